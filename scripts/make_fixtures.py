#!/usr/bin/env python3
"""Generate the golden test fixtures under tests/fixtures/ (dev-only; not run by CI).

Everything is made locally from fixed seeds: a tiny byte-level BPE tokenizer trained on
text embedded in this file, tiny random Hugging Face causal LMs (Llama, Llama-3 rope
scaling, Qwen2, Mistral, GPT-2) and a llama.cpp-style GGUF file, plus golden outputs
(token ids, chat renderings, assistant-token masks, log-probs, logits, greedy
generations) computed with `transformers`.  The Rust tests compare against these files;
they never run Python.

Setup (a throwaway venv outside the repo; only PyPI is needed, the CPU is enough):

    python3 -m venv /tmp/venv-fx
    /tmp/venv-fx/bin/pip install torch transformers safetensors tokenizers gguf numpy jinja2 accelerate

Run from the repository root (regenerates everything, deletes the old tests/fixtures/
tokenizer*, tests/fixtures/models first; takes well under a minute):

    /tmp/venv-fx/bin/python scripts/make_fixtures.py

Versions the committed fixtures were made with (Python 3.11.7, CPU):

    torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3, safetensors 0.8.0,
    gguf 0.19.0, numpy 2.4.6, jinja2 3.1.6, accelerate 1.15.0 (transformers needs it to load GGUF)

Other versions should give the same tokenizer files and (within ~1e-6) the same numbers,
but a fresh run may change the bytes of the committed files; check `git diff` after.

Notes
* transformers 5 writes config.json with `"dtype"` and `"rope_parameters"`.  Hub
  checkpoints made with transformers 4 use `"torch_dtype"`, `"rope_theta"` and
  `"rope_scaling"`.  So that the Rust loader is tested on both, the configs of
  `llama-untied-bf16` and `qwen2-f16-sharded` are rewritten into the transformers-4 form
  (LEGACY_CONFIG below); the script reloads every saved dir with transformers and checks
  it reproduces the goldens, so both forms are known to be understood by transformers.
* Batched log-probs use left padding, attention_mask and position_ids =
  cumsum(mask) - 1 with padded slots set to 1 (what `generate` does).  They are asserted
  equal to the unbatched ones within 1e-5.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"

VOCAB = 320  # model vocab (tokenizer has 300 ids, the rest are unused embedding rows)
TOK_VOCAB = 300  # BPE vocab including the three ChatML specials
TOL = 1e-5
EMB_STD = 0.25  # logits then have a std of ~1.5: peaked enough, but not one-hot

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# The chat template of SmolLM2-Instruct (ChatML with a default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-3 style: the template itself emits the BOS token, and the tokenizer's
# post-processor also prepends it when add_special_tokens=True.  apply_chat_template
# tokenizes the rendered text with add_special_tokens=False, so there is one BOS.
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# The same two templates with each assistant message's content and its end-of-turn token
# wrapped in {% generation %}...{% endgeneration %}, for transformers'
# return_assistant_tokens_mask.  They render exactly the same text as the templates above
# (asserted); the role header and ChatML's "\n" after <|im_end|> stay outside the tags.
CHATML_GEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_GEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% set header = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' %}"
    "{% if loop.index0 == 0 %}{% set header = bos_token + header %}{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ header }}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ header + message['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LEGACY_CONFIG = {"llama-untied-bf16", "qwen2-f16-sharded"}


# --------------------------------------------------------------------------------------
# Training text for the tokenizer: a few hundred short plain-English lines, built from
# a handful of hand-written sentences and word lists (deterministically).
# --------------------------------------------------------------------------------------

BASE_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model can still learn a lot from a little data.",
    "We trained the reward model on pairs of answers.",
    "The assistant should answer the question and then stop.",
    "Please write a short poem about the sea.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "There are three apples and two oranges on the table.",
    "The weather today is sunny with a light breeze from the west.",
    "She opened the door and walked into the garden.",
    "Learning rate, batch size and the number of steps all matter.",
    "The cat sat on the mat and looked at the window.",
    "He said that the train would leave at nine in the morning.",
    "Reading a good book is one of the best ways to spend an evening.",
    "They built a house near the river and planted a tree.",
    "What is the capital of France? The capital of France is Paris.",
    "Water boils at one hundred degrees at sea level.",
    "The children played in the park until the sun went down.",
    "Thank you for your help, it was very kind of you.",
    "Some people like tea, and other people like coffee.",
    "The policy is updated with a clipped objective.",
]

SUBJECTS = ["The teacher", "My friend", "A young student", "The old farmer", "Our team",
            "The little bird", "Her brother", "The new robot", "A tired traveler", "The doctor"]
VERBS = ["reads", "writes", "finds", "carries", "paints", "cleans", "watches", "builds",
         "opens", "remembers", "explains", "shares"]
OBJECTS = ["a long letter", "the red box", "a map of the city", "the morning news",
           "an old song", "the kitchen table", "a simple answer", "the garden gate",
           "a bright picture", "the heavy bag"]
ENDINGS = ["every day.", "in the evening.", "with great care.", "before lunch.",
           "after the rain.", "at the station.", "for the first time.", "without a word."]


def training_lines() -> list[str]:
    rng = random.Random(1234)
    lines = list(BASE_LINES)
    for _ in range(300):
        lines.append(" ".join([rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS),
                               rng.choice(ENDINGS)]))
    return lines


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _dumps(obj, level: int = 0) -> str:
    """Pretty JSON, but a list holding no lists/dicts goes on one line."""
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(obj, dict) and all(not isinstance(v, (list, dict)) for v in obj.values()):
        return json.dumps(obj, ensure_ascii=False)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {_dumps(v, level + 1)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(x, (list, dict)) for x in obj):
        return "[\n" + ",\n".join(inner + _dumps(x, level + 1) for x in obj) + "\n" + pad + "]"
    if isinstance(obj, list):
        return "[" + ", ".join(json.dumps(x, ensure_ascii=False) for x in obj) + "]"
    return json.dumps(obj, ensure_ascii=False)


def write_json(path: Path, obj, indent=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _dumps(obj) if indent is None else json.dumps(obj, ensure_ascii=False, indent=indent)
    assert json.loads(text) == obj
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def f32_list(t: torch.Tensor) -> list:
    """Exact float32 values as Python floats (json writes the shortest repr of the double)."""
    return t.detach().to(torch.float32).cpu().double().tolist()


def as_id_list(x) -> list[int]:
    """apply_chat_template(tokenize=True) returns a dict-like in transformers 5, a list in 4."""
    if hasattr(x, "keys") and "input_ids" in x:
        x = x["input_ids"]
    if hasattr(x, "tolist"):
        x = x.tolist()
    if x and isinstance(x[0], list):
        assert len(x) == 1
        x = x[0]
    return [int(i) for i in x]


# --------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------

def train_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOK_VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_lines(), trainer=trainer)
    assert tok.get_vocab_size() == TOK_VOCAB, tok.get_vocab_size()
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def tokenizer_config(bos, eos, pad, template, added_tokens: list[tuple[int, str]]) -> dict:
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, s in added_tokens
        },
        "bos_token": bos,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "model_max_length": 8192,
        "pad_token": pad,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


ENCODE_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Unicode: café, naïve, 日本語, emoji 🤖 and ñ.",
    "Multiple   spaces,\ttabs and\n\nnew lines\n  indented line",
    "Digits 0123456789 and 3.14159, year 2024, 1,000,000.",
    "Before<|im_start|>user\nHi there<|im_end|>\nafter <|endoftext|>",
    "  leading and trailing spaces  ",
    "",
]

CHATS = [
    ([{"role": "user", "content": "What is the capital of France?"}], True),
    ([{"role": "system", "content": "You are a terse assistant."},
      {"role": "user", "content": "Say hi."}], True),
    ([{"role": "user", "content": "Count to three."},
      {"role": "assistant", "content": "1, 2, 3."},
      {"role": "user", "content": "Now backwards, please!"}], True),
    ([{"role": "system", "content": "Be kind."},
      {"role": "user", "content": "Tell me a joke."},
      {"role": "assistant", "content": "Why did the chicken cross the road?  To get to the other side."}], False),
]

# Conversations for the assistant-token masks (all rendered with add_generation_prompt=False).
MASK_CHATS = [
    # single turn, no system message (ChatML adds its default system prompt)
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    # multi-turn with a system message and three assistant replies
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Count to three."},
     {"role": "assistant", "content": "1, 2, 3."},
     {"role": "user", "content": "Now backwards, please!"},
     {"role": "assistant", "content": "3, 2, 1."},
     {"role": "user", "content": "Thank you."},
     {"role": "assistant", "content": "You are welcome!"}],
    # unicode; an assistant reply with leading spaces, inner newlines and indentation and a
    # trailing newline (the Llama-3 template trims the outer whitespace, ChatML keeps it)
    [{"role": "user", "content": "¿Qué es 日本語? Answer in a list 🤖"},
     {"role": "assistant", "content": "  It is Japanese:\n\n- 日本 (Japan)\n  - 語 (language)\nC'est naïve, café ñ.\n"}],
    # ends with a user message: no trailing assistant turn
    [{"role": "system", "content": "Be kind."},
     {"role": "user", "content": "Tell me a joke."},
     {"role": "assistant", "content": "Why did the chicken cross the road?  To get to the other side."},
     {"role": "user", "content": "Another one, please."}],
]


def make_assistant_masks(hf, gen_template: str) -> list[dict]:
    """apply_chat_template(..., return_assistant_tokens_mask=True) with the generation-tag
    variant of the fixture's template; the text must equal the plain template's."""
    cases = []
    for messages in MASK_CHATS:
        plain = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                      chat_template=gen_template)
        assert text == plain, (text, plain)
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True,
                                     add_generation_prompt=False, chat_template=gen_template)
        ids = as_id_list(out["input_ids"])
        mask = [int(m) for m in out["assistant_masks"]]
        assert ids == hf(text, add_special_tokens=False)["input_ids"]
        assert ids == as_id_list(hf.apply_chat_template(messages, tokenize=True,
                                                        add_generation_prompt=False))
        assert len(mask) == len(ids) and set(mask) <= {0, 1}
        n_asst = sum(m["role"] == "assistant" for m in messages)
        runs = sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
        assert runs == n_asst, (runs, n_asst)  # one contiguous run per assistant message
        cases.append({"messages": messages, "text": text, "ids": ids, "assistant_mask": mask})
    return cases


def prefix_diff_mask(hf, messages: list[dict]) -> list[int]:
    """The "prefix-diff" rule, with the fixture's own template (no generation tags): the
    span of assistant message i is [len(render(messages[:i], add_generation_prompt=True)),
    len(render(messages[:i+1]).rstrip())) in the full rendering, and a token is masked iff
    its character offsets (fast tokenizer, add_special_tokens=False) lie inside a span."""
    def render(msgs, gen):
        return hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        upto = render(messages[: i + 1], False).rstrip()
        assert full.startswith(before) and full.startswith(upto), i
        spans.append((len(before), len(upto)))
    enc = hf(full, add_special_tokens=False, return_offsets_mapping=True)
    return [int(any(a <= s and e <= b for a, b in spans)) for s, e in enc["offset_mapping"]]


def check_prefix_diff(hf, cases: list[dict], name: str) -> None:
    """Does the prefix-diff rule give transformers' generation-tag mask?  (Asserted.)"""
    for k, c in enumerate(cases):
        ours = prefix_diff_mask(hf, c["messages"])
        if ours != c["assistant_mask"]:
            toks = hf.convert_ids_to_tokens(c["ids"])
            diff = [(j, toks[j], c["assistant_mask"][j], ours[j])
                    for j in range(len(ours)) if ours[j] != c["assistant_mask"][j]]
            raise AssertionError(f"{name}: prefix-diff != transformers mask in case {k}: "
                                 f"(index, token, transformers, prefix-diff) {diff}")
    n = sum(sum(c["assistant_mask"]) for c in cases)
    print(f"  {name}: prefix-diff rule == transformers' assistant mask "
          f"({len(cases)} cases, {n} masked tokens)")


