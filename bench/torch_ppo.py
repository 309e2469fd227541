#!/usr/bin/env python3
"""PyTorch + PEFT half of bench/ppo_setup.sh: one PPO iteration with all four models of an RLHF
run in memory, as a PEFT user sets it up, on the random Qwen2.5-0.5B-shaped checkpoints that
`--make-models DIR` writes (bf16 safetensors, the dtype of the Hub's checkpoints).

  policy     the base in bf16 + a PEFT LoRA (r 16, alpha 32, all linear layers, dropout 0)
  reference  the same model with the adapter disabled (PEFT's `disable_adapter()`): no copy
  reward     a *ForSequenceClassification model in bf16, frozen
  value      a second copy of the reward model (InstructGPT starts the value model from the RM,
             as `rlhf ppo` does by default) in bf16 + its own LoRA, the score head trained

One iteration, the phases of TRL's PPO loop: sample B responses of N tokens (do_sample, T = 1),
score them with the reward model, the reference's and the policy's log-probs and the values of
the responses, then one PPO epoch of one mini-batch: the clipped policy loss and the clipped value
loss, backward, AdamW on the adapters (and the value head). Prints one JSON line with the
iteration's time and the process's peak RSS.
"""
import argparse
import json
import resource
import sys
import time

import torch

torch.set_num_threads(2)

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def make_models(out):
    """Random Qwen2.5-0.5B-shaped policy and reward model (bf16), and a tokenizer."""
    import os
    import shutil

    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    cfg = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
               num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
               rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
               use_sliding_window=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    here = os.path.dirname(os.path.abspath(__file__))
    tok = os.path.join(here, "..", "tests", "fixtures", "tokenizer")
    for name, cls, extra in [("policy", Qwen2ForCausalLM, {}),
                             ("reward", Qwen2ForSequenceClassification, {"num_labels": 1})]:
        torch.manual_seed(0 if name == "policy" else 1)
        model = cls(Qwen2Config(**cfg, **extra)).to(torch.bfloat16)
        d = os.path.join(out, name)
        model.save_pretrained(d)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(tok, f), os.path.join(d, f))
        print(f"wrote {d}", file=sys.stderr)


def response_logprobs(model, seqs, mask, start):
    logits = model(input_ids=seqs, attention_mask=mask).logits[:, start - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, seqs[:, start:, None])[..., 0]


def values(model, seqs, mask, start):
    base = model.get_base_model()  # the *ForSequenceClassification model under the adapter
    h = base.model(input_ids=seqs, attention_mask=mask).last_hidden_state[:, start - 1:-1]
    return base.score(h).float()[..., 0]


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make-models", metavar="DIR")
    ap.add_argument("--models", metavar="DIR")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    a = ap.parse_args()
    if a.make_models:
        make_models(a.make_models)
        return
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    t0 = time.perf_counter()
    bf16 = dict(dtype=torch.bfloat16)
    policy = AutoModelForCausalLM.from_pretrained(f"{a.models}/policy", **bf16)
    policy = get_peft_model(policy, LoraConfig(task_type="CAUSAL_LM", **LORA))
    reward = AutoModelForSequenceClassification.from_pretrained(f"{a.models}/reward", **bf16)
    reward.requires_grad_(False)
    value = AutoModelForSequenceClassification.from_pretrained(f"{a.models}/reward", **bf16)
    value = get_peft_model(value, LoraConfig(task_type="SEQ_CLS", **LORA))
    if a.gradient_checkpointing:
        for m in (policy, value):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.enable_input_require_grads()
    load_s = time.perf_counter() - t0
    params = [p for m in (policy, value) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 300, (a.batch, a.prompt_len), generator=gen)
    print(f"torch ppo: models loaded in {load_s:.1f}s", file=sys.stderr)

    t = time.perf_counter()
    with torch.no_grad():
        seqs = policy.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                               do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                               max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                               pad_token_id=0)
        t_gen = time.perf_counter() - t
        mask = torch.ones_like(seqs)
        start = a.prompt_len
        scores = reward(input_ids=seqs, attention_mask=mask).logits[:, 0].float()
        with policy.disable_adapter():
            ref_lp = response_logprobs(policy, seqs, mask, start)
        old_lp = response_logprobs(policy, seqs, mask, start)
        old_v = values(value, seqs, mask, start)
        rewards = -0.05 * (old_lp - ref_lp)
        rewards[:, -1] += scores
        returns = rewards.flip(1).cumsum(1).flip(1)
        adv = returns - old_v
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    t_score = time.perf_counter() - t - t_gen
    policy.train()
    value.train()
    lp = response_logprobs(policy, seqs, mask, start)
    ratio = (lp - old_lp).exp()
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
    v = values(value, seqs, mask, start)
    v_clipped = old_v + (v - old_v).clamp(-0.2, 0.2)
    vf = 0.5 * torch.max((v - returns) ** 2, (v_clipped - returns) ** 2).mean()
    (pg + 0.1 * vf).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()
    total = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "side": "torch", "load_s": round(load_s, 2), "iteration_s": round(total, 2),
        "generate_s": round(t_gen, 2), "score_s": round(t_score, 2),
        "train_s": round(total - t_gen - t_score, 2), "peak_rss_mb": round(rss, 1),
        "batch": a.batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
