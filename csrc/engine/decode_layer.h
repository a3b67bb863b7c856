// One decoder layer of a transformer for one new token (a decode step) in one
// native call: pre-norm, q/k/v, per-head q/k norms, RoPE, the KV cache append,
// grouped-query attention, o, the residual, the feed-forward block (a gated MLP,
// or a softmax top-k router and routed experts with an optional gated shared
// expert), the residual. Each phase is one parallel loop on the pool; the small
// vector steps between them (norms, RoPE, top-k) run on the calling thread
// while the workers spin, so a layer costs a handful of loop start-ups instead
// of a dozen torch calls. The weights are those of the layer's engine ops; the
// spec only points at them.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "engine/moe_op.h"
#include "engine/phase_clock.h"
#include "engine/thread_pool.h"
#include "engine/weight_matrix.h"

namespace tandem {

struct NormSpec {
    const float* scale = nullptr;  // nullptr: no such norm
    float eps = 1e-6f;
};

enum class GatedAct : int { Silu = 0, GeluTanh = 1 };

struct DecodeLayerSpec {
    int64_t hidden = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
    float attn_scale = 1.0f;
    int64_t window = 0;  // sliding window in positions, counting the new one; 0: full attention
    NormSpec attn_norm, q_norm, k_norm, post_attn_norm, ffn_norm, post_ffn_norm;
    WeightMatrix q, k, v, o;
    const float *q_bias = nullptr, *k_bias = nullptr, *v_bias = nullptr, *o_bias = nullptr;

    // Feed-forward: gate/up/down are the dense MLP, or with experts the shared expert
    // (absent when gate.data is null).
    GatedAct act = GatedAct::Silu;
    WeightMatrix gate, up, down;
    WeightMatrix shared_gate;  // [1, hidden]: the shared expert scaled by sigmoid(shared_gate · h)
    std::shared_ptr<MoEOp> experts;
    WeightMatrix router;  // [n_experts, hidden]
    int64_t top_k = 0;
    bool renormalize = true;
};

// Checks a spec's shapes; throws std::invalid_argument with a one-line reason.
void check_decode_layer_spec(const DecodeLayerSpec& s);

// Where a layer's steps spend their time, for profiling (off unless asked for).
enum DecodePhase : int { kQkv, kRope, kAttention, kOut, kRouter, kExperts, kMlp, kResidual, kPhases };
inline const char* const kPhaseNames[kPhases] = {"norm_qkv", "bias_qk_norm_rope_cache", "attention", "o_residual",
                                                 "ffn_norm_router", "experts", "mlp", "ffn_residual"};

class DecodeLayer {
public:
    DecodeLayer(std::shared_ptr<ThreadPool> pool, const VariantKernels& kernels, DecodeLayerSpec spec);

    // x, out: [hidden] (out may be x). cos, sin: [head_dim], this position's rotary
    // factors in the rotate-half layout. k_cache, v_cache: [n_kv_heads, capacity,
    // head_dim] with `pos` positions filled; the new key and value go to row pos.
    void step(const float* x, float* out, const float* cos, const float* sin, float* k_cache, float* v_cache,
              int64_t capacity, int64_t pos);

    const DecodeLayerSpec& spec() const { return spec_; }

    // Profiling: with it on, each step adds its phases' wall time (ns) to phase_ns().
    void set_profiling(bool on) { clock_.set(on); }
    const std::array<int64_t, kPhases>& phase_ns() const { return clock_.ns(); }
    int64_t profiled_steps() const { return clock_.calls(); }

private:
    struct Job {
        const WeightMatrix* w;
        float* out;
    };
    struct Tile {
        int job;
        int64_t r0, nr;
    };

    void gemv(const float* x, std::initializer_list<Job> jobs);
    void feed_forward(const float* h, float* out);

    void mark(DecodePhase phase) { clock_.mark(phase); }

    std::shared_ptr<ThreadPool> pool_;
    const VariantKernels& kernels_;
    DecodeLayerSpec spec_;
    std::mutex mutex_;
    PhaseClock<kPhases> clock_;
    std::vector<uint8_t> act_[3];  // prepared activations per ActFormat
    std::vector<Tile> tiles_;
    std::vector<int64_t> node_tasks_;  // tiles_ per node group
    std::vector<float> h_, q_, k_, v_, attn_, o_, ffn_, g_, u_, d_, logits_, scores_;
    std::vector<uint8_t> o_act_;  // o by kv-head groups (attention_decode_output): their activations
    std::vector<float> o_partial_;  // and their partial sums
    std::vector<int64_t> ids_;
    std::vector<float> weights_;
};

}  // namespace tandem
