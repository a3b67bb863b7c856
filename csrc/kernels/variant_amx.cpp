// The amx kernel variant: the avx512 kernels, with AMX-INT8 tiles for the
// prompt-sized dots of Q4_K and Q5_K (dot_amx_kq.inc).
#define TANDEM_VARIANT_NS amx
#define TANDEM_VARIANT_NAME "amx"
#include "kernels/variant_impl.inc"
