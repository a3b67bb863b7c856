#include "engine/activations.h"

#include <cstring>

namespace tandem {

void prepare_activations(ThreadPool& pool, const VariantKernels& kernels, ActFormat format, const float* x,
                         int64_t n_rows, int64_t k, int64_t x_stride, uint8_t* dst) {
    const size_t row_bytes = act_row_bytes(format, k);
    if (format == ActFormat::F32) {
        for (int64_t r = 0; r < n_rows; ++r) std::memcpy(dst + r * row_bytes, x + r * x_stride, row_bytes);
        return;
    }
    const QuantizeRowFn quantize = format == ActFormat::Q8_32 ? kernels.quantize_q8_32 : kernels.quantize_q8_256;
    if (n_rows == 1) {  // decode: one short row, not worth waking the pool
        quantize(x, k, dst);
        return;
    }
    pool.parallel_for(n_rows, [&](int64_t r, int) { quantize(x + r * x_stride, k, dst + r * row_bytes); });
}

void prepare_activation_row(const VariantKernels& kernels, ActFormat format, const float* x, int64_t k, uint8_t* dst) {
    if (format == ActFormat::F32) std::memcpy(dst, x, act_row_bytes(format, k));
    else (format == ActFormat::Q8_32 ? kernels.quantize_q8_32 : kernels.quantize_q8_256)(x, k, dst);
}

}  // namespace tandem