def make_golden_tokenizer(dirpath: Path, with_special_variant: bool, gen_template: str) -> dict:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(dirpath))
    golden = {"encode": [], "decode": [], "chat": []}
    for text in ENCODE_TEXTS:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        entry = {"text": text, "ids": ids}
        if with_special_variant:
            entry["ids_with_special"] = hf(text, add_special_tokens=True)["input_ids"]
            assert entry["ids_with_special"] == [hf.bos_token_id] + ids
        golden["encode"].append(entry)
        dec = hf.decode(ids, skip_special_tokens=False)
        assert dec == text, (dec, text)
        golden["decode"].append({"ids": ids, "text": dec})
    # a decode of ids that are not a clean encoding: individual byte tokens that split a
    # multi-byte character (decoded with replacement characters, as HF does).
    robot = hf("🤖", add_special_tokens=False)["input_ids"]
    ok = hf(" ok", add_special_tokens=False)["input_ids"]
    assert len(robot) == 4  # one token per UTF-8 byte with this tiny vocab
    bad = robot[:2] + ok
    golden["decode"].append({"ids": bad, "text": hf.decode(bad, skip_special_tokens=False)})
    assert golden["decode"][-1]["text"] == "\ufffd ok", golden["decode"][-1]["text"]
    for messages, gen in CHATS:
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        ids = as_id_list(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen))
        assert ids == hf(text, add_special_tokens=False)["input_ids"]
        golden["chat"].append({"messages": messages, "add_generation_prompt": gen,
                               "text": text, "ids": ids})
    golden["generation_template"] = gen_template
    golden["assistant_masks"] = make_assistant_masks(hf, gen_template)
    check_prefix_diff(hf, golden["assistant_masks"], dirpath.name)
    write_json(dirpath / "golden.json", golden)
    return golden


