// A persistent pool of worker threads for the CPU engine's ops.
//
// One op call is a few phases (quantize activations, gate/up, down, reduce),
// each a parallel loop of small tasks lasting microseconds at decode, so
// waking threads must cost less than the work: workers spin briefly on a
// generation counter before parking on a condition variable, and the calling
// thread takes part in every loop. Tasks are split into one contiguous range
// per thread (each thread keeps reading the same weight rows call after call,
// which keeps them in its caches and on its NUMA node) and a thread that runs
// out steals from the others' ranges, nearest first.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace tandem {

// One iteration of a spin-wait: a pause hint to the core (or a yield elsewhere).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
}

// Atomic counters for one parallel loop's own bookkeeping (tasks left per group, ready
// flags), kept from call to call and grown when a call needs more.
class LoopCounters {
public:
    std::atomic<int64_t>* get(size_t n) {
        if (size_ < n) {
            counters_.reset(new std::atomic<int64_t>[n]);
            size_ = n;
        }
        return counters_.get();
    }

private:
    std::unique_ptr<std::atomic<int64_t>[]> counters_;
    size_t size_ = 0;
};

// Binds the calling thread to one logical CPU (best effort: a refusal only costs locality).
void pin_to(int cpu);

class ThreadPool {
public:
    // task(ctx, index, thread): run by some thread for each index in [0, n_tasks).
    using TaskFn = void (*)(void* ctx, int64_t index, int thread);

    // n_threads counts the calling thread; pin binds each worker to its own core.
    // spin_us: how long an idle worker spins before parking. Decode calls the
    // pool a few hundred times per token with torch work between calls; a
    // parked worker costs a futex wake-up (tens of microseconds, in series
    // over the workers) when the next loop starts.
    // node_groups: 0 groups the threads by the NUMA node of their cores (one group when
    // unpinned), 1 makes one group whatever the machine (NUMA off), N > 1 makes N equal
    // groups of consecutive threads, each on the node of its first thread's core (a
    // machine's nodes simulated, for tests).
    explicit ThreadPool(int n_threads, bool pin, int spin_us = kDefaultSpinMicroseconds, int node_groups = 0);
    static constexpr int kDefaultSpinMicroseconds = 200;
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_threads_; }
    // How long idle workers spin from their next idle period on.
    void set_spin_us(int spin_us) { spin_us_.store(std::max(0, spin_us), std::memory_order_relaxed); }
    int spin_us() const { return static_cast<int>(spin_us_.load(std::memory_order_relaxed)); }
    // After yield_us of an idle period, a spinning worker offers its core to other threads
    // between polls (sched_yield): a thread outside the pool that shares the core (the
    // Python thread of a GPU model's decode loop) then runs at once instead of waiting
    // for a time slice. Negative: never (the default).
    void set_yield_us(int yield_us) { yield_us_.store(yield_us, std::memory_order_relaxed); }
    // Whether a thread out of tasks reads another's range before it takes from it (on, the
    // default), or takes at once (an atomic add on every range, the former way; benchmarks).
    void set_steal_peek(bool on) { steal_peek_.store(on, std::memory_order_relaxed); }
    bool steal_peek() const { return steal_peek_.load(std::memory_order_relaxed); }
    int yield_us() const { return static_cast<int>(yield_us_.load(std::memory_order_relaxed)); }
    const std::vector<int>& cpus() const { return cpus_; }

    // The threads in groups by NUMA node (engine/numa.h): group j is threads
    // [node_first(j), node_first(j + 1)), on OS node node_id(j). One group on a
    // machine of one node. Threads of a group are consecutive (cores_in_order).
    int n_nodes() const { return static_cast<int>(node_ids_.size()); }
    int node_first(int group) const { return node_first_[static_cast<size_t>(group)]; }
    int node_id(int group) const { return node_ids_[static_cast<size_t>(group)]; }
    int node_of_thread(int thread) const { return node_of_thread_[static_cast<size_t>(thread)]; }

    // Runs task for every index on all threads and returns when all are done.
    // Calls from different threads are serialized.
    void parallel_for(int64_t n_tasks, TaskFn task, void* ctx);

    template <typename F>
    void parallel_for(int64_t n_tasks, F&& body) {
        parallel_for(
            n_tasks, [](void* ctx, int64_t i, int t) { (*static_cast<F*>(ctx))(i, t); },
            static_cast<void*>(&body));
    }

    // The same, with the tasks in node order: node_tasks[j] tasks for group j, its
    // indices after those of groups 0 ... j-1. Group j's threads start on them (each
    // its own contiguous range), then steal as in parallel_for. With one group this
    // is parallel_for.
    void parallel_for_nodes(const int64_t* node_tasks, TaskFn task, void* ctx);

    template <typename F>
    void parallel_for_nodes(const int64_t* node_tasks, F&& body) {
        parallel_for_nodes(
            node_tasks, [](void* ctx, int64_t i, int t) { (*static_cast<F*>(ctx))(i, t); },
            static_cast<void*>(&body));
    }

    // Idle workers park at once instead of spinning until the next loop: an
    // op that ends a call with many tokens (prefill) says so, because torch's
    // own threads run next (attention, norms) on the same cores. The next
    // parallel loop ends the rest.
    void rest() { rest_.store(true, std::memory_order_relaxed); }

    // Asynchronous work: job runs on the pool's driver thread, which leads the
    // parallel loops it calls, in submission order. wait_idle() returns when
    // every submitted job has finished.
    void submit(std::function<void()> job);
    void wait_idle();

private:
    struct alignas(64) Range {
        std::atomic<int64_t> next{0};
        int64_t end = 0;
    };

    void run_loop(int64_t n_tasks, const int64_t* node_tasks, TaskFn task, void* ctx);
    void group_threads(int node_groups);
    void worker_main(int thread);
    void driver_main();
    void run_tasks(int thread);
    bool wait_for_generation(uint64_t seen);

    int n_threads_;
    std::atomic<int64_t> spin_us_;
    std::atomic<int64_t> yield_us_{-1};
    std::atomic<bool> steal_peek_{true};
    std::vector<int> cpus_;  // the core of each thread (empty: not pinned)
    std::vector<int> node_first_;      // group j: threads [node_first_[j], node_first_[j + 1])
    std::vector<int> node_ids_;        // OS node of each group
    std::vector<int> node_of_thread_;  // group of each thread
    std::vector<std::thread> workers_;
    std::unique_ptr<Range[]> ranges_;

    std::mutex loop_mutex_;  // one parallel loop at a time
    TaskFn task_ = nullptr;
    void* ctx_ = nullptr;
    alignas(64) std::atomic<uint64_t> generation_{0};
    alignas(64) std::atomic<int64_t> done_{0};  // tasks of the current loop finished
    alignas(64) std::atomic<int> busy_{0};      // workers between waking and leaving a loop
    std::atomic<int> sleepers_{0};
    std::atomic<bool> stop_{false};
    std::atomic<bool> rest_{false};
    std::mutex park_mutex_;
    std::condition_variable park_cv_;

    std::thread driver_;
    std::mutex queue_mutex_;
    std::condition_variable queue_cv_;
    std::condition_variable idle_cv_;
    std::deque<std::function<void()>> queue_;
    bool driver_busy_ = false;
};

// Logical CPUs this process may use, one per physical core first (hyper-thread
// siblings after), grouped by NUMA node.
std::vector<int> cores_in_order();

// The NUMA node of a logical CPU (0 where the machine says nothing).
int node_of_cpu(int cpu);

}  // namespace tandem
