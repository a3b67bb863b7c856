// Memory read bandwidth as the pool sees it: the denominator of the decode
// floor (bytes of weights read per token / bandwidth).
#pragma once

#include <cstddef>

#include "engine/thread_pool.h"

namespace tandem {

// Reads `bytes` of `data` (already touched, so page faults are not counted)
// `repeats` times with all threads; returns the best pass in bytes/second.
double read_bandwidth(ThreadPool& pool, const unsigned char* data, size_t bytes, int repeats);

}  // namespace tandem
