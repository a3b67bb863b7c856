// Helpers shared by the binding files: addresses from Python, kernel tables by name.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/kernel_api.h"

namespace tandem {

template <typename T>
T* ptr(uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

inline const VariantKernels& kernels_named(const std::string& name) {
    const VariantKernels* kernels = variant_kernels(name.c_str());
    if (kernels == nullptr) throw std::invalid_argument("CPU kernel variant '" + name + "' is not built into tandem._cpu");
    return *kernels;
}

}  // namespace tandem
