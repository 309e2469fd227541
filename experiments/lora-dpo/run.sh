#!/usr/bin/env bash
# LoRA DPO on SmolLM2-135M-Instruct against the full-fine-tuning DPO of experiments/sentiment-frontier:
# the same SFT model, preference pairs (4 SFT samples per prompt ranked by VADER, best vs worst),
# β, steps, batch and evaluation; the policy trains a rank-16 adapter on every projection instead
# of every weight. Run from the repository root after scripts/fetch-assets.sh; it reuses
# out/sft-smollm2-reviews and out/frontier/pairs.jsonl when they exist (the frontier script makes
# them the same way).
# Knobs: BETA (0.1), LORA_R (16), LORA_LR (3e-4; LoRA needs ~10x full fine-tuning's 3e-5),
# DPO_STEPS (120), EVAL_PROMPTS (160), FULL (1: also run full DPO at the same β for a same-binary
# comparison).
set -euo pipefail
cd "$(dirname "$0")/../.."
BETA="${BETA:-0.1}"
LORA_R="${LORA_R:-16}"
LORA_LR="${LORA_LR:-3e-4}"
DPO_STEPS="${DPO_STEPS:-120}"
EVAL_PROMPTS="${EVAL_PROMPTS:-160}"
FULL="${FULL:-1}"
O=out/lora-dpo
F=out/frontier
R=experiments/lora-dpo/results
cargo build --release
B=./target/release/rlhf
mkdir -p "$O" "$F" "$R"
python3 scripts/review_sentences.py
[ -e out/sft-smollm2-reviews/model.safetensors ] || $B sft --overwrite --config configs/sft-smollm2-reviews.toml
SFT=out/sft-smollm2-reviews
[ -e "$F/pairs.jsonl" ] || { head -n 100000 data/review-prompts-train.jsonl > "$F/pref-prompts.jsonl";
  $B preferences --model $SFT --prompts "$F/pref-prompts.jsonl" --judge vader --k 4 --max-new-tokens 24 \
      --rankings "$F/rankings.jsonl" --pairs "$F/pairs.jsonl"; }
dpo() {  # NAME EXTRA-SETTINGS...
  local name=$1; shift
  [ -e "$O/$name/adapter_model.safetensors" ] || [ -e "$O/$name/model.safetensors" ] || \
    $B dpo --overwrite --set model=\"$SFT\" --set train_file=\"$F/pairs.jsonl\" --set output_dir=\"$O/$name\" \
      --set beta=$BETA --set max_steps=$DPO_STEPS --set lr_scheduler_type=\"constant\" \
      --set per_device_train_batch_size=8 --set save_steps=0 "$@"
}
POLICIES="\"sft=$SFT\""
dpo "lora-r$LORA_R" --set use_peft=true --set lora_r=$LORA_R --set lora_alpha=$((2 * LORA_R)) \
    --set lora_dropout=0.05 --set learning_rate=$LORA_LR
POLICIES="$POLICIES, \"dpo-lora-r$LORA_R-beta$BETA=$O/lora-r$LORA_R\""
if [ "$FULL" = 1 ]; then
  dpo full --set learning_rate=3e-5
  POLICIES="$POLICIES, \"dpo-full-beta$BETA=$O/full\""
fi
rm -rf "$O/eval"
$B eval --set "policies=[$POLICIES]" --set judge=\"vader\" --set prompt_file=\"data/review-prompts-eval.jsonl\" \
    --set max_prompts=$EVAL_PROMPTS --set response_length=24 --set text_file=\"data/reviews-eval.jsonl\" \
    --set output_dir=\"$O/eval\"
cp "$O/eval/report.md" "$O/eval/results.json" "$O/eval/"*.svg "$R/"
