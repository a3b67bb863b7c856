// A weight matrix (or a stack of per-expert matrices) as the engine sees it:
// raw GGUF blocks somewhere in memory (usually the mapped file) plus the type
// and shape. The engine never owns or copies weights; whoever creates an op
// keeps the memory alive for the op's lifetime (the Python wrapper holds it).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/kernel_api.h"

namespace tandem {

struct WeightMatrix {
    const uint8_t* data = nullptr;
    int ggml_type = -1;
    int64_t n_experts = 1;    // matrices in the stack
    int64_t rows = 0;         // output features per matrix
    int64_t cols = 0;         // input features (the dot length)
    size_t row_bytes = 0;     // bytes of one row of blocks
    size_t matrix_bytes = 0;  // stride between stacked matrices
    const TypeKernel* kernel = nullptr;

    const uint8_t* matrix(int64_t expert) const { return data + static_cast<size_t>(expert) * matrix_bytes; }
};

// Fills row_bytes, matrix_bytes and kernel; throws std::invalid_argument with
// a one-line reason if the variant has no kernel for the type or the shape
// does not divide into its blocks. Nothing has run when it throws.
inline WeightMatrix make_weight_matrix(const VariantKernels& kernels, const std::string& name, const uint8_t* data,
                                       int ggml_type, int64_t n_experts, int64_t rows, int64_t cols) {
    const TypeKernel* kernel = kernels.find(ggml_type);
    if (kernel == nullptr)
        throw std::invalid_argument(name + ": the CPU engine has no kernel for ggml type " + std::to_string(ggml_type));
    if (n_experts < 1 || rows < 1 || cols < 1)
        throw std::invalid_argument(name + ": empty shape");
    if (cols % kernel->block_elems != 0)
        throw std::invalid_argument(name + ": " + std::to_string(cols) + " columns are not a multiple of the block size " +
                                    std::to_string(kernel->block_elems));
    const int64_t act_block = kernel->act == ActFormat::Q8_256 ? 256 : kernel->act == ActFormat::Q8_32 ? 32 : 1;
    if (cols % act_block != 0)
        throw std::invalid_argument(name + ": columns not a multiple of the activation block");
    if (data == nullptr) throw std::invalid_argument(name + ": null weight pointer");
    WeightMatrix w;
    w.data = data;
    w.ggml_type = ggml_type;
    w.n_experts = n_experts;
    w.rows = rows;
    w.cols = cols;
    w.row_bytes = static_cast<size_t>(cols / kernel->block_elems) * static_cast<size_t>(kernel->block_bytes);
    w.matrix_bytes = w.row_bytes * static_cast<size_t>(rows);
    w.kernel = kernel;
    return w;
}

}  // namespace tandem
