#!/usr/bin/env python3
"""Golden fixtures for the model families added after scripts/make_fixtures.py's set (dev-only).

Adds tests/fixtures/models/<name>/ for each family below with exactly what make_fixtures.py makes
for the others (tiny random config, perturbed weights, the shared tokenizer, golden.json with
single and left-padded log-probs, the first sequence's logits and greedy generations, checked by
reloading the saved directory with transformers) — without regenerating the existing fixtures.

    /tmp/venv-fx/bin/python scripts/make_family_fixtures.py      (setup: see make_fixtures.py)
"""

from __future__ import annotations

import sys

import torch

import make_fixtures as mf


def main() -> int:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
