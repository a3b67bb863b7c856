// Bindings of the fused decode layer (engine/decode_layer.h). Python fills a
// DecodeLayerSpec from a loaded model's engine ops and float32 tensors it keeps
// alive (tandem/cpu/decode_layer.py); pointers cross as raw addresses.
#include <nanobind/nanobind.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/string.h>

#include <map>
#include <memory>
#include <stdexcept>
#include <string>

#include "bind_common.h"
#include "engine/decode_layer.h"
#include "engine/linear_op.h"
#include "engine/moe_op.h"
#include "engine/thread_pool.h"

namespace nb = nanobind;
using namespace tandem;

namespace {

NormSpec& norm_named(DecodeLayerSpec& s, const std::string& name) {
    if (name == "attn") return s.attn_norm;
    if (name == "q") return s.q_norm;
    if (name == "k") return s.k_norm;
    if (name == "post_attn") return s.post_attn_norm;
    if (name == "ffn") return s.ffn_norm;
    if (name == "post_ffn") return s.post_ffn_norm;
    throw std::invalid_argument("no norm named '" + name + "' in a decode layer");
}

WeightMatrix& matrix_named(DecodeLayerSpec& s, const std::string& name) {
    if (name == "q") return s.q;
    if (name == "k") return s.k;
    if (name == "v") return s.v;
    if (name == "o") return s.o;
    if (name == "gate") return s.gate;
    if (name == "up") return s.up;
    if (name == "down") return s.down;
    if (name == "shared_gate") return s.shared_gate;
    if (name == "router") return s.router;
    throw std::invalid_argument("no matrix named '" + name + "' in a decode layer");
}

const float*& bias_named(DecodeLayerSpec& s, const std::string& name) {
    if (name == "q") return s.q_bias;
    if (name == "k") return s.k_bias;
    if (name == "v") return s.v_bias;
    if (name == "o") return s.o_bias;
    throw std::invalid_argument("no bias named '" + name + "' in a decode layer");
}

}  // namespace

void bind_decode_layer(nb::module_& m) {
    nb::class_<DecodeLayerSpec>(m, "DecodeLayerSpec", "What one fused decode layer computes, and with which weights.")
        .def(nb::init<>())
        .def_rw("hidden", &DecodeLayerSpec::hidden)
        .def_rw("n_heads", &DecodeLayerSpec::n_heads)
        .def_rw("n_kv_heads", &DecodeLayerSpec::n_kv_heads)
        .def_rw("head_dim", &DecodeLayerSpec::head_dim)
        .def_rw("attn_scale", &DecodeLayerSpec::attn_scale)
        .def_rw("window", &DecodeLayerSpec::window)
        .def_rw("top_k", &DecodeLayerSpec::top_k)
        .def_rw("renormalize", &DecodeLayerSpec::renormalize)
        .def_prop_rw(
            "act", [](const DecodeLayerSpec& s) { return s.act == GatedAct::GeluTanh ? "gelu_tanh" : "silu"; },
            [](DecodeLayerSpec& s, const std::string& name) {
                if (name == "silu") s.act = GatedAct::Silu;
                else if (name == "gelu_tanh") s.act = GatedAct::GeluTanh;
                else throw std::invalid_argument("decode layer activation must be 'silu' or 'gelu_tanh'");
            })
        .def("set_norm",
             [](DecodeLayerSpec& s, const std::string& name, uintptr_t scale, float eps) {
                 NormSpec& n = norm_named(s, name);
                 n.scale = ptr<const float>(scale);
                 n.eps = eps;
             })
        .def("set_matrix",
             [](DecodeLayerSpec& s, const std::string& name, const LinearOp& op) {
                 matrix_named(s, name) = op.weight();
             })
        .def("set_bias",
             [](DecodeLayerSpec& s, const std::string& name, uintptr_t bias) {
                 bias_named(s, name) = ptr<const float>(bias);
             })
        .def("set_experts", [](DecodeLayerSpec& s, std::shared_ptr<MoEOp> op) { s.experts = std::move(op); })
        .def("check", &check_decode_layer_spec);

    nb::class_<DecodeLayer>(m, "DecodeLayer", "One decoder layer for one new token, in one call.")
        .def(nb::new_([](std::shared_ptr<ThreadPool> pool, const std::string& variant, const DecodeLayerSpec& spec) {
            return std::make_shared<DecodeLayer>(std::move(pool), kernels_named(variant), spec);
        }))
        .def(
            "step",
            [](DecodeLayer& layer, uintptr_t x, uintptr_t out, uintptr_t cos, uintptr_t sin, uintptr_t k_cache,
               uintptr_t v_cache, int64_t capacity, int64_t pos) {
                layer.step(ptr<const float>(x), ptr<float>(out), ptr<const float>(cos), ptr<const float>(sin),
                           ptr<float>(k_cache), ptr<float>(v_cache), capacity, pos);
            },
            nb::call_guard<nb::gil_scoped_release>(),
            "x, out [hidden]; cos, sin [head_dim]; caches [n_kv_heads, capacity, head_dim], pos rows filled.")
        .def("set_profiling", &DecodeLayer::set_profiling, "Start (and zero) or stop the per-phase clocks.")
        .def_prop_ro("profiled_steps", &DecodeLayer::profiled_steps)
        .def(
            "phase_seconds",
            [](const DecodeLayer& layer) {
                std::map<std::string, double> out;
                for (int p = 0; p < kPhases; ++p) out[kPhaseNames[p]] = layer.phase_ns()[p] * 1e-9;
                return out;
            },
            "Wall time per phase since profiling started, seconds.");
}
