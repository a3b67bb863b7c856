// A prompt's causal grouped-query attention (batch 1; the keys: a cached prefix, if
// any, then the prompt's own): tasks of one kv head × a block of query positions on
// the pool, each on the variant's attend_prefill kernel (flash-style,
// kernels/attention_prefill.inc). Longer query blocks come first: under the causal
// mask they see the most keys.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/thread_pool.h"
#include "kernels/kernel_api.h"

namespace tandem {

// n query positions against n_keys = a.q_offset + n keys.
void attention_prefill(ThreadPool& pool, const VariantKernels& kernels, const PrefillAttention& a, int64_t n,
                       int64_t n_kv_heads, std::vector<float>& scratch);

}  // namespace tandem
