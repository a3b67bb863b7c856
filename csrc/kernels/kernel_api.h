// The contract between the CPU engine's ops and its kernels.
//
// A kernel dots rows of one GGUF weight type with activation rows that were
// prepared for that type: quantized to 8-bit blocks (the integer units do the
// multiply-adds, and a weight row is read once for all tokens), or left float32
// for float weights. Every variant (generic, avx2, avx512, amx) fills the same
// table; the op picks the table once, at engine creation, from the CPU features.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tandem {

// ggml's type numbers (ggml.h enum ggml_type), the numbering GGUF files carry.
enum GGMLType : int {
    GGML_F32 = 0,
    GGML_F16 = 1,
    GGML_Q4_0 = 2,
    GGML_Q4_1 = 3,
    GGML_Q5_0 = 6,
    GGML_Q5_1 = 7,
    GGML_Q8_0 = 8,
    GGML_Q2_K = 10,
    GGML_Q3_K = 11,
    GGML_Q4_K = 12,
    GGML_Q5_K = 13,
    GGML_Q6_K = 14,
    GGML_BF16 = 30,
};

// How a weight type wants its activations.
enum class ActFormat : int {
    F32 = 0,     // float32 as is: float weights (F32, F16, BF16)
    Q8_32 = 1,   // ActQ8_32 blocks: the 32-element legacy quants (Q4_0 ... Q8_0)
    Q8_256 = 2,  // ActQ8_256 blocks: the K-quants (super-blocks of 256)
};

// x[i] ≈ d * qs[i] for 32 elements; sum = Σ qs (lets a kernel fold a weight
// offset such as Q4_0's -8 or Q4_1's min into one multiply per block).
struct ActQ8_32 {
    float d;
    int32_t sum;
    int8_t qs[32];
};
static_assert(sizeof(ActQ8_32) == 40, "ActQ8_32 layout");

// x[i] ≈ d * qs[i] for 256 elements; bsums[j] = Σ qs[16j .. 16j+15] (the
// K-quants' mins and offsets apply per 16 or 32 elements).
struct ActQ8_256 {
    float d;
    int16_t bsums[16];
    int8_t qs[256];
};
static_assert(sizeof(ActQ8_256) == 292, "ActQ8_256 layout");

// Quantization rule shared by every variant and by the torch reference
// (tandem/cpu/reference.py), so that they agree bit for bit on the activations:
//   amax = max |x| over the block; d = amax / 127; id = amax ? 127 / amax : 0;
//   qs[i] = round_half_even(x[i] * id)   (float32 multiply, no FMA)
using QuantizeRowFn = void (*)(const float* x, int64_t k, uint8_t* out);

// out[t * out_stride + r] = Σ_c W[r, c] · x_t[c] for r < n_rows, t < n_tok.
// w: n_rows rows of row_bytes bytes (GGUF blocks, row r at w + r * row_bytes).
// act: n_tok prepared rows, act_row_bytes apart, k elements each.
// k is a multiple of the type's block size (the op checks before calling).
using DotRowsFn = void (*)(const uint8_t* w, size_t row_bytes, int64_t n_rows, int64_t k,
                           const uint8_t* act, size_t act_row_bytes, int64_t n_tok, float* out,
                           int64_t out_stride);

// A faster way to many tokens, where a kernel has one (the amx variant's Q4_K and
// Q5_K): the call's activations are rewritten once into the kernel's own operand
// form, in groups of kLaidOutGroup tokens, and every row tile of the call dots
// against that. dot_rows alone rewrites its tokens on every call, and an op calls
// it once per (row tile, token tile). A token's outputs depend on its own
// activations only, so they equal dot_rows' bit for bit for any n_tok >= min_tokens
// (below that, dot_rows takes another kernel).
constexpr int64_t kLaidOutGroup = 16;
inline int64_t laid_out_groups(int64_t n_tok) { return (n_tok + kLaidOutGroup - 1) / kLaidOutGroup; }

