// Builds of the dot kernels from up to six source trees in one process, timed in
// alternation (benchmarks/kernel_builds_ab.sh compiles it): on a machine whose speed
// drifts by tens of percent within minutes, only a ratio measured round by round settles
// a change of a few percent. The first build is the reference; each build's output must
// equal its output bit for bit ("DIFF" says where it does not).
// kernel_builds_ab GGML_TYPE ROUNDS BUILDS [TOKENS,... [cold]]: 512 rows × 2048 columns (K=768 in
// the environment: 768, an expert's down matrix) of
// random blocks, one thread, the dot_rows of the amx variant (activations quantized
// beforehand). The weights stay in cache, or with `cold` each call takes the next of 1,024
// copies (576 MiB of Q4_K), so that they come from memory as an expert's do in a prompt.
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/kernel_api.h"

#define TANDEM_BUILD(ns) \
    namespace tandem::ns { \
    const VariantKernels& kernels(); \
    }
TANDEM_BUILD(b0)
TANDEM_BUILD(b1)
TANDEM_BUILD(b2)
TANDEM_BUILD(b3)
TANDEM_BUILD(b4)
TANDEM_BUILD(b5)

using namespace tandem;

int main(int argc, char** argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: kernel_builds_ab GGML_TYPE ROUNDS BUILDS [TOKENS,...]\n");
        return 2;
    }
    syscall(SYS_arch_prctl, 0x1023, 18);  // ARCH_REQ_XCOMP_PERM for AMX tile data
    const int type = std::atoi(argv[1]), rounds = std::atoi(argv[2]), nb = std::atoi(argv[3]);
    std::vector<int> tokens;
    std::stringstream list(argc > 4 ? argv[4] : "16,32,64,512");
    for (std::string item; std::getline(list, item, ',');) tokens.push_back(std::stoi(item));
    const bool cold = argc > 5 && std::string(argv[5]) == "cold";
    const VariantKernels* builds[6] = {&b0::kernels(), &b1::kernels(), &b2::kernels(),
                                       &b3::kernels(), &b4::kernels(), &b5::kernels()};
    if (nb < 1 || nb > 6 || builds[0]->find(type) == nullptr) {
        std::fprintf(stderr, "kernel_builds_ab: 1-6 builds and a ggml type they have\n");
        return 2;
    }
    const TypeKernel& tk = *builds[0]->find(type);
    const int rows = 512, k = std::getenv("K") != nullptr ? std::atoi(std::getenv("K")) : 2048;  // a multiple of 256
    const size_t row_bytes = static_cast<size_t>(k / tk.block_elems) * tk.block_bytes;
    std::mt19937 rng(1);
    const size_t copies = cold ? 1024 : 1, matrix = rows * row_bytes;
    std::vector<uint8_t> w(matrix * copies);
    for (size_t i = 0; i < matrix; ++i) w[i] = static_cast<uint8_t>(rng());
    // Finite, modest fp16 scales: Q4_K/Q5_K's d and dmin lead the block, Q6_K's d ends it.
    for (size_t i = 0; i < w.size(); i += tk.block_bytes) {
        const size_t at = type == 14 ? i + tk.block_bytes - 1 : i + 1;
        w[at] = 0x3c;
        if (type == 12 || type == 13) w[i + 3] = 0x2c;
    }
    for (size_t c = 1; c < copies; ++c) std::memcpy(w.data() + c * matrix, w.data(), matrix);
    size_t next = 0;  // the copy the next call takes
    std::normal_distribution<float> normal;
    const size_t arb = act_row_bytes(tk.act, k);
    for (const int n : tokens) {
        std::vector<float> x(static_cast<size_t>(n) * k);
        for (float& v : x) v = normal(rng);
        std::vector<uint8_t> act(arb * n);
        for (int t = 0; t < n; ++t) {
            const QuantizeRowFn q = tk.act == ActFormat::Q8_32 ? builds[0]->quantize_q8_32 : builds[0]->quantize_q8_256;
            q(x.data() + static_cast<size_t>(t) * k, k, act.data() + arb * t);
        }
        std::vector<std::vector<float>> out(nb, std::vector<float>(static_cast<size_t>(n) * rows));
        std::vector<std::vector<double>> ratio(nb);
        std::vector<double> best(nb, 1e30);
        const int inner = std::max(1, 512 / n);
        for (int r = 0; r < rounds; ++r) {
            std::vector<double> t(nb);
            for (int b = 0; b < nb; ++b) {
                const DotRowsFn dot = builds[b]->find(type)->dot_rows;
                double fastest = 1e30;
                for (int rep = 0; rep < 5; ++rep) {
                    const auto t0 = std::chrono::steady_clock::now();
                    for (int j = 0; j < inner; ++j, next = (next + 1) % copies)
                        dot(w.data() + next * matrix, row_bytes, rows, k, act.data(), arb, n, out[b].data(), rows);
                    const std::chrono::duration<double> s = std::chrono::steady_clock::now() - t0;
                    fastest = std::min(fastest, s.count() / inner);
                }
                t[b] = fastest;
                best[b] = std::min(best[b], fastest);
            }
            for (int b = 0; b < nb; ++b) ratio[b].push_back(t[0] / t[b]);
        }
        std::printf("type %d, %3d tokens%s:", type, n, cold ? ", cold" : "");
        for (int b = 0; b < nb; ++b) {
            std::sort(ratio[b].begin(), ratio[b].end());
            const bool same = std::memcmp(out[b].data(), out[0].data(), out[b].size() * sizeof(float)) == 0;
            std::printf("  b%d %6.1f G/s x%.2f (%.2f-%.2f)%s", b, rows * double(k) * n / best[b] / 1e9,
                        ratio[b][ratio[b].size() / 2], ratio[b].front(), ratio[b].back(), same ? "" : " DIFF");
        }
        std::printf("\n");
    }
    return 0;
}
