"""Tiny tokenizers and models for the engine tests, built in memory (no downloads).

Helpers are handed out as fixtures, not imported, so that this file never collides
with another folder's conftest module.
"""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# A few merges so that some tokens span several characters and a stop string can
# straddle token boundaries; everything else (é, ✓ ...) falls back to single bytes.
_MERGES = [("h", "e"), ("l", "l"), ("Ġ", "w"), ("o", "r"), ("Ġ", "<"), ("Ġ", "t"), ("s", "t")]


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<s>": 0, "</s>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    for a, b in _MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-like: words carry a leading '▁' that the decoder drops at the start of a text."""
    words = ["<unk>", "▁The", "▁capital", "▁is", "▁Paris", "▁and"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        # A wider init than the default 0.02 gives peaked, varied logits, so greedy
        # output does not collapse into one repeated token.
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    return _byte_tokenizer()


@pytest.fixture(scope="session")
def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    return _metaspace_tokenizer()


@pytest.fixture(scope="session")
def make_tiny_llama():
    """Builds a tiny Llama for a vocabulary size and seed."""
    return _tiny_llama


@pytest.fixture(scope="session")
def tiny_model(byte_tokenizer) -> LlamaForCausalLM:
    return _tiny_llama(len(byte_tokenizer))
