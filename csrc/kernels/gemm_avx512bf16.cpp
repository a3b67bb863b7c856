// The bf16 prefill kernels built for avx512bf16 (see gemm_bf16.inc).
#include <algorithm>

#include "kernels/prelude.h"

#define TANDEM_GEMM_NAME "avx512bf16"

namespace tandem::gemm_avx512bf16 {

using namespace tandem::detail;

#include "kernels/gemm_bf16.inc"

}  // namespace tandem::gemm_avx512bf16
