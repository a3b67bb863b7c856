// Memory as the pool sees it: read bandwidth (the denominator of the decode
// floor, bytes of weights read per token / bandwidth) and pre-faulting weights.
#pragma once

#include <cstddef>

#include "engine/thread_pool.h"
#include "kernels/kernel_api.h"

namespace tandem {

// Reads `bytes` of `data` (already touched, so page faults are not counted)
// `repeats` times with all threads, through the variant's read loop (its widest
// loads, as its kernels read weights); returns the best pass in bytes/second.
double read_bandwidth(ThreadPool& pool, const VariantKernels& kernels, const unsigned char* data, size_t bytes,
                      int repeats);

// Mean seconds per parallel loop of n_tasks tasks, each reading task_bytes (from memory:
// every loop reads the next part of `bytes` of data, cycling), over `loops` loops back to
// back: with task_bytes 0 the pool's own cost of a loop, otherwise a decode phase's shape.
double loop_seconds(ThreadPool& pool, const VariantKernels& kernels, const unsigned char* data, size_t bytes,
                    int64_t n_tasks, size_t task_bytes, int loops);

// Maps every page of [data, data + bytes) into the process now, with all
// threads, so that the first decode steps do not pay a page fault per 4 KiB
// of weights they touch (mmap maps a file's pages lazily, on first access).
void prefault(ThreadPool& pool, const unsigned char* data, size_t bytes);

}  // namespace tandem