def make_tokenizers():
    from tokenizers import AddedToken, processors

    # ChatML (SmolLM2-like)
    tok = train_bpe()
    d = FIX / "tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    cfg = tokenizer_config("<|im_start|>", "<|im_end|>", "<|im_end|>", CHATML_TEMPLATE,
                           list(enumerate(SPECIALS)))
    write_json(d / "tokenizer_config.json", cfg, indent=2)
    g = make_golden_tokenizer(d, with_special_variant=False,
                             gen_template=CHATML_GEN_TEMPLATE)
    # the literal "<|im_start|>" must become the special token
    assert 1 in g["encode"][4]["ids"] and 2 in g["encode"][4]["ids"]

    # Llama-3 style: same BPE, four more specials, BOS-prepending post-processor.
    tok3 = train_bpe()
    tok3.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in LLAMA3_SPECIALS])
    ids3 = [tok3.token_to_id(s) for s in LLAMA3_SPECIALS]
    assert ids3 == list(range(TOK_VOCAB, TOK_VOCAB + 4)), ids3
    bos = "<|begin_of_text|>"
    tok3.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tok3.token_to_id(bos))],
        ),
    ])
    d3 = FIX / "tokenizer-llama3"
    d3.mkdir(parents=True, exist_ok=True)
    tok3.save(str(d3 / "tokenizer.json"))
    cfg3 = tokenizer_config(bos, "<|eot_id|>", "<|endoftext|>",
                            LLAMA3_TEMPLATE,
                            list(enumerate(SPECIALS)) + list(zip(ids3, LLAMA3_SPECIALS)))
    write_json(d3 / "tokenizer_config.json", cfg3, indent=2)
    g3 = make_golden_tokenizer(d3, with_special_variant=True,
                              gen_template=LLAMA3_GEN_TEMPLATE)
    for c in g3["chat"]:
        assert c["ids"][0] == ids3[0] and c["ids"][1] != ids3[0], "expected exactly one BOS"
    return tok


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------

