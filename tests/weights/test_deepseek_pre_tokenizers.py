"""DeepSeek's pre-tokenizers (`tokenizer.ggml.pre` deepseek-llm, deepseek-coder, deepseek-v3) split
text as llama.cpp's regex lists do: each regex splits the pieces the previous one left."""

from __future__ import annotations

import pytest
from tokenizers import Regex, pre_tokenizers

from tandem.weights.tokenizer_models import PRE_TOKENIZER_REGEXES

TEXT = "Hello world, 12345 你好\n  x"
EXPECTED = {
    # digits: one run (llm), one by one (coder), groups of three (v3)
    "deepseek-llm": ["Hello", " world", ",", " ", "12345", " ", "你好", "\n", " ", " x"],
    "deepseek-coder": ["Hello", " world", ",", " ", "1", "2", "3", "4", "5", " ", "你好", "\n", " ", " x"],
    "deepseek-v3": ["Hello", " world", ",", " ", "123", "45", " ", "你好", "\n", " ", " x"],
}


@pytest.mark.parametrize("pre", sorted(EXPECTED))
def test_deepseek_pre_tokenizer_splits(pre):
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_REGEXES[pre]]
    pieces = [piece for piece, _ in pre_tokenizers.Sequence(splits).pre_tokenize_str(TEXT)]
    assert pieces == EXPECTED[pre]
    assert "".join(pieces) == TEXT
