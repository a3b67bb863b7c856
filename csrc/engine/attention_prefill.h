// A prompt's causal grouped-query attention (batch 1; the keys: a cached prefix, if
// any, then the prompt's own): tasks of one kv head × a block of query positions on
// the pool, each on the variant's attend_prefill kernel (flash-style,
// kernels/attention_prefill.inc) or its AMX-BF16 one (attention_prefill_amx.inc).
// Longer query blocks come first: under the causal mask they see the most keys.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/thread_pool.h"
#include "kernels/kernel_api.h"

namespace tandem {

// Whether bf16 = true takes the variant's AMX-BF16 kernel for these sizes.
bool prefill_bf16_applies(const VariantKernels& kernels, const PrefillAttention& a);

// n query positions against n_keys = a.q_offset + n keys; with bf16, on the variant's
// AMX-BF16 kernel where it applies (prefill_bf16_applies), else the float32 one.
void attention_prefill(ThreadPool& pool, const VariantKernels& kernels, const PrefillAttention& a, int64_t n,
                       int64_t n_kv_heads, std::vector<float>& scratch, bool bf16);

}  // namespace tandem
