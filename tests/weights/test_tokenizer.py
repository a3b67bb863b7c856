"""load_tokenizer against transformers' own GGUF tokenizer on both real models, and untrusted metadata.

Parity means identical input_ids (with and without special tokens) and identical
decoded text; transformers builds its reference from the same file with its own
GGUF conversion code, which tandem does not use.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tandem.errors import GGUFError, TandemError, UnsupportedError
from tandem.weights.gguf_file import read_metadata
from tandem.weights.tokenizer import eos_token_ids, load_tokenizer
from tandem.weights.tokenizer_models import byte_alphabet

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "a  b   c    d",
    "你好，世界！这是一个测试。",
    "日本語のテキストと한국어",
    "def fib(n):\n    if n < 2:\n\treturn n\n    return fib(n - 1) + fib(n - 2)  # recursion\n",
    'for (int i = 0; i < 10; ++i) {\n        printf("%d\\n", i);\n}\n',
    "\tTabs\tand\r\nwindows line ends\r\n",
    "\n\n\nblank lines\n\n",
    "Émojis 😀🎉👍🏽 and accents: ñ ü ß ø",
    "ελληνικά русский العربية हिन्दी ᚠᛇᚻ",
    "12345 678901234 3.14159 1,000,000 -42 0x1F",
    "don't you'll I'M we've",
    "no\u00a0break zero\u200bwidth",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "<tool_call>{}</tool_call> <table><tr><td>x</td></tr></table>",
    "<bos>text<eos> <unk> <pad>",
    "<0x41> is not a byte here",
    "",
    " ",
]


@pytest.fixture(scope="module", params=["qwen", "gemma"])
def pair(request):
    """(name, metadata, tandem tokenizer, transformers reference) for one real model, one at a time."""
    path = request.getfixturevalue(f"{request.param}_gguf")
    metadata = read_metadata(path)
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    yield request.param, metadata, load_tokenizer(metadata), reference
    del reference


@pytest.mark.parametrize("text", TEXTS)
def test_input_ids_match_transformers(pair, text):
    _, _, ours, reference = pair
    for special in (True, False):
        assert (
            ours(text, add_special_tokens=special)["input_ids"]
            == reference(text, add_special_tokens=special)["input_ids"]
        ), (text, special)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(pair, text):
    _, _, ours, reference = pair
    ids = reference(text)["input_ids"]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def test_vocabulary_and_special_ids_match(pair):
    _, _, ours, reference = pair
    assert len(ours) == len(reference)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(reference, name), name


def test_bos_is_added_exactly_when_the_file_says(pair):
    name, metadata, ours, _ = pair
    ids = ours("hello")["input_ids"]
    if name == "gemma":
        assert metadata["tokenizer.ggml.add_bos_token"] is True
        assert ids[0] == ours.bos_token_id == 2
    else:
        assert metadata["tokenizer.ggml.add_bos_token"] is False
        assert ours.bos_token_id not in ids
    assert ours("hello", add_special_tokens=False)["input_ids"] == ids[1 if name == "gemma" else 0 :]


def test_special_tokens_in_text_are_single_tokens(pair):
    name, _, ours, _ = pair
    token = "<|im_start|>" if name == "qwen" else "<start_of_turn>"
    ids = ours(f"x{token}y", add_special_tokens=False)["input_ids"]
    assert ours.convert_tokens_to_ids(token) in ids
    assert len(ours(token, add_special_tokens=False)["input_ids"]) == 1


def test_eos_token_ids(pair):
    name, metadata, ours, _ = pair
    expected = {"qwen": [151645, 151643], "gemma": [1, 106]}[
        name
    ]  # <|im_end|>, <|endoftext|> / <eos>, <end_of_turn>
    assert eos_token_ids(metadata, ours) == expected


# ---- small synthetic vocabularies


def _gpt2_metadata(**changes):
    alphabet = list(byte_alphabet().values())
    tokens = [
        *alphabet,
        "he",
        "ll",
        "hell",
        "hello",
        "Ġw",
        "Ġwor",
        "Ġworld",
        "or",
        "ld",
        "<|end|>",
        "<think>",
    ]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
    types = [1] * (len(tokens) - 2) + [3, 4]
    metadata = {
        "general.architecture": "qwen2",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": tokens.index("<|end|>"),
    }
    metadata.update(changes)
    return {k: v for k, v in metadata.items() if v is not None}


def _llama_metadata(**changes):
    words = ["▁", "h", "e", "l", "o", "he", "ll", "▁he", "llo", "▁hello"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *words]
    scores = [0.0] * 259 + [-float(i) for i in range(len(words))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    metadata = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    metadata.update(changes)
    return {k: v for k, v in metadata.items() if v is not None}


def test_small_byte_level_vocabulary():
    tok = load_tokenizer(_gpt2_metadata())
    ids = tok("hello world<|end|><think>")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["hello", "Ġworld", "<|end|>", "<think>"]
    assert tok.decode(ids) == "hello world<|end|><think>"
    assert tok.decode(ids, skip_special_tokens=True) == "hello world<think>"


def test_llama3_pre_tokenizer_adds_bos_by_default():
    metadata = _gpt2_metadata(**{"tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.bos_token_id": 0})
    assert load_tokenizer(metadata)("hello")["input_ids"][0] == 0


def test_small_sentencepiece_vocabulary():
    tok = load_tokenizer(_llama_metadata())
    ids = tok("hello €")["input_ids"]
    # BOS by default, a prefix space, then "€" (not in the vocabulary) as its three UTF-8 bytes.
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁hello", "▁", "<0xE2>", "<0x82>", "<0xAC>"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello €"
    no_prefix = load_tokenizer(_llama_metadata(**{"tokenizer.ggml.add_space_prefix": False}))
    assert no_prefix.convert_ids_to_tokens(no_prefix("hello", add_special_tokens=False)["input_ids"]) == [
        "he",
        "llo",
    ]


def test_add_eos_token_appends_eos():
    tok = load_tokenizer(_llama_metadata(**{"tokenizer.ggml.add_eos_token": True}))
    assert tok("hello")["input_ids"][-1] == 2


BAD_METADATA = {
    "no tokenizer model": (_gpt2_metadata(**{"tokenizer.ggml.model": None}), GGUFError),
    "unsupported model": (_gpt2_metadata(**{"tokenizer.ggml.model": "bert"}), UnsupportedError),
    "model not a string": (_gpt2_metadata(**{"tokenizer.ggml.model": 7}), GGUFError),
    "unknown pre-tokenizer": (_gpt2_metadata(**{"tokenizer.ggml.pre": "mystery"}), UnsupportedError),
    "no tokens": (_gpt2_metadata(**{"tokenizer.ggml.tokens": None}), GGUFError),
    "empty tokens": (
        _llama_metadata(**{"tokenizer.ggml.tokens": [], "tokenizer.ggml.scores": []}),
        GGUFError,
    ),
    "tokens not an array": (_gpt2_metadata(**{"tokenizer.ggml.tokens": "abc"}), GGUFError),
    "non-string token": (_llama_metadata(**{"tokenizer.ggml.tokens": ["<unk>", 5, *["x"] * 266]}), GGUFError),
    "scores too short": (_llama_metadata(**{"tokenizer.ggml.scores": [0.0] * 10}), GGUFError),
    "score not a number": (_llama_metadata(**{"tokenizer.ggml.scores": ["a"] * 269}), GGUFError),
    "token types too long": (_llama_metadata(**{"tokenizer.ggml.token_type": [1] * 1000}), GGUFError),
    "bool as token type": (_llama_metadata(**{"tokenizer.ggml.token_type": [True] * 269}), GGUFError),
    "bos id out of range": (_llama_metadata(**{"tokenizer.ggml.bos_token_id": 10**6}), GGUFError),
    "negative eos id": (_llama_metadata(**{"tokenizer.ggml.eos_token_id": -1}), GGUFError),
    "bool as unk id": (_llama_metadata(**{"tokenizer.ggml.unknown_token_id": True}), GGUFError),
    "no merges": (_gpt2_metadata(**{"tokenizer.ggml.merges": None}), GGUFError),
    "merge of unknown tokens": (_gpt2_metadata(**{"tokenizer.ggml.merges": ["h e", "q z"]}), GGUFError),
    "merge without a space": (_gpt2_metadata(**{"tokenizer.ggml.merges": ["he"]}), GGUFError),
    "add_bos without bos id": (_gpt2_metadata(**{"tokenizer.ggml.add_bos_token": True}), GGUFError),
    "add_bos not a bool": (_llama_metadata(**{"tokenizer.ggml.add_bos_token": "yes"}), GGUFError),
}


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_bad_metadata_is_one_clear_error(case):
    metadata, error = BAD_METADATA[case]
    with pytest.raises(error) as caught:
        load_tokenizer(metadata)
    assert isinstance(caught.value, TandemError)
    assert "\n" not in str(caught.value) and str(caught.value)


def test_eos_token_ids_validates_ids():
    metadata = _gpt2_metadata(**{"tokenizer.ggml.eot_token_id": 10**9})
    tok = load_tokenizer(_gpt2_metadata())
    with pytest.raises(GGUFError):
        eos_token_ids(metadata, tok)
    assert eos_token_ids(_gpt2_metadata(), tok) == [tok.convert_tokens_to_ids("<|end|>")]
