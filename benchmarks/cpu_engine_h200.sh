#!/usr/bin/env bash
# The CPU engine on the GPU machine's CPU (16 cores, AVX-512 + AMX), CPU only:
# kernel and op tests for every variant there, then tandem bench against
# llama.cpp's llama-bench (CPU build of llama-cpp-python 0.3.36's llama.cpp) on
# one Qwen3-30B-A3B-shaped Q4_K_M file from tandem synth, same threads.
# Expects .whl/gguf-*.whl, .whl/llamacpp-cpu-src.tar.xz and .whl/qwen25-tokenizer.gguf
# (the embedded model's tokenizer alone) carried, $OUT set. SKIP_TESTS=1 skips the tests;
# PROFILE=1 adds a prompt and a decode profile and the MoE op alone (PROFILE=prompt: the first alone); CROSSOVER=1 the
# prefill kernels against the dot kernels on one matrix; DOTS=1 the dot kernels of avx512 and amx on one thread. AB names an environment setting for a second tandem run (default: the fused
# decode layers off; AB=none: no second run); SWEEP adds runs (benchmarks/sweep_benches.sh). LLAMA=0 leaves llama.cpp out, BENCH=0 the tandem bench;
# PAIRS=N runs the first tandem bench and llama-bench N times in turn;
# LLAMA_JOBS: compile jobs for llama.cpp (default 6, beside the tests). tandem's decode follows its
# prompt, so llama-bench runs tg at depth NP too, and tandem bench once more with an 8-token prompt.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
THREADS=${THREADS:-16}; LAYERS=${LAYERS:-48}; NP=${NP:-512}; NG=${NG:-32}; R=${R:-2}
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/steps.log"; }
source benchmarks/sweep_benches.sh

python -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl
LLAMA_PID=
if [ "${LLAMA:-1}" != 0 ]; then
log "build llama.cpp (background)"
( mkdir -p /tmp/l && tar xJf .whl/llamacpp-cpu-src.tar.xz -C /tmp/l &&
  cmake -S /tmp/l/llama.cpp -B /tmp/l/b -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DGGML_NATIVE=ON &&
  cmake --build /tmp/l/b -j "${LLAMA_JOBS:-6}" --target llama-bench ) > "$OUT/llama_build.log" 2>&1 &
