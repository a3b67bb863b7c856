// Weights near the threads that read them, on machines of several NUMA nodes.
//
// The pool groups its threads by node (ThreadPool::n_nodes). Every weight matrix
// is divided by rows among the groups, in proportion to their threads: group j
// owns rows [edges[j], edges[j + 1]) of each matrix (of each expert's matrix in a
// stack). place_rows moves the pages of group j's rows to its node, once, when an
// op is built; the one-token loops (decode) then hand group j's rows to group j's
// threads first (ThreadPool::parallel_for_nodes). Weights stay one copy: a node
// holds its share of every matrix, not a matrix of its own. On one node, one
// group owns every row and nothing moves.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "engine/thread_pool.h"
#include "engine/weight_matrix.h"

namespace tandem {

// Where group j's rows of a matrix start (j = n_nodes(): rows): rows in proportion to
// each group's threads, every edge but the last on a multiple of `align` rows.
int64_t node_row_edge(const ThreadPool& pool, int64_t rows, int group, int64_t align = 16);

// What place_rows did: bytes it asked the kernel to move, and calls the kernel refused
// (no permission, no such node, a kernel without NUMA): the pages then stay where
// they are, which costs speed only.
struct Placement {
    uint64_t bytes = 0;
    int64_t refused = 0;
};

// Moves each group's rows of every matrix in w to the group's node (pages rounded to
// the nearest page edge). Does nothing with one group.
Placement place_rows(const ThreadPool& pool, const WeightMatrix& w);

// The node of each page of [data, data + bytes): negative where the kernel could not say
// (-ENOENT: not in memory); empty where it refused the query. For tests and benchmarks.
std::vector<int> page_nodes(const uint8_t* data, size_t bytes);

// Totals over every place_rows call of the process (tandem doctor, benchmarks).
Placement placement_totals();

}  // namespace tandem
