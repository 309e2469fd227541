#!/usr/bin/env python3
"""Generate the LoRA golden fixtures under tests/fixtures/lora/ (dev-only; not run by CI).

For several of the committed tiny models (tests/fixtures/models/, made by make_fixtures.py) this
makes a PEFT LoRA adapter with non-zero B (so the adapter changes the outputs), saves it with
PEFT's own `save_pretrained` (adapter_config.json + adapter_model.safetensors, PEFT's tensor
names), and records with transformers + PEFT:

* the adapter model's per-token log-probs of three sequences;
* the loss  L = sum over the sequences of the mean next-token NLL  and its gradient with respect
  to every lora_A / lora_B tensor (autograd through PEFT's modules, dropout off);
* the log-probs of `merge_and_unload()`'s merged model;
* for the sequence-classification base (llama-rm): the scores of the PEFT SEQ_CLS model, whose
  `score` head is saved as a module to save.

The Rust tests load these adapters onto the committed bases and compare. They never run Python.

Setup (a throwaway venv outside the repo; only PyPI is needed):

    python3 -m venv /tmp/venv-fx
    /tmp/venv-fx/bin/pip install torch transformers safetensors peft numpy

Run from the repository root (rewrites tests/fixtures/lora/; a few seconds):

    /tmp/venv-fx/bin/python scripts/make_lora_fixtures.py

`scripts/check_peft_adapter.py` does the other direction: it loads an adapter that rlhf saved
into PEFT and compares PEFT's log-probs with numbers rlhf printed.

Versions the committed fixtures were made with: see tests/fixtures/lora/VERSIONS.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "lora"
VOCAB = 320

# name: (base fixture, PEFT LoraConfig keyword arguments)
CASES = {
    # all linear layers, rsLoRA scaling, tied embeddings
    "llama-tied-all-rslora": ("llama-tied", dict(r=4, lora_alpha=8, target_modules="all-linear",
                                                 use_rslora=True)),
    # PEFT's default targets for Llama-like models (q_proj, v_proj), untied LM head
    "mistral-qv": ("mistral", dict(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    # q/k/v biases in the base
    "qwen2-all": ("qwen2-f16-sharded", dict(r=4, lora_alpha=4, target_modules="all-linear")),
    # GPT-2's Conv1D layers ([in, out] weights: fan_in_fan_out)
    "gpt2-all": ("gpt2", dict(r=3, lora_alpha=6, target_modules="all-linear",
                              fan_in_fan_out=True)),
}
SEQ_CLS_CASE = ("llama-rm-all", "llama-rm", dict(r=4, lora_alpha=8, target_modules="all-linear"))


def f32_list(t: torch.Tensor) -> list:
    return t.detach().to(torch.float32).cpu().double().flatten().tolist()


def seq_logprobs(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    lp = torch.log_softmax(logits.float(), dim=-1)
    t = torch.tensor(ids[1:])
    return lp[: len(ids) - 1].gather(-1, t[:, None])[:, 0]


def perturb_lora_(model, seed: int) -> None:
    """B ~ 0.2·N(0,1) (PEFT initialises it to zero, which would make the adapter a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def peft_name(name: str) -> str:
    """PEFT's saved name of a parameter: the adapter name ("default") left out."""
    return name.replace(".default", "")


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj) + "\n")


