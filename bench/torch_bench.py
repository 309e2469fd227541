#!/usr/bin/env python3
"""PyTorch half of bench/run.sh: the same workloads as `rlhf bench`, on randomly initialised
transformers models of the same architectures, f32, 2 threads. Prints one JSON line:
{"workload", "arch", "times_s", "peak_rss_mb", ...}; progress goes to stderr.

Workloads (see src/commands/bench.rs for the rlhf side):
  train     one optimizer step on random ids [B, T]: forward with labels (next-token cross-entropy
            over all positions), backward, clip_grad_norm_(1.0), AdamW (torch defaults, foreach).
  generate  B left-padded prompts (lengths T -/+ T/4, B*T tokens in all) with attention_mask,
            model.generate(do_sample=True, temperature 1, no top-k/top-p, exactly N new tokens;
            with --group G, num_return_sequences=G: G samples of each prompt, B*G rows).
  dpo       B chosen + B rejected sequences of length T as one batch of 2B; sequence log-prob sums
            over the second half; loss -log sigmoid(beta * margin) against constant reference
            log-probs; backward, clipping, AdamW.
Dropout is off (GPT-2's default 0.1 would add work that rlhf does not do).
--bf16 runs the forward (and so the backward) of train and dpo under torch.autocast("cpu",
torch.bfloat16): what a PyTorch user turns on for mixed precision on CPU. Weights, gradients and
AdamW stay f32.
--lora-r R wraps the model in a PEFT LoRA (r = R, alpha = 2R, dropout 0, target_modules
"all-linear"), as `rlhf bench --lora-r R` does; --gradient-checkpointing turns on transformers'
gradient checkpointing (non-reentrant), as `rlhf bench --gradient-checkpointing` does.
"""
import contextlib
import argparse
import json
import math
import resource
import sys
import time

import torch

torch.set_num_threads(2)

import torch.nn.functional as F  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

LR = 1e-5
DPO_BETA = 0.1


def smollm2_135m():
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


def qwen25(hidden, inter, layers, heads):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=151643,
        eos_token_id=151643,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(cfg)


ARCHS = {
    "smollm2": lambda: smollm2_135m(),
    "gpt2": lambda: gpt2_small(),
    "qwen2.5-0.5b": lambda: qwen25(896, 4864, 24, 14),
    "qwen2.5-1.5b": lambda: qwen25(1536, 8960, 28, 12),
}


def gpt2_small():
    cfg = GPT2Config(
        vocab_size=50257,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=50256,
        eos_token_id=50256,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(cfg)


def prompt_lengths(batch, seq):
    """Alternately T - T/4 and T + T/4 (T for a last odd one): B*T prompt tokens in all."""
    d = seq // 4
    out = []
    for i in range(batch):
        if batch % 2 == 1 and i == batch - 1:
            out.append(seq)
        elif i % 2 == 0:
            out.append(seq - d)
        else:
            out.append(seq + d)
    return out


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


TICKS_PER_S = 100.0  # USER_HZ of /proc times on Linux


def cpu_snap():
    """(machine busy ticks, steal ticks, this process's ticks, wall time), as in src/commands/bench.rs."""
    try:
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    busy = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6]
    return busy, cpu[7] if len(cpu) > 7 else 0, int(rest[11]) + int(rest[12]), time.perf_counter()


def other_load(a, b):
    """(cores kept busy by other processes, cores taken by the hypervisor) on average from a to b."""
    if a is None or b is None:
        return float("nan"), float("nan")
    wall = max(b[3] - a[3], 1e-3) * TICKS_PER_S
    return max((b[0] - a[0]) - (b[2] - a[2]), 0) / wall, (b[1] - a[1]) / wall


