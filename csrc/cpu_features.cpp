// CPU feature detection. Built with baseline flags only: this file runs on
// every x86-64 (and aarch64) machine, before anything is known about the CPU.
#include "cpu_features.h"

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TANDEM_X86 1
#include <cpuid.h>
#endif

#if defined(TANDEM_X86) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace tandem {

#ifdef TANDEM_X86
namespace {

struct Regs {
    uint32_t eax = 0, ebx = 0, ecx = 0, edx = 0;
};

// __get_cpuid_count checks the maximum leaf first, so unsupported leaves read as zeros.
Regs cpuid(uint32_t leaf, uint32_t subleaf) {
    Regs r;
    if (!__get_cpuid_count(leaf, subleaf, &r.eax, &r.ebx, &r.ecx, &r.edx)) r = Regs{};
    return r;
}

bool bit(uint32_t reg, int index) { return (reg >> index) & 1u; }

// XGETBV through inline asm: the _xgetbv intrinsic needs -mxsave (or a target
// attribute), and this file must stay at the baseline ISA.
uint64_t xgetbv0() {
    uint32_t lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0u));
    return (uint64_t(hi) << 32) | lo;
}

#ifdef __linux__
// From <asm/prctl.h> (Linux 5.16+); spelled out so older headers still build.
constexpr int kArchGetXcompPerm = 0x1022;
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

bool request_amx_permission() {
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
    // The request can succeed on a kernel that then still refuses; read back what is granted.
    unsigned long granted = 0;
    if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &granted) != 0) return false;
    return (granted >> kXfeatureXtiledata) & 1ul;
}
#else
bool request_amx_permission() { return false; }
#endif

CpuFeatures probe() {
    CpuFeatures f;
    const Regs leaf1 = cpuid(1, 0);
    const Regs leaf7 = cpuid(7, 0);
    const Regs leaf7_1 = cpuid(7, 1);

    f.fma = bit(leaf1.ecx, 12);
    f.f16c = bit(leaf1.ecx, 29);
    f.avx2 = bit(leaf7.ebx, 5);
    f.avx512f = bit(leaf7.ebx, 16);
    f.avx512bw = bit(leaf7.ebx, 30);
    f.avx512vl = bit(leaf7.ebx, 31);
    f.avx512_vnni = bit(leaf7.ecx, 11);
    f.avx512_bf16 = bit(leaf7_1.eax, 5);
    f.amx_bf16 = bit(leaf7.edx, 22);
    f.amx_tile = bit(leaf7.edx, 24);
    f.amx_int8 = bit(leaf7.edx, 25);

    // XGETBV faults unless the OS set CR4.OSXSAVE, which CPUID.1:ECX[27] mirrors.
    if (bit(leaf1.ecx, 27)) {
        const uint64_t xcr0 = xgetbv0();
        const uint64_t ymm = (1u << 1) | (1u << 2);                   // SSE, AVX
        const uint64_t zmm = ymm | (1u << 5) | (1u << 6) | (1u << 7);  // opmask, ZMM_Hi256, Hi16_ZMM
        const uint64_t tiles = (1u << 17) | (1u << 18);                // TILECFG, TILEDATA
        f.os_avx = (xcr0 & ymm) == ymm;
        f.os_avx512 = (xcr0 & zmm) == zmm;
        f.os_amx = (xcr0 & tiles) == tiles;
    }
    if (f.amx_tile && f.os_amx) f.amx_permitted = request_amx_permission();
    return f;
}

}  // namespace

std::string cpu_brand() {
    if (cpuid(0x80000000u, 0).eax < 0x80000004u) return "";
    char text[49] = {};
    for (uint32_t i = 0; i < 3; ++i) {
        const Regs r = cpuid(0x80000002u + i, 0);
        std::memcpy(text + 16 * i, &r, 16);
    }
    std::string brand(text);
    const auto first = brand.find_first_not_of(' ');
    const auto last = brand.find_last_not_of(' ');
    return first == std::string::npos ? "" : brand.substr(first, last - first + 1);
}

#else   // not x86-64: no x86 features; other architectures get their own probes later.

namespace {
CpuFeatures probe() { return CpuFeatures{}; }
}  // namespace

std::string cpu_brand() { return ""; }
#endif  // TANDEM_X86

const CpuFeatures& cpu_features() {
    // A function-local static: probed once, thread-safe, and the AMX request made once.
    static const CpuFeatures features = probe();
    return features;
}

std::vector<std::pair<const char*, bool>> CpuFeatures::items() const {
    return {
        {"avx2", avx2},
        {"fma", fma},
        {"f16c", f16c},
        {"avx512f", avx512f},
        {"avx512bw", avx512bw},
        {"avx512vl", avx512vl},
        {"avx512_vnni", avx512_vnni},
        {"avx512_bf16", avx512_bf16},
        {"amx_tile", amx_tile},
        {"amx_int8", amx_int8},
        {"amx_bf16", amx_bf16},
        {"os_avx", os_avx},
        {"os_avx512", os_avx512},
        {"os_amx", os_amx},
        {"amx_permitted", amx_permitted},
    };
}

}  // namespace tandem
