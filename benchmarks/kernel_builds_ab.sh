#!/usr/bin/env bash
# The amx variant's dot kernels from several source trees, in one process, timed in
# alternation (benchmarks/kernel_builds_ab.cpp): each SRC is a csrc directory, the first
# the reference, e.g. one from `git archive REV csrc | tar x -C DIR`.
# benchmarks/kernel_builds_ab.sh SRC0 SRC1 [SRC2 ...]; TYPES (ggml type numbers, default
# "12 13": Q4_K, Q5_K), ROUNDS (default 15), TOKENS (default 16,32,64,512), COLD=1 (weights
# from memory, not cache), K (columns, default 2048), CXX.
set -eu
[ $# -ge 2 ] && [ $# -le 6 ] || { echo "usage: $0 SRC0 SRC1 [... up to six csrc directories]" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
flags="-O2 -std=c++17 -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx512bf16 -mamx-tile -mamx-int8 -mamx-bf16"
echo '#include "kernels/variant_impl.inc"' > "$work/variant.cpp"
objs=()
pids=()
i=0
for ns in b0 b1 b2 b3 b4 b5; do
  idx=$((i + 1)); [ $idx -le $# ] && src=${!idx} || src=$1
  ${CXX:-g++} $flags -DTANDEM_VARIANT_NS=$ns -DTANDEM_VARIANT_NAME='"amx"' -I"$src" -c "$work/variant.cpp" -o "$work/$ns.o" &
  pids+=($!)
  objs+=("$work/$ns.o")
  i=$((i + 1))
done
for pid in "${pids[@]}"; do wait "$pid"; done
${CXX:-g++} $flags -I"$1" "$here/kernel_builds_ab.cpp" "${objs[@]}" -o "$work/ab"
for type in ${TYPES:-12 13}; do
  "$work/ab" "$type" "${ROUNDS:-15}" $# "${TOKENS:-16,32,64,512}" ${COLD:+cold}
done
