#!/usr/bin/env bash
# GRPO-shaped rollout throughput, rlhf against transformers' `generate`, in one run:
#   bench/rollout.sh            (PAIRS=1; needs scripts/fetch-assets.sh and the bench venv)
#
# SmolLM2-135M-Instruct (the GGUF asset, converted once to a float32 HF directory that both sides
# load), the first 16 arithmetic prompts of experiments/grpo-arithmetic/make_problems.py in its chat
# template, G = 8 samples each (128 rows), temperature 1, up to 256 new tokens, every row ending at
# <|im_end|>. tokens/s = tokens generated (stop tokens included) / wall time of the call; both sides
# use 2 threads, f32. Variants, interleaved per pair:
#   rlhf           all 128 rows at once, each prompt prefilled once (the default)
#   rlhf-unshared  every row prefills its own copy of its prompt (what num_return_sequences does)
#   rlhf-refill32  at most 32 rows at once, a finished row's place refilled at once
#   rlhf-waves32   at most 32 rows at once, in waves that each wait for their longest row
#   torch          model.generate(num_return_sequences = 8): finished rows stay in the batch
# The table: median tokens/s per variant and the median over pairs of (variant / torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BENCH_VENV:-$HOME/.cache/rlhf-bench-venv}"
WORK="${BENCH_WORK:-target/bench/rollout}"
PAIRS="${PAIRS:-1}"
VARIANTS="${VARIANTS:-rlhf rlhf-unshared rlhf-refill32 rlhf-waves32 torch}"
GGUF="${GGUF:-$HOME/.cache/rlhf-assets/smollm2-135m-instruct/model.gguf}"
RLHF=target/release/rlhf
log() { echo "[rollout $(date +%H:%M:%S)] $*" >&2; }

lscpu | grep -E "Model name|^CPU\(s\)" >&2
cargo build --release >&2
mkdir -p "$WORK"
[ -f "$WORK/model/model.safetensors" ] || "$RLHF" convert --model "$GGUF" --out "$WORK/model" >&2
[ -f "$WORK/problems/train.jsonl" ] || python3 experiments/grpo-arithmetic/make_problems.py "$WORK/problems"
PROMPTS="$WORK/problems/train.jsonl"
COMMON=(--batch 16 --group 8 --new-tokens 256 --warmup 0 --repeats 1)
RESULTS="$WORK/results-$(date +%Y%m%d-%H%M%S).jsonl"
: > "$RESULTS"
for pair in $(seq "$PAIRS"); do
  for v in $VARIANTS; do
    log "$v: pair $pair/$PAIRS"
    case "$v" in
      torch) line=$(cd bench && "$VENV/bin/python" torch_rollout.py --model "../$WORK/model" \
                      --prompts "../$PROMPTS" "${COMMON[@]}" --seed "$pair") ;;
      rlhf) line=$("$RLHF" bench --workload rollout --seq 2 --model "$WORK/model" --prompts "$PROMPTS" "${COMMON[@]}" --seed "$pair") ;;
      rlhf-unshared) line=$("$RLHF" bench --workload rollout --seq 2 --model "$WORK/model" --prompts "$PROMPTS" "${COMMON[@]}" --seed "$pair" --no-share-prefill) ;;
      rlhf-refill32) line=$("$RLHF" bench --workload rollout --seq 2 --model "$WORK/model" --prompts "$PROMPTS" "${COMMON[@]}" --seed "$pair" --max-rows 32) ;;
      rlhf-waves32) line=$("$RLHF" bench --workload rollout --seq 2 --model "$WORK/model" --prompts "$PROMPTS" "${COMMON[@]}" --seed "$pair" --max-rows 32 --no-refill) ;;
      *) echo "unknown variant $v" >&2; exit 2 ;;
    esac
    echo "{\"variant\":\"$v\",\"pair\":$pair,\"result\":$line}" >> "$RESULTS"
  done
done
log "raw results in $RESULTS"
"$VENV/bin/python" - "$RESULTS" <<'PY'
import json, statistics, subprocess, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
tps = lambda r: sum(r["result"]["tokens"]) / sum(r["result"]["times_s"])
by = {}
for r in rows:
    by.setdefault(r["variant"], {})[r["pair"]] = r
print(f"\nCPU: {model}\n")
print("| variant | tokens/s (median) | tokens | seconds | decoding steps | prompts prefilled | peak RSS MB | × torch (median of pairs) |")
print("|---|---|---|---|---|---|---|---|")
for v, pairs in by.items():
    rs = list(pairs.values())
    ratio = [tps(pairs[p]) / tps(by["torch"][p]) for p in pairs if "torch" in by and p in by["torch"]]
    sched = rs[-1]["result"].get("schedules", [{}])[0]
    print(f"| {v} | {statistics.median(map(tps, rs)):.1f} | {rs[-1]['result']['tokens'][0]} | "
          f"{rs[-1]['result']['times_s'][0]:.1f} | {sched.get('decode_steps', 256)} | "
          f"{sched.get('prefill_prompts', 128)} | {rs[-1]['result']['peak_rss_mb']:.0f} | "
          f"{statistics.median(ratio):.2f} |" if ratio else "| - |")
PY
