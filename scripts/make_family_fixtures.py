#!/usr/bin/env python3
"""Golden fixtures for the model families added after scripts/make_fixtures.py's set (dev-only).

Adds tests/fixtures/models/<name>/ for each family below with exactly what make_fixtures.py makes
for the others (tiny random config, perturbed weights, the shared tokenizer, golden.json with
single and left-padded log-probs, the first sequence's logits and greedy generations, checked by
reloading the saved directory with transformers) — without regenerating the existing fixtures.

    /tmp/venv-fx/bin/python scripts/make_family_fixtures.py      (setup: see make_fixtures.py)

Regenerating is byte-stable: a rerun with the versions listed in make_fixtures.py leaves
`git diff tests/fixtures/models` empty.

* gemma3's config.json is rewritten into the transformers-4 hub form (to_gemma3_hub_config)
  and reloaded again from that form; gemma2 and phi3 keep transformers 5's form.
* phi3's golden.json has an extra "long_greedy" entry: 8 greedy tokens after a 28-token prompt,
  crossing original_max_position_embeddings (32) on the way (transformers then re-encodes).
* phi3's golden.json has an extra "long" entry: one 40-token sequence, longer than
  original_max_position_embeddings (32), so transformers uses the long_factor frequencies
  for the whole forward pass (the three "single" sequences and everything else are <= 17
  tokens and use short_factor).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

import make_fixtures as mf


def int_if_whole(x):
    return int(x) if isinstance(x, float) and x.is_integer() else x


def to_gemma3_hub_config(path: Path) -> None:
    """Rewrite transformers 5's gemma3_text config.json the way google/gemma-3-1b-it's
    (transformers 4) looks: `torch_dtype`; `rope_theta` (full-attention layers),
    `rope_local_base_freq` (sliding layers) and `rope_scaling` (full-attention layers only, or
    null) instead of the per-layer-type `rope_parameters`; `sliding_window_pattern` instead of
    `layer_types` (layer i is sliding iff (i + 1) % pattern != 0); `cache_implementation`
    "hybrid"; no private or newer keys."""
    cfg = json.loads(path.read_text())
    new = {}
    for k, v in cfg.items():
        if k == "dtype":
            new["torch_dtype"] = v
        elif k == "rope_parameters":
            full, local = dict(v["full_attention"]), dict(v["sliding_attention"])
            assert local == {"rope_type": "default", "rope_theta": local["rope_theta"]}, local
            # gemma-3-1b-it spells both bases as JSON integers (10000, 1000000)
            new["rope_local_base_freq"] = int_if_whole(local["rope_theta"])
            new["rope_theta"] = int_if_whole(full.pop("rope_theta"))
            new["rope_scaling"] = None if full.get("rope_type", "default") == "default" else full
        elif k == "layer_types":
            n = len(v)
            pats = [p for p in range(1, n + 2)
                    if v == ["sliding_attention" if (i + 1) % p else "full_attention"
                             for i in range(n)]]
            assert pats, f"layer_types {v} is not expressible as a sliding_window_pattern"
            new["sliding_window_pattern"] = pats[0]
        elif k == "_sliding_window_pattern":
            continue  # transformers 5 serialises its private copy of the pattern
        elif k == "use_bidirectional_attention" and not v:
            continue  # newer than gemma-3-1b-it's config
        else:
            new[k] = v
    new["cache_implementation"] = "hybrid"
    new["transformers_version"] = "4.50.0.dev0"
    path.write_text(json.dumps(dict(sorted(new.items())), indent=2) + "\n")


def reload(name: str):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(mf.FIX / "models" / name), dtype=torch.float32,
                                             attn_implementation="eager")
    m.eval()
    return m


def greedy_margin(model, golden: dict) -> float:
    """Smallest top-1 minus top-2 logit gap along the golden greedy paths (how far the greedy
    choices are from a tie)."""
    worst = float("inf")
    with torch.no_grad():
        for g in golden["greedy"]:
            cur = g["prompt"] + g["new_ids"]
            logits = model(input_ids=torch.tensor([cur])).logits[0]
            top = logits[len(g["prompt"]) - 1: len(cur) - 1].topk(2, dim=-1).values
            worst = min(worst, (top[:, 0] - top[:, 1]).min().item())
    return worst


def max_abs_logit(model, golden: dict) -> float:
    with torch.no_grad():
        return max(model(input_ids=torch.tensor([s["ids"]])).logits.abs().max().item()
                   for s in golden["single"])


def main() -> int:
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM,
                              Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Phi3Config,
                              Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    common = dict(vocab_size=mf.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, bos_token_id=1,
                  eos_token_id=2, attn_implementation="eager")
    # Qwen3: per-head q/k RMSNorm, and a head_dim (12) that is not hidden_size / heads (8).
    mf.build("qwen3",
             Qwen3Config(**common, num_key_value_heads=2, head_dim=12, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                         attention_bias=False),
             Qwen3ForCausalLM, seed=600)
    # Llama 3.2: llama3 RoPE scaling with tied embeddings (1B/3B's shape).
    mf.build("llama3.2-tied",
             LlamaConfig(**common, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16}),
             LlamaForCausalLM, seed=700)

    # Gemma 2: (1 + w) RMSNorms around attention and MLP, sqrt(hidden)-scaled embeddings,
    # head_dim 16 != hidden / heads, scale query_pre_attn_scalar^-0.5 (12 != head_dim), tanh
    # soft-capping of attention scores (2.0) and final logits (3.0, small so it bites), and a
    # sliding window of 4 on layer 0 (transformers' default layer_types: sliding on even layers).
    # pad_token_id None like the other fixtures (Gemma's default would be 0).
    model, golden = mf.build(
        "gemma2",
        Gemma2Config(**common, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12,
                     sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                     hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                     rope_theta=10000.0, tie_word_embeddings=True, pad_token_id=None),
        Gemma2ForCausalLM, seed=800)
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    cap = max_abs_logit(model, golden)
    assert 2.5 < cap < 3.0, cap
    print(f"  gemma2: layer_types {model.config.layer_types}, max|logit| = {cap:.4f} (cap 3.0), "
          f"min greedy top-2 gap = {greedy_margin(model, golden):.2e}")

    # Gemma 3 (text): also per-head q/k (1 + w) RMSNorm before RoPE, three layers
    # sliding/full/sliding, local RoPE base 1e4 on sliding layers and base 1e6 with linear
    # scaling x8 on the full-attention layer only (Gemma 3 4B's setting), no soft-capping.
    # Saved in the transformers-4 hub form (to_gemma3_hub_config).
    c3 = dict(common, num_hidden_layers=3)
    layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
    model, golden = mf.build(
        "gemma3",
        Gemma3TextConfig(**c3, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12,
                         sliding_window=4, layer_types=layer_types, rope_parameters=rope,
                         attn_logit_softcapping=None, final_logit_softcapping=None,
                         hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                         tie_word_embeddings=True, pad_token_id=None),
        Gemma3ForCausalLM, seed=900)
    d = mf.FIX / "models" / "gemma3"
    to_gemma3_hub_config(d / "config.json")
    re = reload("gemma3")
    assert re.config.layer_types == layer_types, re.config.layer_types
    assert re.config.rope_parameters == model.config.rope_parameters, re.config.rope_parameters
    worst = mf.check_against_golden(re, golden, 1e-6, "gemma3 hub-form reload")
    print(f"  gemma3: hub-form config.json, reload max|dlogprob| = {worst:.2e}; "
          f"min greedy top-2 gap = {greedy_margin(model, golden):.2e}")

    # Phi-3 / Phi-4-mini: packed qkv_proj and gate_up_proj, partial rotary (0.75 of head_dim 8
    # = 6 dims) and longrope with original_max_position_embeddings 32 < max 64, so the cos/sin
    # attention factor sqrt(1 + ln 2 / ln 32) applies; untied.
    rng = np.random.default_rng(1001)
    short = [round(float(x), 4) for x in rng.uniform(1.0, 2.0, size=3)]
    long = [round(float(x), 4) for x in rng.uniform(2.0, 8.0, size=3)]
    model, golden = mf.build(
        "phi3",
        Phi3Config(**common, num_key_value_heads=2, partial_rotary_factor=0.75,
                   original_max_position_embeddings=32, rope_theta=10000.0,
                   rope_scaling={"rope_type": "longrope", "short_factor": short,
                                 "long_factor": long},
                   sliding_window=None, tie_word_embeddings=False, hidden_act="silu",
                   rms_norm_eps=1e-5, pad_token_id=None),
        Phi3ForCausalLM, seed=1000)
    assert model.model.rotary_emb.inv_freq.shape == (3,)
    # one 40-token forward (> original_max_position_embeddings: long_factor for all positions)
    ids = mf.rand_ids(np.random.default_rng(1002), 40)
    with torch.no_grad():
        lp = mf.seq_logprobs(model(input_ids=torch.tensor([ids])).logits[0], ids)
        lp32 = mf.seq_logprobs(model(input_ids=torch.tensor([ids[:32]])).logits[0], ids[:32])
    switched = (lp[:31] - lp32).abs().max().item()
    assert switched > 1e-3, switched  # the same 32-token prefix, but long vs short factors
    golden["long"] = [{"ids": ids, "logprobs": mf.f32_list(lp)}]
    # greedy decoding across the boundary: transformers drops the (short-factor) cache at the
    # first step past 32 tokens and re-encodes with the long factors; an uncached loop agrees.
    from transformers import GenerationConfig
    prompt = mf.rand_ids(np.random.default_rng(1003), 28)
    gc = GenerationConfig(do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0,
                          bos_token_id=None)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]),
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             generation_config=gc)
        new = [int(x) for x in out[0, len(prompt):].tolist()]
        cur = list(prompt)
        for _ in range(8):
            cur.append(int(model(input_ids=torch.tensor([cur])).logits[0, -1].argmax()))
    assert cur[len(prompt):] == new, (cur[len(prompt):], new)
    golden["long_greedy"] = [{"prompt": prompt, "new_ids": new}]
    d = mf.FIX / "models" / "phi3"
    mf.write_json(d / "golden.json", golden)
    re = reload("phi3")
    with torch.no_grad():
        rlp = mf.seq_logprobs(re(input_ids=torch.tensor([ids])).logits[0], ids)
    worst = (rlp - lp).abs().max().item()
    assert worst < 1e-6, worst
    worst = max(worst, mf.check_against_golden(re, golden, 1e-6, "phi3 reload after long"))
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = sorted(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names, names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names and "lm_head.weight" in names
    print(f"  phi3: factors short {short} long {long}; 40-token 'long' reload "
          f"max|dlogprob| = {worst:.2e}; its first 31 log-probs differ from the 32-token "
          f"(short) forward's by up to {switched:.3f}; "
          f"min greedy top-2 gap = {greedy_margin(model, golden):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
