#!/usr/bin/env python3
"""Reward-model fixtures and checks, made with transformers (dev-only; not run by CI).

1. Fixtures (run from the repo root, with the venv of scripts/make_fixtures.py):

       /tmp/venv-fx/bin/python scripts/make_rm_fixtures.py

   writes tests/fixtures/models/{llama-rm,gpt2-rm}: tiny random LlamaForSequenceClassification
   and GPT2ForSequenceClassification (num_labels=1, the configs of the llama-tied and gpt2
   fixtures) and golden.json with the scores transformers gives to id sequences, one at a time
   and as one right-padded batch (transformers reads the score at the last non-pad token).

2. Round trip of a model written by `rlhf rm`:

       /tmp/venv-fx/bin/python scripts/make_rm_fixtures.py --check-saved RM_DIR TEXTS.jsonl SCORES.jsonl

   loads RM_DIR with AutoModelForSequenceClassification, scores each {"text"} of TEXTS.jsonl
   (tokenizer(text), one at a time) and compares logit + config's rlhf_score_bias with the
   {"score"} lines that `rlhf score --data TEXTS.jsonl` wrote.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "models"


def make(name: str, base: str, cls_name: str, pad: int, seed: int) -> None:
    import transformers

    cfg_dict = json.loads((FIX / base / "config.json").read_text())
    cfg_cls = transformers.AutoConfig.for_model(cfg_dict["model_type"]).__class__
    cfg = cfg_cls.from_dict({k: v for k, v in cfg_dict.items() if k != "architectures"})
    cfg.num_labels = 1
    cfg.pad_token_id = pad
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rng = np.random.default_rng(seed)
    vocab = cfg.vocab_size
    seqs = []
    for n in [3, 7, 12, 20, 5]:
        ids = rng.integers(3, vocab, size=n).tolist()  # never the pad id
        seqs.append(ids)
    with torch.no_grad():
        single = [model(torch.tensor([s])).logits[0, 0].item() for s in seqs]
        t = max(len(s) for s in seqs)
        batch = torch.tensor([s + [pad] * (t - len(s)) for s in seqs])
        mask = (batch != pad).long()
        batched = model(batch, attention_mask=mask).logits[:, 0].tolist()
    assert max(abs(a - b) for a, b in zip(single, batched)) < 1e-5
    d = FIX / name
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(d))
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        src = FIX / base / f
        if src.exists():
            (d / f).write_bytes(src.read_bytes())
    (d / "golden.json").write_text(
        json.dumps({"ids": seqs, "scores": single, "batched_scores": batched}, indent=1) + "\n"
    )
    print(f"{name}: {cls_name}, scores {np.round(single, 4).tolist()}")


def check_saved(rm_dir: str, texts: str, scores: str) -> int:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(rm_dir)
    cfg = json.loads((Path(rm_dir) / "config.json").read_text())
    bias = cfg.get("rlhf_score_bias", 0.0)
    ours = [json.loads(l)["score"] for l in open(scores) if l.strip()]
    worst = 0.0
    n = 0
    for line, ref in zip(open(texts), ours):
        text = json.loads(line)["text"]
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            logit = model(ids).logits[0, 0].item()
        worst = max(worst, abs(logit + bias - ref))
        n += 1
    print(f"{type(model).__name__}: {n} texts, bias {bias:.6f}, max |transformers logit + bias - rlhf score| = {worst:.2e}")
    return 0 if worst < 1e-4 else 1


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--check-saved":
        return check_saved(*sys.argv[2:])
    make("llama-rm", "llama-tied", "LlamaForSequenceClassification", pad=2, seed=11)
    make("gpt2-rm", "gpt2", "GPT2ForSequenceClassification", pad=0, seed=12)
    return 0


if __name__ == "__main__":
    sys.exit(main())
