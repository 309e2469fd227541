#!/usr/bin/env bash
# InstructGPT's PPO-ptx "alignment tax" effect on SmolLM2-135M-Instruct: a reward model on K=4
# rankings of SFT samples scored by the ground truth (VADER), then PPO against it with γ_ptx = 0
# (plain PPO) and γ_ptx > 0 (pretraining text: Moby-Dick, public domain), evaluated for win rate vs
# SFT, held-out perplexity and last-word cloze accuracy on unseen Moby-Dick paragraphs.
# Run from the repository root after scripts/fetch-assets.sh and
# experiments/sentiment-frontier/run.sh (it reuses its reward model out/frontier/rm).
# Knobs: PTX_COEFS (γ_ptx values; 0 is plain PPO), EPISODES, SKIP_EVAL=1 (train only).
# γ_ptx = 0 with EPISODES=640 is exactly the sentiment-frontier run out/frontier/ppo-rm-0.05 (same
# config, seed and reward model; the pretraining data is loaded but unused), so that run is reused.
set -euo pipefail
# Finished runs (with their model.safetensors) are skipped; an interrupted one starts again (--overwrite).
cd "$(dirname "$0")/../.."
PTX_COEFS="${PTX_COEFS:-0 0.1 0.5 2 8}"
EPISODES="${EPISODES:-640}"
A="${RLHF_ASSETS:-$HOME/.cache/rlhf-assets}"
O=out/ptx
R=experiments/instructgpt-ptx/results
cargo build --release
B=./target/release/rlhf
mkdir -p "$O" "$R"
SFT=out/sft-smollm2-reviews
RM=out/frontier/rm
[ -e "$RM/model.safetensors" ] || { echo "run experiments/sentiment-frontier/run.sh first (needs $RM)"; exit 1; }
# Moby-Dick paragraphs: the first 80% are the pretraining corpus, the rest held out. The alignment
# tax is also measured on text no model here was trained on: State of the Union addresses 2010-2021,
# in whole sentences grouped to at least 60 words (every 6th group).
python3 - "$A/corpora" "$O" <<'PY'
import glob, json, re, sys
corpora, out = sys.argv[1], sys.argv[2]
paras = [" ".join(p.split()) for p in open(f"{corpora}/moby-dick.txt", encoding="utf-8").read().split("\n\n")]
paras = [p for p in paras if len(p.split()) >= 12]
cut = len(paras) * 8 // 10
chunks, chunk = [], []
for path in sorted(glob.glob(f"{corpora}/sotu/20[12]*.txt")):
    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(open(path, encoding="utf-8").read().split())):
        chunk.append(sentence)
        if len(" ".join(chunk).split()) >= 60:
            chunks.append(" ".join(chunk))
            chunk = []
for name, part in [("ptx", paras[:cut]), ("moby-heldout", paras[cut:]), ("sotu", chunks[::6])]:
    with open(f"{out}/{name}.jsonl", "w") as f:
        for p in part:
            f.write(json.dumps({"text": p}) + "\n")
PY
POLICIES="\"sft=$SFT\""
PLAIN=out/frontier/ppo-rm-0.05
for g in $PTX_COEFS; do
  if [ "$g" = 0 ] && [ ! -e "$O/ppo-ptx-0" ] && [ -e "$PLAIN/model.safetensors" ] \
      && tail -1 "$PLAIN/metrics.jsonl" | grep -q "\"episode\":$EPISODES.0"; then
    ln -s "$(realpath "$PLAIN")" "$O/ppo-ptx-0"
  fi
  [ -e "$O/ppo-ptx-$g/model.safetensors" ] || $B ppo --overwrite --config configs/ppo-smollm2-vader.toml \
      --set reward=\"$RM\" --set ptx_coef=$g --set ptx_file=\"$O/ptx.jsonl\" --set ptx_batch_size=8 \
      --set ptx_max_length=128 --set total_episodes=$EPISODES --set output_dir=\"$O/ppo-ptx-$g\" --set save_steps=0
  POLICIES="$POLICIES, \"ppo-ptx$g=$O/ppo-ptx-$g\""
done
[ "${SKIP_EVAL:-0}" = 1 ] && exit 0
rm -rf "$O/eval"
$B eval --set "policies=[$POLICIES]" --set judge=\"vader\" --set prompt_file=\"data/review-prompts-eval.jsonl\" \
    --set max_prompts=160 --set response_length=24 --set max_texts=200 \
    --set "text_file=[\"$O/moby-heldout.jsonl\", \"$O/sotu.jsonl\", \"data/reviews-eval.jsonl\"]" \
    --set output_dir=\"$O/eval\"
cp "$O/eval/report.md" "$O/eval/"*.svg "$O/eval/"*.png "$O/eval/results.json" "$R/"
python3 - "$R/results.json" > "$R/results.csv" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["results"]
names = {"moby-heldout": "moby", "sotu": "sotu", "reviews-eval": "reviews"}
corpora = [names.get(t["file"].rsplit("/", 1)[-1].removesuffix(".jsonl"), t["file"]) for t in rows[0]["text"]]
print(",".join(["policy", "kl_nats", "mean_reward", "reward_sem", "win_rate_vs_sft", "win_low", "win_high"]
               + [f"{m}_{c}" for c in corpora for m in ("perplexity", "cloze")]))
for r in rows:
    cells = [r["name"]] + [str(r[k]) for k in ["kl", "mean_reward", "reward_sem", "win_rate", "win_low", "win_high"]]
    cells += [str(t[k]) for t in r["text"] for k in ("perplexity", "cloze_accuracy")]
    print(",".join(cells))
PY
echo "wrote $R/"
