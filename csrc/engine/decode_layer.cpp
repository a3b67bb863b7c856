#include "engine/decode_layer.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "engine/activations.h"
#include "engine/attention_decode.h"
#include "engine/linear_op.h"
#include "engine/numa.h"
#include "engine/router.h"

namespace tandem {
namespace {

void require(bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument("decode layer: " + what);
}

bool present(const WeightMatrix& w) { return w.data != nullptr; }

void check_matrix(const WeightMatrix& w, int64_t rows, int64_t cols, const char* name) {
    require(present(w), std::string(name) + " is missing");
    require(w.n_experts == 1 && w.rows == rows && w.cols == cols,
            std::string(name) + " is " + std::to_string(w.rows) + " x " + std::to_string(w.cols) + ", expected " +
                std::to_string(rows) + " x " + std::to_string(cols));
}

void norm(const VariantKernels& kernels, const NormSpec& n, const float* x, int64_t rows, int64_t len, float* out) {
    if (n.scale != nullptr) kernels.rms_norm(x, n.scale, rows, len, n.eps, out);
    else if (out != x) std::copy(x, x + rows * len, out);
}

void add_bias(float* y, const float* bias, int64_t n) {
    if (bias != nullptr)
        for (int64_t i = 0; i < n; ++i) y[i] += bias[i];
}

// Rotate-half RoPE (Hugging Face's layout): pairs (i, i + d/2) of every head.
void rope(float* x, int64_t heads, int64_t d, const float* cos, const float* sin) {
    const int64_t half = d / 2;
    for (int64_t h = 0; h < heads; ++h, x += d)
        for (int64_t i = 0; i < half; ++i) {
            const float a = x[i], b = x[i + half];
            x[i] = a * cos[i] - b * sin[i];
            x[i + half] = b * cos[i + half] + a * sin[i + half];
        }
}

}  // namespace

void check_decode_layer_spec(const DecodeLayerSpec& s) {
    require(s.hidden > 0 && s.n_heads > 0 && s.n_kv_heads > 0 && s.head_dim > 0, "empty shape");
    require(s.n_heads % s.n_kv_heads == 0, "query heads are not a multiple of key/value heads");
    require(s.head_dim % 2 == 0, "odd head dimension");
    require(s.window >= 0, "negative sliding window");
    const int64_t qd = s.n_heads * s.head_dim, kd = s.n_kv_heads * s.head_dim;
    check_matrix(s.q, qd, s.hidden, "q");
    check_matrix(s.k, kd, s.hidden, "k");
    check_matrix(s.v, kd, s.hidden, "v");
    check_matrix(s.o, s.hidden, qd, "o");
    const bool dense = present(s.gate);
    require(dense || s.experts != nullptr, "no feed-forward block");
    if (dense) {
        check_matrix(s.gate, s.gate.rows, s.hidden, "gate");
        check_matrix(s.up, s.gate.rows, s.hidden, "up");
        check_matrix(s.down, s.hidden, s.gate.rows, "down");
    }
    require(s.act == GatedAct::Silu || s.act == GatedAct::GeluTanh, "unknown activation");
    if (s.experts != nullptr) {
        require(s.experts->hidden() == s.hidden, "experts' hidden size differs");
        check_matrix(s.router, s.experts->n_experts(), s.hidden, "router");
        require(s.top_k >= 1 && s.top_k <= s.experts->n_experts(), "top_k outside 1 ... n_experts");
        require(s.act == GatedAct::Silu, "routed experts are SiLU-gated");
        if (present(s.shared_gate)) {
            require(dense, "a shared-expert gate without a shared expert");
            check_matrix(s.shared_gate, 1, s.hidden, "shared expert gate");
        }
    } else {
        require(!present(s.shared_gate), "a shared-expert gate without experts");
    }
}

DecodeLayer::DecodeLayer(std::shared_ptr<ThreadPool> pool, const VariantKernels& kernels, DecodeLayerSpec spec)
    : pool_(std::move(pool)), kernels_(kernels), spec_(std::move(spec)) {
    check_decode_layer_spec(spec_);
    const DecodeLayerSpec& s = spec_;
    const int64_t inter = present(s.gate) ? s.gate.rows : 0;
    h_.resize(s.hidden);
    q_.resize(s.n_heads * s.head_dim);
    k_.resize(s.n_kv_heads * s.head_dim);
    v_.resize(s.n_kv_heads * s.head_dim);
    attn_.resize(s.n_heads * s.head_dim);
    o_.resize(s.hidden);
    ffn_.resize(s.hidden);
    d_.resize(s.hidden);
    g_.resize(std::max<int64_t>(inter, 1));
    u_.resize(std::max<int64_t>(inter, 1));
    if (s.experts != nullptr) {
        logits_.resize(s.experts->n_experts());
        ids_.resize(s.top_k);
        weights_.resize(s.top_k);
    }
}

void DecodeLayer::gemv(const float* x, std::initializer_list<Job> jobs) {
    const Job* job = jobs.begin();
    const int n_jobs = static_cast<int>(jobs.size());
    const int64_t cols = job[0].w->cols;
    bool prepared[3] = {false, false, false};
    int64_t total_rows = 0;
    size_t row_bytes = 0;
    for (int j = 0; j < n_jobs; ++j) {
        row_bytes = std::max(row_bytes, job[j].w->row_bytes);
        const ActFormat f = job[j].w->kernel->act;
        const int fi = static_cast<int>(f);
        if (!prepared[fi]) {
            prepare_activation_row(kernels_, f, x, cols, scratch(act_[fi], act_row_bytes(f, cols)));
            prepared[fi] = true;
        }
        total_rows += job[j].w->rows;
    }
    // At least two tiles per thread where rows allow (a router's 128 rows would
    // otherwise leave half of 16 threads idle), at least 4 rows per tile.
    const int64_t threads = pool_->size();
    const int64_t even = (total_rows + 2 * threads - 1) / (2 * threads);
    const int64_t tile = std::min(one_token_rows(total_rows, 1, threads, row_bytes, decode_split()),
                                  std::max<int64_t>(4, (even + 3) / 4 * 4));
    // Node by node (engine/numa.h): group g's rows of every job, for group g's threads.
    tiles_.clear();
    node_tasks_.assign(static_cast<size_t>(pool_->n_nodes()), 0);
    for (int g = 0; g < pool_->n_nodes(); ++g)
        for (int j = 0; j < n_jobs; ++j) {
            const int64_t end = node_row_edge(*pool_, job[j].w->rows, g + 1);
            for (int64_t r0 = node_row_edge(*pool_, job[j].w->rows, g); r0 < end; r0 += tile)
                tiles_.push_back(Tile{j, r0, std::min(tile, end - r0)});
            node_tasks_[static_cast<size_t>(g)] = static_cast<int64_t>(tiles_.size());
        }
    for (int g = pool_->n_nodes() - 1; g > 0; --g) node_tasks_[g] -= node_tasks_[g - 1];
    pool_->parallel_for_nodes(node_tasks_.data(), [&](int64_t i, int) {
        const Tile& t = tiles_[i];
        const WeightMatrix& w = *job[t.job].w;
        const ActFormat f = w.kernel->act;
        w.kernel->dot_rows(w.data + t.r0 * w.row_bytes, w.row_bytes, t.nr, w.cols, act_[static_cast<int>(f)].data(),
                           act_row_bytes(f, w.cols), 1, job[t.job].out + t.r0, w.rows);
    });
}

void DecodeLayer::feed_forward(const float* h, float* out) {
    const DecodeLayerSpec& s = spec_;
    const bool gated = present(s.gate);
    if (s.experts == nullptr) {
        gemv(h, {{&s.gate, g_.data()}, {&s.up, u_.data()}});
    } else {
        // Router: softmax over all experts, the top k (ties to the lower id), renormalised.
        gemv(h, {{&s.router, logits_.data()}});  // (the ffn norm before it counts here too)
        softmax_top_k(logits_.data(), s.experts->n_experts(), s.top_k, s.renormalize, logits_.data(), ids_.data(),
                      weights_.data());
        MoECall call;
        call.n_tok = 1;
        call.top_k = s.top_k;
        call.x = h;
        call.ids = ids_.data();
        call.weights = weights_.data();
        call.out = out;
        mark(kRouter);
        s.experts->forward(call);
        mark(kExperts);
        if (!gated) return;
        float gate_logit = 0.0f;
        if (present(s.shared_gate))
            gemv(h, {{&s.gate, g_.data()}, {&s.up, u_.data()}, {&s.shared_gate, &gate_logit}});
        else
            gemv(h, {{&s.gate, g_.data()}, {&s.up, u_.data()}});
        const float scale = present(s.shared_gate) ? 1.0f / (1.0f + std::exp(-gate_logit)) : 1.0f;
        kernels_.silu_mul(g_.data(), u_.data(), s.gate.rows);
        gemv(g_.data(), {{&s.down, d_.data()}});
        for (int64_t i = 0; i < s.hidden; ++i) out[i] += scale * d_[i];
        mark(kMlp);
        return;
    }
    if (s.act == GatedAct::Silu) kernels_.silu_mul(g_.data(), u_.data(), s.gate.rows);
    else kernels_.gelu_tanh_mul(g_.data(), u_.data(), s.gate.rows);
    gemv(g_.data(), {{&s.down, out}});
    mark(kMlp);
}

void DecodeLayer::step(const float* x, float* out, const float* cos, const float* sin, float* k_cache,
                       float* v_cache, int64_t capacity, int64_t pos) {
    std::lock_guard<std::mutex> lock(mutex_);
    const DecodeLayerSpec& s = spec_;
    const int64_t d = s.head_dim;
    if (pos < 0 || pos >= capacity) throw std::invalid_argument("decode layer: position outside the cache");
    clock_.start();

    norm(kernels_, s.attn_norm, x, 1, s.hidden, h_.data());
    gemv(h_.data(), {{&s.q, q_.data()}, {&s.k, k_.data()}, {&s.v, v_.data()}});
    mark(kQkv);
    add_bias(q_.data(), s.q_bias, s.n_heads * d);
    add_bias(k_.data(), s.k_bias, s.n_kv_heads * d);
    add_bias(v_.data(), s.v_bias, s.n_kv_heads * d);
    norm(kernels_, s.q_norm, q_.data(), s.n_heads, d, q_.data());
    norm(kernels_, s.k_norm, k_.data(), s.n_kv_heads, d, k_.data());
    rope(q_.data(), s.n_heads, d, cos, sin);
    rope(k_.data(), s.n_kv_heads, d, cos, sin);
    const int64_t head_stride = capacity * d;
    for (int64_t g = 0; g < s.n_kv_heads; ++g) {
        std::copy(k_.data() + g * d, k_.data() + (g + 1) * d, k_cache + g * head_stride + pos * d);
        std::copy(v_.data() + g * d, v_.data() + (g + 1) * d, v_cache + g * head_stride + pos * d);
    }
    mark(kRope);
    const int64_t first = s.window > 0 ? std::max<int64_t>(0, pos + 1 - s.window) : 0;
    DecodeAttention a;
    a.q = q_.data();
    a.n_q_heads = s.n_heads;
    a.d = d;
    a.k = k_cache + first * d;
    a.v = v_cache + first * d;
    a.n_kv_heads = s.n_kv_heads;
    a.t = pos + 1 - first;
    a.dv = d;
    a.k_head_stride = a.v_head_stride = head_stride;
    a.k_row_stride = a.v_row_stride = d;
    a.scale = s.attn_scale;
    a.out = attn_.data();
    if (decode_output_by_groups() && output_by_groups_fits(s.o, s.n_kv_heads)) {
        // o by kv-head groups inside the attention's loop: its time counts as attention's
        attention_decode_output(*pool_, kernels_, a, scores_, OutputByGroups{&s.o, o_.data(), &o_act_, &o_partial_});
        mark(kAttention);
    } else {
        attention_decode(*pool_, kernels_, a, scores_);
        mark(kAttention);
        gemv(attn_.data(), {{&s.o, o_.data()}});
    }
    add_bias(o_.data(), s.o_bias, s.hidden);
    norm(kernels_, s.post_attn_norm, o_.data(), 1, s.hidden, o_.data());
    for (int64_t i = 0; i < s.hidden; ++i) o_[i] += x[i];  // o_: the residual stream from here
    mark(kOut);

    norm(kernels_, s.ffn_norm, o_.data(), 1, s.hidden, h_.data());
    feed_forward(h_.data(), ffn_.data());
    norm(kernels_, s.post_ffn_norm, ffn_.data(), 1, s.hidden, ffn_.data());
    for (int64_t i = 0; i < s.hidden; ++i) out[i] = o_[i] + ffn_[i];
    mark(kResidual);
}

}  // namespace tandem
