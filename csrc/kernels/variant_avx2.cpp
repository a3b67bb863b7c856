// The avx2 kernel variant.
#define TANDEM_VARIANT_NS avx2
#define TANDEM_VARIANT_NAME "avx2"
#include "kernels/variant_impl.inc"
