#!/usr/bin/env bash
# The fuzz campaign: each target (all by default) runs SECONDS (default 300) from its corpus in
# fuzz/corpus/<target>, JOBS targets at a time (default 1), then prints executions, speed and
# crashes per target. A crash stops that target; its input is in fuzz/artifacts/<target>/.
# Needs cargo-fuzz (`cargo install cargo-fuzz`); nightly flags come from RUSTC_BOOTSTRAP=1.
#
#   fuzz/run.sh 600                  # every target, 10 minutes each
#   JOBS=2 fuzz/run.sh 30 gguf_file  # one target, 30 seconds
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-300}
shift || true
export RUSTC_BOOTSTRAP=1
# anyhow captures a backtrace per error when RUST_BACKTRACE is set (cargo fuzz sets it): slow.
export RUST_LIB_BACKTRACE=0
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi
[ -d corpus ] || ./seed.sh
# cargo-fuzz's default build: optimised, with debug assertions, overflow checks and ASan.
cargo fuzz build
mkdir -p logs
fuzz_one() {
  local t=$1 seconds=$2
  mkdir -p "corpus/$t" "artifacts/$t"
  # 4 GB and 20 s per input: past them an input is an allocation bomb or a hang.
  cargo fuzz run "$t" "corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=4096 -malloc_limit_mb=4096 -timeout=20 \
    -print_final_stats=1 -close_fd_mask=3 >"logs/$t.log" 2>&1 || true
}
export -f fuzz_one
printf '%s\n' "${targets[@]}" | xargs -P "${JOBS:-1}" -I{} bash -c "fuzz_one {} $seconds"
printf '%-18s %12s %10s %8s %s\n' target executions "exec/s" crashes corpus
total=0
for t in "${targets[@]}"; do
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | tail -1 | grep -o '[0-9]*$' || echo 0)
  speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "logs/$t.log" | tail -1 | grep -o '[0-9]*$' || echo 0)
  crashes=$(find "artifacts/$t" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) | wc -l)
  printf '%-18s %12s %10s %8s %s\n' "$t" "${runs:-0}" "${speed:-0}" "$crashes" "$(ls "corpus/$t" | wc -l)"
  total=$((total + ${runs:-0}))
done
echo "total executions: $total"
