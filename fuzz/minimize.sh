#!/usr/bin/env bash
# Shrinks each target's corpus (all by default) to the inputs that add coverage (`cargo fuzz
# cmin`, libFuzzer's merge), so that what is committed stays small and `cargo test` replays it in
# seconds. Run after a campaign, before committing fuzz/corpus/.
#
#   fuzz/minimize.sh                  # every target
#   fuzz/minimize.sh gguf_file        # one target
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1 RUST_LIB_BACKTRACE=0
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi
mkdir -p logs
for t in "${targets[@]}"; do
  before=$(ls "corpus/$t" | wc -l)
  cargo fuzz cmin "$t" "corpus/$t" -- -rss_limit_mb=4096 -malloc_limit_mb=4096 -timeout=20 \
    -close_fd_mask=3 >"logs/cmin-$t.log" 2>&1
  printf '%-18s %6s -> %5s inputs, %s\n' "$t" "$before" "$(ls "corpus/$t" | wc -l)" \
    "$(du -sh --apparent-size "corpus/$t" | cut -f1)"
done
