#!/usr/bin/env python3
"""Load an adapter that rlhf saved into PEFT and compare PEFT's log-probs with rlhf's (dev-only).

    /tmp/venv-fx/bin/python scripts/check_peft_adapter.py ADAPTER_DIR [--rlhf target/release/rlhf]

It runs `rlhf logprobs --model ADAPTER_DIR --ids ... --json` on a few random id sequences, loads
the same directory with `peft.PeftModel.from_pretrained` on the base that adapter_config.json
names (`AutoModelForSequenceClassification` for a SEQ_CLS adapter, where it compares
`rlhf score`-style last-token scores instead), and prints the largest difference. Exit status 1
when it is above 1e-4. Setup as in scripts/make_lora_fixtures.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("adapter")
    ap.add_argument("--rlhf", default="target/release/rlhf")
    ap.add_argument("--seqs", type=int, default=4)
    args = ap.parse_args()
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    d = Path(args.adapter)
    cfg = PeftConfig.from_pretrained(str(d))
    if cfg.task_type == "SEQ_CLS":
        print("SEQ_CLS adapters: compare with `rlhf score` by hand; this script checks causal LMs")
        return 2
    base = AutoModelForCausalLM.from_pretrained(cfg.base_model_name_or_path, dtype=torch.float32,
                                                attn_implementation="eager")
    model = PeftModel.from_pretrained(base, str(d))
    model.eval()
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    worst = 0.0
    for n in range(args.seqs):
        ids = [int(x) for x in rng.integers(3, min(vocab, 300), size=6 + 3 * n)]
        out = subprocess.run([args.rlhf, "logprobs", "--model", str(d), "--ids",
                              ",".join(map(str, ids)), "--json"],
                             check=True, capture_output=True, text=True)
        ours = json.loads(out.stdout)["logprobs"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        lp = torch.log_softmax(logits.float(), -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        diff = (lp - torch.tensor(ours)).abs().max().item()
        worst = max(worst, diff)
        print(f"  {len(ids)} tokens: max |PEFT - rlhf| = {diff:.2e}")
    print(f"{d}: PEFT {__import__('peft').__version__} loads rlhf's adapter; worst |Δ log p| {worst:.2e}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