class Trainer:
    def __init__(self, model):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR)

    def step(self, loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def autocast(bf16):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_step(tr, ids, bf16):
    with autocast(bf16):
        loss = tr.model(input_ids=ids, labels=ids).loss
    tr.step(loss)


def dpo_step(tr, ids, ref_lp, bf16):
    rows, t = ids.shape
    pairs = rows // 2
    with autocast(bf16):
        logits = tr.model(input_ids=ids).logits.float()
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    # Column j predicts token j + 1; the response is tokens T/2 .. T.
    resp = (torch.arange(t - 1) + 1 >= t // 2).to(lp.dtype)
    seq_lp = (lp * resp).sum(-1)
    logratio = seq_lp - ref_lp
    margin = logratio[:pairs] - logratio[pairs:]
    loss = -F.logsigmoid(DPO_BETA * margin).mean()
    tr.step(loss)


def generate_once(model, gen, vocab, batch, seq, new_tokens, group=1):
    lengths = prompt_lengths(batch, seq)
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(0, vocab, (n,), generator=gen)
        mask[i, width - n :] = 1
    t = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
        num_return_sequences=group,
    )
    elapsed = time.perf_counter() - t
    if out.shape[1] - width != new_tokens:
        sys.exit(f"generated {out.shape[1] - width} tokens per row, expected {new_tokens}")
    return elapsed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["train", "generate", "dpo"], required=True)
    ap.add_argument("--arch", choices=list(ARCHS), required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--group", type=int, default=1,
                    help="generate: samples per prompt (num_return_sequences), as GRPO draws them")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for train and dpo")
    ap.add_argument("--lora-r", type=int, default=0, help="PEFT LoRA of this rank (0: full)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--frozen-bf16", action="store_true",
                    help="load the LoRA base in bf16 (the usual PEFT set-up; adapters stay f32)")
    a = ap.parse_args()

    torch.manual_seed(a.seed)
    label = f"torch {a.workload} {a.arch}"
    t0 = time.perf_counter()
    model = ARCHS[a.arch]().float()
    if a.workload != "generate" and a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if a.workload != "generate" and a.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        if a.frozen_bf16:
            model = model.to(torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r,
                                                 lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        if a.gradient_checkpointing:
            model.enable_input_require_grads()
    vocab = model.config.vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{label}: random {n_params / 1e6:.1f}M-parameter model built in {time.perf_counter() - t0:.1f}s "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads, attn {model.config._attn_implementation})",
        file=sys.stderr,
    )
    gen = torch.Generator().manual_seed(a.seed + 1)
    tr = None
    if a.workload == "generate":
        model.eval()
    else:
        model.train()
        tr = Trainer(model)
    times, other_cpu, steal_cpu = [], [], []
    total = a.warmup + a.repeats
    for i in range(total):
        before = cpu_snap()
        if a.workload == "train":
            ids = torch.randint(0, vocab, (a.batch, a.seq), generator=gen)
            t = time.perf_counter()
            train_step(tr, ids, a.bf16)
            elapsed, what = time.perf_counter() - t, "step"
        elif a.workload == "dpo":
            ids = torch.randint(0, vocab, (2 * a.batch, a.seq), generator=gen)
            half = a.seq - a.seq // 2
            ref_lp = -math.log(vocab) * half + (torch.rand(2 * a.batch, generator=gen) * 10 - 5)
            t = time.perf_counter()
            dpo_step(tr, ids, ref_lp, a.bf16)
            elapsed, what = time.perf_counter() - t, "step"
        else:
            torch.manual_seed(a.seed + i)
            elapsed = generate_once(model, gen, vocab, a.batch, a.seq, a.new_tokens, a.group)
            what = "generate"
        other, steal = other_load(before, cpu_snap())
        warm = i < a.warmup
        print(
            f"{label}: {what} {i + 1}/{total} {elapsed:.2f}s{' (warm-up)' if warm else ''}"
            f" (other processes {other:.2f} cores, steal {steal:.2f})",
            file=sys.stderr,
        )
        if not warm:
            times.append(elapsed)
            other_cpu.append(round(other, 2))
            steal_cpu.append(round(steal, 2))
    print(
        json.dumps(
            {
                "workload": a.workload,
                "arch": a.arch,
                "times_s": times,
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "batch": a.batch,
                "seq": a.seq,
                "new_tokens": a.new_tokens if a.workload == "generate" else None,
                "group": a.group,
                "params": n_params,
                "other_cpu": other_cpu,
                "steal_cpu": steal_cpu,
                "torch": torch.__version__,
                "bf16": a.bf16,
                "lora_r": a.lora_r,
                "frozen_bf16": a.frozen_bf16,
                "gradient_checkpointing": a.gradient_checkpointing,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
