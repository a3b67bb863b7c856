#!/usr/bin/env bash
# tandem bench against llama.cpp's llama-bench on the two embedded real models and a
# 4-layer Qwen3-30B-A3B-shaped Q4_K_M synth file, same threads, one run.
# LLAMA_BIN: the folder holding a CPU build of llama-bench (llama-cpp-python 0.3.36's llama.cpp).
set -u
LLAMA_BIN=${LLAMA_BIN:-/tmp/llamacpp/build/bin}; THREADS=${THREADS:-2}; NP=${NP:-64}; NG=${NG:-16}; R=${R:-3}
MODELS=$(python -c "from tandem.weights.default_model import gemma_model_path, default_model_path; print(gemma_model_path(), default_model_path())")
SYNTH=${SYNTH:-/tmp/qwen3-30b-a3b-4l.gguf}
[ -f "$SYNTH" ] || python -m tandem synth --shape qwen3-30b-a3b --layers 4 -o "$SYNTH" >/dev/null 2>&1
for model in $MODELS "$SYNTH"; do
  echo "== $(basename "$model")"
  python -m tandem bench -m "$model" -t "$THREADS" -p "$NP" -n "$NG" -r "$R" 2>&1 | grep -Ev "^\s*$|Warning|warn"
  "$LLAMA_BIN/llama-bench" -m "$model" -t "$THREADS" -p "$NP" -n "$NG" -r "$R" 2>/dev/null | grep -E "pp|tg"
done
