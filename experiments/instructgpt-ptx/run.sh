#!/usr/bin/env bash
# InstructGPT's PPO-ptx "alignment tax" effect on SmolLM2-135M-Instruct: a reward model on K=4
# rankings of SFT samples scored by the ground truth (VADER), then PPO against it with γ_ptx = 0
# (plain PPO) and γ_ptx > 0 (pretraining text: Moby-Dick, public domain), evaluated for win rate vs
# SFT, held-out perplexity and last-word cloze accuracy on unseen Moby-Dick paragraphs.
# Run from the repository root after scripts/fetch-assets.sh and
# experiments/sentiment-frontier/run.sh (it reuses out/frontier/rankings.jsonl and out/frontier/rm).
# Knobs: PTX_COEFS, EPISODES.
set -euo pipefail
cd "$(dirname "$0")/../.."
PTX_COEFS="${PTX_COEFS:-0 1 4 16}"
EPISODES="${EPISODES:-1600}"
A="${RLHF_ASSETS:-$HOME/.cache/rlhf-assets}"
O=out/ptx
R=experiments/instructgpt-ptx/results
cargo build --release
B=./target/release/rlhf
mkdir -p "$O" "$R"
SFT=out/sft-smollm2-reviews
RM=out/frontier/rm
[ -e "$RM/model.safetensors" ] || { echo "run experiments/sentiment-frontier/run.sh first (needs $RM)"; exit 1; }
# Moby-Dick paragraphs: the first 80% are the pretraining corpus, the rest held out.
python3 - "$A/corpora/moby-dick.txt" "$O" <<'PY'
import json, sys
paras = [" ".join(p.split()) for p in open(sys.argv[1], encoding="utf-8").read().split("\n\n")]
paras = [p for p in paras if len(p.split()) >= 12]
cut = len(paras) * 8 // 10
for name, part in [("ptx", paras[:cut]), ("heldout", paras[cut:])]:
    with open(f"{sys.argv[2]}/{name}.jsonl", "w") as f:
        for p in part:
            f.write(json.dumps({"text": p}) + "\n")
PY
POLICIES="\"sft=$SFT\""
for g in $PTX_COEFS; do
  [ -e "$O/ppo-ptx-$g/model.safetensors" ] || $B ppo --config configs/ppo-smollm2-vader.toml \
      --set reward=\"$RM\" --set ptx_coef=$g --set ptx_file=\"$O/ptx.jsonl\" --set ptx_batch_size=8 \
      --set ptx_max_length=128 --set total_episodes=$EPISODES --set output_dir=\"$O/ppo-ptx-$g\"
  POLICIES="$POLICIES, \"ppo-ptx$g=$O/ppo-ptx-$g\""
done
rm -rf "$O/eval"
$B eval --set "policies=[$POLICIES]" --set judge=\"vader\" --set prompt_file=\"data/review-prompts-eval.jsonl\" \
    --set max_prompts=160 --set response_length=24 --set text_file=\"$O/heldout.jsonl\" --set max_texts=200 \
    --set output_dir=\"$O/eval\"
cp "$O/eval/report.md" "$O/eval/reward_vs_kl.svg" "$O/eval/win_rate.svg" "$O/eval/"*.png "$O/eval/results.json" "$R/"
echo "wrote $R/"
