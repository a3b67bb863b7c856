# Sourced by hybrid_h200.sh, hybrid_v3_h200.sh and cpu_engine_h200.sh (which define log, OUT, NP,
# NG, R; THREADS too, else 16). sweep_benches FILE GIB LABEL: one more `tandem bench` of FILE
# (with --gpu-memory GIB, or CPU only where GIB is empty) per entry of SWEEP, entries
# separated by '|', each environment words (NAME=value) and bench arguments,
# e.g. SWEEP='-t 15|TANDEM_CPU_SPIN_US=5000 -t 15'.
sweep_benches() {
  local file=$1 gib=$2 label=$3 entry word
  local -a sweep envs args gpu=()
  [ -n "$gib" ] && gpu=(--gpu-memory "$gib")
  IFS='|' read -r -a sweep <<< "${SWEEP:-}"
  for entry in "${sweep[@]}"; do
    envs=(); args=()
    for word in $entry; do case $word in *=*) envs+=("$word");; *) args+=("$word");; esac; done
    log "tandem bench, $label$entry"
    env "${envs[@]}" timeout 300 python -m tandem bench -m "$file" -t "${THREADS:-16}" -p "$NP" -n "$NG" \
      -r "$R" "${gpu[@]}" --json "${args[@]}" 2>&1 | tail -1 >> "$OUT/steps.log"
  done
}
