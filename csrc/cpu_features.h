// What the processor and the operating system let tandem run: CPUID bits, the
// register state the OS saves (XCR0), and Linux's AMX permission. Plain C++ so
// that kernels and their dispatcher can use it without Python.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace tandem {

struct CpuFeatures {
    // CPUID bits: what the silicon implements.
    bool avx2 = false;
    bool fma = false;
    bool f16c = false;
    bool avx512f = false;
    bool avx512bw = false;
    bool avx512vl = false;
    bool avx512_vnni = false;
    bool avx512_bf16 = false;
    bool amx_tile = false;
    bool amx_int8 = false;
    bool amx_bf16 = false;
    // XCR0 bits: what the OS saves on a context switch. An instruction whose
    // registers the OS does not save faults even when CPUID lists it.
    bool os_avx = false;     // XMM + YMM state
    bool os_avx512 = false;  // opmask + ZMM_Hi256 + Hi16_ZMM state (and YMM)
    bool os_amx = false;     // TILECFG + TILEDATA state
    // Linux keeps the 8 KiB tile state off by default; a process must ask.
    bool amx_permitted = false;

    // (name, value) pairs in a fixed order, for bindings and reports.
    std::vector<std::pair<const char*, bool>> items() const;
};

// Probed once per process (thread-safe); the AMX permission request happens here.
const CpuFeatures& cpu_features();

// The processor's brand string from CPUID, or "" where there is none.
std::string cpu_brand();

}  // namespace tandem
