// System headers and small helpers every kernel file uses. Included once per
// variant translation unit, before the variant's namespace opens, so the
// per-type .inc files can be included inside that namespace.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "kernels/kernel_api.h"

namespace tandem::detail {

// IEEE half to float, exact (subnormals, infinities and NaN included).
inline float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else {  // subnormal: renormalize
            exponent = 127 - 15 + 1;
            while ((mantissa & 0x400u) == 0) {
                mantissa <<= 1;
                --exponent;
            }
            bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
        }
    } else if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

inline float bf16_to_fp32(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

// GGUF blocks are packed structs with no alignment promise: read fields by memcpy.
inline uint16_t load_u16(const uint8_t* p) {
    uint16_t v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline float load_fp16(const uint8_t* p) { return fp16_to_fp32(load_u16(p)); }

// Q4_K / Q5_K: scale and min of sub-block j (0..7) from the 12 packed bytes.
// Bytes 0-3 and 4-7 hold scales and mins 0-3 in their low six bits; scales and
// mins 4-7 take their low four bits from the nibbles of bytes 8-11 and their
// top two bits from the top of bytes 0-3 (scales) and 4-7 (mins).
inline void kq_scale_min(const uint8_t* s, int j, int* sc, int* m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Decode streams every weight once: a one-token kernel asks for the bytes
// decode_prefetch ahead of the block it works on (rows are contiguous, so that
// is a later row of the same matrix) while it computes, which the out-of-order
// window alone does not reach far enough ahead to do. 0 turns it off; the engine
// sets it (tandem/cpu/engine.py, TANDEM_CPU_PREFETCH).
// decode_prefetch_level: which cache the lines go to (0: every level, prefetcht0; 1: L2
// and beyond, prefetcht1; 2: the last level, prefetcht2), TANDEM_CPU_PREFETCH_LEVEL.
inline size_t decode_prefetch = 2048;
inline int decode_prefetch_level = 0;
// Whether the one-token kernels that have a 512-bit form take it (Q4_K's, Q5_K's, Q6_K's and the
// 32-value block types', where the variant has AVX-512 BW and VNNI); false keeps their 256-bit
// loops. TANDEM_CPU_DECODE_WIDE.
inline bool decode_wide_on = true;
// How many streams of rows the one-token kernels walk side by side (row_streams.inc), 1-8.
// TANDEM_CPU_DECODE_STREAMS.
inline int decode_streams_n = 4;
template <int Locality>  // __builtin_prefetch's: 3 = prefetcht0, 2 = prefetcht1, 1 = prefetcht2
inline void prefetch_lines(const uint8_t* p, size_t bytes) {
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, Locality);
}
inline void prefetch_ahead(const uint8_t* block, size_t bytes) {
    const size_t ahead = decode_prefetch;
    if (ahead == 0) return;
    switch (decode_prefetch_level) {
        case 1: return prefetch_lines<2>(block + ahead, bytes);
        case 2: return prefetch_lines<1>(block + ahead, bytes);
        default: return prefetch_lines<3>(block + ahead, bytes);
    }
}

// AMX's tile configuration (palette 1): per tile register, bytes per row and rows.
struct alignas(64) AmxTileConfig {
    uint8_t palette = 1, start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};
static_assert(sizeof(AmxTileConfig) == 64, "AMX tile configuration layout");

// Tiles 0-7 of 16 rows × 64 bytes. Load it with _tile_loadconfig(&kAmxTiles16x64): a
// configuration built in a local before the load is not safe, since GCC 12 can drop the
// stores into it as dead (it kept the palette and lost the sizes: every tile
// instruction then faulted).
constexpr AmxTileConfig amx_tiles_16x64() {
    AmxTileConfig c{};
    for (int i = 0; i < 8; ++i) {
        c.colsb[i] = 64;
        c.rows[i] = 16;
    }
    return c;
}
alignas(64) inline constexpr AmxTileConfig kAmxTiles16x64 = amx_tiles_16x64();

}  // namespace tandem::detail