def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise with larger, non-trivial values so that logits are far from uniform
    and norms/biases matter: matrices ~ N(0, 1/fan_in), embeddings/lm_head ~ N(0, EMB_STD^2),
    norm weights 1 + 0.1*N, biases 0.1*N."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = p.shape
            if p.ndim == 1:
                if "norm" in name or name.endswith("ln_1.weight") or name.endswith("ln_2.weight") \
                        or name.endswith("ln_f.weight"):
                    if name.endswith("weight"):
                        p.copy_(1.0 + 0.1 * torch.randn(shape, generator=g))
                    else:
                        p.copy_(0.1 * torch.randn(shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(shape, generator=g))
            elif ("embed" in name or name.startswith("lm_head") or name.endswith("wte.weight")
                  or name.endswith("wpe.weight")):
                p.copy_(EMB_STD * torch.randn(shape, generator=g))
            else:
                # nn.Linear weight is [out, in]; GPT-2 Conv1D weight is [in, out]
                fan_in = shape[0] if "transformer.h." in name else shape[1]
                p.copy_(torch.randn(shape, generator=g) / (fan_in ** 0.5))


def round_params_(model, dtype) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))


def rand_ids(rng: np.random.Generator, n: int) -> list[int]:
    return [int(x) for x in rng.integers(3, VOCAB, size=n)]


