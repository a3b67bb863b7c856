// Rotate-half rotary position embedding (Hugging Face's layout) for a prompt's
// queries or keys: out = x · cos + rotate_half(x) · sin per head, where
// rotate_half pairs element i with i + d/2. Replaces the four elementwise torch
// ops (and their temporaries) of transformers' apply_rotary_pos_emb on the CPU.
#pragma once

#include <cstdint>

#include "engine/thread_pool.h"

namespace tandem {

struct RopeArgs {
    const float* x = nullptr;  // [B, H, T, D] by element strides; D contiguous
    float* out = nullptr;      // same shape, its own strides
    const float* cos = nullptr;  // [B or 1, T, D]: position t of batch b at cos + b * cs_b + t * D
    const float* sin = nullptr;
    int64_t batch = 0, heads = 0, tokens = 0, d = 0;
    int64_t x_b = 0, x_h = 0, x_t = 0;
    int64_t out_b = 0, out_h = 0, out_t = 0;
    int64_t cs_b = 0;  // 0 when cos and sin are shared by the batch
};

void rope_half(ThreadPool& pool, const RopeArgs& a);

}  // namespace tandem