struct LaidOutKernel {
    int64_t min_tokens;
    // Bytes of one laid-out group of tokens of k columns (a multiple of 64).
    size_t (*group_bytes)(int64_t k);
    // Tokens [0, n_tok), token t the prepared row at act + (index ? index[t] : t) * act_row_bytes,
    // into laid_out_groups(n_tok) groups at dst (64-byte aligned for speed); lanes past
    // n_tok are zero.
    void (*lay_out)(const uint8_t* act, size_t act_row_bytes, const int64_t* index, int64_t n_tok, int64_t k,
                    uint8_t* dst);
    // dot_rows' contract for the n_tok tokens laid out at laid (any n_tok >= 1).
    void (*dot_rows)(const uint8_t* w, size_t row_bytes, int64_t n_rows, int64_t k, const uint8_t* laid,
                     int64_t n_tok, float* out, int64_t out_stride);
};

struct TypeKernel {
    int ggml_type;
    int block_elems;  // weight elements per GGUF block
    int block_bytes;  // bytes per GGUF block
    ActFormat act;
    DotRowsFn dot_rows;
    const LaidOutKernel* laid_out = nullptr;  // null: dot_rows only
};

// g[i] = silu(g[i]) * u[i] for i < n (the MoE op's gated activation).
using SiluMulFn = void (*)(float* g, const float* u, int64_t n);
// g[i] = gelu_tanh(g[i]) * u[i] (the tanh-approximated GELU, Gemma's), same contract.
using GeluMulFn = void (*)(float* g, const float* u, int64_t n);
// y[i] += a · x[i] for i < n (the MoE op's weighted sum).
using AddScaledFn = void (*)(float a, const float* x, int64_t n, float* y);

// out[r] = x[r] / sqrt(mean(x[r]²) + eps) * w for rows of n floats (out may be x).
using RmsNormFn = void (*)(const float* x, const float* w, int64_t rows, int64_t n, float eps, float* out);

// A chunk of decode attention for n_q query heads that share one kv head (q_i at q + i * d)
// over t keys (k_j at k + j * k_stride, v_j at v + j * v_stride): for each head i,
// max_i = max_j scale·q_i·k_j, sum_i = Σ_j exp(scale·q_i·k_j - max_i) and
// out_i[dv] = Σ_j exp(scale·q_i·k_j - max_i) v_j, not divided by sum_i, written at
// out + i * stride, max[i * stat_stride] and sum[i * stat_stride]; scores: n_q * t floats of
// scratch.
using AttendChunkFn = void (*)(const float* q, int64_t n_q, const float* k, int64_t k_stride, int64_t t, int64_t d,
                               float scale, const float* v, int64_t v_stride, int64_t dv, float* scores, float* out,
                               int64_t stride, float* max, float* sum, int64_t stat_stride);

// A prompt's causal attention (batch 1): query head h, position i at q + h * q_head + i * q_row
// (d floats); kv head g's key and value j at k + g * k_head + j * k_row and
// v + g * v_head + j * v_row (dv floats); query head h reads kv head h / group. Query i
// stands at key index q_offset + i (the keys before q_offset: a cached prefix) and sees
// keys j <= q_offset + i, with window > 0 only j > q_offset + i - window. out like q, dv floats.
// kt: the keys transposed, element c of kv head g's key j at kt + g * kt_head + c * kt_ld + j,
// zero from the last key up to kt_ld, a multiple of 32 (the vector kernels read these).
struct PrefillAttention {
    const float* q = nullptr;
    int64_t q_head = 0, q_row = 0;
    const float* k = nullptr;
    const float* v = nullptr;
    int64_t k_head = 0, k_row = 0, v_head = 0, v_row = 0;
    const float* kt = nullptr;
    int64_t kt_head = 0, kt_ld = 0;
    float* out = nullptr;
    int64_t out_head = 0, out_row = 0;
    int64_t group = 1, d = 0, dv = 0, window = 0, q_offset = 0;
    float scale = 1.0f;
    // The bf16 kernel's keys and values (VariantKernels::attend_prefill_bf16), packed by the
    // engine as its tiles' B operands, per kv head (kb_head, vb_head elements apart), zero
    // past the last key, in blocks of kPrefillBf16Keys keys:
    //   kb: per 16 keys, per 32 columns c: [pair p][key j][2] = k[key j][32c + 2p + e]
    //   vb: per 32 keys, per 16 columns u: [pair p][column i][2] = v[key 2p + e][16u + i]
    const uint16_t* kb = nullptr;
    const uint16_t* vb = nullptr;
    int64_t kb_head = 0, vb_head = 0;
};
constexpr int64_t kPrefillBf16Keys = 128;
// Keys [k0, k0 + 32) of kv head kv_head into its packed keys kb and values vb (the head's
// own, PrefillAttention::kb, vb), zero from n_keys on.
using PackPrefillFn = void (*)(const PrefillAttention& a, int64_t kv_head, int64_t k0, int64_t n_keys, uint16_t* kb,
                               uint16_t* vb);

