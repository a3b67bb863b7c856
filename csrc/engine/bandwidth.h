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

// Maps every page of [data, data + bytes) into the process now, with all
// threads, so that the first decode steps do not pay a page fault per 4 KiB
// of weights they touch (mmap maps a file's pages lazily, on first access).
void prefault(ThreadPool& pool, const unsigned char* data, size_t bytes);

}  // namespace tandem
