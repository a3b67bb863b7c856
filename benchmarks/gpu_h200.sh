#!/usr/bin/env bash
# The GPU operators on the GPU machine: build, the GPU tests (compiled Triton kernels,
# the planned hybrid placement, the GPU paths of the shipped rules), then the linear
# kernels' timings, and tandem bench on a Qwen3-30B-A3B-shaped synth of LAYERS layers
# wholly on the GPU and with its experts on the CPU (--gpu-memory HYBRID_GIB). Expects .whl/gguf-*.whl carried and $OUT set.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/steps.log"; }
python -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl
log "build tandem"
python -m pip install --no-build-isolation --no-deps -e . > "$OUT/tandem_build.log" 2>&1 || { log "build failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$OUT/steps.log" 2>&1
log "gpu tests"
timeout 300 python -m pytest -q -p no:cacheprovider tests/gpu tests/test_gpu.py tests/ops/test_deepseek_gpu.py \
  > "$OUT/gpu_tests.log" 2>&1
log "gpu tests rc=$?"; tail -25 "$OUT/gpu_tests.log" >> "$OUT/steps.log"
log "linear kernels"
timeout 200 python benchmarks/gpu_linear_bench.py 4096 4096 1,4,8 >> "$OUT/steps.log" 2>&1
timeout 200 python benchmarks/gpu_linear_bench.py 2048 7168 1,8 >> "$OUT/steps.log" 2>&1
log "one MoE layer's experts: engine, GPU with copies, GPU resident; routed matvec"
timeout 200 python benchmarks/gpu_experts_bench.py 16 32,128,512,2048 >> "$OUT/steps.log" 2>&1
log "hybrid bench: synth"
python -m tandem synth --shape qwen3-30b-a3b --layers "${LAYERS:-8}" --quant Q4_K_M \
  --tokenizer-from .whl/qwen25-tokenizer.gguf -o /tmp/q3g.gguf > "$OUT/synth.log" 2>&1
log "synth rc=$?"
for place in "--device cuda" "--gpu-memory ${HYBRID_GIB:-3}"; do
  log "tandem bench $place"
  timeout 200 python -m tandem bench -m /tmp/q3g.gguf -t 16 -p 512 -n 32 -r 2 $place --json \
    > "$OUT/bench.txt" 2>&1; log "rc=$?"; tail -6 "$OUT/bench.txt" >> "$OUT/steps.log"
done
log done