// Query positions [i0, i0 + nq) of every query head reading kv head kv_head. scratch:
// prefill_scratch_floats(group * nq, d, dv) floats.
using AttendPrefillFn = void (*)(const PrefillAttention& a, int64_t kv_head, int64_t i0, int64_t nq, float* scratch);
inline int64_t prefill_scratch_floats(int64_t rows, int64_t d, int64_t dv) {
    // outputs, max, sum and rescaling factor per row, a block of scores per row (at most 64
    // keys), a pointer per row, alignment
    (void)d;
    return rows * (dv + 3 + 64) + rows * static_cast<int64_t>(sizeof(void*) / sizeof(float)) + 16;
}

// The bf16 kernel's scratch: outputs, max, sum and factor per row, a block of scores and
// of bf16 weights per row, the bf16 queries, four result tiles, each part 64-byte aligned.
inline int64_t prefill_bf16_scratch_floats(int64_t rows, int64_t d, int64_t dv) {
    const int64_t padded = (rows + 15) / 16 * 16;
    return padded * (dv + 3 + kPrefillBf16Keys + kPrefillBf16Keys / 2 + d / 2) + 4 * 256 + 8 * 16 + 16;
}

// The sum of n bytes read as 64-bit words (and single bytes at the end), at the
// variant's widest loads: the read-bandwidth measure's loop.
using ReadWordsFn = uint64_t (*)(const uint8_t* p, size_t n);

struct VariantKernels {
    const char* name;
    QuantizeRowFn quantize_q8_32;
    QuantizeRowFn quantize_q8_256;
    SiluMulFn silu_mul;
    GeluMulFn gelu_tanh_mul;
    AddScaledFn add_scaled;
    RmsNormFn rms_norm;
    AttendChunkFn attend_chunk;
    AttendPrefillFn attend_prefill;
    ReadWordsFn read_words;
    const TypeKernel* types;
    int n_types;
    // A prompt's attention on AMX-BF16 tiles (d a multiple of 32, dv of 16; the keys and
    // values packed: PrefillAttention::kb, vb); null where the variant has none.
    AttendPrefillFn attend_prefill_bf16 = nullptr;
    PackPrefillFn pack_prefill_bf16 = nullptr;

    const TypeKernel* find(int ggml_type) const {
        for (int i = 0; i < n_types; ++i)
            if (types[i].ggml_type == ggml_type) return &types[i];
        return nullptr;
    }
};

// Bytes one prepared activation row of k elements takes in a format.
inline size_t act_row_bytes(ActFormat format, int64_t k) {
    switch (format) {
        case ActFormat::Q8_32: return static_cast<size_t>(k / 32) * sizeof(ActQ8_32);
        case ActFormat::Q8_256: return static_cast<size_t>(k / 256) * sizeof(ActQ8_256);
        default: return static_cast<size_t>(k) * sizeof(float);
    }
}

