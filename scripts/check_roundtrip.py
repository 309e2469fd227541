#!/usr/bin/env python3
"""Dev check (not a test): a model written by `rlhf convert` loads in transformers and
gives the same log-probs as `rlhf logprobs`.

    /tmp/venv-fx/bin/python scripts/check_roundtrip.py --rlhf target/release/rlhf \\
        --model tests/fixtures/models/llama-tied [--ids 5,17,42,...] [--tol 1e-4] [--keep]

Steps:
 1. `rlhf convert --model SRC --out TMP`
 2. load TMP with AutoModelForCausalLM (float32, eager attention) and AutoTokenizer
 3. `rlhf logprobs --model TMP --ids ... --json`, which prints one JSON object
    {"ids": [...], "logprobs": [...]} with logprobs[i-1] = log p(ids[i] | ids[:i])
 4. compute the same with transformers and compare: exit 1 if max |diff| > --tol
Also, where transformers can load SRC itself (an HF dir, or a dir/file with a .gguf),
its log-probs are compared with TMP's (convert kept the weights), and the tokenizer
saved in TMP must encode a sample text like SRC's tokenizer does.

Without --ids the ids come from encoding a sample text with TMP's tokenizer (capped to
the model's context).  The venv is the one described in scripts/make_fixtures.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog. Unicode: café 日本語 🤖, digits 2024!"


def run(cmd: list[str]) -> str:
    print("$ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout)
        sys.stderr.write(p.stderr)
        raise SystemExit(f"command failed with exit code {p.returncode}: {' '.join(cmd)}")
    return p.stdout


def parse_json_stdout(out: str) -> dict:
    """The JSON object printed by `rlhf logprobs --json` (tolerates other stdout lines)."""
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        for line in reversed(out.strip().splitlines()):
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)
    raise SystemExit(f"no JSON object on stdout of rlhf logprobs:\n{out}")


def hf_logprobs(model, ids: list[int]) -> list[float]:
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)[:-1]
    return lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def split_gguf(src: Path) -> tuple[Path, str | None]:
    """(dir, gguf file name or None) for SRC given as an HF dir, a .gguf file, or a dir
    holding exactly one .gguf and no config.json."""
    if src.is_file() and src.suffix == ".gguf":
        return src.parent, src.name
    if src.is_dir() and not (src / "config.json").exists():
        ggufs = sorted(p.name for p in src.glob("*.gguf"))
        if len(ggufs) == 1:
            return src, ggufs[0]
    return src, None


def load_model(path: Path, gguf_file: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    kw = {"dtype": torch.float32, "attn_implementation": "eager"}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    m = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    m.eval()
    return m


def load_tokenizer(path: Path, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(str(path), **kw)


def max_abs_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        raise SystemExit(f"length mismatch: {len(a)} vs {len(b)} log-probs")
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rlhf", required=True, help="path to the rlhf binary")
    ap.add_argument("--model", required=True, help="source model (HF dir or GGUF)")
    ap.add_argument("--ids", help="comma-separated token ids (default: encode a sample text)")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--keep", action="store_true", help="keep the converted dir and print it")
    args = ap.parse_args()

    rlhf = str(Path(args.rlhf).resolve()) if Path(args.rlhf).exists() else args.rlhf
    src = Path(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="rlhf-roundtrip-"))
    out = tmp / "converted"
    failures: list[str] = []
    try:
        run([rlhf, "convert", "--model", str(src), "--out", str(out)])
        print(f"converted files: {sorted(p.name for p in out.iterdir())}")

        model = load_model(out)
        print(f"transformers loaded {type(model).__name__} from the converted dir")
        try:
            tok = load_tokenizer(out)
            print(f"AutoTokenizer loaded {type(tok).__name__} (vocab {len(tok)})")
        except Exception as e:  # noqa: BLE001
            tok = None
            failures.append(f"AutoTokenizer could not load the converted dir: {e!r}")

        if args.ids:
            ids = [int(x) for x in args.ids.split(",") if x.strip()]
        elif tok is not None:
            ids = tok(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
        else:
            ids = list(range(3, 19))
        n_ctx = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", None) or len(ids)
        ids = ids[:n_ctx]
        if len(ids) < 2:
            raise SystemExit("need at least 2 ids")

        res = parse_json_stdout(run([rlhf, "logprobs", "--model", str(out), "--ids",
                                     ",".join(map(str, ids)), "--json"]))
        if list(res.get("ids", ids)) != ids:
            failures.append(f"rlhf echoed different ids: {res.get('ids')}")
        ours = [float(x) for x in res["logprobs"]]
        theirs = hf_logprobs(model, ids)
        d = max_abs_diff(ours, theirs)
        print(f"rlhf logprobs vs transformers on converted model: max |diff| = {d:.3e} "
              f"over {len(ids) - 1} positions")
        if d > args.tol:
            failures.append(f"log-probs differ by {d:.3e} > {args.tol}")

        # Extra checks against the source itself, where transformers can read it.
        sdir, sgguf = split_gguf(src)
        try:
            smodel = load_model(sdir, sgguf)
        except Exception as e:  # noqa: BLE001
            smodel = None
            print(f"(skipped source comparison: transformers cannot load {src}: {e!r})")
        if smodel is not None:
            ds = max_abs_diff(hf_logprobs(smodel, ids), theirs)
            print(f"transformers: source vs converted model: max |diff| = {ds:.3e}")
            if ds > args.tol:
                failures.append(f"converted weights change log-probs by {ds:.3e} > {args.tol}")
        if tok is not None:
            try:
                stok = load_tokenizer(sdir, sgguf)
            except Exception as e:  # noqa: BLE001
                stok = None
                print(f"(skipped tokenizer comparison: cannot load source tokenizer: {e!r})")
            if stok is not None:
                a = stok(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
                b = tok(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
                print(f"tokenizer source vs converted on sample text: "
                      f"{'same ids' if a == b else 'DIFFERENT ids'}")
                if a != b:
                    failures.append(f"tokenizer ids differ: {a} vs {b}")
    finally:
        if args.keep:
            print(f"kept {out}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    if failures:
        for f in failures:
            print("FAIL: " + f)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
