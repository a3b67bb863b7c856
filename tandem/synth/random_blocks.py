"""Random quantized blocks whose values look like a freshly initialized model's.

Quant bits are raw random bytes; only the scale fields are overwritten, with
fp16 scales chosen so that each dequantized weight has a standard deviation of
about `WEIGHT_STD` (a typical init) and every value is finite. For K-quants the
6-bit sub-block scales lie in [32, 63] and the sub-block mins equal them, with
dmin set so each sub-block is centred on zero (value = d*sc*(q - q_mid)).

Speed: a multi-GB file cannot be drawn value by value on two cores, so each
tensor is a rotation of one random template of ~8 MiB of blocks per type
(rotated by a random whole number of blocks, so tensors differ): generating a
tensor costs nothing beyond writing it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tandem.errors import UnsupportedError

T = GGMLQuantizationType
WEIGHT_STD = 0.02
TEMPLATE_BYTES = 8 << 20

# RMS of the integer factor each type multiplies by its scale, for uniformly random bits:
# (q - 8) over 0..15, (q - 16) over 0..31, int8 over -128..127.
_RMS_Q4 = float(np.sqrt(np.mean((np.arange(16) - 8.0) ** 2)))
_RMS_Q5 = float(np.sqrt(np.mean((np.arange(32) - 16.0) ** 2)))
_RMS_Q8 = float(np.sqrt(np.mean(np.arange(-128, 128, dtype=np.float64) ** 2)))
_RMS_Q6 = float(np.sqrt(np.mean((np.arange(64) - 32.0) ** 2)))
_KSC_LO, _KSC_HI = 32, 64  # K-quant 6-bit sub-block scales
_RMS_KSC = float(np.sqrt(np.mean(np.arange(_KSC_LO, _KSC_HI, dtype=np.float64) ** 2)))
_Q6SC_LO, _Q6SC_HI = 16, 64  # Q6_K int8 sub-block scales
_RMS_Q6SC = float(np.sqrt(np.mean(np.arange(_Q6SC_LO, _Q6SC_HI, dtype=np.float64) ** 2)))

SUPPORTED = (T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K)


def random_blocks(
    ggml_type: GGMLQuantizationType, n_blocks: int, rng: np.random.Generator, std: float = WEIGHT_STD
) -> np.ndarray:
    """uint8 [n_blocks, type_size]: random blocks of `ggml_type` with values of about `std`."""
    block, size = GGML_QUANT_SIZES[ggml_type]
    if ggml_type in (T.F32, T.F16):
        values = rng.standard_normal(n_blocks * block, dtype=np.float32) * np.float32(std)
        dtype = "<f4" if ggml_type == T.F32 else "<f2"
        return values.astype(dtype).view(np.uint8).reshape(n_blocks, size)
    if ggml_type not in SUPPORTED:
        raise UnsupportedError(f"synth cannot make random {ggml_type.name} blocks")
    b = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    # Per-block scale jitter keeps blocks from being identical up to their bits.
    jitter = rng.uniform(0.8, 1.25, n_blocks)

    def put_f16(col: int, values: np.ndarray) -> None:
        b[:, col : col + 2] = values.astype("<f2").view(np.uint8).reshape(n_blocks, 2)

    if ggml_type in (T.Q4_0, T.Q5_0, T.Q8_0):
        rms = {T.Q4_0: _RMS_Q4, T.Q5_0: _RMS_Q5, T.Q8_0: _RMS_Q8}[ggml_type]
        put_f16(0, std / rms * jitter)
    elif ggml_type in (T.Q4_1, T.Q5_1):
        # value = d*q + m; m = -mid*d centres the block like Q4_0 / Q5_0.
        rms, mid = (_RMS_Q4, 8.0) if ggml_type == T.Q4_1 else (_RMS_Q5, 16.0)
        d = std / rms * jitter
        put_f16(0, d)
        put_f16(2, -mid * d)
    elif ggml_type in (T.Q4_K, T.Q5_K):
        rms, mid = (_RMS_Q4, 7.5) if ggml_type == T.Q4_K else (_RMS_Q5, 15.5)
        d = std / (rms * _RMS_KSC) * jitter
        put_f16(0, d)
        put_f16(2, mid * d)  # dmin: value = d*sc*q - dmin*m with m = sc
        sc = rng.integers(_KSC_LO, _KSC_HI, size=(n_blocks, 8), dtype=np.uint8)
        b[:, 4:16] = _pack_k_scales(sc, sc)
    else:  # Q6_K: ql[128] qh[64] scales int8[16] d
        d = std / (_RMS_Q6 * _RMS_Q6SC) * jitter
        b[:, 192:208] = rng.integers(_Q6SC_LO, _Q6SC_HI, size=(n_blocks, 16), dtype=np.uint8)
        put_f16(208, d)
    return b


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and mins [n, 8] into ggml's 12-byte K-quant layout
    (the inverse of get_scale_min_k4)."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return out


class BlockSource:
    """Streams random tensors of any supported type from one template per type."""

    def __init__(self, seed: int = 0, template_bytes: int = TEMPLATE_BYTES) -> None:
        self._rng = np.random.default_rng(seed)
        self._template_bytes = template_bytes
        self._templates: dict[GGMLQuantizationType, np.ndarray] = {}

    def template(self, ggml_type: GGMLQuantizationType) -> np.ndarray:
        """The flat uint8 template of `ggml_type` (a whole number of blocks)."""
        tpl = self._templates.get(ggml_type)
        if tpl is None:
            size = GGML_QUANT_SIZES[ggml_type][1]
            tpl = random_blocks(ggml_type, max(1, self._template_bytes // size), self._rng).reshape(-1)
            self._templates[ggml_type] = tpl
        return tpl

    def chunks(self, ggml_type: GGMLQuantizationType, n_bytes: int) -> Iterator[memoryview]:
        """`n_bytes` of blocks (a whole number of them) as zero-copy slices of the template."""
        size = GGML_QUANT_SIZES[ggml_type][1]
        if n_bytes % size:
            raise ValueError(f"{n_bytes} bytes is not a whole number of {ggml_type.name} blocks")
        tpl = memoryview(self.template(ggml_type))
        n_tpl_blocks = len(tpl) // size
        pos = int(self._rng.integers(0, n_tpl_blocks)) * size
        left = n_bytes
        while left:
            take = min(left, len(tpl) - pos)
            yield tpl[pos : pos + take]
            left -= take
            pos = 0

    def values(self, shape: tuple[int, ...], kind: str) -> np.ndarray:
        """A small F32 tensor: norms (about 1), router weights, expert biases."""
        n = 1
        for d in shape:
            n *= d
        if kind == "norm":
            # near 1 like a trained RMSNorm gain, but not exactly (a test can see it was written)
            return (1.0 + 0.01 * self._rng.standard_normal(n, dtype=np.float32)).astype("<f4")
        if kind == "bias":
            return (0.001 * self._rng.standard_normal(n, dtype=np.float32)).astype("<f4")
        return (WEIGHT_STD * self._rng.standard_normal(n, dtype=np.float32)).astype("<f4")
