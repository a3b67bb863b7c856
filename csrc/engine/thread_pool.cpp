#include "engine/thread_pool.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

namespace tandem {
namespace {

// /sys is read with C stdio on purpose: iostreams depend on the C++ runtime's
// locale machinery, and a process that also loads torch may hold two copies of
// that runtime (a crash seen in std::ifstream's constructor).
std::string read_text(const std::string& path) {
    std::string text;
    if (FILE* file = std::fopen(path.c_str(), "r")) {
        char buffer[4096];
        if (std::fgets(buffer, sizeof buffer, file) != nullptr) text = buffer;
        std::fclose(file);
    }
    while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
    return text;
}

int read_int(const std::string& path, int fallback) {
    const std::string text = read_text(path);
    char* end = nullptr;
    const long value = std::strtol(text.c_str(), &end, 10);
    return (text.empty() || end == text.c_str()) ? fallback : static_cast<int>(value);
}

// "0-3,8,10-11" -> {0,1,2,3,8,10,11}; malformed entries are skipped (topology is a hint).
std::vector<int> parse_cpu_list(const std::string& text) {
    std::vector<int> out;
    const char* p = text.c_str();
    while (*p != '\0') {
        char* end = nullptr;
        const long first = std::strtol(p, &end, 10);
        if (end == p) break;
        long last = first;
        p = end;
        if (*p == '-') {
            last = std::strtol(p + 1, &end, 10);
            if (end == p + 1) break;
            p = end;
        }
        for (long cpu = first; cpu <= last && cpu < 1 << 16; ++cpu) out.push_back(static_cast<int>(cpu));
        if (*p == ',') ++p;
        else break;
    }
    return out;
}

}  // namespace

int node_of_cpu(int cpu) {
    // Node numbers need not be consecutive: the online list names them.
    for (int node : parse_cpu_list(read_text("/sys/devices/system/node/online"))) {
        const auto cpus = parse_cpu_list(read_text("/sys/devices/system/node/node" + std::to_string(node) + "/cpulist"));
        if (std::find(cpus.begin(), cpus.end(), cpu) != cpus.end()) return node;
    }
    return 0;
}

void pin_to(int cpu) {
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);  // best effort: a refusal only costs locality
#else
    (void)cpu;
#endif
}

std::vector<int> cores_in_order() {
    std::vector<int> allowed;
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu)
            if (CPU_ISSET(cpu, &set)) allowed.push_back(cpu);
#endif
    if (allowed.empty())
        for (unsigned cpu = 0; cpu < std::max(1u, std::thread::hardware_concurrency()); ++cpu)
            allowed.push_back(static_cast<int>(cpu));
    // (node, hyper-thread sibling rank, package, core, cpu): first threads of
    // every core come before second threads, and a node's cores stay together.
    std::vector<std::tuple<int, int, int, int, int>> keys;
    for (int cpu : allowed) {
        const std::string topo = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
        auto siblings = parse_cpu_list(read_text(topo + "thread_siblings_list"));
        const int rank = static_cast<int>(std::count_if(siblings.begin(), siblings.end(), [&](int s) { return s < cpu; }));
        keys.emplace_back(node_of_cpu(cpu), rank, read_int(topo + "physical_package_id", 0),
                          read_int(topo + "core_id", cpu), cpu);
    }
    std::sort(keys.begin(), keys.end());
    std::vector<int> out;
    for (const auto& key : keys) out.push_back(std::get<4>(key));
    return out;
}

ThreadPool::ThreadPool(int n_threads, bool pin, int spin_us, int node_groups)
    : n_threads_(std::max(1, n_threads)),
      spin_us_(std::max(0, spin_us)),
      ranges_(new Range[static_cast<size_t>(std::max(1, n_threads))]) {
    if (pin) {
        const auto cores = cores_in_order();
        if (static_cast<int>(cores.size()) >= n_threads_) cpus_.assign(cores.begin(), cores.begin() + n_threads_);
    }
    group_threads(node_groups);
    for (int t = 1; t < n_threads_; ++t) workers_.emplace_back([this, t] { worker_main(t); });
}

