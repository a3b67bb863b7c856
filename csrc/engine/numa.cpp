#include "engine/numa.h"

#include <algorithm>
#include <atomic>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace tandem {
namespace {

std::atomic<uint64_t> g_bytes{0};
std::atomic<int64_t> g_refused{0};

constexpr int kMpolMfMove = 2;  // MPOL_MF_MOVE: move pages only this process maps

// move_pages(2) through syscall(2), no libnuma at build or run time; page by page, so the
// mapping keeps its policy and is not split into one mapping per range (a stack of 256
// experts on two nodes would otherwise make hundreds of mappings per tensor). Pages not
// yet in memory are skipped. False if the kernel refused the call.
bool move_range(uintptr_t begin, uintptr_t end, uintptr_t page, int node) {
#if defined(__linux__) && defined(SYS_move_pages)
    constexpr size_t kBatch = 4096;
    std::vector<void*> pages;
    std::vector<int> nodes(kBatch, node), status(kBatch);
    pages.reserve(kBatch);
    for (uintptr_t at = begin; at < end;) {
        pages.clear();
        for (; at < end && pages.size() < kBatch; at += page) pages.push_back(reinterpret_cast<void*>(at));
        if (syscall(SYS_move_pages, 0, pages.size(), pages.data(), nodes.data(), status.data(), kMpolMfMove) < 0)
            return false;
    }
    return true;
#else
    (void)begin, (void)end, (void)page, (void)node;
    return false;
#endif
}

uintptr_t nearest_page(uintptr_t address, uintptr_t page) { return (address + page / 2) / page * page; }

}  // namespace

int64_t node_row_edge(const ThreadPool& pool, int64_t rows, int group, int64_t align) {
    if (group <= 0) return 0;
    if (group >= pool.n_nodes()) return rows;
    const int64_t at = rows * pool.node_first(group) / pool.size();
    return std::min(rows, (at + align / 2) / align * align);
}

Placement place_rows(const ThreadPool& pool, const WeightMatrix& w) {
    Placement done;
    if (pool.n_nodes() < 2 || w.data == nullptr) return done;
#if defined(__linux__)
    const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    for (int64_t e = 0; e < w.n_experts; ++e) {
        const uintptr_t base = reinterpret_cast<uintptr_t>(w.matrix(e));
        for (int j = 0; j < pool.n_nodes(); ++j) {
            const uintptr_t first = base + static_cast<uintptr_t>(node_row_edge(pool, w.rows, j)) * w.row_bytes;
            const uintptr_t last = base + static_cast<uintptr_t>(node_row_edge(pool, w.rows, j + 1)) * w.row_bytes;
            // The first group takes the page its rows start in, the last the page they end in;
            // a page across an edge goes to the group holding most of it.
            const uintptr_t begin = j == 0 ? first / page * page : nearest_page(first, page);
            const uintptr_t end = j + 1 == pool.n_nodes() ? (last + page - 1) / page * page : nearest_page(last, page);
            if (end <= begin) continue;
            if (move_range(begin, end, page, pool.node_id(j))) done.bytes += end - begin;
            else ++done.refused;
        }
    }
#endif
    g_bytes.fetch_add(done.bytes, std::memory_order_relaxed);
    g_refused.fetch_add(done.refused, std::memory_order_relaxed);
    return done;
}

std::vector<int> page_nodes(const uint8_t* data, size_t bytes) {
#if defined(__linux__) && defined(SYS_move_pages)
    const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    const uintptr_t begin = reinterpret_cast<uintptr_t>(data) / page * page;
    const uintptr_t end = reinterpret_cast<uintptr_t>(data) + bytes;
    std::vector<void*> pages;
    for (uintptr_t at = begin; at < end; at += page) pages.push_back(reinterpret_cast<void*>(at));
    std::vector<int> status(pages.size());
    if (syscall(SYS_move_pages, 0, pages.size(), pages.data(), nullptr, status.data(), 0) < 0) return {};
    return status;
#else
    (void)data, (void)bytes;
    return {};
#endif
}

Placement placement_totals() {
    return Placement{g_bytes.load(std::memory_order_relaxed), g_refused.load(std::memory_order_relaxed)};
}

}  // namespace tandem