def make_causal(name: str, base: str, kwargs: dict, seed: int) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = FIX / "models" / base
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32,
                                                 attn_implementation="eager")
    cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **kwargs)
    pm = get_peft_model(model, cfg)
    perturb_lora_(pm, seed + 1)
    pm.eval()

    rng = np.random.default_rng(seed + 2)
    seqs = [[int(x) for x in rng.integers(3, VOCAB, size=n)] for n in (6, 9, 13)]
    single, loss = [], 0.0
    for ids in seqs:
        logits = pm(input_ids=torch.tensor([ids])).logits[0]
        lp = seq_logprobs(logits, ids)
        single.append({"ids": ids, "logprobs": f32_list(lp)})
        loss = loss + (-lp.mean())
    loss.backward()
    grads = {peft_name(n): f32_list(p.grad) for n, p in pm.named_parameters()
             if p.requires_grad}
    assert grads and all(("lora_A" in n or "lora_B" in n) for n in grads), list(grads)

    d = OUT / name
    shutil.rmtree(d, ignore_errors=True)
    # A path relative to the adapter directory: rlhf resolves it there when it is not a path
    # relative to the working directory (PEFT itself needs the base passed explicitly here).
    pm.peft_config["default"].base_model_name_or_path = f"../../models/{base}"
    pm.save_pretrained(str(d))
    (d / "README.md").unlink(missing_ok=True)  # PEFT's model-card template

    # Reload from disk with PEFT and check the outputs, then merge.
    base_model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32,
                                                      attn_implementation="eager")
    re = PeftModel.from_pretrained(base_model, str(d))
    re.eval()
    with torch.no_grad():
        for s in single:
            lp = seq_logprobs(re(input_ids=torch.tensor([s["ids"]])).logits[0], s["ids"])
            diff = (lp - torch.tensor(s["logprobs"])).abs().max().item()
            assert diff < 1e-6, (name, diff)
        merged = re.merge_and_unload()
        merged_lp = [f32_list(seq_logprobs(merged(input_ids=torch.tensor([s["ids"]])).logits[0],
                                           s["ids"])) for s in single]
    write_json(d / "golden.json", {
        "base": base,
        "single": single,
        "loss": float(loss.item()),
        "grads": grads,
        "merged_logprobs": merged_lp,
    })
    n = sum(len(v) for v in grads.values())
    print(f"  {name}: {len(grads)} adapter tensors ({n} values), loss {loss.item():.4f}")


def make_seq_cls(name: str, base: str, kwargs: dict, seed: int) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base_dir = FIX / "models" / base
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(base_dir), dtype=torch.float32,
                                                               attn_implementation="eager")
    cfg = LoraConfig(task_type="SEQ_CLS", lora_dropout=0.0, **kwargs)
    pm = get_peft_model(model, cfg)
    perturb_lora_(pm, seed + 1)
    with torch.no_grad():  # the score head trains too (a module to save): make it differ
        g = torch.Generator().manual_seed(seed + 3)
        for n, p in pm.named_parameters():
            if "modules_to_save" in n and "score" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    pm.eval()
    rng = np.random.default_rng(seed + 2)
    seqs = [[int(x) for x in rng.integers(3, VOCAB, size=n)] for n in (5, 8, 12)]
    with torch.no_grad():
        scores = [float(pm(input_ids=torch.tensor([s])).logits[0, 0]) for s in seqs]
    d = OUT / name
    shutil.rmtree(d, ignore_errors=True)
    pm.peft_config["default"].base_model_name_or_path = f"../../models/{base}"
    pm.save_pretrained(str(d))
    (d / "README.md").unlink(missing_ok=True)
    re = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(str(base_dir), dtype=torch.float32,
                                                           attn_implementation="eager"), str(d))
    re.eval()
    with torch.no_grad():
        again = [float(re(input_ids=torch.tensor([s])).logits[0, 0]) for s in seqs]
    assert max(abs(a - b) for a, b in zip(scores, again)) < 1e-6, (scores, again)
    write_json(d / "golden.json", {"base": base, "seqs": seqs, "scores": scores})
    print(f"  {name}: scores {['%.4f' % s for s in scores]}")


def main() -> int:
    import peft
    import transformers

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    for i, (name, (base, kwargs)) in enumerate(CASES.items()):
        make_causal(name, base, kwargs, seed=1000 + 10 * i)
    make_seq_cls(*SEQ_CLS_CASE, seed=2000)
    (OUT / "VERSIONS").write_text(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, python {sys.version.split()[0]}\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"done: {OUT.relative_to(ROOT)} is {total / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
