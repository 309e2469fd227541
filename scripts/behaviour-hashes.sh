#!/usr/bin/env bash
# Fixed-seed SFT, RM, DPO and PPO runs on the tiny test model; prints the SHA-256 of each final
# model.safetensors. A refactoring that should not change behaviour must leave these unchanged
# (same machine, same thread count): run it before and after and compare.
#   scripts/behaviour-hashes.sh [path/to/rlhf]      (default target/release/rlhf)
# KEEP=DIR keeps the runs' output directories in DIR (to compare weights when a hash differs).
set -euo pipefail
cd "$(dirname "$0")/.."
RLHF="${1:-target/release/rlhf}"
MODEL="$PWD/tests/fixtures/models/llama-tied"
if [ -n "${KEEP:-}" ]; then
  W="$KEEP"; rm -rf "$W"; mkdir -p "$W"
else
  W="$(mktemp -d)"; trap 'rm -rf "$W"' EXIT
fi
python3 - "$W" <<'PY'
import json, random, sys
w = sys.argv[1]
rng = random.Random(5)
words = "the cat sat on a mat dog ran far and big red sun hot cold good bad".split()
def phrase(n): return " ".join(rng.choice(words) for _ in range(n))
with open(f"{w}/sft.jsonl", "w") as f:
    for _ in range(40): f.write(json.dumps({"prompt": phrase(3), "completion": " " + phrase(4)}) + "\n")
with open(f"{w}/pairs.jsonl", "w") as f:
    for _ in range(24): f.write(json.dumps({"prompt": phrase(3), "chosen": " " + phrase(3), "rejected": " " + phrase(5)}) + "\n")
with open(f"{w}/rankings.jsonl", "w") as f:
    for _ in range(24):
        f.write(json.dumps({"prompt": phrase(3), "completions": [" " + phrase(k) for k in (2, 3, 4)], "ranking": [2, 0, 1]}) + "\n")
with open(f"{w}/prompts.jsonl", "w") as f:
    for _ in range(32): f.write(json.dumps({"prompt": phrase(3)}) + "\n")
with open(f"{w}/ptx.txt", "w") as f:
    f.write("\n\n".join(phrase(12) for _ in range(10)))
PY
common=(--set threads=1 --set seed=7 --set save_steps=0 --set learning_rate=1e-3)
"$RLHF" sft "${common[@]}" --set model="\"$MODEL\"" --set train_file="\"$W/sft.jsonl\"" \
  --set eval_split=0.1 --set max_steps=6 --set per_device_train_batch_size=4 \
  --set gradient_accumulation_steps=2 --set warmup_steps=2 --set output_dir="\"$W/sft\"" 2>/dev/null
"$RLHF" rm "${common[@]}" --set model="\"$MODEL\"" --set train_file="\"$W/rankings.jsonl\"" \
  --set max_steps=5 --set per_device_train_batch_size=4 --set gradient_accumulation_steps=2 \
  --set output_dir="\"$W/rm\"" 2>/dev/null
"$RLHF" dpo "${common[@]}" --set model="\"$MODEL\"" --set train_file="\"$W/pairs.jsonl\"" \
  --set max_steps=5 --set per_device_train_batch_size=4 --set gradient_accumulation_steps=2 \
  --set ref_cache_dir='""' --set label_smoothing=0.1 --set output_dir="\"$W/dpo\"" 2>/dev/null
"$RLHF" ppo "${common[@]}" --set model="\"$MODEL\"" --set prompt_file="\"$W/prompts.jsonl\"" \
  --set reward='"rule:ids:100-160"' --set total_episodes=64 --set response_length=8 \
  --set per_device_train_batch_size=4 --set gradient_accumulation_steps=2 --set num_mini_batches=2 \
  --set num_ppo_epochs=2 --set adaptive_kl=true --set missing_eos_penalty=0.1 --set score_clip=0.9 \
  --set ptx_coef=0.5 --set ptx_file="\"$W/ptx.txt\"" --set ptx_batch_size=4 --set ema_decay=0.9 \
  --set output_dir="\"$W/ppo\"" 2>/dev/null
for run in sft rm dpo ppo; do
  printf '%-4s %s\n' "$run" "$(sha256sum "$W/$run/model.safetensors" | cut -d' ' -f1)"
done