LLAMA_PID=$!
fi
log "build tandem"
python -m pip install --no-build-isolation --no-deps -e . > "$OUT/tandem_build.log" 2>&1 || { log "tandem build failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD  # after the build: the build backend must come from the system
python -m tandem doctor | head -3 >> "$OUT/steps.log" 2>&1
if [ -z "${SKIP_TESTS:-}" ]; then
log "tests"
timeout 240 python -m pytest -v -p no:cacheprovider tests/cpu/test_kernels.py tests/cpu/test_engine_ops.py \
  tests/cpu/test_gemm.py tests/cpu/test_decode_layer.py tests/engine/test_kv_cache.py tests/cpu/test_rope.py \
  tests/cpu/test_dequant_rows.py tests/cpu/test_attention_prefill.py tests/cpu/test_router_engine.py \
  tests/cpu/test_laid_out.py tests/cpu/test_numa.py > "$OUT/tests.log" 2>&1; log "tests rc=$?"; grep -v PASSED "$OUT/tests.log" | tail -40 >> "$OUT/steps.log"
grep -c "amx\] PASSED" "$OUT/tests.log" | sed 's/^/amx prefill tests passed: /' >> "$OUT/steps.log"
fi
# Nothing else may run while either tool is timed: a compile beside the engine's pinned
# workers cut its decode to a third (BENCHMARKS.md).
[ -n "$LLAMA_PID" ] && { wait $LLAMA_PID; log "llama build rc=$?"; }
log "synth"
python -m tandem synth --shape qwen3-30b-a3b --layers "$LAYERS" --quant Q4_K_M --tokenizer-from .whl/qwen25-tokenizer.gguf -o /tmp/q3.gguf > "$OUT/synth.log" 2>&1
log "synth rc=$? $(ls -la /tmp/q3.gguf)"
sync  # the file's 18 GB of dirty pages written back before anything is timed, not during it
# llama-bench right after tandem's first bench, so that the machine has least time to
# drift between the two (its read bandwidth moved by a third within one run, BENCHMARKS.md):
# pp and tg, then tg at tandem's depth (its tg starts from an empty cache unless -d fills it).
llama_benches() {
  [ -n "$LLAMA_PID" ] && [ -x /tmp/l/b/bin/llama-bench ] || return 0
  timeout 240 /tmp/l/b/bin/llama-bench -m /tmp/q3.gguf -t "$THREADS" -p "$NP" -n "$NG" -r "$R" -o md > "$OUT/llama_bench.txt" 2>&1
  log "llama-bench rc=$?"; cat "$OUT/llama_bench.txt" | tee -a "$OUT/steps.log"
  timeout 240 /tmp/l/b/bin/llama-bench -m /tmp/q3.gguf -t "$THREADS" -p 0 -n "$NG" -d "$NP" -r "$R" -o md > "$OUT/llama_bench_depth.txt" 2>&1
  log "llama-bench at depth $NP rc=$?"; grep "@ d" "$OUT/llama_bench_depth.txt" | tee -a "$OUT/steps.log"
}
if [ "${BENCH:-1}" != 0 ]; then
for pair in $(seq "${PAIRS:-1}"); do  # PAIRS=N: N tandem, llama.cpp pairs back to back
log "tandem bench ($pair)"
timeout 300 python -m tandem bench -m /tmp/q3.gguf -t "$THREADS" -p "$NP" -n "$NG" -r "$R" --json > "$OUT/tandem_bench.txt" 2>&1
log "tandem bench rc=$?"; tail -8 "$OUT/tandem_bench.txt" | tee -a "$OUT/steps.log"
llama_benches
done
# tandem's decode follows its prompt (tg @ dNP); one with an almost empty cache for llama-bench's plain tg
log "tandem bench, -p 8"
timeout 300 python -m tandem bench -m /tmp/q3.gguf -t "$THREADS" -p 8 -n "$NG" -r "$R" --json 2>&1 | tail -1 | tee -a "$OUT/steps.log"
AB=${AB:-TANDEM_CPU_FUSED_DECODE=0}
if [ "$AB" != none ]; then
log "tandem bench, $AB"
env $AB timeout 300 python -m tandem bench -m /tmp/q3.gguf -t "$THREADS" -p "$NP" -n "$NG" -r "$R" --json \
  2>&1 | tail -1 | tee -a "$OUT/steps.log"
fi
sweep_benches /tmp/q3.gguf "" ""
else
llama_benches
fi
if [ -n "${CROSSOVER:-}" ]; then
log "prefill kernels against the dot kernels, one linear layer"
for shape in "2048 2048" "768 2048"; do
  timeout 120 python benchmarks/gemm_crossover.py "$THREADS" $shape >> "$OUT/steps.log" 2>&1
done
fi
if [ -n "${DOTS:-}" ]; then
log "dot kernels, one thread, by variant"
for v in avx512 amx; do
  timeout 120 python benchmarks/dot_kernel_bench.py "${GHZ:-2.0}" 1,4,8,16,32,64,128 "$v" >> "$OUT/steps.log" 2>&1
done
fi
if [ -n "${PROFILE:-}" ]; then
log "prompt profile"
PROFILE_OPS=1 timeout 150 python benchmarks/profile_decode.py /tmp/q3.gguf "$THREADS" 0 "$NP" \
  2>&1 | grep -v -i warn | tail -45 >> "$OUT/steps.log"
if [ "$PROFILE" != prompt ]; then
log "moe op alone"
timeout 120 python benchmarks/moe_op_bench.py /tmp/q3.gguf "$THREADS" 20 >> "$OUT/steps.log" 2>&1
log "profile"
timeout 200 python benchmarks/profile_decode.py /tmp/q3.gguf "$THREADS" 8 2>&1 | grep -v Warn | tail -14 >> "$OUT/steps.log"
fi
fi
