#!/usr/bin/env bash
# Sampling throughput: 16 chat prompts × 64 new tokens (EOS ignored, so exactly 1024 tokens) on
# SmolLM2-135M-Instruct, one batch, KV cache. Prints tokens/s for each of N repeats.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-${RLHF_ASSETS:-$HOME/.cache/rlhf-assets}/smollm2-135m-instruct/model.gguf}"
REPEATS="${REPEATS:-3}"
cargo build --release --locked -q
for i in $(seq "$REPEATS"); do
  ./target/release/rlhf generate --model "$MODEL" --prompts bench/prompts16.jsonl --chat \
    --max-new-tokens 64 --ignore-eos --temperature 1 --seed "$i" --batch-size 16 --json 2>&1 >/dev/null | grep generated
done
