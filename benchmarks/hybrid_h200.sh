#!/usr/bin/env bash
# The hybrid placement on the GPU machine: experts on the CPU engine (16 threads), the rest
# on the H200, against llama.cpp's llama-bench built with CUDA from llama-cpp-python
# 0.3.36's source (-ngl 99 -ot exps=CPU -fa on -t 16) on one Qwen3-30B-A3B-shaped Q4_K_M
# file from tandem synth (SHAPE, LAYERS: another of tandem synth's shapes, e.g.
# SHAPE=deepseek-v2-lite LAYERS=27). Expects .whl/gguf-*.whl, .whl/llamacpp-cuda-src.tar.xz (the
# source; its CUDA backend is built here) and .whl/qwen25-tokenizer.gguf carried, $OUT set.
# TESTS=1 runs the GPU tests first; AB=none skips tandem's run with eager decode steps;
# LLAMA=0 leaves llama.cpp out; SWEEP adds runs (benchmarks/sweep_benches.sh); PROFILE=1 splits a decode step
# (benchmarks/profile_hybrid.py; PROFILE_RUNS='threads:prompt ...', default 16:512 as bench
# decodes); EXTRA='shape:layers:gib ...' benches more files the same way after the first
# (tandem's default settings and llama.cpp's), e.g. EXTRA='deepseek-v2-lite:27:auto'; P2=2048
# also measures the first file's prompt of P2 tokens (llama.cpp with -ub P2). The budget GIB
# (auto: benchmarks/experts_on_cpu_budget.py) keeps every layer's experts on the CPU (the plan is
# printed).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SHAPE=${SHAPE:-qwen3-30b-a3b}; LAYERS=${LAYERS:-48}; NP=${NP:-512}; NG=${NG:-32}; R=${R:-2}; GIB=${GIB:-auto}
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/steps.log"; }
source benchmarks/sweep_benches.sh

