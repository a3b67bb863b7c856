// The generic kernel variant: plain C++ for the baseline ISA, the fallback everywhere.
#define TANDEM_VARIANT_NS generic
#define TANDEM_VARIANT_NAME "generic"
#include "kernels/variant_impl.inc"
