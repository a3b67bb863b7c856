// The avx512 kernel variant.
#define TANDEM_VARIANT_NS avx512
#define TANDEM_VARIANT_NAME "avx512"
#include "kernels/variant_impl.inc"
