// The softmax top-k router of Qwen2-MoE, Qwen3-MoE and Mixtral for one token:
// softmax over all experts' logits, the k most probable experts (ties to the
// lower id, in falling order), optionally renormalised over those k. A NaN
// or infinite logit poisons its row: every slot stays empty (id -1, weight 0),
// which the MoE op skips.
#pragma once

#include <cstdint>

#include "engine/thread_pool.h"

namespace tandem {

// scratch: n_experts floats (may be logits itself, which it then overwrites).
void softmax_top_k(const float* logits, int64_t n_experts, int64_t k, bool renormalize, float* scratch,
                   int64_t* ids, float* weights);

// Rows of a prompt: logits [n, n_experts] → ids, weights [n, k]; the pool takes many rows.
void softmax_top_k_rows(ThreadPool& pool, const float* logits, int64_t n, int64_t n_experts, int64_t k,
                        bool renormalize, int64_t* ids, float* weights);

}  // namespace tandem
