// The amx kernel variant: the avx512 kernels, with AMX-INT8 tiles for the
// prompt-sized dots of Q4_K, Q5_K and Q6_K (dot_amx_kq.inc) and for a prompt's
// attention (attention_prefill_amx.inc).
#define TANDEM_VARIANT_NS amx
#define TANDEM_VARIANT_NAME "amx"
#include "kernels/variant_impl.inc"
