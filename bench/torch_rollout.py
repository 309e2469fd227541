"""The PyTorch half of bench/rollout.sh: a GRPO-shaped rollout with transformers' `generate`.

The first B prompts of a prompt file (chat-formatted with the checkpoint's template, left-padded),
num_return_sequences = G, sampling at temperature 1 (no top-k / top-p) up to N new tokens, each row
ending at the checkpoint's end-of-turn token (transformers keeps a finished row in the batch,
padding it, until every row has finished). Counts the tokens generated up to and including each
row's stop token, as `rlhf bench --workload rollout` does, and prints one JSON line.
"""
import argparse
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from torch_bench import cpu_snap, other_load, peak_rss_mb


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(a.model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    rows = [json.loads(line) for line in open(a.prompts) if line.strip()][: a.batch]
    texts = [
        tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        if isinstance(r["prompt"], list)
        else tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                     add_generation_prompt=True)
        for r in rows
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    width = enc["input_ids"].shape[1]
    label = f"torch rollout {a.batch * a.group} rows"
    print(f"{label}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"attn {model.config._attn_implementation}", file=sys.stderr)
    times, tokens, other_cpu, steal_cpu = [], [], [], []
    for i in range(a.warmup + a.repeats):
        torch.manual_seed(a.seed + i)
        before = cpu_snap()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=a.new_tokens, num_return_sequences=a.group,
                                 eos_token_id=eos, pad_token_id=pad)
        secs = time.perf_counter() - t
        other, steal = other_load(before, cpu_snap())
        new = out[:, width:]
        n = 0
        for row in new.tolist():
            stop = next((j for j, x in enumerate(row) if x in eos), None)
            n += len(row) if stop is None else stop + 1
        warm = i < a.warmup
        print(f"{label}: rollout {i + 1}/{a.warmup + a.repeats} {secs:.2f}s, {n} tokens "
              f"({n / secs:.1f} tokens/s), {new.shape[1]} decoding steps{' (warm-up)' if warm else ''} "
              f"(other processes {other:.2f} cores, steal {steal:.2f})", file=sys.stderr)
        if not warm:
            times.append(secs)
            tokens.append(n)
            other_cpu.append(round(other, 2))
            steal_cpu.append(round(steal, 2))
    print(json.dumps({"workload": "rollout", "model": a.model, "times_s": times, "tokens": tokens,
                      "peak_rss_mb": round(peak_rss_mb(), 1), "batch": a.batch, "group": a.group,
                      "new_tokens": a.new_tokens, "torch": torch.__version__,
                      "other_cpu": other_cpu, "steal_cpu": steal_cpu}), flush=True)


if __name__ == "__main__":
    main()
