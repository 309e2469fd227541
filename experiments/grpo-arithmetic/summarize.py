#!/usr/bin/env python3
"""The experiment's table from out/grpo-arithmetic (standard library only):

    summarize.py OUT_DIR

held-out accuracy of each policy with its Wilson 95% interval, the paired difference to the base
model with a bootstrap 95% interval (same problems, 10,000 resamples), training reward by step,
tokens generated, and wall time split into generation / scoring / training.
"""
import json
import math
import os
import random
import sys


def wilson(k, n, z=1.96):
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def main():
    out = sys.argv[1]
    rows = [json.loads(l) for l in open(os.path.join(out, "eval", "samples.jsonl"))]
    names = [k for k in rows[0] if k != "prompt"]
    n = len(rows)
    base = [r[names[0]]["score"] for r in rows]
    print(f"Held-out problems: {n}, greedy decoding.\n")
    print("| policy | accuracy | Wilson 95% | Δ vs base | bootstrap 95% of Δ | problems gained / lost |")
    print("|---|---|---|---|---|---|")
    rng = random.Random(0)
    for name in names:
        s = [r[name]["score"] for r in rows]
        k = sum(1 for x in s if x > 0.5)
        lo, hi = wilson(k, n)
        d = [a - b for a, b in zip(s, base)]
        boots = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(10000))
        gained = sum(1 for x in d if x > 0)
        lost = sum(1 for x in d if x < 0)
        delta = "" if name == names[0] else f"{sum(d) / n:+.3f}"
        ci = "" if name == names[0] else f"[{boots[249]:+.3f}, {boots[9749]:+.3f}]"
        gl = "" if name == names[0] else f"{gained} / {lost}"
        print(f"| {name} | {k / n:.3f} ({k}/{n}) | [{lo:.3f}, {hi:.3f}] | {delta} | {ci} | {gl} |")
    walls = {}
    wall_file = os.path.join(out, "wall_seconds.txt")
    if os.path.exists(wall_file):
        for line in open(wall_file):
            m, s = line.split()
            walls[m] = int(s)
    print("\n| method | steps | responses | tokens generated | train reward, first 3 → last 3 steps | generation s | scoring s | training s | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names[1:]:
        path = os.path.join(out, name, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        ms = [json.loads(l) for l in open(path)]
        ms = [m for m in ms if "time/generation" in m]
        reward_key = "reward" if "reward" in ms[0] else "objective/scores"
        rewards = [m[reward_key] for m in ms]
        length_key = "completions/mean_length" if "completions/mean_length" in ms[0] else "val/response_length"
        tokens = sum(m.get(length_key, 0) * 32 for m in ms)
        first, last = rewards[:3], rewards[-3:]
        t = {k: sum(m.get(f"time/{k}", 0) for m in ms) for k in ["generation", "scoring", "training"]}
        print(f"| {name} | {len(ms)} | {32 * len(ms)} | {tokens:.0f} | {sum(first) / len(first):.3f} → {sum(last) / len(last):.3f} | "
              f"{t['generation']:.0f} | {t['scoring']:.1f} | {t['training']:.0f} | {walls.get(name, '')} |")
    print("\nTraining reward per step (mean over the step's 32 responses):\n")
    for name in names[1:]:
        path = os.path.join(out, name, "metrics.jsonl")
        if os.path.exists(path):
            ms = [json.loads(l) for l in open(path) if "time/generation" in l]
            key = "reward" if "reward" in ms[0] else "objective/scores"
            print(f"* {name}: " + " ".join(f"{m[key]:.2f}" for m in ms))


if __name__ == "__main__":
    main()
