// Calls a CUDA stream asks of the CPU through two words of page-locked memory.
//
// A hybrid decode step hands each MoE layer's routed experts to the CPU engine and
// takes the result back. A host function (cudaLaunchHostFunc) does that through the
// driver's callback thread, and in a CUDA graph every host node stops the GPU until the
// driver restarts the work after it. Here the stream signals and waits by itself: it
// copies a call's inputs to host memory, writes the call's code into the request word
// (cuStreamWriteValue32), and waits until the done word holds that code
// (cuStreamWaitValue32) before it copies the output back. A serving thread polls the
// request word, clears it, runs the call and then stores the code in the done word.
// The stream clears the done word after its wait, so calls strictly alternate:
// request c, done c, done 0, the next request.
//
// One stream at a time may use a mailbox: its calls must be in one order.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace tandem {

class StepMailbox {
public:
    using Fn = void (*)(void*);
    static constexpr uint32_t kCapacity = 1 << 16;

    // words[0]: request, words[1]: done; page-locked and outliving the mailbox.
    // spin_us: how long the serving thread polls without sleeping after a call;
    // past it, it sleeps idle_sleep_us between polls, and 1 ms after a second idle.
    // cpu >= 0: the serving thread is pinned there (the pool's thread-0 core, which it
    // leads the loops from).
    // yield_us >= 0: past yield_us idle, the thread offers its core to other threads between
    // polls (as ThreadPool::set_yield_us).
    StepMailbox(uint32_t* words, int spin_us, int idle_sleep_us = 50, int cpu = -1, int yield_us = -1);
    ~StepMailbox();
    StepMailbox(const StepMailbox&) = delete;
    StepMailbox& operator=(const StepMailbox&) = delete;

    // The code (1, 2, ...) that makes the serving thread call fn(data).
    uint32_t add(Fn fn, void* data);
    uint64_t served() const { return served_.load(std::memory_order_relaxed); }
    // Requests with a code nothing was added under, or whose call threw: each is
    // answered all the same, so that the stream never waits forever.
    uint64_t failed() const { return failed_.load(std::memory_order_relaxed); }
    // Dry: requests are answered without running their calls, so that a benchmark can
    // time the hand-over alone (the outputs keep what they held).
    void set_dry(bool dry) { dry_.store(dry, std::memory_order_relaxed); }
    bool dry() const { return dry_.load(std::memory_order_relaxed); }

private:
    struct Entry {
        Fn fn = nullptr;
        void* data = nullptr;
    };
    void serve();

    uint32_t* words_;
    int spin_us_;
    int idle_sleep_us_;
    int cpu_;
    int yield_us_;
    std::vector<Entry> entries_;
    std::atomic<uint32_t> count_{0};
    std::atomic<uint64_t> served_{0};
    std::atomic<uint64_t> failed_{0};
    std::atomic<bool> stop_{false};
    std::atomic<bool> dry_{false};
    std::thread thread_;
};

}  // namespace tandem