void ThreadPool::group_threads(int node_groups) {
    auto node_at = [&](int t) { return cpus_.empty() ? 0 : node_of_cpu(cpus_[static_cast<size_t>(t)]); };
    node_first_.assign(1, 0);
    node_ids_.clear();
    if (node_groups > 1) {
        const int groups = std::min(node_groups, n_threads_);
        for (int j = 0; j < groups; ++j) {
            node_ids_.push_back(node_at(n_threads_ * j / groups));
            node_first_.push_back(n_threads_ * (j + 1) / groups);
        }
    } else {
        node_ids_.push_back(node_at(0));
        for (int t = 1; t < n_threads_ && node_groups == 0 && !cpus_.empty(); ++t) {
            if (node_at(t) == node_ids_.back()) continue;
            node_first_.push_back(t);
            node_ids_.push_back(node_at(t));
        }
        node_first_.push_back(n_threads_);
    }
    node_of_thread_.assign(static_cast<size_t>(n_threads_), 0);
    for (int j = 0; j < n_nodes(); ++j)
        for (int t = node_first(j); t < node_first(j + 1); ++t) node_of_thread_[static_cast<size_t>(t)] = j;
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(queue_mutex_);
        stop_.store(true);
    }
    queue_cv_.notify_all();
    if (driver_.joinable()) driver_.join();
    {
        std::lock_guard<std::mutex> lock(park_mutex_);
        generation_.fetch_add(2);  // stays even: no loop is set up
    }
    park_cv_.notify_all();
    for (auto& worker : workers_) worker.join();
}

// The loop protocol. generation_ is odd while the caller sets a loop up and
// even once it is published. A worker announces itself in busy_ before it
// reads generation_, and the caller sets up only once busy_ is zero, so a
// worker that woke late never reads half-written state (the two seq_cst
// store/load pairs form a Dekker handshake). The caller returns when every
// task is done, not when every worker has come and gone: a worker still
// parked when the loop ends (woken late by the OS) costs nothing.
void ThreadPool::parallel_for(int64_t n_tasks, TaskFn task, void* ctx) { run_loop(n_tasks, nullptr, task, ctx); }

void ThreadPool::parallel_for_nodes(const int64_t* node_tasks, TaskFn task, void* ctx) {
    int64_t n_tasks = 0;
    for (int j = 0; j < n_nodes(); ++j) n_tasks += node_tasks[j];
    run_loop(n_tasks, n_nodes() > 1 ? node_tasks : nullptr, task, ctx);
}

void ThreadPool::run_loop(int64_t n_tasks, const int64_t* node_tasks, TaskFn task, void* ctx) {
    if (n_tasks <= 0) return;
    std::lock_guard<std::mutex> loop(loop_mutex_);
    if (n_threads_ == 1 || n_tasks == 1) {
        for (int64_t i = 0; i < n_tasks; ++i) task(ctx, i, 0);
        return;
    }
    rest_.store(false, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_seq_cst);  // odd: setting up
    while (busy_.load(std::memory_order_seq_cst) != 0) cpu_relax();
    task_ = task;
    ctx_ = ctx;
    if (node_tasks == nullptr) {
        for (int t = 0; t < n_threads_; ++t) {
            ranges_[t].next.store(n_tasks * t / n_threads_, std::memory_order_relaxed);
            ranges_[t].end = n_tasks * (t + 1) / n_threads_;
        }
    } else {  // each group's tasks over its own threads
        int64_t first = 0;
        for (int j = 0; j < n_nodes(); ++j) {
            const int64_t n = node_tasks[j];
            const int t0 = node_first(j), count = node_first(j + 1) - t0;
            for (int i = 0; i < count; ++i) {
                ranges_[t0 + i].next.store(first + n * i / count, std::memory_order_relaxed);
                ranges_[t0 + i].end = first + n * (i + 1) / count;
            }
            first += n;
        }
    }
    done_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_seq_cst);  // even: published
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
        std::lock_guard<std::mutex> lock(park_mutex_);
        park_cv_.notify_all();
    }
    run_tasks(0);
    while (done_.load(std::memory_order_acquire) != n_tasks) cpu_relax();
}