python -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl
LLAMA_PID=
if [ "${LLAMA:-1}" != 0 ]; then
log "build llama.cpp with CUDA (background)"
bash benchmarks/build_llama_cuda.sh > "$OUT/llama_build.log" 2>&1 &
LLAMA_PID=$!
fi
log "build tandem"
python -m pip install --no-build-isolation --no-deps -e . > "$OUT/tandem_build.log" 2>&1 || { log "tandem build failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
if [ -n "${TESTS:-}" ]; then
  log "gpu tests"
  timeout 240 python -m pytest -q -p no:cacheprovider tests/gpu tests/test_gpu.py tests/ops/test_deepseek_gpu.py \
    > "$OUT/gpu_tests.log" 2>&1
  log "gpu tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | tail -15 >> "$OUT/steps.log"
fi
log "synth"
python -m tandem synth --shape "$SHAPE" --layers "$LAYERS" --quant Q4_K_M \
  --tokenizer-from .whl/qwen25-tokenizer.gguf -o /tmp/q3.gguf > "$OUT/synth.log" 2>&1
log "synth rc=$?"
[ "$GIB" = auto ] && GIB=$(python benchmarks/experts_on_cpu_budget.py /tmp/q3.gguf)
python -m tandem inspect /tmp/q3.gguf --plan --gpu-memory "$GIB" --ctx 4096 2>&1 | sed -n '/placement/,/rules/p' >> "$OUT/steps.log"
declare -A BUDGET  # each EXTRA file's budget, once computed
for extra in ${EXTRA:-}; do
  IFS=: read -r xshape xlayers xgib <<< "$extra"
  log "synth $xshape, $xlayers layers"
  python -m tandem synth --shape "$xshape" --layers "$xlayers" --quant Q4_K_M \
    --tokenizer-from .whl/qwen25-tokenizer.gguf -o "/tmp/$xshape.gguf" >> "$OUT/synth.log" 2>&1
  log "synth rc=$?"
  [ "$xgib" = auto ] && xgib=$(python benchmarks/experts_on_cpu_budget.py "/tmp/$xshape.gguf")
  BUDGET[$xshape]=$xgib
  python -m tandem inspect "/tmp/$xshape.gguf" --plan --gpu-memory "$xgib" --ctx 4096 2>&1 |
    sed -n '/placement/,/rules/p' >> "$OUT/steps.log"
done
# Nothing may compile while either tool is timed (the engine's workers are pinned).
sync  # nor may the synthesized files' dirty pages be written back then
[ -n "$LLAMA_PID" ] && { wait $LLAMA_PID; log "llama build rc=$?"; }
log "tandem bench --gpu-memory $GIB"
timeout 300 python -m tandem bench -m /tmp/q3.gguf -t 16 -p "$NP" -n "$NG" -r "$R" --gpu-memory "$GIB" --json \
  > "$OUT/tandem_bench.txt" 2>&1
log "rc=$?"; tail -3 "$OUT/tandem_bench.txt" >> "$OUT/steps.log"
if [ "${AB:-}" != none ]; then
  log "tandem bench, TANDEM_CUDA_GRAPH=0"
  TANDEM_CUDA_GRAPH=0 timeout 300 python -m tandem bench -m /tmp/q3.gguf -t 16 -p "$NP" -n "$NG" -r "$R" \
    --gpu-memory "$GIB" --json 2>&1 | tail -1 >> "$OUT/steps.log"
fi
sweep_benches /tmp/q3.gguf "$GIB" ""  # SWEEP (benchmarks/sweep_benches.sh)
if [ -n "${PROFILE:-}" ]; then
  log "where a hybrid step goes"
  for run in ${PROFILE_RUNS:-16:512}; do
    IFS=: read -r threads n_prompt <<< "$run"
    timeout 200 python benchmarks/profile_hybrid.py /tmp/q3.gguf "$threads" "$GIB" 32 "$n_prompt" 2>&1 |
      grep -v -i warn >> "$OUT/steps.log"
  done
fi
if [ -n "$LLAMA_PID" ] && [ -x /tmp/lc/b/bin/llama-bench ]; then
  timeout 240 /tmp/lc/b/bin/llama-bench -m /tmp/q3.gguf -ngl 99 -ot exps=CPU -fa on -t 16 -p "$NP" -n "$NG" \
    -r "$R" -o md > "$OUT/llama_bench.txt" 2>&1
  log "llama-bench rc=$?"; cat "$OUT/llama_bench.txt" >> "$OUT/steps.log"
fi
if [ -n "${P2:-}" ]; then
  log "prompt of $P2 tokens"
  timeout 300 python -m tandem bench -m /tmp/q3.gguf -t 16 -p "$P2" -n 4 -r "$R" --gpu-memory "$GIB" --json \
    2>&1 | tail -1 >> "$OUT/steps.log"
  if [ -n "$LLAMA_PID" ] && [ -x /tmp/lc/b/bin/llama-bench ]; then
    timeout 240 /tmp/lc/b/bin/llama-bench -m /tmp/q3.gguf -ngl 99 -ot exps=CPU -fa on -t 16 -p "$P2" -ub "$P2" \
      -n 0 -r "$R" -o md 2>&1 | grep -E "^\|" >> "$OUT/steps.log"
  fi
fi
for extra in ${EXTRA:-}; do
  IFS=: read -r xshape xlayers xgib <<< "$extra"
  xgib=${BUDGET[$xshape]}
  log "tandem bench $xshape --gpu-memory $xgib"
  timeout 300 python -m tandem bench -m "/tmp/$xshape.gguf" -t 16 -p "$NP" -n "$NG" -r "$R" \
    --gpu-memory "$xgib" --json 2>&1 | tail -1 >> "$OUT/steps.log"
  if [ -n "$LLAMA_PID" ] && [ -x /tmp/lc/b/bin/llama-bench ]; then
    timeout 240 /tmp/lc/b/bin/llama-bench -m "/tmp/$xshape.gguf" -ngl 99 -ot exps=CPU -fa on -t 16 \
      -p "$NP" -n "$NG" -r "$R" -o md 2>&1 | grep -E "^\|" >> "$OUT/steps.log"
  fi
  if [ -n "${PROFILE:-}" ]; then
    timeout 200 python benchmarks/profile_hybrid.py "/tmp/$xshape.gguf" 16 "$xgib" 32 512 2>&1 |
      grep -v -i warn >> "$OUT/steps.log"
  fi
done
log done
