// The bf16 prefill kernels built for amx (see gemm_bf16.inc).
#include <algorithm>

#include "kernels/prelude.h"

#define TANDEM_GEMM_NAME "amx"

namespace tandem::gemm_amx {

using namespace tandem::detail;

#include "kernels/gemm_bf16.inc"

}  // namespace tandem::gemm_amx
