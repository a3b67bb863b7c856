"""A transformers tokenizer built from a GGUF's `tokenizer.ggml.*` metadata.

A GGUF carries no tokenizer.json: it lists the vocabulary, per-token scores
and types, merges and special-token ids under llama.cpp's key names. This
module validates those (metadata is untrusted input), builds a `tokenizers`
backend with `tokenizer_models`, and wraps it in `PreTrainedTokenizerFast`,
so that `tokenizer(text)["input_ids"]` matches what transformers and
llama.cpp produce from the same file, BOS included exactly when the file says.

Token types (llama.cpp's `llama_token_type`): 1 normal, 2 unknown, 3 control,
4 user-defined, 5 unused, 6 byte. Control tokens become special added tokens
and user-defined ones plain added tokens, so both are matched whole in text.

The chat template is not attached to the tokenizer; `chat_template.py`
renders it in a hardened sandbox instead.
"""

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from tandem.errors import GGUFError, UnsupportedError
from tandem.weights import tokenizer_models

CONTROL = 3
USER_DEFINED = 4

# Tokens that end a turn in common chat formats; llama.cpp stops on these too
# when the vocabulary has them, whatever the file's eos id says.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
    "<|return|>",
    "<|call|>",
    "<end_of_utterance>",
)

# Gemma's scores do not follow the order its merges were learned in; the order
# of tokens in the file does (transformers orders Gemma merges the same way).
_FILE_ORDER_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3", "gemma3n", "gemma-embedding"})

_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


class GGUFTokenizer(PreTrainedTokenizerFast):
    """A PreTrainedTokenizerFast that takes its backend as given.

    Passing `tokenizer_object=` makes transformers deep-copy the backend, which
    costs seconds for a 262k-token vocabulary; transformers' own tokenizer
    classes instead set `_tokenizer` before calling the base constructor.
    """

    def __init__(self, *, backend: Tokenizer, **kwargs: Any) -> None:
        self._tokenizer = backend
        super().__init__(**kwargs)


