#include "engine/attention_prefill.h"

#include <algorithm>

namespace tandem {

bool prefill_bf16_applies(const VariantKernels& kernels, const PrefillAttention& a) {
    return kernels.attend_prefill_bf16 != nullptr && kernels.pack_prefill_bf16 != nullptr && a.d % 32 == 0 &&
           a.dv % 16 == 0;
}

void attention_prefill(ThreadPool& pool, const VariantKernels& kernels, const PrefillAttention& args, int64_t n,
                       int64_t n_kv_heads, std::vector<float>& scratch, bool bf16) {
    PrefillAttention a = args;
    // Blocks of 16 positions; shorter ones when that leaves fewer than two tasks per thread.
    int64_t block = 16;
    while (block > 4 && n_kv_heads * ((n + block - 1) / block) < 2 * pool.size()) block /= 2;
    const int64_t blocks = (n + block - 1) / block;
    const int64_t n_keys = a.q_offset + n;
    AttendPrefillFn attend = kernels.attend_prefill;
    int64_t per_thread = 0;
    float* task_scratch = nullptr;
    if (bf16 && prefill_bf16_applies(kernels, a)) {
        attend = kernels.attend_prefill_bf16;
        const int64_t keys = (n_keys + kPrefillBf16Keys - 1) / kPrefillBf16Keys * kPrefillBf16Keys;
        const int64_t packed = n_kv_heads * keys * (a.d + a.dv) / 2 + 16;  // floats
        per_thread = prefill_bf16_scratch_floats(a.group * block, a.d, a.dv);
        const size_t need = static_cast<size_t>(packed + per_thread * pool.size());
        if (scratch.size() < need) scratch.resize(need);
        // The keys and values as the kernel's B operands, once for every task: one pool
        // task per kv head and 32 keys.
        auto* kb = reinterpret_cast<uint16_t*>(scratch.data());
        uint16_t* vb = kb + n_kv_heads * keys * a.d;
        a.kb = kb;
        a.vb = vb;
        a.kb_head = keys * a.d;
        a.vb_head = keys * a.dv;
        pool.parallel_for(n_kv_heads * (keys / 32), [&](int64_t task, int) {
            const int64_t g = task / (keys / 32), k0 = task % (keys / 32) * 32;
            kernels.pack_prefill_bf16(a, g, k0, n_keys, kb + g * a.kb_head, vb + g * a.vb_head);
        });
        task_scratch = scratch.data() + packed;
    } else {
        per_thread = prefill_scratch_floats(a.group * block, a.d, a.dv);
        // The keys transposed once for every task (kernel_api.h: PrefillAttention::kt), then
        // each thread's own scratch.
        const int64_t ld = (n_keys + 31) / 32 * 32;
        const int64_t kt_floats = n_kv_heads * a.d * ld;
        const size_t need = static_cast<size_t>(kt_floats + per_thread * pool.size());
        if (scratch.size() < need) scratch.resize(need);
        float* kt = scratch.data();
        const int64_t col_tasks = (a.d + 15) / 16;
        pool.parallel_for(n_kv_heads * col_tasks, [&](int64_t task, int) {
            const int64_t g = task / col_tasks, c0 = task % col_tasks * 16;
            const float* k = a.k + g * a.k_head;
            float* dst = kt + g * a.d * ld;
            for (int64_t c = c0; c < std::min(a.d, c0 + 16); ++c) {
                for (int64_t j = 0; j < n_keys; ++j) dst[c * ld + j] = k[j * a.k_row + c];
                std::fill(dst + c * ld + n_keys, dst + (c + 1) * ld, 0.0f);
            }
        });
        a.kt = kt;
        a.kt_head = a.d * ld;
        a.kt_ld = ld;
        task_scratch = scratch.data() + kt_floats;
    }
    pool.parallel_for(n_kv_heads * blocks, [&](int64_t task, int thread) {
        const int64_t b = blocks - 1 - task / n_kv_heads;  // the last (longest) blocks first
        const int64_t g = task % n_kv_heads;
        const int64_t i0 = b * block;
        attend(a, g, i0, std::min(block, n - i0), task_scratch + thread * per_thread);
    });
    pool.rest();  // a prompt's op: torch runs next
}

}  // namespace tandem
