// Bindings of the engine: thread pool, kernels (for tests and benchmarks), the
// linear and MoE ops, and the plain C entry points a CUDA stream can call.
// Tensors cross as raw addresses (torch's data_ptr()); the Python wrappers in
// tandem/cpu/ check dtype, shape and contiguity before any address gets here.
#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bind_common.h"
#include "engine/activations.h"
#include "engine/attention_decode.h"
#include "engine/attention_prefill.h"
#include "engine/bandwidth.h"
#include "engine/dequant_rows.h"
#include "engine/gemm_path.h"
#include "engine/linear_op.h"
#include "engine/numa.h"
#include "engine/moe_op.h"
#include "engine/rope.h"
#include "engine/router.h"
#include "engine/step_mailbox.h"
#include "engine/thread_pool.h"
#include "engine/weight_matrix.h"

namespace nb = nanobind;
using namespace tandem;

namespace {

GemmPath gemm_path(const std::string& name, int64_t min_tokens, bool int8_first) {
    GemmPath path;
    if (name.empty()) return path;
    path.kernels = &gemm_named(name);
    if (min_tokens < 1) throw std::invalid_argument("gemm_min_tokens must be at least 1");
    path.min_tokens = min_tokens;
    path.int8_first = int8_first;
    return path;
}

std::vector<std::string> gemm_built() {
    std::vector<std::string> out;
    for (const char* name : {"avx512bf16", "amx"})
        if (gemm_kernels(name) != nullptr) out.emplace_back(name);
    return out;
}

// The prefill path on the calling thread: rows x tokens through dequantized tiles (tests, benchmarks).
void gemm_matmul(const std::string& name, int ggml_type, uintptr_t w, int64_t rows, int64_t cols, uintptr_t x,
                 int64_t n_tok, uintptr_t out) {
    const GemmKernels* g = &gemm_named(name);
    if (!g->supports(ggml_type)) throw std::invalid_argument("no prefill kernel for ggml type " + std::to_string(ggml_type));
    if (cols % 32 != 0) throw std::invalid_argument("columns must be a multiple of 32");
    // The generic table only supplies the block geometry here.
    const WeightMatrix m = make_weight_matrix(kernels_named("generic"), "weight", ptr<const uint8_t>(w), ggml_type, 1, rows, cols);
    nb::gil_scoped_release release;
    ThreadPool single(1, false);
    std::vector<uint16_t> packed(gemm_act_elems(n_tok, cols));
    pack_for_gemm(single, *g, ptr<const float>(x), cols, nullptr, n_tok, cols, packed.data());
    GemmScratch scratch;
    scratch.reserve(1, cols);
    for (int64_t r0 = 0; r0 < rows; r0 += kGemmRows)
        gemm_rows(*g, scratch, 0, m, m.data, r0, std::min(kGemmRows, rows - r0), packed.data(), n_tok, ptr<float>(out),
                  rows);
}

std::vector<std::string> variants_built() {
    std::vector<std::string> out;
    for (const char* name : {"generic", "avx2", "avx512", "amx"})
        if (variant_kernels(name) != nullptr) out.emplace_back(name);
    return out;
}

std::vector<int> kernel_types(const std::string& variant) {
    const VariantKernels& kernels = kernels_named(variant);
    std::vector<int> out;
    for (int i = 0; i < kernels.n_types; ++i) out.push_back(kernels.types[i].ggml_type);
    return out;
}

// One kernel call on the calling thread: activations prepared, then dot_rows.
void dot_rows(const std::string& variant, int ggml_type, uintptr_t w, int64_t rows, int64_t cols, uintptr_t x,
              int64_t n_tok, uintptr_t out) {
    const VariantKernels& kernels = kernels_named(variant);
    const WeightMatrix m = make_weight_matrix(kernels, "weight", ptr<const uint8_t>(w), ggml_type, 1, rows, cols);
    const size_t arb = act_row_bytes(m.kernel->act, cols);
    std::vector<uint8_t> act(arb * static_cast<size_t>(n_tok));
    nb::gil_scoped_release release;
    ThreadPool single(1, false);
    prepare_activations(single, kernels, m.kernel->act, ptr<const float>(x), n_tok, cols, cols, act.data());
    m.kernel->dot_rows(m.data, m.row_bytes, rows, cols, act.data(), arb, n_tok, ptr<float>(out), rows);
}

// The laid-out path (LaidOutKernel) on the calling thread: the tokens laid out two
// groups per call, then row tiles of 16 against token tiles of tok_tile tokens, as
// the ops split it. Refused where the type's kernel has no such path.
void dot_rows_laid_out(const std::string& variant, int ggml_type, uintptr_t w, int64_t rows, int64_t cols,
                       uintptr_t x, int64_t n_tok, int64_t tok_tile, uintptr_t out) {
    const VariantKernels& kernels = kernels_named(variant);
    const WeightMatrix m = make_weight_matrix(kernels, "weight", ptr<const uint8_t>(w), ggml_type, 1, rows, cols);
    const LaidOutKernel* lo = m.kernel->laid_out;
    if (lo == nullptr) throw std::invalid_argument("no laid-out kernel for ggml type " + std::to_string(ggml_type));
    if (tok_tile < 1 || tok_tile % kLaidOutGroup != 0) throw std::invalid_argument("tok_tile must be a multiple of 16");
    const size_t arb = act_row_bytes(m.kernel->act, cols), gb = lo->group_bytes(cols);
    std::vector<uint8_t> act(arb * static_cast<size_t>(n_tok)), buf;
    std::vector<int64_t> index(static_cast<size_t>(n_tok));
    for (int64_t t = 0; t < n_tok; ++t) index[t] = t;
    nb::gil_scoped_release release;
    ThreadPool single(1, false);
    prepare_activations(single, kernels, m.kernel->act, ptr<const float>(x), n_tok, cols, cols, act.data());
    uint8_t* laid = aligned_scratch(buf, gb * static_cast<size_t>(laid_out_groups(n_tok)));
    for (int64_t t0 = 0; t0 < n_tok; t0 += 2 * kLaidOutGroup)
        lo->lay_out(act.data(), arb, index.data() + t0, std::min(2 * kLaidOutGroup, n_tok - t0), cols,
                    laid + t0 / kLaidOutGroup * gb);
    for (int64_t t0 = 0; t0 < n_tok; t0 += tok_tile)
        for (int64_t r0 = 0; r0 < rows; r0 += 16)
            lo->dot_rows(m.data + r0 * m.row_bytes, m.row_bytes, std::min<int64_t>(16, rows - r0), cols,
                         laid + t0 / kLaidOutGroup * gb, std::min(tok_tile, n_tok - t0),
                         ptr<float>(out) + t0 * rows + r0, rows);
}

// The activation format a type's kernel wants, and activations prepared in it.
int act_format(const std::string& variant, int ggml_type) {
    const TypeKernel* kernel = kernels_named(variant).find(ggml_type);
    if (kernel == nullptr) throw std::invalid_argument("no kernel for ggml type " + std::to_string(ggml_type));
    return static_cast<int>(kernel->act);
}

void quantize_activations(const std::string& variant, int format, uintptr_t x, int64_t n_rows, int64_t k,
                          uintptr_t out) {
    const VariantKernels& kernels = kernels_named(variant);
    if (format < 1 || format > 2) throw std::invalid_argument("format must be 1 (Q8_32) or 2 (Q8_256)");
    const ActFormat f = static_cast<ActFormat>(format);
    if (k % (f == ActFormat::Q8_32 ? 32 : 256) != 0) throw std::invalid_argument("k is not a multiple of the block");
    ThreadPool single(1, false);
    prepare_activations(single, kernels, f, ptr<const float>(x), n_rows, k, k, ptr<uint8_t>(out));
}

// The engine's calls from a CUDA stream (cudaLaunchHostFunc takes a
// void(*)(void*) and one pointer): a HostCall is that pointer.
struct HostCall {
    MoEOp* op;
    MoECall call;
};

extern "C" void tandem_moe_host_submit(void* data) {
    auto* host = static_cast<HostCall*>(data);
    host->op->submit(host->call);
}

extern "C" void tandem_moe_host_sync(void* data) { static_cast<HostCall*>(data)->op->sync(); }

// The whole call on the calling thread (a stream's host-function thread), which leads
// the op's parallel loops itself: no hand-over to the pool's driver thread and back.
extern "C" void tandem_moe_host_run(void* data) {
    auto* host = static_cast<HostCall*>(data);
    host->op->forward(host->call);
}

MoECall make_call(int64_t n_tok, int64_t top_k, uintptr_t x, uintptr_t ids, uintptr_t weights, uintptr_t out) {
    MoECall call;
    call.n_tok = n_tok;
    call.top_k = top_k;
    call.x = ptr<const float>(x);
    call.ids = ptr<const int64_t>(ids);
    call.weights = ptr<const float>(weights);
    call.out = ptr<float>(out);
    return call;
}

}  // namespace