def load_tokenizer(metadata: Mapping[str, Any]) -> PreTrainedTokenizerFast:
    """Build the tokenizer a GGUF describes from its metadata (a dict of plain values).

    Raises UnsupportedError for tokenizer models other than `gpt2` and `llama`
    (or an unknown `gpt2` pre-tokenizer), GGUFError for inconsistent metadata.
    """
    kind = _string(metadata, "tokenizer.ggml.model")
    if kind is None:
        raise GGUFError("GGUF metadata has no tokenizer.ggml.model: the file carries no tokenizer")
    if kind not in ("gpt2", "llama"):
        raise UnsupportedError(f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2, llama")
    tokens = _list(metadata, "tokenizer.ggml.tokens", (str,), "a string")
    if not tokens:
        raise GGUFError("GGUF metadata tokenizer.ggml.tokens is empty")
    types = _list(metadata, "tokenizer.ggml.token_type", (int,), "an integer", len(tokens), required=False)
    special_ids = {name: _token_id(metadata, key, len(tokens)) for name, key in _SPECIAL_IDS.items()}

    if kind == "gpt2":
        spelled = tokenizer_models.byte_level_tokens(tokens)
        vocab = tokenizer_models.vocab_index(spelled)
        merges = _list(metadata, "tokenizer.ggml.merges", (str,), "a string")
        pre = _string(metadata, "tokenizer.ggml.pre") or "default"
        backend = tokenizer_models.build_byte_level_bpe(spelled, vocab, merges, pre)
        default_bos = pre in tokenizer_models.LLAMA3_STYLE_PRE
    else:
        spelled = tokenizer_models.sentencepiece_tokens(tokens)
        vocab = tokenizer_models.vocab_index(spelled)
        scores = _list(
            metadata, "tokenizer.ggml.scores", (int, float), "a number", len(tokens), required=False
        )
        if _string(metadata, "general.architecture") in _FILE_ORDER_ARCHITECTURES or scores is None:
            priority = [-float(index) for index in range(len(tokens))]
        else:
            priority = [float(score) for score in scores]
        unk_id = special_ids["unk_token"]
        backend = tokenizer_models.build_sentencepiece_bpe(
            spelled,
            vocab,
            priority,
            unk_token=spelled[unk_id] if unk_id is not None else None,
            add_space_prefix=_flag(metadata, "tokenizer.ggml.add_space_prefix", True),
        )
        default_bos = True  # llama.cpp's default for SentencePiece vocabularies
    add_bos = _flag(metadata, "tokenizer.ggml.add_bos_token", default_bos)
    add_eos = _flag(metadata, "tokenizer.ggml.add_eos_token", False)

    _add_whole_tokens(backend, tokens, types, vocab)
    names = {}
    for name, token_id in special_ids.items():
        if token_id is None:
            continue
        if vocab[spelled[token_id]] != token_id:
            raise GGUFError(f"GGUF metadata {_SPECIAL_IDS[name]} = {token_id} names a token listed twice")
        names[name] = spelled[token_id]
    for flag, name in ((add_bos, "bos_token"), (add_eos, "eos_token")):
        if flag and name not in names:
            raise GGUFError(f"GGUF metadata asks to add a {name} but has no {_SPECIAL_IDS[name]}")

    tokenizer = GGUFTokenizer(
        backend=backend,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
        **names,
    )
    # Set the post-processor ourselves too: whether the constructor derives it
    # from add_bos_token/add_eos_token has changed between transformers releases.
    tokenizer.backend_tokenizer.post_processor = _post_processor(
        (names.get("bos_token"), special_ids["bos_token"]) if add_bos else None,
        (names.get("eos_token"), special_ids["eos_token"]) if add_eos else None,
    )
    return tokenizer


def eos_token_ids(metadata: Mapping[str, Any], tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Every token id that should stop generation, the file's eos id first.

    That is the eos id, the end-of-turn and end-of-message ids when the file
    names them, and the well-known end-of-turn tokens (`END_OF_TURN_TOKENS`)
    that the vocabulary holds.
    """
    tokens = _list(metadata, "tokenizer.ggml.tokens", (str,), "a string")
    ids = [
        _token_id(metadata, key, len(tokens))
        for key in (
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        )
    ]
    if ids[0] is None:
        ids[0] = tokenizer.eos_token_id
    wanted = set(END_OF_TURN_TOKENS)
    ids += [index for index, token in enumerate(tokens) if token in wanted]
    return list(dict.fromkeys(token_id for token_id in ids if token_id is not None))


def _add_whole_tokens(
    backend: Tokenizer, tokens: list[str], types: list[int] | None, vocab: dict[str, int]
) -> None:
    """Make control tokens special added tokens and user-defined ones plain added tokens.

    Added tokens are matched in the raw text before the model splits it, which
    is how llama.cpp treats both kinds. A token is only added under the exact
    string the vocabulary maps to its own id, or the tokenizer would grow new ids.
    """
    if types is None:
        return
    control, user = [], []
    for index, (token, token_type) in enumerate(zip(tokens, types, strict=True)):
        # A token the model had to respell (byte-level tokens outside the byte
        # alphabet, Gemma's runs of spaces) is left to the model itself.
        if token_type not in (CONTROL, USER_DEFINED) or not token or vocab.get(token) != index:
            continue
        (control if token_type == CONTROL else user).append(token)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in user])


def _post_processor(
    bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> processors.TemplateProcessing:
    def sequence(name: str, type_id: int) -> list[str]:
        head = [f"{bos[0]}:{type_id}"] if bos else []
        tail = [f"{eos[0]}:{type_id}"] if eos else []
        return [*head, f"${name}:{type_id}", *tail]

    special = list(dict.fromkeys(token for token in (bos, eos) if token is not None))
    return processors.TemplateProcessing(
        single=sequence("A", 0), pair=sequence("A", 0) + sequence("B", 1), special_tokens=special
    )


def _string(metadata: Mapping[str, Any], key: str) -> str | None:
    value = metadata.get(key)
    if value is not None and not isinstance(value, str):
        raise GGUFError(f"GGUF metadata {key} should be a string, not {type(value).__name__}")
    return value


def _flag(metadata: Mapping[str, Any], key: str, default: bool) -> bool:
    value = metadata.get(key, default)
    if not isinstance(value, bool):
        raise GGUFError(f"GGUF metadata {key} should be a boolean, not {type(value).__name__}")
    return value


def _token_id(metadata: Mapping[str, Any], key: str, n_tokens: int) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise GGUFError(f"GGUF metadata {key} should be a token id, not {type(value).__name__}")
    if not 0 <= value < n_tokens:
        raise GGUFError(f"GGUF metadata {key} = {value} is outside the vocabulary of {n_tokens} tokens")
    return int(value)


def _list(
    metadata: Mapping[str, Any],
    key: str,
    kinds: tuple[type, ...],
    kind_name: str,
    length: int | None = None,
    required: bool = True,
) -> list | None:
    value = metadata.get(key)
    if value is None:
        if required:
            raise GGUFError(f"GGUF metadata has no {key}")
        return None
    if hasattr(value, "tolist"):  # a numpy array from a reader that keeps arrays as arrays
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise GGUFError(f"GGUF metadata {key} should be an array, not {type(value).__name__}")
    if length is not None and len(value) != length:
        raise GGUFError(
            f"GGUF metadata {key} has {len(value)} entries but tokenizer.ggml.tokens has {length}"
        )
    # Exact type checks: fast on 262k-entry arrays, and they refuse bools as numbers.
    for index, item in enumerate(value):
        if type(item) not in kinds:
            raise GGUFError(f"GGUF metadata {key}[{index}] should be {kind_name}, not {type(item).__name__}")
    return list(value)
