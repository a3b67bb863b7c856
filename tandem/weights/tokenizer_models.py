"""The two tokenizer models a GGUF can describe, built as `tokenizers` backends.

`tokenizer.py` validates the metadata and hands plain lists here; this module
only knows how to turn a vocabulary into a `tokenizers.Tokenizer`:

- `gpt2`: byte-level BPE with the file's merges; text is first split by a
  regex that llama.cpp picks from `tokenizer.ggml.pre`.
- `llama`: SentencePiece-style BPE. The file has scores but usually no merges,
  so merges are derived from the vocabulary; spaces become `▁` and characters
  the vocabulary lacks fall back to `<0xNN>` byte tokens.
"""

from collections.abc import Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from tandem.errors import GGUFError, UnsupportedError

SPACE_MARK = "\u2581"  # "▁": how SentencePiece spells a space inside tokens

# Pre-tokenizer regexes, as llama.cpp's `llm_tokenizer_bpe` lists them per
# `tokenizer.ggml.pre` (they come from each model's own tokenizer.json). Several
# regexes in one entry are applied one after another, each splitting the pieces
# the previous one left. `None` means GPT-2's own regex, which the ByteLevel
# pre-tokenizer applies itself.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# DeepSeek's own splits (llama.cpp's llm_tokenizer_bpe; from their tokenizer.json files).
# deepseek-llm's letter class lists the cased letters of its Unicode version explicitly
# (as code points: several of them have look-alikes).
_DEEPSEEK_LLM_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5"
    "\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a"
    "\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3"
    "\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115"
    "\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149"
    "\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_DEEPSEEK_LLM = (
    r"[\r\n]",
    r"\s?[" + _DEEPSEEK_LLM_LETTERS + "]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    r"\p{N}+",
)
_DEEPSEEK_CODER = (
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    r"\p{N}",
)
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)

PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...] | None] = {
    # Older conversions without a specific pre-tokenizer write "default"; their
    # vocabularies are GPT-2-like, and transformers reads them with GPT-2's regex.
    "default": None,
    "gpt-2": None,
    "phi-2": None,
    "mpt": None,
    "olmo": None,
    "llama3": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "llama-bpe": (_LLAMA3,),
    "falcon3": (_LLAMA3,),
    "falcon-h1": (_LLAMA3,),
    "pixtral": (_LLAMA3,),
    "dbrx": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,),
    "chatglm-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "qwen2.5": (_QWEN2,),
    "deepseek-r1-qwen": (_QWEN2,),
    "stablelm2": (_QWEN2,),
    "hunyuan": (_QWEN2,),
    "qwen35": (_QWEN35,),
    "starcoder": (r"\p{N}", _GPT2),
    "refact": (r"\p{N}", _GPT2),
    "command-r": (r"\p{N}", _GPT2),
    "smollm": (r"\p{N}", _GPT2),
    "codeshell": (r"\p{N}", _GPT2),
    "exaone": (r"\p{N}", _GPT2),
    "tekken": (_TEKKEN,),
    "gpt-4o": (_GPT4O,),
    "llama4": (_GPT4O,),
    "minimax-m2": (_GPT4O,),
    "deepseek-llm": _DEEPSEEK_LLM,
    "deepseek-coder": _DEEPSEEK_CODER,
    "deepseek-v3": _DEEPSEEK_V3,
}

# For these llama.cpp keeps a pre-tokenized word whole when it is already a
# token (`ignore_merges`, as their tokenizer.json files ask) and adds BOS
# unless the file says otherwise.
LLAMA3_STYLE_PRE = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "tekken"})


def byte_alphabet() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character that spells it in a byte-level vocabulary.

    Printable Latin-1 bytes stand for themselves; the rest (controls, space,
    0x7F-0xA0, 0xAD) are moved to code points from 256 up, in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    spelling = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in spelling:
            spelling[byte] = chr(256 + shifted)
            shifted += 1
    return spelling


