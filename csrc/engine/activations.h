// Preparing activation rows for a weight type's kernel, in parallel.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/thread_pool.h"
#include "kernels/kernel_api.h"

namespace tandem {

// rows[i] (k floats, x_stride floats apart) -> dst row i (act_row_bytes(format, k) bytes apart).
void prepare_activations(ThreadPool& pool, const VariantKernels& kernels, ActFormat format, const float* x,
                         int64_t n_rows, int64_t k, int64_t x_stride, uint8_t* dst);

// One row, on the calling thread.
void prepare_activation_row(const VariantKernels& kernels, ActFormat format, const float* x, int64_t k, uint8_t* dst);

// Grows buf to at least n bytes (never shrinks: op scratch is reused call after call).
inline uint8_t* scratch(std::vector<uint8_t>& buf, size_t n) {
    if (buf.size() < n) buf.resize(n);
    return buf.data();
}

}  // namespace tandem
