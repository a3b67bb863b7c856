// Helpers shared by the binding files: addresses from Python, kernel tables by name.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu_features.h"
#include "kernels/kernel_api.h"

namespace tandem {

template <typename T>
T* ptr(uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

// AMX instructions fault in a process that has not asked Linux for the tile state;
// cpu_features() asks once. Tables that use them are refused where that failed.
inline void require_amx(const std::string& what) {
    const CpuFeatures& f = cpu_features();
    if (!(f.amx_tile && f.amx_int8 && f.amx_bf16 && f.os_amx && f.amx_permitted))
        throw std::invalid_argument(what + " needs AMX tiles, which this CPU or OS does not let tandem use");
}

inline const VariantKernels& kernels_named(const std::string& name) {
    const VariantKernels* kernels = variant_kernels(name.c_str());
    if (kernels == nullptr) throw std::invalid_argument("CPU kernel variant '" + name + "' is not built into tandem._cpu");
    if (name == "amx") require_amx("the amx kernel variant");
    return *kernels;
}

// The prefill kernel set `name`, refused like kernels_named where it cannot run.
inline const GemmKernels& gemm_named(const std::string& name) {
    const GemmKernels* gemm = gemm_kernels(name.c_str());
    if (gemm == nullptr) throw std::invalid_argument("prefill kernels '" + name + "' are not built into tandem._cpu");
    if (name == "amx") require_amx("the amx prefill kernels");
    return *gemm;
}

}  // namespace tandem