def seq_logprobs(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    lp = torch.log_softmax(logits.float(), dim=-1)
    t = torch.tensor(ids[1:])
    return lp[: len(ids) - 1].gather(-1, t[:, None])[:, 0]


@torch.no_grad()
def compute_golden(model, seed: int) -> dict:
    model.eval()
    rng = np.random.default_rng(seed)
    seqs = [rand_ids(rng, n) for n in (5, 11, 17)]
    single = []
    logits_first = None
    for ids in seqs:
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        if logits_first is None:
            logits_first = f32_list(logits)
        single.append({"ids": ids, "logprobs": f32_list(seq_logprobs(logits, ids))})

    # left-padded batch
    L = max(len(s) for s in seqs)
    input_ids = [[0] * (L - len(s)) + s for s in seqs]
    mask = [[0] * (L - len(s)) + [1] * len(s) for s in seqs]
    m = torch.tensor(mask)
    pos = m.cumsum(-1) - 1
    pos = pos.masked_fill(m == 0, 1)
    logits = model(input_ids=torch.tensor(input_ids), attention_mask=m, position_ids=pos).logits
    batch_lp = []
    for r, s in enumerate(seqs):
        start = L - len(s)
        lp = seq_logprobs(logits[r, start:], s)
        batch_lp.append(f32_list(lp))
        diff = (lp - torch.tensor(single[r]["logprobs"])).abs().max().item()
        assert diff < TOL, f"batched vs single logprobs differ by {diff} (row {r})"

    # greedy, one prompt at a time
    from transformers import GenerationConfig
    gc = GenerationConfig(do_sample=False, max_new_tokens=8, eos_token_id=None,
                          pad_token_id=0, bos_token_id=None)
    greedy = []
    for n in (3, 6, 9):
        prompt = rand_ids(rng, n)
        out = model.generate(input_ids=torch.tensor([prompt]),
                             attention_mask=torch.ones(1, n, dtype=torch.long),
                             generation_config=gc)
        new = [int(x) for x in out[0, n:].tolist()]
        assert len(new) == 8, new
        # cross-check against a hand-written greedy loop without KV cache
        cur = list(prompt)
        for _ in range(8):
            cur.append(int(model(input_ids=torch.tensor([cur])).logits[0, -1].argmax()))
        assert cur[n:] == new, (cur[n:], new)
        greedy.append({"prompt": prompt, "new_ids": new})

    return {
        "single": single,
        "logits_first": logits_first,
        "batch": {"input_ids": input_ids, "attention_mask": mask,
                  "position_ids": pos.tolist(), "logprobs": batch_lp},
        "greedy": greedy,
    }


def check_against_golden(model, golden: dict, tol: float, what: str) -> float:
    """Max abs logprob difference of `model` vs golden['single'] (asserted < tol)."""
    worst = 0.0
    with torch.no_grad():
        for s in golden["single"]:
            logits = model(input_ids=torch.tensor([s["ids"]])).logits[0]
            d = (seq_logprobs(logits, s["ids"]) - torch.tensor(s["logprobs"])).abs().max().item()
            worst = max(worst, d)
    assert worst < tol, f"{what}: logprobs differ from golden by {worst}"
    return worst


def to_legacy_config(path: Path) -> None:
    """Rewrite a transformers-5 config.json in the transformers-4 (hub) form."""
    cfg = json.loads(path.read_text())
    new = {}
    for k, v in cfg.items():
        if k == "dtype":
            new["torch_dtype"] = v
        elif k == "layer_types" and all(t == "full_attention" for t in v):
            continue  # derived field that transformers-4 hub configs do not carry
        elif k == "rope_parameters":
            rp = dict(v)
            new["rope_theta"] = rp.pop("rope_theta")
            if rp.get("rope_type", "default") != "default":
                new["rope_scaling"] = rp
            else:
                new["rope_scaling"] = None
        else:
            new[k] = v
    new["transformers_version"] = "4.57.1"
    path.write_text(json.dumps(dict(sorted(new.items())), indent=2) + "\n")


def copy_tokenizer(dst: Path) -> None:
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIX / "tokenizer" / f, dst / f)


