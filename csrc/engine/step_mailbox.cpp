#include "step_mailbox.h"

#include <chrono>
#include <stdexcept>

#include "thread_pool.h"

namespace tandem {

namespace {

// The words are written by the GPU over the bus, never by this thread's compiler-visible
// stores alone: atomic accesses keep every poll a real load.
inline uint32_t load(uint32_t* word) { return __atomic_load_n(word, __ATOMIC_ACQUIRE); }
inline void store(uint32_t* word, uint32_t value) { __atomic_store_n(word, value, __ATOMIC_RELEASE); }

}  // namespace

StepMailbox::StepMailbox(uint32_t* words, int spin_us, int idle_sleep_us, int cpu, int yield_us)
    : words_(words),
      spin_us_(spin_us),
      idle_sleep_us_(idle_sleep_us),
      cpu_(cpu),
      yield_us_(yield_us),
      entries_(kCapacity) {
    if (words == nullptr) throw std::invalid_argument("mailbox words are null");
    if (spin_us < 0 || idle_sleep_us < 1) throw std::invalid_argument("spin_us >= 0 and idle_sleep_us >= 1");
    store(&words_[0], 0);
    store(&words_[1], 0);
    thread_ = std::thread([this] { serve(); });
}

StepMailbox::~StepMailbox() {
    stop_.store(true, std::memory_order_relaxed);
    thread_.join();
}

uint32_t StepMailbox::add(Fn fn, void* data) {
    if (fn == nullptr) throw std::invalid_argument("mailbox call without a function");
    const uint32_t index = count_.load(std::memory_order_relaxed);
    if (index >= kCapacity) throw std::length_error("mailbox is full");
    entries_[index] = Entry{fn, data};
    count_.store(index + 1, std::memory_order_release);  // publishes the entry to the serving thread
    return index + 1;
}

void StepMailbox::serve() {
    if (cpu_ >= 0) pin_to(cpu_);
    using Clock = std::chrono::steady_clock;
    auto last = Clock::now();
    uint64_t polls = 0;
    while (!stop_.load(std::memory_order_relaxed)) {
        const uint32_t code = load(&words_[0]);
        if (code == 0) {
            // Spin while calls come often (a decode step's layers); past spin_us, sleep between
            // polls, and a millisecond at a time once idle for a second (no generation running).
            if ((++polls & 255) != 0) {
                cpu_relax();
                continue;
            }
            const auto idle = Clock::now() - last;
            if (idle > std::chrono::seconds(1)) {
                std::this_thread::sleep_for(std::chrono::milliseconds(1));
            } else if (idle > std::chrono::microseconds(spin_us_)) {
                std::this_thread::sleep_for(std::chrono::microseconds(idle_sleep_us_));
            } else if (yield_us_ >= 0 && idle > std::chrono::microseconds(yield_us_)) {
                std::this_thread::yield();
            }
            continue;
        }
        store(&words_[0], 0);
        if (dry_.load(std::memory_order_relaxed)) {
            // answered below without running the call
        } else if (code <= count_.load(std::memory_order_acquire)) {
            const Entry& entry = entries_[code - 1];
            try {
                entry.fn(entry.data);
                served_.fetch_add(1, std::memory_order_relaxed);
            } catch (...) {
                failed_.fetch_add(1, std::memory_order_relaxed);
            }
        } else {
            failed_.fetch_add(1, std::memory_order_relaxed);
        }
        store(&words_[1], code);
        last = Clock::now();
        polls = 0;
    }
}

}  // namespace tandem