// The prefill path (gemm_bf16.inc): a tile of kGemmRows weight rows is
// dequantized to bf16 once per call, tokens are packed once per call in groups
// of kGemmGroup as bf16 pairs, and the bf16 dot-product units (AMX tiles or
// AVX512-BF16) multiply the two. Packed groups come in pairs: a call's packed
// activations take gemm_act_elems(n_tok, k) uint16 values.
constexpr int64_t kGemmRows = 32;
constexpr int64_t kGemmGroup = 16;
// A dequantized tile's rows lie k + kGemmTilePad elements apart: rows a power
// of two bytes apart (k = 2048: 4 KiB) would all fall in one L1 cache set.
constexpr int64_t kGemmTilePad = 32;
inline int64_t gemm_tile_ld(int64_t k) { return k + kGemmTilePad; }

inline int64_t gemm_groups(int64_t n_tok) { return (n_tok + 2 * kGemmGroup - 1) / (2 * kGemmGroup) * 2; }
inline size_t gemm_act_elems(int64_t n_tok, int64_t k) { return static_cast<size_t>(gemm_groups(n_tok) * kGemmGroup * k); }

struct GemmKernels {
    const char* name;
    bool (*supports)(int ggml_type);
    // Rows [0, n_rows) of w (n_rows <= kGemmRows, k a multiple of 32) to bf16
    // rows of k elements in dst[kGemmRows][gemm_tile_ld(k)]; rows past n_rows become zero.
    // tmp: k floats of scratch.
    void (*dequant_tile)(int ggml_type, const uint8_t* w, size_t row_bytes, int64_t n_rows, int64_t k,
                         uint16_t* dst, float* tmp);
    // Groups [g0, g1) of n float rows (row t at x + index[t] * x_stride, or
    // t * x_stride when index is null); tokens past n are zero. tmp: 32 floats.
    void (*pack_act)(const float* x, int64_t x_stride, const int64_t* index, int64_t n, int64_t k, int64_t g0,
                     int64_t g1, uint16_t* dst, float* tmp);
    // out[t * out_stride + r] = W[r] · x_t for r < n_rows, t < n_tok, from one
    // dequantized tile and the packed groups.
    void (*tile_gemm)(const uint16_t* tile, int64_t k, const uint16_t* act, int64_t n_tok, float* out,
                      int64_t out_stride, int64_t n_rows);
};

namespace gemm_avx512bf16 { extern const GemmKernels kGemm; }
namespace gemm_amx { extern const GemmKernels kGemm; }

// "avx512bf16" or "amx" if built into this extension, else nullptr.
const GemmKernels* gemm_kernels(const char* name);

// One table per built variant (csrc/kernels/variant_*.cpp). Only call a
// variant's table on a CPU that can run it (tandem/cpu/features.py decides).
namespace generic { const VariantKernels& kernels(); }
namespace avx2 { const VariantKernels& kernels(); }
namespace avx512 { const VariantKernels& kernels(); }
namespace amx { const VariantKernels& kernels(); }

// How far ahead of their block the one-token kernels prefetch weights, bytes (0: off).
// One setting per process; set it before kernels run, not while they do.
// level: the cache the lines go to (0: L1, 1: L2, 2: the last level).
void set_decode_prefetch(size_t bytes, int level = 0);
size_t decode_prefetch_bytes();
int decode_prefetch_level();
// Whether one-token kernels with a 512-bit form take it (where the variant has one); the
// same process-wide rule as the prefetch.
void set_decode_wide(bool on);
bool decode_wide();
// How many streams of rows the one-token kernels walk side by side (1 to kMaxDecodeStreams);
// process-wide too.
constexpr int kMaxDecodeStreams = 8;
void set_decode_streams(int streams);
int decode_streams();

// The table named `name` ("generic", "avx2", "avx512", "amx"), or nullptr if that
// variant is not built into this extension.
const VariantKernels* variant_kernels(const char* name);

}  // namespace tandem