void ThreadPool::run_tasks(int thread) {
    // Own range first, then the others', nearest thread first. Another's range is read
    // before it is taken from: at a loop's end every thread goes through every range, and
    // an atomic add on each would pull every range's line from core to core, exclusive,
    // while the last tasks run; a read leaves it shared.
    const bool peek = steal_peek_.load(std::memory_order_relaxed);
    int64_t ran = 0;
    for (int step = 0; step < n_threads_; ++step) {
        Range& range = ranges_[(thread + step) % n_threads_];
        if (step > 0 && peek && range.next.load(std::memory_order_relaxed) >= range.end) continue;
        for (;;) {
            const int64_t i = range.next.fetch_add(1, std::memory_order_relaxed);
            if (i >= range.end) break;
            task_(ctx_, i, thread);
            ++ran;
        }
    }
    if (ran) done_.fetch_add(ran, std::memory_order_acq_rel);
}

bool ThreadPool::wait_for_generation(uint64_t seen) {
    const auto start = std::chrono::steady_clock::now();
    const auto deadline = start + std::chrono::microseconds(spin_us_.load(std::memory_order_relaxed));
    const int64_t yield_us = yield_us_.load(std::memory_order_relaxed);
    const auto yield_from = start + std::chrono::microseconds(std::max<int64_t>(0, yield_us));
    for (int i = 0;; ++i) {
        if (generation_.load(std::memory_order_acquire) != seen) return true;
        if ((i & 63) == 63) {
            if (rest_.load(std::memory_order_relaxed)) break;
            const auto now = std::chrono::steady_clock::now();
            if (now > deadline) break;
            if (yield_us >= 0 && now > yield_from) std::this_thread::yield();
        }
        cpu_relax();
    }
    std::unique_lock<std::mutex> lock(park_mutex_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    park_cv_.wait(lock, [&] { return generation_.load(std::memory_order_seq_cst) != seen; });
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
    return true;
}

void ThreadPool::worker_main(int thread) {
    if (!cpus_.empty()) pin_to(cpus_[thread]);
    uint64_t seen = 0;  // the generation before any loop: a loop published earlier is still new
    for (;;) {
        wait_for_generation(seen);
        busy_.fetch_add(1, std::memory_order_seq_cst);
        const uint64_t generation = generation_.load(std::memory_order_seq_cst);
        if (stop_.load(std::memory_order_acquire)) {
            busy_.fetch_sub(1, std::memory_order_seq_cst);
            return;
        }
        // Odd: a loop is being set up; wait for its publication. Even and new: join it.
        if ((generation & 1) == 0 && generation != seen) run_tasks(thread);
        busy_.fetch_sub(1, std::memory_order_seq_cst);
        seen = generation;
    }
}

void ThreadPool::submit(std::function<void()> job) {
    {
        std::lock_guard<std::mutex> lock(queue_mutex_);
        if (!driver_.joinable()) driver_ = std::thread([this] { driver_main(); });
        queue_.push_back(std::move(job));
    }
    queue_cv_.notify_one();
}

void ThreadPool::wait_idle() {
    std::unique_lock<std::mutex> lock(queue_mutex_);
    idle_cv_.wait(lock, [&] { return queue_.empty() && !driver_busy_; });
}

void ThreadPool::driver_main() {
    // The driver leads the loops of submitted jobs, as thread 0 on thread 0's core.
    if (!cpus_.empty()) pin_to(cpus_[0]);
    for (;;) {
        std::function<void()> job;
        {
            std::unique_lock<std::mutex> lock(queue_mutex_);
            queue_cv_.wait(lock, [&] { return stop_.load() || !queue_.empty(); });
            if (queue_.empty()) return;  // stopping with nothing left to run
            job = std::move(queue_.front());
            queue_.pop_front();
            driver_busy_ = true;
        }
        job();
        {
            std::lock_guard<std::mutex> lock(queue_mutex_);
            driver_busy_ = false;
        }
        idle_cv_.notify_all();
    }
}

}  // namespace tandem
