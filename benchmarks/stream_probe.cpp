// Read bandwidth of 16 pinned threads under several loops and page kinds.
// g++ -O2 -std=c++17 -mavx512f -pthread benchmarks/stream_probe.cpp -o /tmp/stream_probe
// /tmp/stream_probe THREADS GIB FILE
#include <fcntl.h>
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

static uint64_t sum_sse(const uint8_t* p, size_t n) {
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (size_t i = 0; i + 32 <= n; i += 32) {
        uint64_t w[4];
        std::memcpy(w, p + i, 32);
        a += w[0]; b += w[1]; c += w[2]; d += w[3];
    }
    return a + b + c + d;
}

template <int PF>
static uint64_t sum_avx512(const uint8_t* p, size_t n) {
    __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
    for (size_t i = 0; i + 256 <= n; i += 256) {
        if (PF) _mm_prefetch(reinterpret_cast<const char*>(p + i + PF), _MM_HINT_T0), _mm_prefetch(reinterpret_cast<const char*>(p + i + PF + 64), _MM_HINT_T0),
                _mm_prefetch(reinterpret_cast<const char*>(p + i + PF + 128), _MM_HINT_T0), _mm_prefetch(reinterpret_cast<const char*>(p + i + PF + 192), _MM_HINT_T0);
        a = _mm512_add_epi64(a, _mm512_loadu_si512(p + i));
        b = _mm512_add_epi64(b, _mm512_loadu_si512(p + i + 64));
        c = _mm512_add_epi64(c, _mm512_loadu_si512(p + i + 128));
        d = _mm512_add_epi64(d, _mm512_loadu_si512(p + i + 192));
    }
    return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a, b), _mm512_add_epi64(c, d)));
}

using Fn = uint64_t (*)(const uint8_t*, size_t);

// chunk 0: each thread one contiguous slice; else tasks of `chunk` bytes taken in turn.
static double run(const uint8_t* data, size_t bytes, int threads, Fn fn, size_t chunk) {
    double best = 0;
    for (int rep = 0; rep < 5; ++rep) {
        std::atomic<uint64_t> sink{0};
        std::atomic<int64_t> next{0};
        std::atomic<int> ready{0};
        std::atomic<bool> go{false};
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t)
            pool.emplace_back([&, t] {
                cpu_set_t set;
                CPU_ZERO(&set);
                CPU_SET(t, &set);
                pthread_setaffinity_np(pthread_self(), sizeof set, &set);
                ready++;
                while (!go.load()) {
                }
                uint64_t s = 0;
                if (chunk == 0) {
                    const size_t part = bytes / threads;
                    s = fn(data + t * part, part);
                } else {
                    for (;;) {
                        const int64_t i = next.fetch_add(1);
                        if (static_cast<size_t>(i + 1) * chunk > bytes) break;
                        s += fn(data + i * chunk, chunk);
                    }
                }
                sink += s;
            });
        while (ready.load() < threads) {
        }
        const auto t0 = std::chrono::steady_clock::now();
        go = true;
        for (auto& th : pool) th.join();
        const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        best = std::max(best, bytes / sec / 1e9);
        if (sink.load() == 42) best += 0;
    }
    return best;
}

static void report(const char* name, const uint8_t* data, size_t bytes, int threads) {
    std::printf("%-28s sse/1M %6.1f  avx512/1M %6.1f  avx512+pf1K/1M %6.1f  avx512+pf4K/1M %6.1f  avx512/slice %6.1f  "
                "avx512/64K %6.1f GB/s\n",
                name, run(data, bytes, threads, sum_sse, 1 << 20), run(data, bytes, threads, sum_avx512<0>, 1 << 20),
                run(data, bytes, threads, sum_avx512<1024>, 1 << 20), run(data, bytes, threads, sum_avx512<4096>, 1 << 20),
                run(data, bytes, threads, sum_avx512<0>, 0), run(data, bytes, threads, sum_avx512<0>, 1 << 16));
    std::fflush(stdout);
}

int main(int argc, char** argv) {
    const int threads = argc > 1 ? std::atoi(argv[1]) : 16;
    const size_t bytes = (argc > 2 ? std::atoll(argv[2]) : 4) << 30;
    const char* file = argc > 3 ? argv[3] : nullptr;
    for (int huge = 0; huge < 2; ++huge) {
        auto* p = static_cast<uint8_t*>(mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
        madvise(p, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
        std::memset(p, 1, bytes);
        report(huge ? "anonymous, huge pages" : "anonymous, 4K pages", p, bytes, threads);
        munmap(p, bytes);
    }
    if (file) {
        const int fd = open(file, O_RDONLY);
        const size_t size = lseek(fd, 0, SEEK_END);
        const size_t n = std::min(size / 2, bytes);
        auto* p = static_cast<uint8_t*>(mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0));
        const uint8_t* q = p + size / 4;  // inside the tensors
        madvise(const_cast<uint8_t*>(q), n, MADV_WILLNEED);
        run(q, n, threads, sum_avx512<0>, 1 << 20);  // maps the pages
        report("file mapping (page cache)", q, n, threads);
    }
    return 0;
}
