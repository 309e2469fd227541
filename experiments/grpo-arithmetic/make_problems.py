#!/usr/bin/env python3
"""Arithmetic word problems with their answers, as rlhf prompt files (Python standard library only).

    make_problems.py OUT_DIR [--train N] [--heldout N] [--seed S]

writes OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl: {"prompt": [{"role": "user", "content": …}],
"answer": "<integer>"}. Each problem is one or two steps of +, − or × on small whole numbers,
in a few sentence templates; held-out problems are never among the training problems' texts.
"""
import argparse
import json
import os
import random

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jun", "Kofi", "Lena",
         "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "shells", "coins", "cookies", "cards", "stamps"]
INSTRUCTION = "End your reply with the final answer as a number."
# One-step problems by default: SmolLM2-135M-Instruct sampled at temperature 1 solved ~3% of a
# mix with two-step problems, too few successes for 10 GRPO iterations to learn from.
KINDS = ["add", "sub", "mul"]


def problem(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(KINDS)
    if kind == "add":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        text, ans = f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?", a + b
    elif kind == "sub":
        a = rng.randint(5, 25)
        b = rng.randint(1, a - 1)
        text, ans = f"{name} has {a} {item} and gives {b} of them away. How many {item} are left?", a - b
    elif kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        text, ans = f"{name} has {a} boxes with {b} {item} in each box. How many {item} are there in all?", a * b
    elif kind == "add_sub":
        a, b = rng.randint(5, 30), rng.randint(2, 20)
        c = rng.randint(1, a + b - 1)
        text = (f"{name} has {a} {item}, buys {b} more, and then loses {c}. "
                f"How many {item} does {name} have?")
        ans = a + b - c
    else:
        a, b, c = rng.randint(2, 6), rng.randint(2, 6), rng.randint(1, 15)
        text = (f"{name} buys {a} packs of {b} {item} and already had {c}. "
                f"How many {item} does {name} have now?")
        ans = a * b + c
    return f"{text} {INSTRUCTION}", str(ans)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--heldout", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--two-step", action="store_true", help="also a + b − c and a × b + c problems")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    if a.two_step:
        KINDS.extend(["add_sub", "mul_add"])
    seen, sets = set(), {"heldout": [], "train": []}
    for split, n in [("heldout", a.heldout), ("train", a.train)]:
        while len(sets[split]) < n:
            text, ans = problem(rng)
            if text in seen:
                continue
            seen.add(text)
            sets[split].append({"prompt": [{"role": "user", "content": text}], "answer": ans})
    os.makedirs(a.out_dir, exist_ok=True)
    for split, rows in sets.items():
        with open(os.path.join(a.out_dir, f"{split}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
