#include "engine/attention_decode.h"

namespace tandem {

void attention_decode(ThreadPool& pool, const VariantKernels& kernels, const DecodeAttention& a,
                      std::vector<float>& scratch) {
    const int64_t group = a.n_q_heads / a.n_kv_heads;
    const size_t need = static_cast<size_t>(pool.size()) * static_cast<size_t>(a.t);
    if (scratch.size() < need) scratch.resize(need);
    pool.parallel_for(a.n_q_heads, [&](int64_t h, int thread) {
        const int64_t g = h / group;
        kernels.attend_head(a.q + h * a.d, a.k + g * a.k_head_stride, a.k_row_stride, a.t, a.d, a.scale,
                            a.v + g * a.v_head_stride, a.v_row_stride, a.dv, scratch.data() + thread * a.t,
                            a.out + h * a.dv);
    });
}

}  // namespace tandem
