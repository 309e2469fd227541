#!/usr/bin/env bash
# Peak memory and time of one PPO iteration with its whole set-up in memory — policy (LoRA r 16 on
# a frozen base), reference, value model and reward model — at the Qwen2.5-0.5B shape: `rlhf ppo`
# against PyTorch + PEFT (bench/torch_ppo.py), on the same random bf16 checkpoints, one after the
# other on this machine. Not part of the default benchmark (about 10 minutes).
#
#   bench/ppo_setup.sh                 PAIRS=2 (interleaved rlhf, torch runs); BENCH_VENV as run.sh
#
# Both sides: 8 prompts of 32 tokens, 64 sampled tokens each (T = 1), the reward model's scores, the
# reference's log-probs (the policy with its adapter off), values from a value model that starts as
# a copy of the reward model with its own LoRA (InstructGPT's choice and `rlhf ppo`'s default), one
# PPO epoch of one mini-batch, gradient checkpointing. rlhf stores the frozen weights in bf16 (the
# checkpoints are bf16: `frozen_dtype = "auto"`) and computes in f32; PyTorch keeps them in bf16 and
# computes in bf16 (what `torch_dtype=torch.bfloat16` gives a PEFT user), so its times are not the
# same precision.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BENCH_VENV:-$HOME/.cache/rlhf-bench-venv}"
WORK="${BENCH_WORK:-target/bench/ppo-setup}"
PAIRS="${PAIRS:-2}"
RLHF=target/release/rlhf
log() { echo "[ppo-setup $(date +%H:%M:%S)] $*" >&2; }

lscpu | grep -E "Model name|^CPU\(s\)" >&2
cargo build --release >&2
mkdir -p "$WORK"
if [ ! -f "$WORK/models/reward/config.json" ]; then
  log "writing random Qwen2.5-0.5B-shaped policy and reward model (bf16)"
  "$VENV/bin/python" bench/torch_ppo.py --make-models "$WORK/models"
fi
: > "$WORK/prompts.jsonl"
for i in $(seq 8); do
  printf '{"prompt": "the model reads prompt %s and says a few words about the sun, the rain and the sea today"}\n' "$i" >> "$WORK/prompts.jsonl"
done
RESULTS="$WORK/results-$(date +%Y%m%d-%H%M%S).jsonl"
: > "$RESULTS"

run_rlhf() {
  local out="$WORK/rlhf-out" t0 t1
  rm -rf "$out"
  t0=$(date +%s.%N)
  /usr/bin/time -f '%M' -o "$WORK/rlhf.rss" "$RLHF" ppo \
    --set model="$WORK/models/policy" --set reward="$WORK/models/reward" \
    --set prompt_file="$WORK/prompts.jsonl" --set max_prompt_length=32 \
    --set response_length=64 --set per_device_train_batch_size=8 --set num_mini_batches=1 \
    --set num_ppo_epochs=1 --set max_steps=1 --set save_steps=0 --set logging_steps=1 \
    --set use_peft=true --set lora_r=16 --set lora_alpha=32 --set lora_dropout=0.0 \
    --set gradient_checkpointing=true --set output_dir="$out" 2> "$WORK/rlhf.log"
  t1=$(date +%s.%N)
  printf '{"side": "rlhf", "wall_s": %.2f, "peak_rss_mb": %.1f}\n' \
    "$(echo "$t1 - $t0" | bc)" "$(echo "$(cat "$WORK/rlhf.rss") / 1024" | bc -l)" >> "$RESULTS"
}

run_torch() {
  local t0 t1 line
  t0=$(date +%s.%N)
  line=$("$VENV/bin/python" bench/torch_ppo.py --models "$WORK/models" --batch 8 \
    --prompt-len 32 --new-tokens 64 --gradient-checkpointing 2> "$WORK/torch.log")
  t1=$(date +%s.%N)
  echo "$line" | "$VENV/bin/python" -c \
    'import json, sys; d = json.load(sys.stdin); d["wall_s"] = round(float(sys.argv[1]), 2); print(json.dumps(d))' \
    "$(echo "$t1 - $t0" | bc)" >> "$RESULTS"
}

for pair in $(seq "$PAIRS"); do
  log "pair $pair/$PAIRS: rlhf"; run_rlhf
  log "pair $pair/$PAIRS: torch"; run_torch
done
cat "$RESULTS"
"$VENV/bin/python" - "$RESULTS" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for side in ("rlhf", "torch"):
    r = [x for x in rows if x["side"] == side]
    print(f"{side}: wall (load + iteration) median {statistics.median(x['wall_s'] for x in r):.1f} s, "
          f"peak RSS median {statistics.median(x['peak_rss_mb'] for x in r):.0f} MB")
EOF
