#!/usr/bin/env bash
# The main job on the embedded default for now: fetch the pinned SmolLM2-135M-Instruct GGUF (once),
# build rlhf, ask it a question, and score a sentence.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."
CACHE="${RLHF_ASSETS:-$HOME/.cache/rlhf-assets}"
MODEL="$CACHE/smollm2-135m-instruct/model.gguf"
[ -f "$MODEL" ] || bash scripts/fetch-assets.sh "$CACHE"
cargo build --release --locked
./target/release/rlhf generate --model "$MODEL" --chat --temperature 0 --max-new-tokens 40 \
  --prompt "What is the capital of France?"
./target/release/rlhf logprobs --model "$MODEL" --text "Hello world, this is GPT-2."
