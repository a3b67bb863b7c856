#include "engine/attention_decode.h"

#include <algorithm>
#include <atomic>
#include <cmath>

#include "engine/activations.h"
#include "engine/linear_op.h"

namespace tandem {
namespace {

// Positions per chunk below which splitting a head's cache is not worth a merge.
constexpr int64_t kMinChunk = 64;

// One head's chunks merged: out = Σ_c e^(m_c - M) out_c / Σ_c e^(m_c - M) sum_c, the chunks'
// partials (out[dv], max, sum) per_head floats apart from first.
void merge_chunks(const float* first, int64_t n_chunks, int64_t per_head, int64_t dv, float* out) {
    float top = -INFINITY;
    for (int64_t c = 0; c < n_chunks; ++c) top = std::max(top, first[c * per_head + dv]);
    std::fill(out, out + dv, 0.0f);
    float total = 0.0f;
    for (int64_t c = 0; c < n_chunks; ++c) {
        const float* p = first + c * per_head;
        const float w = std::exp(p[dv] - top);
        total += w * p[dv + 1];
        for (int64_t i = 0; i < dv; ++i) out[i] += w * p[i];
    }
    const float inv = 1.0f / total;
    for (int64_t i = 0; i < dv; ++i) out[i] *= inv;
}

// How a call splits into tasks, and the task itself.
class AttentionTasks {
public:
    AttentionTasks(const VariantKernels& kernels, const DecodeAttention& a, int64_t threads,
                   std::vector<float>& scratch)
        : kernels_(kernels), a_(a) {
        group_ = a.n_q_heads / a.n_kv_heads;
        // A task takes the query heads of one kv head (the kernel reads each key and value once
        // for a block of them, and the task's chunk of the cache comes from memory once) and,
        // when there are fewer kv heads than about two tasks per thread, a chunk of the
        // positions: one thread would otherwise stream a long cache alone. A cache too short to
        // split that far splits the heads instead, into blocks of four, or one each.
        const int64_t want = (2 * threads + a.n_kv_heads - 1) / a.n_kv_heads;
        n_chunks_ = std::max<int64_t>(1, std::min(want, a.t / kMinChunk));
        const auto tasks_of = [&](int64_t h) { return a.n_kv_heads * n_chunks_ * ((group_ + h - 1) / h); };
        heads_ = group_;
        if (tasks_of(heads_) < 2 * threads) heads_ = std::min<int64_t>(group_, 4);
        if (tasks_of(heads_) < 2 * threads && n_chunks_ == 1) heads_ = 1;
        blocks_ = (group_ + heads_ - 1) / heads_;  // per kv head
        chunk_ = (a.t + n_chunks_ - 1) / n_chunks_;
        per_head_ = a.dv + 2;                          // a chunk's partial: out[dv], max, sum
        per_thread_ = heads_ * chunk_ + 2 * heads_;    // scores, then one chunk's max and sum
        const size_t scores = static_cast<size_t>(threads * per_thread_);
        const size_t partials = n_chunks_ > 1 ? static_cast<size_t>(a.n_q_heads * n_chunks_ * per_head_) : 0;
        if (scratch.size() < scores + partials) scratch.resize(scores + partials);
        scratch_ = scratch.data();
        part_ = scratch_ + scores;
        // Per (kv head, block of heads): chunks still to finish; the task that finishes the last
        // merges the block's heads.
        thread_local LoopCounters counters;  // the thread that leads the loop owns them
        const int64_t n_blocks = n_chunks_ > 1 ? a.n_kv_heads * blocks_ : 0;
        left_ = counters.get(static_cast<size_t>(n_blocks));
        for (int64_t i = 0; i < n_blocks; ++i) left_[i].store(n_chunks_, std::memory_order_relaxed);
    }
    int64_t count() const { return a_.n_kv_heads * n_chunks_ * blocks_; }
    int64_t per_group() const { return n_chunks_ * blocks_; }  // tasks of one kv head, consecutive