def vocab_index(tokens: Sequence[str]) -> dict[str, int]:
    # A string listed twice keeps its last id, as in llama.cpp's token_to_id map.
    return {token: index for index, token in enumerate(tokens)}


def byte_level_tokens(tokens: Sequence[str]) -> list[str]:
    """The tokens as the byte-level BPE model spells them.

    A converter sometimes stores an added token in plain text (with a space or
    a CJK character, say); spelling it byte by byte keeps it reachable.
    """
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    return [
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
        for token in tokens
    ]


def build_byte_level_bpe(
    tokens: Sequence[str], vocab: dict[str, int], merges: Sequence[str], pre: str
) -> Tokenizer:
    """Byte-level BPE from the file's merges, pre-tokenized as llama.cpp does for `pre`."""
    if pre not in PRE_TOKENIZER_REGEXES:
        raise UnsupportedError(
            f"GGUF tokenizer pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(PRE_TOKENIZER_REGEXES))}"
        )
    pairs = []
    for index, merge in enumerate(merges):
        # llama.cpp splits at the first space after the first character, so a
        # merge whose left part is a lone space still parses.
        cut = merge.find(" ", 1)
        left, right = merge[:cut], merge[cut + 1 :]
        if cut < 0 or left not in vocab or right not in vocab or left + right not in vocab:
            raise GGUFError(
                f"GGUF tokenizer merge #{index} {merge!r} is not two vocabulary tokens that join into a third"
            )
        pairs.append((left, right))
    model = models.BPE(
        vocab=vocab,
        merges=pairs,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=pre in LLAMA3_STYLE_PRE,
    )
    tokenizer = Tokenizer(model)
    regexes = PRE_TOKENIZER_REGEXES[pre]
    if regexes is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        splits = [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in regexes]
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def sentencepiece_tokens(tokens: Sequence[str]) -> list[str]:
    """The tokens as the SentencePiece-style model spells them.

    Gemma stores its runs-of-spaces tokens with real spaces, while the text
    reaching the model has every space turned into `▁`; respelling them is what
    lets BPE produce them.
    """
    return [SPACE_MARK * len(token) if token and not token.strip(" ") else token for token in tokens]


def derive_merges(
    tokens: Sequence[str], vocab: dict[str, int], priority: Sequence[float]
) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best first: BPE merges implied by the vocabulary.

    SentencePiece BPE joins, at each step, the adjacent pair whose union has
    the best score; as an ordered merge list that is "merges producing better
    tokens first". `priority[i]` ranks token i (higher joins first). Ties go to
    the longer left part, then the longer right part, then vocabulary order,
    which is how transformers orders them.
    """
    known = vocab.__contains__
    ranked = []
    for index, token in enumerate(tokens):
        length = len(token)
        if length < 2 or vocab.get(token) != index:
            continue  # a duplicate spelling: only the id the vocabulary keeps can be produced
        rank = -priority[index]
        for cut in range(length - 1, 0, -1):
            if known(token[:cut]) and known(token[cut:]):
                # (rank, longer left, longer right, index) is unique per entry,
                # so sorting never falls through to comparing the strings.
                ranked.append((rank, -cut, cut - length, index, token[:cut], token[cut:]))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_sentencepiece_bpe(
    tokens: Sequence[str],
    vocab: dict[str, int],
    priority: Sequence[float],
    unk_token: str | None,
    add_space_prefix: bool,
) -> Tokenizer:
    """SentencePiece-style BPE with byte fallback, spaces spelled `▁`."""
    model = models.BPE(
        vocab=vocab,
        merges=derive_merges(tokens, vocab, priority),
        dropout=None,
        unk_token=unk_token,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    # prepend_scheme "first" adds the prefix space once, at the start of the
    # text, as transformers' (non-legacy) Llama tokenizer does; llama.cpp also
    # adds one after each special token written in the text.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPACE_MARK, prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer
