// Selected rows of a GGUF matrix to float32 (the token embedding's lookup: one
// row per token, so plain scalar code at the baseline ISA is enough).
#pragma once

#include <cstddef>
#include <cstdint>

namespace tandem {

// Whether dequantize_rows knows the type.
bool dequant_rows_supported(int ggml_type);

// out[i, :] = row ids[i] of data (rows row_bytes apart, k elements each, k a multiple of the block).
void dequantize_rows(int ggml_type, const uint8_t* data, size_t row_bytes, const int64_t* ids, int64_t n, int64_t k,
                     float* out);

}  // namespace tandem
