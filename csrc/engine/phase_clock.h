// Wall time per phase of an op's calls, for profiling (off unless asked for).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>

namespace tandem {

template <int N>
class PhaseClock {
public:
    // Start (and zero) or stop the clocks.
    void set(bool on) {
        on_ = on;
        ns_.fill(0);
        calls_ = 0;
    }
    // A call begins: phases are timed from here.
    void start() {
        if (!on_) return;
        last_ = std::chrono::steady_clock::now();
        ++calls_;
    }
    // The phase that ran since the last mark (or start) ends now.
    void mark(int phase) {
        if (!on_) return;
        const auto now = std::chrono::steady_clock::now();
        ns_[phase] += std::chrono::duration_cast<std::chrono::nanoseconds>(now - last_).count();
        last_ = now;
    }
    const std::array<int64_t, N>& ns() const { return ns_; }
    int64_t calls() const { return calls_; }

private:
    bool on_ = false;
    std::array<int64_t, N> ns_{};
    int64_t calls_ = 0;
    std::chrono::steady_clock::time_point last_;
};

}  // namespace tandem