def build(name: str, cfg, cls, seed: int, round_to=None, save_dtype=torch.float32,
          shard=None):
    from transformers import AutoModelForCausalLM

    seed_all(seed)
    model = cls(cfg).to(torch.float32)
    perturb_(model, seed)
    if getattr(cfg, "tie_word_embeddings", False):
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if round_to is not None:
        round_params_(model, round_to)
    model.eval()
    golden = compute_golden(model, seed + 1)

    d = FIX / "models" / name
    d.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if shard:
        kwargs["max_shard_size"] = shard
    model.to(save_dtype).save_pretrained(str(d), **kwargs)
    model.to(torch.float32)
    gen_cfg = d / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    if name in LEGACY_CONFIG:
        to_legacy_config(d / "config.json")
    copy_tokenizer(d)
    write_json(d / "golden.json", golden)

    # reload from disk in f32 and check it reproduces the golden exactly
    re = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32,
                                              attn_implementation="eager")
    re.eval()
    worst = check_against_golden(re, golden, 1e-6, f"{name} reload")
    print(f"  {name}: saved, reload max|dlogprob| = {worst:.2e}")
    return model, golden


def make_models():
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, bos_token_id=1,
                  eos_token_id=2, attn_implementation="eager")

    build("llama-tied",
          LlamaConfig(**common, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=True),
          LlamaForCausalLM, seed=100)

    build("llama-untied-bf16",
          LlamaConfig(**common, num_key_value_heads=4, rope_theta=500000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=False,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 16}),
          LlamaForCausalLM, seed=200, round_to=torch.bfloat16, save_dtype=torch.bfloat16)

    build("qwen2-f16-sharded",
          Qwen2Config(**common, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, use_sliding_window=False, sliding_window=None,
                      max_window_layers=2),
          Qwen2ForCausalLM, seed=300, round_to=torch.float16, save_dtype=torch.float16,
          shard="12KB")
    idx = FIX / "models" / "qwen2-f16-sharded" / "model.safetensors.index.json"
    assert idx.exists()
    nshards = len(set(json.loads(idx.read_text())["weight_map"].values()))
    assert nshards >= 2, nshards
    print(f"  qwen2-f16-sharded: {nshards} shards")

    build("mistral",
          MistralConfig(**common, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
                        tie_word_embeddings=False, sliding_window=None),
          MistralForCausalLM, seed=400)

    build("gpt2",
          GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     n_inner=64, activation_function="gelu_new", bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     attn_implementation="eager"),
          GPT2LMHeadModel, seed=500)


# --------------------------------------------------------------------------------------
# GGUF (written the way llama.cpp's convert_hf_to_gguf.py writes a Llama model, --outtype q8_0)
# --------------------------------------------------------------------------------------

