#include "engine/dequant_rows.h"

#include "kernels/prelude.h"

namespace tandem::baseline_dequant {

using namespace tandem::detail;

#include "kernels/dequant_row.inc"

}  // namespace tandem::baseline_dequant

namespace tandem {

bool dequant_rows_supported(int ggml_type) { return baseline_dequant::dequant_supported(ggml_type); }

void dequantize_rows(int ggml_type, const uint8_t* data, size_t row_bytes, const int64_t* ids, int64_t n, int64_t k,
                     float* out) {
    for (int64_t i = 0; i < n; ++i)
        baseline_dequant::dequant_row(ggml_type, data + static_cast<size_t>(ids[i]) * row_bytes, k, out + i * k);
}

}  // namespace tandem
