// The nanobind module tandem._cpu: Python bindings for the C++ CPU engine.
// Each op keeps its logic in its own file; this file only binds.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "cpu_features.h"

namespace nb = nanobind;

void bind_engine(nb::module_& m);        // bind_engine.cpp
void bind_decode_layer(nb::module_& m);  // bind_decode_layer.cpp

// CMake passes these (CMakeLists.txt); the fallbacks keep a hand build compiling.
#ifndef TANDEM_COMPILER_ID
#define TANDEM_COMPILER_ID "unknown"
#endif
#ifndef TANDEM_COMPILER_VERSION
#define TANDEM_COMPILER_VERSION "unknown"
#endif
#ifndef TANDEM_BUILD_TYPE
#define TANDEM_BUILD_TYPE "unknown"
#endif
#ifndef TANDEM_CXX_FLAGS
#define TANDEM_CXX_FLAGS ""
#endif
#ifndef TANDEM_SYSTEM_PROCESSOR
#define TANDEM_SYSTEM_PROCESSOR "unknown"
#endif

namespace {

nb::dict features_dict() {
    nb::dict out;
    for (const auto& [name, value] : tandem::cpu_features().items()) out[name] = value;
    return out;
}

// The instruction sets this translation unit was allowed to use: evidence that
// the shared code was built for the baseline, not for the build machine.
nb::list baseline_isa() {
    nb::list out;
#if defined(__x86_64__)
    out.append("x86-64");
#endif
#if defined(__aarch64__)
    out.append("aarch64");
#endif
#if defined(__SSE4_2__)
    out.append("sse4.2");
#endif
#if defined(__AVX__)
    out.append("avx");
#endif
#if defined(__AVX2__)
    out.append("avx2");
#endif
#if defined(__AVX512F__)
    out.append("avx512f");
#endif
    return out;
}

nb::dict build_info() {
    nb::dict out;
    out["compiler_id"] = TANDEM_COMPILER_ID;
    out["compiler_version"] = TANDEM_COMPILER_VERSION;
    out["build_type"] = TANDEM_BUILD_TYPE;
    out["cxx_flags"] = TANDEM_CXX_FLAGS;
    out["system_processor"] = TANDEM_SYSTEM_PROCESSOR;
    // CMakeLists.txt refuses to configure with -march=native anywhere in the flags.
    out["march_native"] = false;
    out["baseline_isa"] = baseline_isa();
    out["cplusplus"] = static_cast<long>(__cplusplus);
    out["nanobind_version"] = std::to_string(NB_VERSION_MAJOR) + "." + std::to_string(NB_VERSION_MINOR) +
                              "." + std::to_string(NB_VERSION_PATCH);
    return out;
}

}  // namespace

NB_MODULE(_cpu, m) {
    m.doc() = "tandem's C++ CPU engine.";
    // A model or engine still held by a module global when Python exits is torn
    // down after this extension, which nanobind would report as leaked objects on
    // every `tandem` command's exit; the process is ending, so say nothing.
    nb::set_leak_warnings(false);
    m.def("cpu_features", &features_dict,
          "CPUID feature bits, OS register-state support (XCR0) and AMX permission, as name -> bool.");
    m.def("cpu_brand", &tandem::cpu_brand, "The processor's brand string, or '' where CPUID has none.");
    m.def("build_info", &build_info, "How this extension was compiled.");
    bind_engine(m);
    bind_decode_layer(m);
}
