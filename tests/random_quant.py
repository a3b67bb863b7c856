"""Random GGUF blocks for tests: every quant bit random, float fields finite.

Blocks are random bytes, so every code (nibble, 2-bit plane, high bit, 6-bit
scale) takes every value; only the float16 scale fields are overwritten with
finite random values, because a NaN or Inf there would make a comparison
meaningless.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

# Byte offsets of the float16 fields (d, dmin, m) in each block, from ggml's block_* structs.
SCALE_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
    T.IQ4_XS: [0],
}
# Float types: the integer word of one value and its exponent mask (all ones = Inf/NaN).
FLOAT_TYPES = {T.F32: (np.uint32, 0x7F800000), T.F16: (np.uint16, 0x7C00), T.BF16: (np.uint16, 0x7F80)}
REQUIRED = sorted(set(SCALE_FIELDS) | set(FLOAT_TYPES))


def random_blocks(ggml_type: T, n_blocks: int, seed: int = 0, max_exponent: int = 4) -> np.ndarray:
    """uint8 [n_blocks, type_size]: random bytes with finite float fields."""
    rng = np.random.default_rng(seed)
    _, type_size = GGML_QUANT_SIZES[ggml_type]
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    if ggml_type in FLOAT_TYPES:
        word, exp_mask = FLOAT_TYPES[ggml_type]
        bits = raw.view(word)  # [n_blocks, 1]
        # Clear the top exponent bit of Inf/NaN patterns; zeros, subnormals and signs stay.
        top_bit = word(exp_mask & ~(exp_mask >> 1))
        bits[(bits & exp_mask) == exp_mask] ^= top_bit
        return raw
    for offset in SCALE_FIELDS[ggml_type]:
        # Both signs, magnitudes from float16 subnormals up to ~30.
        scale = rng.standard_normal(n_blocks) * 2.0 ** rng.integers(-14, max_exponent, n_blocks)
        raw[:, offset : offset + 2] = scale.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw
