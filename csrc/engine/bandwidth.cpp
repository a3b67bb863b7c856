#include "engine/bandwidth.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <vector>

namespace tandem {

double read_bandwidth(ThreadPool& pool, const VariantKernels& kernels, const unsigned char* data, size_t bytes,
                      int repeats) {
    constexpr size_t kChunk = 1 << 20;  // 1 MiB tasks: large enough to stream, small enough to balance
    const int64_t chunks = static_cast<int64_t>(bytes / kChunk);
    if (chunks == 0) return 0.0;
    std::atomic<uint64_t> sink{0};
    double best = 0.0;
    for (int r = 0; r < std::max(1, repeats); ++r) {
        const auto start = std::chrono::steady_clock::now();
        pool.parallel_for(chunks, [&](int64_t i, int) {
            sink.fetch_add(kernels.read_words(data + i * kChunk, kChunk), std::memory_order_relaxed);
        });
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        best = std::max(best, static_cast<double>(chunks * kChunk) / seconds);
    }
    // The sum must look used, or the reads could be optimized away.
    if (sink.load() == 0x5eed) best += 0.0;
    return best;
}

double loop_seconds(ThreadPool& pool, const VariantKernels& kernels, const unsigned char* data, size_t bytes,
                    int64_t n_tasks, size_t task_bytes, int loops) {
    const size_t per_loop = static_cast<size_t>(n_tasks) * task_bytes;
    if (n_tasks < 1 || loops < 1 || per_loop > bytes) return 0.0;
    struct alignas(64) Sum {
        uint64_t value = 0;
    };
    std::vector<Sum> sums(static_cast<size_t>(pool.size()));  // one line per thread: no shared line in the loop
    size_t at = 0;
    const auto start = std::chrono::steady_clock::now();
    for (int l = 0; l < loops; ++l) {
        if (at + per_loop > bytes) at = 0;
        const unsigned char* base = data + at;
        pool.parallel_for(n_tasks, [&](int64_t i, int thread) {
            if (task_bytes > 0) sums[static_cast<size_t>(thread)].value += kernels.read_words(base + i * task_bytes, task_bytes);
        });
        at += per_loop;
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    uint64_t sink = 0;
    for (const Sum& s : sums) sink += s.value;
    if (sink == 0x5eed) return seconds;  // the sums must look used
    return seconds / loops;
}

void prefault(ThreadPool& pool, const unsigned char* data, size_t bytes) {
    constexpr size_t kChunk = 1 << 22;  // 4 MiB per task
    constexpr size_t kPage = 4096;
    const int64_t chunks = static_cast<int64_t>((bytes + kChunk - 1) / kChunk);
    std::atomic<uint64_t> sink{0};
    pool.parallel_for(chunks, [&](int64_t i, int) {
        const size_t begin = static_cast<size_t>(i) * kChunk, end = std::min(bytes, begin + kChunk);
        uint64_t sum = 0;
        // One read per page maps it; volatile keeps the reads from being dropped.
        for (size_t offset = begin; offset < end; offset += kPage) sum += *static_cast<const volatile unsigned char*>(data + offset);
        sink.fetch_add(sum, std::memory_order_relaxed);
    });
}

}  // namespace tandem
