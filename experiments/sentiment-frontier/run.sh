#!/usr/bin/env bash
# The DPO paper's Figure 2 (left) on SmolLM2-135M-Instruct: reward (VADER) vs KL(π‖π_ref) for
# DPO at several β, PPO against a learned reward model at several KL coefficients, and PPO on the
# ground-truth reward. Run from the repository root after scripts/fetch-assets.sh.
# Knobs: BETAS, KLS (empty: no PPO against the learned RM), EPISODES (PPO), DPO_STEPS, EVAL_PROMPTS,
# DPO_LR, DPO_SCHED, PREF_PROMPTS (training prompts sampled for preference data; default all 999). Outputs under out/frontier/ and the
# summary (results.csv, reward_vs_kl.{svg,png}, win_rate.{svg,png}, report.md) in experiments/sentiment-frontier/results/.
set -euo pipefail
# Finished runs (with their model.safetensors) are skipped; an interrupted one starts again (--overwrite).
cd "$(dirname "$0")/../.."
BETAS="${BETAS:-0.05 0.1 0.5 1.0}"
KLS="${KLS-0.02 0.05 0.1 0.2}"
EPISODES="${EPISODES:-1600}"
DPO_STEPS="${DPO_STEPS:-120}"
DPO_LR="${DPO_LR:-3e-5}"
DPO_SCHED="${DPO_SCHED:-constant}"
EVAL_PROMPTS="${EVAL_PROMPTS:-160}"
PREF_PROMPTS="${PREF_PROMPTS:-100000}"
O=out/frontier
R=experiments/sentiment-frontier/results
cargo build --release
B=./target/release/rlhf
mkdir -p "$O" "$R"
python3 scripts/review_sentences.py
[ -e out/sft-smollm2-reviews/model.safetensors ] || $B sft --overwrite --config configs/sft-smollm2-reviews.toml
SFT=out/sft-smollm2-reviews
# Preference data: 4 SFT samples per training prompt, ranked by the ground truth (VADER).
head -n "$PREF_PROMPTS" data/review-prompts-train.jsonl > "$O/pref-prompts.jsonl"
[ -e "$O/rankings.jsonl" ] || $B preferences --model $SFT --prompts "$O/pref-prompts.jsonl" \
    --judge vader --k 4 --max-new-tokens 24 --rankings "$O/rankings.jsonl" --pairs "$O/pairs.jsonl"
[ -z "$KLS" ] || [ -e "$O/rm/model.safetensors" ] || $B rm --overwrite --set model=\"$SFT\" --set train_file=\"$O/rankings.jsonl\" \
    --set eval_split=0.1 --set output_dir=\"$O/rm\" --set num_train_epochs=1 --set learning_rate=1e-5 \
    --set per_device_train_batch_size=8 --set save_steps=0
POLICIES="\"sft=$SFT\""
for b in $BETAS; do
  [ -e "$O/dpo-$b/model.safetensors" ] || $B dpo --overwrite --set model=\"$SFT\" --set train_file=\"$O/pairs.jsonl\" \
      --set output_dir=\"$O/dpo-$b\" --set beta=$b --set max_steps=$DPO_STEPS --set learning_rate=$DPO_LR --set lr_scheduler_type=\"$DPO_SCHED\" \
      --set per_device_train_batch_size=8 --set save_steps=0
  POLICIES="$POLICIES, \"dpo-beta$b=$O/dpo-$b\""
done
for k in $KLS; do
  [ -e "$O/ppo-rm-$k/model.safetensors" ] || $B ppo --overwrite --config configs/ppo-smollm2-vader.toml \
      --set reward=\"$O/rm\" --set kl_coef=$k --set total_episodes=$EPISODES --set output_dir=\"$O/ppo-rm-$k\" \
      --set save_steps=0
  POLICIES="$POLICIES, \"ppo-rm-kl$k=$O/ppo-rm-$k\""
done
[ -e "$O/ppo-gt/model.safetensors" ] || $B ppo --overwrite --config configs/ppo-smollm2-vader.toml \
    --set total_episodes=$EPISODES --set output_dir=\"$O/ppo-gt\" --set save_steps=0
POLICIES="$POLICIES, \"ppo-gt=$O/ppo-gt\""
rm -rf "$O/eval"
$B eval --set "policies=[$POLICIES]" --set judge=\"vader\" --set prompt_file=\"data/review-prompts-eval.jsonl\" \
    --set max_prompts=$EVAL_PROMPTS --set response_length=24 --set text_file=\"data/reviews-eval.jsonl\" \
    --set output_dir=\"$O/eval\"
cp "$O/eval/report.md" "$O/eval/"*.svg "$O/eval/"*.png "$O/eval/results.json" "$R/"
python3 - "$R/results.json" > "$R/results.csv" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("policy,kl_nats,mean_reward,reward_sem,win_rate_vs_sft,win_low,win_high,perplexity,cloze_accuracy")
for x in r["results"]:
    print(",".join(str(x[k]) for k in ["name", "kl", "mean_reward", "reward_sem", "win_rate", "win_low", "win_high", "perplexity", "cloze_accuracy"]))
PY
echo "wrote $R/results.csv, $R/reward_vs_kl.png, $R/report.md"