def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved row order, per head.

    Within each head of size d, HF rows are [r_0..r_{d/2-1}, i_0..i_{d/2-1}] (the two halves
    that rotate_half pairs up); llama.cpp wants pairs adjacent: [r_0, i_0, r_1, i_1, ...].
    out[h*d + 2*j + t] = w[h*d + t*(d/2) + j]   for t in {0, 1}, j < d/2.
    """
    rows = w.shape[0]
    d = rows // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llamacpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llamacpp_permute: w_hf[h*d + t*(d/2) + j] = w_gguf[h*d + 2*j + t]."""
    rows = w.shape[0]
    d = rows // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_gguf(bpe_tok):
    import gguf
    from gguf import GGMLQuantizationType as Q
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    seed = 600
    n_head, n_kv = 4, 2
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=n_head, num_key_value_heads=n_kv,
                      max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      attn_implementation="eager")
    seed_all(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    perturb_(model, seed)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    # HF name -> (gguf name, permute heads or None)
    names = {"model.embed_tokens.weight": ("token_embd.weight", None),
             "model.norm.weight": ("output_norm.weight", None)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        names.update({
            p + "self_attn.q_proj.weight": (b + "attn_q.weight", n_head),
            p + "self_attn.k_proj.weight": (b + "attn_k.weight", n_kv),
            p + "self_attn.v_proj.weight": (b + "attn_v.weight", None),
            p + "self_attn.o_proj.weight": (b + "attn_output.weight", None),
            p + "mlp.gate_proj.weight": (b + "ffn_gate.weight", None),
            p + "mlp.up_proj.weight": (b + "ffn_up.weight", None),
            p + "mlp.down_proj.weight": (b + "ffn_down.weight", None),
            p + "input_layernorm.weight": (b + "attn_norm.weight", None),
            p + "post_attention_layernorm.weight": (b + "ffn_norm.weight", None),
        })

    d = FIX / "models" / "llama-gguf"
    d.mkdir(parents=True, exist_ok=True)
    path = d / "model.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("rlhf tiny llama fixture")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.hidden_size // n_head)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(VOCAB)

    # tokenizer metadata, as convert_hf_to_gguf does for a BPE ("gpt2") vocab: ids past the
    # tokenizer's size are filled with "[PAD{i}]" of type UNUSED; added specials are CONTROL.
    tj = json.loads((FIX / "tokenizer" / "tokenizer.json").read_text())
    rev = {i: t for t, i in tj["model"]["vocab"].items()}
    special_ids = {a["id"] for a in tj["added_tokens"] if a["special"]}
    tokens, types = [], []
    for i in range(VOCAB):
        if i in rev:
            tokens.append(rev[i])
            types.append(gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    tcfg = json.loads((FIX / "tokenizer" / "tokenizer_config.json").read_text())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bpe_tok.token_to_id(tcfg["bos_token"]))
    w.add_eos_token_id(bpe_tok.token_to_id(tcfg["eos_token"]))
    w.add_pad_token_id(bpe_tok.token_to_id(tcfg["pad_token"]))
    w.add_add_bos_token(False)
    w.add_chat_template(tcfg["chat_template"])

    deq = {}  # HF name -> dequantized f32 (HF row order)
    for hf_name, (g_name, heads) in names.items():
        a = sd[hf_name]
        if heads is not None:
            a = llamacpp_permute(a, heads)
        if a.ndim == 2 and a.shape[1] % 32 == 0:
            q = gguf.quants.quantize(a, Q.Q8_0)
            w.add_tensor(g_name, q, raw_dtype=Q.Q8_0)
            back = gguf.quants.dequantize(q, Q.Q8_0).reshape(a.shape).astype(np.float32)
        else:
            w.add_tensor(g_name, a.astype(np.float32))
            back = a
        if heads is not None:
            back = llamacpp_unpermute(back, heads)
        deq[hf_name] = back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # golden from the dequantized weights
    sd_t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in deq.items()}
    missing, unexpected = model.load_state_dict(sd_t, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.eval()
    golden = compute_golden(model, seed + 1)
    write_json(d / "golden.json", golden)

    # read back with the gguf reader: names, types, shapes
    r = gguf.GGUFReader(str(path))
    got = {t.name: t for t in r.tensors}
    assert "output.weight" not in got and len(got) == len(names)
    for hf_name, (g_name, _) in names.items():
        t = got[g_name]
        arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(deq[hf_name].shape)
        if ".attn_q." in g_name or ".attn_k." in g_name:
            arr = llamacpp_unpermute(arr, n_head if ".attn_q." in g_name else n_kv)
        assert np.array_equal(arr, deq[hf_name]), g_name

    # cross-check: transformers' own GGUF loader must give the same log-probs
    hf = AutoModelForCausalLM.from_pretrained(str(d), gguf_file="model.gguf", dtype=torch.float32)
    hf.eval()
    assert hf.config.tie_word_embeddings
    worst = check_against_golden(hf, golden, TOL, "transformers gguf load")
    print(f"  llama-gguf: transformers gguf loader max|dlogprob| = {worst:.2e}")
    try:
        from transformers import AutoTokenizer
        ht = AutoTokenizer.from_pretrained(str(d), gguf_file="model.gguf")
        ours = AutoTokenizer.from_pretrained(str(FIX / "tokenizer"))
        for text in ENCODE_TEXTS:
            a = ht(text, add_special_tokens=False)["input_ids"]
            b = ours(text, add_special_tokens=False)["input_ids"]
            if a != b:
                print(f"  llama-gguf: note: transformers' gguf tokenizer differs on {text!r}")
                break
        else:
            print("  llama-gguf: transformers' gguf tokenizer matches the tokenizer fixture")
    except Exception as e:  # noqa: BLE001
        print(f"  llama-gguf: note: transformers could not build a tokenizer from the gguf: {e!r}")


def main() -> int:
    os.chdir(ROOT)
    torch.set_num_threads(1)  # bit-for-bit reproducible CPU reductions
    torch.use_deterministic_algorithms(True)
    for sub in ("tokenizer", "tokenizer-llama3", "models"):
        shutil.rmtree(FIX / sub, ignore_errors=True)
    print("tokenizers")
    bpe = make_tokenizers()
    print("models")
    make_models()
    print("gguf")
    make_gguf(bpe)
    total = sum(p.stat().st_size for p in FIX.rglob("*") if p.is_file())
    print(f"done: {FIX.relative_to(ROOT)} is {total / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