    void run(int64_t task, int thread) const {
        const DecodeAttention& a = a_;
        const int64_t g = task / (n_chunks_ * blocks_), c = task / blocks_ % n_chunks_, b = task % blocks_;
        const int64_t h0 = g * group_ + b * heads_, nh = std::min(heads_, group_ - b * heads_);
        const int64_t p0 = c * chunk_, len = std::min(chunk_, a.t - p0);
        float* mine = scratch_ + thread * per_thread_;
        const float* k = a.k + g * a.k_head_stride + p0 * a.k_row_stride;
        const float* v = a.v + g * a.v_head_stride + p0 * a.v_row_stride;
        if (n_chunks_ == 1) {  // the whole cache: normalized in place
            float* top = mine + heads_ * chunk_;
            float* sum = top + heads_;
            float* out = a.out + h0 * a.dv;
            kernels_.attend_chunk(a.q + h0 * a.d, nh, k, a.k_row_stride, len, a.d, a.scale, v, a.v_row_stride, a.dv,
                                  mine, out, a.dv, top, sum, 1);
            for (int64_t i = 0; i < nh; ++i) {
                const float inv = 1.0f / sum[i];
                for (int64_t col = 0; col < a.dv; ++col) out[i * a.dv + col] *= inv;
            }
            return;
        }
        float* p = part_ + (h0 * n_chunks_ + c) * per_head_;  // head i's partial at p + i * n_chunks * per_head
        const int64_t stride = n_chunks_ * per_head_;
        if (len <= 0) {  // rounding left this chunk empty: it adds nothing
            for (int64_t i = 0; i < nh; ++i) {
                std::fill(p + i * stride, p + i * stride + a.dv + 2, 0.0f);
                p[i * stride + a.dv] = -INFINITY;
            }
        } else {
            kernels_.attend_chunk(a.q + h0 * a.d, nh, k, a.k_row_stride, len, a.d, a.scale, v, a.v_row_stride, a.dv,
                                  mine, p, stride, p + a.dv, p + a.dv + 1, stride);
        }
        if (left_[g * blocks_ + b].fetch_sub(1, std::memory_order_acq_rel) != 1) return;
        for (int64_t h = h0; h < h0 + nh; ++h)
            merge_chunks(part_ + h * n_chunks_ * per_head_, n_chunks_, per_head_, a.dv, a.out + h * a.dv);
    }

private:
    const VariantKernels& kernels_;
    const DecodeAttention& a_;
    int64_t group_ = 1, n_chunks_ = 1, heads_ = 1, blocks_ = 1, chunk_ = 1, per_head_ = 0, per_thread_ = 0;
    float* scratch_ = nullptr;
    float* part_ = nullptr;
    std::atomic<int64_t>* left_ = nullptr;
};

std::atomic<bool> g_output_by_groups{false};

}  // namespace

void attention_decode(ThreadPool& pool, const VariantKernels& kernels, const DecodeAttention& a,
                      std::vector<float>& scratch) {
    const AttentionTasks tasks(kernels, a, pool.size(), scratch);
    pool.parallel_for(tasks.count(), [&](int64_t task, int thread) { tasks.run(task, thread); });
}

void set_decode_output_by_groups(bool on) { g_output_by_groups.store(on, std::memory_order_relaxed); }
bool decode_output_by_groups() { return g_output_by_groups.load(std::memory_order_relaxed); }

bool output_by_groups_fits(const WeightMatrix& w, int64_t n_kv_heads) {
    if (n_kv_heads < 2 || w.n_experts != 1 || w.cols % n_kv_heads != 0) return false;
    const int64_t cols = w.cols / n_kv_heads;
    const int64_t act_block = w.kernel->act == ActFormat::Q8_256 ? 256 : w.kernel->act == ActFormat::Q8_32 ? 32 : 1;
    return cols % w.kernel->block_elems == 0 && cols % act_block == 0;
}

void attention_decode_output(ThreadPool& pool, const VariantKernels& kernels, const DecodeAttention& a,
                             std::vector<float>& scratch, const OutputByGroups& o) {
    const WeightMatrix& w = *o.w;
    const int64_t groups = a.n_kv_heads, rows = w.rows, cols = w.cols / groups;
    const int64_t threads = pool.size();
    const AttentionTasks att(kernels, a, threads, scratch);
    // The projection's tasks: row tiles of every group, group by group (the first groups'
    // heads finish first), about decode_split().tasks_per_thread a thread in all.
    const size_t group_bytes = w.row_bytes / static_cast<size_t>(groups);
    const int64_t tile = one_token_rows(rows, groups, threads, group_bytes, decode_split());
    const int64_t tiles = (rows + tile - 1) / tile;
    const ActFormat format = w.kernel->act;
    const size_t arb = act_row_bytes(format, cols);
    uint8_t* act = aligned_scratch(*o.act, arb * static_cast<size_t>(groups));
    if (o.partial->size() < static_cast<size_t>(groups * rows)) o.partial->resize(static_cast<size_t>(groups * rows));
    float* partial = o.partial->data();
    // Counters: per group, its attention tasks left; per group, ready (1); per tile, groups left.
    thread_local LoopCounters counters;
    std::atomic<int64_t>* c = counters.get(static_cast<size_t>(2 * groups + tiles + 1));
    std::atomic<int64_t>* att_left = c;
    std::atomic<int64_t>* ready = c + groups;
    std::atomic<int64_t>* tile_left = c + 2 * groups;
    std::atomic<int64_t>* next = c + 2 * groups + tiles;
    for (int64_t g = 0; g < groups; ++g) {
        att_left[g].store(att.per_group(), std::memory_order_relaxed);
        ready[g].store(0, std::memory_order_relaxed);
    }
    for (int64_t t = 0; t < tiles; ++t) tile_left[t].store(groups, std::memory_order_relaxed);
    next->store(0, std::memory_order_relaxed);
    const int64_t n_att = att.count(), n_all = n_att + groups * tiles;
    // Tasks come from one counter in order, so every attention task is taken before any
    // projection task waits for its group.
    pool.parallel_for(threads, [&](int64_t, int thread) {
        for (int64_t i = next->fetch_add(1, std::memory_order_relaxed); i < n_all;
             i = next->fetch_add(1, std::memory_order_relaxed)) {
            if (i < n_att) {
                att.run(i, thread);
                const int64_t g = i / att.per_group();
                if (att_left[g].fetch_sub(1, std::memory_order_acq_rel) != 1) continue;
                prepare_activation_row(kernels, format, a.out + g * cols, cols, act + g * arb);
                ready[g].store(1, std::memory_order_release);
                continue;
            }
            const int64_t g = (i - n_att) / tiles, t = (i - n_att) % tiles;
            const int64_t r0 = t * tile, nr = std::min(tile, rows - r0);
            while (ready[g].load(std::memory_order_acquire) == 0) cpu_relax();
            w.kernel->dot_rows(w.data + r0 * w.row_bytes + g * group_bytes, w.row_bytes, nr, cols, act + g * arb, arb,
                               1, partial + g * rows + r0, rows);
            if (tile_left[t].fetch_sub(1, std::memory_order_acq_rel) != 1) continue;
            for (int64_t r = r0; r < r0 + nr; ++r) {  // the groups in order: the same sum whatever the threads
                float sum = partial[r];
                for (int64_t h = 1; h < groups; ++h) sum += partial[h * rows + r];
                o.out[r] = sum;
            }
        }
    });
}

}  // namespace tandem
