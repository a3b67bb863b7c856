// Which kernel variants this build holds, by name.
#include <cstring>
#include <stdexcept>

#include "kernels/kernel_api.h"
#include "kernels/prelude.h"

namespace tandem {

void set_decode_prefetch(size_t bytes, int level) {
    if (level < 0 || level > 2) throw std::invalid_argument("prefetch level must be 0, 1 or 2");
    detail::decode_prefetch = bytes;
    detail::decode_prefetch_level = level;
}
size_t decode_prefetch_bytes() { return detail::decode_prefetch; }
int decode_prefetch_level() { return detail::decode_prefetch_level; }
void set_decode_wide(bool on) { detail::decode_wide_on = on; }
bool decode_wide() { return detail::decode_wide_on; }
void set_decode_streams(int streams) {
    if (streams < 1 || streams > kMaxDecodeStreams) throw std::invalid_argument("decode streams must be 1 to 8");
    detail::decode_streams_n = streams;
}
int decode_streams() { return detail::decode_streams_n; }

const VariantKernels* variant_kernels(const char* name) {
    if (std::strcmp(name, "generic") == 0) return &generic::kernels();
#if defined(TANDEM_HAVE_AVX2)
    if (std::strcmp(name, "avx2") == 0) return &avx2::kernels();
#endif
#if defined(TANDEM_HAVE_AVX512)
    if (std::strcmp(name, "avx512") == 0) return &avx512::kernels();
#endif
#if defined(TANDEM_HAVE_AMX)
    if (std::strcmp(name, "amx") == 0) return &amx::kernels();
#endif
    return nullptr;
}

const GemmKernels* gemm_kernels(const char* name) {
#if defined(TANDEM_HAVE_AVX512BF16)
    if (std::strcmp(name, "avx512bf16") == 0) return &gemm_avx512bf16::kGemm;
#endif
#if defined(TANDEM_HAVE_AMX)
    if (std::strcmp(name, "amx") == 0) return &gemm_amx::kGemm;
#endif
    (void)name;
    return nullptr;
}

}  // namespace tandem
