#!/usr/bin/env bash
# DeepSeek-V3-shaped files from tandem synth (Q4_K_M, 3 dense layers + 2 or 6 MoE layers) on the
# GPU machine, tandem against llama.cpp built with CUDA (-ngl 99 -ot exps=CPU -fa on -t 16), one
# file at a time (the 9-layer file is about 42 GB of a 64 GB disk). The time of one MoE layer is
# the difference of the two files' decode steps over the 4 layers between them. Expects
# .whl/gguf-*.whl, .whl/llamacpp-cuda-src.tar.xz and .whl/qwen25-tokenizer.gguf carried, $OUT set.
# FILES: layers:GiB pairs (GiB: a budget that keeps every layer's experts on the CPU, or auto:
# benchmarks/experts_on_cpu_budget.py); the last
# file is also measured with a prompt of P2 tokens (llama.cpp with -ub P2). LLAMA=0 leaves
# llama.cpp out (tandem's figures alone, in about half the time); PROFILE=1 splits each file's
# decode step (benchmarks/profile_hybrid.py, after a 512-token prompt); SWEEP: more tandem runs of
# each file (benchmarks/sweep_benches.sh; e.g. SWEEP='TANDEM_CPU_DECODE_STREAMS=8').
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
FILES=${FILES:-5:auto 9:auto}; NP=${NP:-512}; NG=${NG:-32}; R=${R:-2}; P2=${P2:-2048}
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/steps.log"; }
source benchmarks/sweep_benches.sh

python -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl
LLAMA_PID=
if [ "${LLAMA:-1}" != 0 ]; then
  log "build llama.cpp with CUDA (background)"
  bash benchmarks/build_llama_cuda.sh > "$OUT/llama_build.log" 2>&1 &
  LLAMA_PID=$!
fi
llama() { [ "${LLAMA:-1}" != 0 ] && timeout 240 /tmp/lc/b/bin/llama-bench "$@" 2>&1 | grep -E "^\|" >> "$OUT/steps.log"; }
log "build tandem"
python -m pip install --no-build-isolation --no-deps -e . > "$OUT/tandem_build.log" 2>&1 || { log "tandem build failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
last=${FILES##* }
for spec in $FILES; do
  IFS=: read -r layers gib <<< "$spec"
  log "synth deepseek-v3, $layers layers"
  python -m tandem synth --shape deepseek-v3 --layers "$layers" --quant Q4_K_M \
    --tokenizer-from .whl/qwen25-tokenizer.gguf -o /tmp/v3.gguf >> "$OUT/synth.log" 2>&1
  log "synth rc=$?"
  [ "$gib" = auto ] && gib=$(python benchmarks/experts_on_cpu_budget.py /tmp/v3.gguf)
  python -m tandem inspect /tmp/v3.gguf --plan --gpu-memory "$gib" --ctx 4096 2>&1 | sed -n '/placement/,/rules/p' >> "$OUT/steps.log"
  # Nothing may compile while either tool is timed (the engine's workers are pinned).
  [ -n "$LLAMA_PID" ] && { wait $LLAMA_PID; log "llama build rc=$?"; LLAMA_PID=; }
  sync  # nor may the file's dirty pages be written back then
  log "tandem bench, $layers layers, --gpu-memory $gib"
  timeout 300 python -m tandem bench -m /tmp/v3.gguf -t 16 -p "$NP" -n "$NG" -r "$R" --gpu-memory "$gib" --json \
    2>&1 | tail -1 >> "$OUT/steps.log"
  llama -m /tmp/v3.gguf -ngl 99 -ot exps=CPU -fa on -t 16 -p "$NP" -n "$NG" -r "$R" -o md
  sweep_benches /tmp/v3.gguf "$gib" "$layers layers, "
  if [ -n "${PROFILE:-}" ]; then
    timeout 200 python benchmarks/profile_hybrid.py /tmp/v3.gguf 16 "$gib" 32 512 2>&1 | grep -v -i warn >> "$OUT/steps.log"
  fi
  if [ "$spec" = "$last" ] && [ "$P2" != 0 ]; then
    log "prompt of $P2 tokens"
    timeout 300 python -m tandem bench -m /tmp/v3.gguf -t 16 -p "$P2" -n 4 -r "$R" --gpu-memory "$gib" --json \
      2>&1 | tail -1 >> "$OUT/steps.log"
    llama -m /tmp/v3.gguf -ngl 99 -ot exps=CPU -fa on -t 16 -p "$P2" -ub "$P2" -n 0 -r "$R" -o md
  fi
  rm -f /tmp/v3.gguf
done
log done
