#!/usr/bin/env python3
"""Writes data/reviews-{train,eval}.jsonl ({"text": ...}) and data/review-prompts-{train,eval}.jsonl
({"prompt": the first 2-4 words of a sentence}, the DPO paper's controlled-sentiment prompts) from the UCI review sentences fetched by
scripts/fetch-assets.sh (CC BY 4.0, Kotzias et al., KDD 2015). Standard library only."""
import json, os, random, sys

cache = os.environ.get("RLHF_ASSETS", os.path.expanduser("~/.cache/rlhf-assets"))
rows = []
for name in ["imdb", "yelp", "amazon"]:
    path = os.path.join(cache, "sentiment-sentences", f"{name}.json")
    if not os.path.exists(path):
        sys.exit(f"{path} missing: run scripts/fetch-assets.sh")
    rows += [r["text"].strip() for r in json.load(open(path)) if r.get("text")]
random.Random(0).shuffle(rows)
os.makedirs("data", exist_ok=True)
for name, part in [("train", rows[:1200]), ("eval", rows[1200:1400])]:
    with open(f"data/reviews-{name}.jsonl", "w") as f:
        for t in part:
            f.write(json.dumps({"text": t}) + "\n")
rng = random.Random(1)
for name, part in [("train", rows[:1200]), ("eval", rows[1200:1400])]:
    with open(f"data/review-prompts-{name}.jsonl", "w") as f:
        for t in part:
            words = t.split()
            if len(words) >= 5:
                f.write(json.dumps({"prompt": " ".join(words[: rng.randint(2, 4)])}) + "\n")
print(f"wrote data/reviews-train.jsonl (1200) and data/reviews-eval.jsonl (200), data/review-prompts-{{train,eval}}.jsonl from {len(rows)} sentences")