void bind_engine(nb::module_& m) {
    nb::class_<ThreadPool>(m, "ThreadPool", "Persistent worker threads; n_threads counts the calling thread.")
        .def(nb::new_([](int n_threads, bool pin, int spin_us, int node_groups) {
                 if (n_threads < 1 || n_threads > 4096) throw std::invalid_argument("threads must be in 1 ... 4096");
                 if (spin_us < 0 || spin_us > 1000000) throw std::invalid_argument("spin_us must be in 0 ... 1000000");
                 if (node_groups < 0 || node_groups > 4096)
                     throw std::invalid_argument("node_groups must be in 0 ... 4096");
                 return std::make_shared<ThreadPool>(n_threads, pin, spin_us, node_groups);
             }),
             nb::arg("n_threads"), nb::arg("pin") = true, nb::arg("spin_us") = ThreadPool::kDefaultSpinMicroseconds,
             nb::arg("node_groups") = 0,
             "node_groups: 0 groups threads by NUMA node, 1 makes one group, N > 1 simulates N nodes (tests).")
        .def(
            "set_spin_us",
            [](ThreadPool& pool, int spin_us) {
                if (spin_us < 0 || spin_us > 1000000) throw std::invalid_argument("spin_us must be in 0 ... 1000000");
                pool.set_spin_us(spin_us);
            },
            nb::arg("spin_us"))
        .def_prop_ro("spin_us", &ThreadPool::spin_us)
        .def_prop_rw("yield_us", &ThreadPool::yield_us, &ThreadPool::set_yield_us,
                     "After this long idle, spinning workers yield their cores between polls (negative: never).")
        .def_prop_ro("size", &ThreadPool::size)
        .def_prop_rw("steal_peek", &ThreadPool::steal_peek, &ThreadPool::set_steal_peek,
                     "Whether idle threads read another's range before taking from it (benchmarks).")
        .def_prop_ro("cpus", &ThreadPool::cpus, "The core each thread is pinned to (empty: not pinned).")
        .def_prop_ro(
            "node_groups",
            [](const ThreadPool& pool) {
                std::vector<std::pair<int, int>> out;  // (OS node, threads) per group
                for (int j = 0; j < pool.n_nodes(); ++j)
                    out.emplace_back(pool.node_id(j), pool.node_first(j + 1) - pool.node_first(j));
                return out;
            },
            "(NUMA node, threads) of each group of threads, in thread order.")
        .def("wait_idle", &ThreadPool::wait_idle, nb::call_guard<nb::gil_scoped_release>());
    m.def(
        "read_bandwidth",
        [](ThreadPool& pool, const std::string& variant, uintptr_t data, size_t bytes, int repeats) {
            return read_bandwidth(pool, kernels_named(variant), ptr<const unsigned char>(data), bytes, repeats);
        },
        nb::arg("pool"), nb::arg("variant"), nb::arg("data"), nb::arg("bytes"), nb::arg("repeats") = 3,
        nb::call_guard<nb::gil_scoped_release>(), "Best of `repeats` reads of the buffer, bytes per second.");
    m.def(
        "loop_seconds",
        [](ThreadPool& pool, const std::string& variant, uintptr_t data, size_t bytes, int64_t n_tasks,
           size_t task_bytes, int loops) {
            return loop_seconds(pool, kernels_named(variant), ptr<const unsigned char>(data), bytes, n_tasks,
                                task_bytes, loops);
        },
        nb::arg("pool"), nb::arg("variant"), nb::arg("data"), nb::arg("bytes"), nb::arg("n_tasks"),
        nb::arg("task_bytes"), nb::arg("loops"), nb::call_guard<nb::gil_scoped_release>(),
        "Mean seconds per loop of n_tasks tasks reading task_bytes each (benchmarks/pool_loop_bench.py).");
    m.def(
        "read_words",
        [](const std::string& variant, uintptr_t data, size_t bytes) {
            return kernels_named(variant).read_words(ptr<const uint8_t>(data), bytes);
        },
        nb::arg("variant"), nb::arg("data"), nb::arg("bytes"), "The bandwidth loop's sum of a buffer (tests).");
    m.def(
        "prefault",
        [](ThreadPool& pool, uintptr_t data, size_t bytes) { prefault(pool, ptr<const unsigned char>(data), bytes); },
        nb::arg("pool"), nb::arg("data"), nb::arg("bytes"), nb::call_guard<nb::gil_scoped_release>(),
        "Touch every page of the range with all threads (maps lazily mapped file pages now).");
    m.def(
        "page_nodes",
        [](uintptr_t data, size_t bytes) { return page_nodes(ptr<const uint8_t>(data), bytes); },
        nb::arg("data"), nb::arg("bytes"), "The NUMA node of each page of the range (negative: unknown).");
    m.def(
        "node_row_edge",
        [](const ThreadPool& pool, int64_t rows, int group) { return node_row_edge(pool, rows, group); },
        nb::arg("pool"), nb::arg("rows"), nb::arg("group"), "Where a node group's rows of a matrix start.");
    m.def(
        "placement_totals",
        [] {
            const Placement p = placement_totals();
            return std::make_pair(p.bytes, p.refused);
        },
        "(bytes moved to their node group's node, calls the kernel refused) over the process.");
    m.def("cores_in_order", &cores_in_order, "Usable logical CPUs, first thread of each core first, by NUMA node.");
    m.def("variants_built", &variants_built, "Kernel variants compiled into this extension.");
    m.def("kernel_types", &kernel_types, "ggml type numbers a variant has kernels for.");
    m.def("set_decode_prefetch", &set_decode_prefetch, nb::arg("bytes"), nb::arg("level") = 0,
          "How far ahead the one-token kernels prefetch weights (0: off) and into which cache "
          "(0: L1, 1: L2, 2: last level); process-wide.");
    m.def("decode_prefetch", &decode_prefetch_bytes);
    m.def("decode_prefetch_level", &decode_prefetch_level);
    m.def("set_decode_wide", &set_decode_wide, nb::arg("on"),
          "Whether one-token kernels with a 512-bit form take it; process-wide.");
    m.def("decode_wide", &decode_wide);
    m.def("set_decode_streams", &set_decode_streams, nb::arg("streams"),
          "How many streams of rows the one-token kernels walk side by side (1-8); process-wide.");
    m.def("decode_streams", &decode_streams);
    m.def(
        "set_decode_split",
        [](bool one_loop, int tasks_per_thread, int64_t max_task_bytes) {
            set_decode_split(DecodeSplit{one_loop, tasks_per_thread, max_task_bytes});
        },
        nb::arg("one_loop"), nb::arg("tasks_per_thread") = DecodeSplit{}.tasks_per_thread,
        nb::arg("max_task_bytes") = DecodeSplit{}.max_task_bytes,
        "How one-token calls divide their work: the experts in one loop or two, about how many "
        "tasks a thread gets, and the most weight bytes a task reads; process-wide.");
    m.def("set_decode_output_by_groups", &set_decode_output_by_groups, nb::arg("on"),
          "Fused decode layers run o by kv-head groups inside the attention's loop (TANDEM_CPU_DECODE_O_GROUPS).");
    m.def("decode_output_by_groups", &decode_output_by_groups);
    m.def("decode_split", [] {
        const DecodeSplit split = decode_split();
        return std::make_tuple(split.one_loop, split.tasks_per_thread, split.max_task_bytes);
    });
    m.def("act_format", &act_format, "0: float32, 1: Q8_32 blocks, 2: Q8_256 blocks.");
    m.def("dot_rows", &dot_rows, "out[t, r] = W[r] . x[t], one kernel on the calling thread (tests, benchmarks).");
    m.def("dot_rows_laid_out", &dot_rows_laid_out,
          "dot_rows through the laid-out path (tokens laid out once, then token tiles of tok_tile), for tests.");
    m.def("quantize_activations", &quantize_activations, "float32 rows to 8-bit activation blocks.");
    m.def(
        "silu_mul",
        [](const std::string& variant, uintptr_t g, uintptr_t u, int64_t n) {
            kernels_named(variant).silu_mul(ptr<float>(g), ptr<const float>(u), n);
        },
        "g[i] = silu(g[i]) * u[i], one kernel call (tests).");
    m.def(
        "add_scaled",
        [](const std::string& variant, float a, uintptr_t x, int64_t n, uintptr_t y) {
            kernels_named(variant).add_scaled(a, ptr<const float>(x), n, ptr<float>(y));
        },
        "y[i] += a * x[i], one kernel call (tests).");
    m.def(
        "gelu_tanh_mul",
        [](const std::string& variant, uintptr_t g, uintptr_t u, int64_t n) {
            kernels_named(variant).gelu_tanh_mul(ptr<float>(g), ptr<const float>(u), n);
        },
        "g[i] = gelu_tanh(g[i]) * u[i], one kernel call (tests).");
    m.def(
        "rms_norm",
        [](ThreadPool& pool, const std::string& variant, uintptr_t x, uintptr_t w, int64_t rows, int64_t n, float eps,
           uintptr_t out) {
            const RmsNormFn norm = kernels_named(variant).rms_norm;
            if (rows < 64) return norm(ptr<const float>(x), ptr<const float>(w), rows, n, eps, ptr<float>(out));
            nb::gil_scoped_release release;
            const int64_t chunk = 16;
            pool.parallel_for((rows + chunk - 1) / chunk, [&](int64_t i, int) {
                const int64_t r0 = i * chunk, nr = std::min(chunk, rows - r0);
                norm(ptr<const float>(x) + r0 * n, ptr<const float>(w), nr, n, eps, ptr<float>(out) + r0 * n);
            });
            pool.rest();  // many rows: prefill, torch runs next
        },
        "out = x / sqrt(mean(x^2) + eps) * w per row of n floats (out may be x); the pool takes many rows.");
    m.def(
        "head_matvec",
        [](ThreadPool& pool, const std::string& variant, uintptr_t a, int64_t a_head, uintptr_t x, uintptr_t out,
           int64_t heads, int64_t rows, int64_t k) {
            // Per head h: out[h, :rows] = A_h x_h, A_h float32 rows of k at a + h * a_head floats.
            // MLA's absorbed decode (W_UK folded into the query, W_UV applied to the output): at
            // one token torch runs such per-head products on one thread.
            const TypeKernel* f32 = kernels_named(variant).find(GGML_F32);
            if (f32 == nullptr || heads < 1 || rows < 1 || k < 1 || a_head < rows * k)
                throw nb::value_error("head_matvec: heads, rows and k must be positive, heads apart by >= rows * k");
            nb::gil_scoped_release release;
            const int64_t chunk = 16, per_head = (rows + chunk - 1) / chunk;
            const size_t row_bytes = static_cast<size_t>(k) * sizeof(float);
            pool.parallel_for(heads * per_head, [&](int64_t i, int) {
                const int64_t h = i / per_head, r0 = i % per_head * chunk, nr = std::min(chunk, rows - r0);
                f32->dot_rows(ptr<const uint8_t>(a) + (h * a_head + r0 * k) * sizeof(float), row_bytes, nr, k,
                              ptr<const uint8_t>(x) + h * row_bytes, row_bytes, 1, ptr<float>(out) + h * rows + r0,
                              0);
            });
        },
        "out[h] = A_h x[h] for float32 heads A_h [rows, k] (a_head floats apart), x [heads, k], on the pool.");
    m.def(
        "attention_prefill",
        [](ThreadPool& pool, const std::string& variant, uintptr_t q, int64_t q_head, int64_t q_row, uintptr_t k,
           int64_t k_head, int64_t k_row, uintptr_t v, int64_t v_head, int64_t v_row, uintptr_t out, int64_t out_head,
           int64_t out_row, int64_t n, int64_t n_q_heads, int64_t n_kv_heads, int64_t d, int64_t dv, int64_t window,
           float scale, int64_t q_offset, bool bf16) {
            if (n < 1 || n_q_heads < 1 || n_kv_heads < 1 || n_q_heads % n_kv_heads != 0 || d < 1 || dv < 1 ||
                window < 0 || q_offset < 0)
                throw std::invalid_argument("attention_prefill: bad head counts or sizes");
            PrefillAttention a;
            a.q = ptr<const float>(q);
            a.q_head = q_head;
            a.q_row = q_row;
            a.k = ptr<const float>(k);
            a.k_head = k_head;
            a.k_row = k_row;
            a.v = ptr<const float>(v);
            a.v_head = v_head;
            a.v_row = v_row;
            a.out = ptr<float>(out);
            a.out_head = out_head;
            a.out_row = out_row;
            a.group = n_q_heads / n_kv_heads;
            a.d = d;
            a.dv = dv;
            a.window = window;
            a.q_offset = q_offset;
            a.scale = scale;
            const VariantKernels& kernels = kernels_named(variant);
            nb::gil_scoped_release release;
            thread_local std::vector<float> scratch;
            attention_prefill(pool, kernels, a, n, n_kv_heads, scratch, bf16);
        },
        nb::arg("pool"), nb::arg("variant"), nb::arg("q"), nb::arg("q_head"), nb::arg("q_row"), nb::arg("k"),
        nb::arg("k_head"), nb::arg("k_row"), nb::arg("v"), nb::arg("v_head"), nb::arg("v_row"), nb::arg("out"),
        nb::arg("out_head"), nb::arg("out_row"), nb::arg("n"), nb::arg("n_q_heads"), nb::arg("n_kv_heads"),
        nb::arg("d"), nb::arg("dv"), nb::arg("window"), nb::arg("scale"), nb::arg("q_offset"), nb::arg("bf16") = false,
        "A prompt's causal grouped-query attention (element strides; see kernels/kernel_api.h); bf16: on the "
        "variant's AMX-BF16 kernel where it has one and the sizes suit it.");
    m.def(
        "attention_prefill_bf16_applies",
        [](const std::string& variant, int64_t d, int64_t dv) {
            PrefillAttention a;
            a.d = d;
            a.dv = dv;
            return prefill_bf16_applies(kernels_named(variant), a);
        },
        "Whether attention_prefill(..., bf16=True) takes the AMX-BF16 kernel for these head sizes.");
    m.def(
        "softmax_top_k",
        [](ThreadPool& pool, uintptr_t logits, int64_t n, int64_t n_experts, int64_t k, bool renormalize,
           uintptr_t ids, uintptr_t weights) {
            if (n < 0 || n_experts < 1 || k < 1 || k > n_experts)
                throw std::invalid_argument("softmax_top_k: need 1 <= k <= n_experts");
            nb::gil_scoped_release release;
            softmax_top_k_rows(pool, ptr<const float>(logits), n, n_experts, k, renormalize, ptr<int64_t>(ids),
                               ptr<float>(weights));
        },
        "Per row of logits [n, E]: softmax, the top k (ties to the lower id), optionally renormalised.");
    m.def(
        "rope_half",
        [](ThreadPool& pool, uintptr_t x, uintptr_t out, uintptr_t cos, uintptr_t sin, int64_t batch, int64_t heads,
           int64_t tokens, int64_t d, int64_t x_b, int64_t x_h, int64_t x_t, int64_t out_b, int64_t out_h,
           int64_t out_t, int64_t cs_b) {
            if (batch < 1 || heads < 1 || tokens < 1 || d < 2 || d % 2 != 0)
                throw std::invalid_argument("rope_half: bad shape");
            RopeArgs a;
            a.x = ptr<const float>(x);
            a.out = ptr<float>(out);
            a.cos = ptr<const float>(cos);
            a.sin = ptr<const float>(sin);
            a.batch = batch;
            a.heads = heads;
            a.tokens = tokens;
            a.d = d;
            a.x_b = x_b;
            a.x_h = x_h;
            a.x_t = x_t;
            a.out_b = out_b;
            a.out_h = out_h;
            a.out_t = out_t;
            a.cs_b = cs_b;
            nb::gil_scoped_release release;
            rope_half(pool, a);
        },
        "out = x cos + rotate_half(x) sin for x [B, H, T, D] (element strides, D contiguous), cos/sin [B|1, T, D].");
    m.def(
        "attention_decode",
        [](ThreadPool& pool, const std::string& variant, uintptr_t q, int64_t n_q_heads, int64_t d, uintptr_t k,
           uintptr_t v, int64_t n_kv_heads, int64_t t, int64_t dv, int64_t k_head_stride, int64_t k_row_stride,
           int64_t v_head_stride, int64_t v_row_stride, float scale, uintptr_t out) {
            if (n_q_heads < 1 || n_kv_heads < 1 || n_q_heads % n_kv_heads != 0 || t < 1 || d < 1 || dv < 1)
                throw std::invalid_argument("attention_decode: bad head counts or sizes");
            DecodeAttention a;
            a.q = ptr<const float>(q);
            a.n_q_heads = n_q_heads;
            a.d = d;
            a.k = ptr<const float>(k);
            a.v = ptr<const float>(v);
            a.n_kv_heads = n_kv_heads;
            a.t = t;
            a.dv = dv;
            a.k_head_stride = k_head_stride;
            a.k_row_stride = k_row_stride;
            a.v_head_stride = v_head_stride;
            a.v_row_stride = v_row_stride;
            a.scale = scale;
            a.out = ptr<float>(out);
            const VariantKernels& kernels = kernels_named(variant);
            nb::gil_scoped_release release;
            thread_local std::vector<float> scratch;
            attention_decode(pool, kernels, a, scratch);
        },
        "One query position against cached keys/values, grouped-query, one pool task per query head.");
    m.def("dequant_rows_supported", &dequant_rows_supported, "Whether dequantize_rows knows a ggml type.");
    m.def(
        "dequantize_rows",
        [](int ggml_type, uintptr_t data, size_t row_bytes, uintptr_t ids, int64_t n, int64_t k, uintptr_t out) {
            if (!dequant_rows_supported(ggml_type))
                throw std::invalid_argument("no dequantization for ggml type " + std::to_string(ggml_type));
            dequantize_rows(ggml_type, ptr<const uint8_t>(data), row_bytes, ptr<const int64_t>(ids), n, k,
                            ptr<float>(out));
        },
        "out[i] = row ids[i] of a GGUF matrix as float32, on the calling thread (ids checked by the caller).");
    m.def("gemm_built", &gemm_built, "Prefill (bf16 tile) kernels compiled into this extension.");
    m.def("gemm_matmul", &gemm_matmul, "out[t, r] = W[r] . x[t] through the prefill kernels, on the calling thread.");

    nb::class_<LinearOp>(m, "LinearOp")
        .def(nb::new_([](std::shared_ptr<ThreadPool> pool, const std::string& variant, uintptr_t data, int ggml_type,
                         int64_t rows, int64_t cols, const std::string& gemm, int64_t gemm_min_tokens,
                         bool gemm_int8_first) {
                 const VariantKernels& kernels = kernels_named(variant);
                 return std::make_shared<LinearOp>(
                     std::move(pool), kernels,
                     make_weight_matrix(kernels, "weight", ptr<const uint8_t>(data), ggml_type, 1, rows, cols),
                     gemm_path(gemm, gemm_min_tokens, gemm_int8_first));
             }),
             nb::arg("pool"), nb::arg("variant"), nb::arg("data"), nb::arg("ggml_type"), nb::arg("rows"),
             nb::arg("cols"), nb::arg("gemm") = "", nb::arg("gemm_min_tokens") = 32, nb::arg("gemm_int8_first") = false)
        .def(
            "forward",
            [](LinearOp& op, uintptr_t x, int64_t n_tok, int64_t x_stride, uintptr_t out) {
                op.forward(ptr<const float>(x), n_tok, x_stride, ptr<float>(out));
            },
            nb::call_guard<nb::gil_scoped_release>());

    nb::class_<HostCall>(m, "HostCall", "Arguments of one MoE call, at a fixed address for cudaLaunchHostFunc.")
        .def_prop_ro("address", [](HostCall& h) { return reinterpret_cast<uintptr_t>(&h); });

    nb::class_<MoEOp>(m, "MoEOp")
        .def(nb::new_([](std::shared_ptr<ThreadPool> pool, const std::string& variant, int64_t n_experts,
                         int64_t hidden, int64_t inter, uintptr_t gate, int gate_type, uintptr_t up, int up_type,
                         uintptr_t down, int down_type, const std::string& gemm, int64_t gemm_min_tokens,
                         bool gemm_int8_first) {
                 const VariantKernels& kernels = kernels_named(variant);
                 auto g = make_weight_matrix(kernels, "gate", ptr<const uint8_t>(gate), gate_type, n_experts, inter, hidden);
                 auto u = make_weight_matrix(kernels, "up", ptr<const uint8_t>(up), up_type, n_experts, inter, hidden);
                 auto d = make_weight_matrix(kernels, "down", ptr<const uint8_t>(down), down_type, n_experts, hidden, inter);
                 return std::make_shared<MoEOp>(std::move(pool), kernels, g, u, d,
                                                gemm_path(gemm, gemm_min_tokens, gemm_int8_first));
             }),
             nb::arg("pool"), nb::arg("variant"), nb::arg("n_experts"), nb::arg("hidden"), nb::arg("inter"),
             nb::arg("gate"), nb::arg("gate_type"), nb::arg("up"), nb::arg("up_type"), nb::arg("down"),
             nb::arg("down_type"), nb::arg("gemm") = "", nb::arg("gemm_min_tokens") = 32,
             nb::arg("gemm_int8_first") = false)
        .def(
            "forward",
            [](MoEOp& op, int64_t n_tok, int64_t top_k, uintptr_t x, uintptr_t ids, uintptr_t w, uintptr_t out) {
                op.forward(make_call(n_tok, top_k, x, ids, w, out));
            },
            nb::call_guard<nb::gil_scoped_release>())
        .def(
            "submit",
            [](MoEOp& op, int64_t n_tok, int64_t top_k, uintptr_t x, uintptr_t ids, uintptr_t w, uintptr_t out) {
                op.submit(make_call(n_tok, top_k, x, ids, w, out));
            },
            nb::call_guard<nb::gil_scoped_release>())
        .def("sync", &MoEOp::sync, nb::call_guard<nb::gil_scoped_release>())
        .def("set_profiling", &MoEOp::set_profiling, "Start (and zero) or stop the per-phase clocks of its calls.")
        .def_prop_ro("profiled_calls", &MoEOp::profiled_calls)
        .def(
            "phase_seconds",
            [](const MoEOp& op) {
                std::map<std::string, double> out;
                for (int p = 0; p < kMoEPhases; ++p) out[kMoEPhaseNames[p]] = op.phase_ns()[p] * 1e-9;
                return out;
            },
            "Wall time per phase of its calls since profiling started, seconds (one-token calls: activations, gate_up, hidden and down, the weighted sum inside down).")
        .def(
            "host_call",
            [](MoEOp& op, int64_t n_tok, int64_t top_k, uintptr_t x, uintptr_t ids, uintptr_t w, uintptr_t out) {
                return new HostCall{&op, make_call(n_tok, top_k, x, ids, w, out)};
            },
            nb::rv_policy::take_ownership, nb::keep_alive<0, 1>());
    m.def("host_submit_fn", [] { return reinterpret_cast<uintptr_t>(&tandem_moe_host_submit); },
          "Address of void(void*) that submits a HostCall (for cudaLaunchHostFunc).");
    m.def("host_sync_fn", [] { return reinterpret_cast<uintptr_t>(&tandem_moe_host_sync); },
          "Address of void(void*) that waits for a HostCall's op.");
    m.def("host_run_fn", [] { return reinterpret_cast<uintptr_t>(&tandem_moe_host_run); },
          "Address of void(void*) that runs a HostCall's MoE call on the calling thread.");

    nb::class_<StepMailbox>(m, "StepMailbox",
                            "A thread that runs the calls a CUDA stream requests through two page-locked words.")
        .def(nb::new_([](uintptr_t words, int spin_us, int idle_sleep_us, int cpu, int yield_us) {
                 if (spin_us < 0 || spin_us > 1000000) throw std::invalid_argument("spin_us must be in 0 ... 1000000");
                 return std::make_shared<StepMailbox>(ptr<uint32_t>(words), spin_us, idle_sleep_us, cpu, yield_us);
             }),
             nb::arg("words"), nb::arg("spin_us"), nb::arg("idle_sleep_us") = 50, nb::arg("cpu") = -1,
             nb::arg("yield_us") = -1)
        .def(
            "add",
            [](StepMailbox& box, uintptr_t fn, uintptr_t data) {
                return box.add(reinterpret_cast<StepMailbox::Fn>(fn), reinterpret_cast<void*>(data));
            },
            nb::arg("fn"), nb::arg("data"), "Register fn(data); returns the code a stream requests it by.")
        .def_prop_ro("served", &StepMailbox::served)
        .def_prop_ro("failed", &StepMailbox::failed)
        .def_prop_rw("dry", &StepMailbox::dry, &StepMailbox::set_dry,
                     "Answer requests without running their calls (to time the hand-over alone).");
}
