#!/usr/bin/env python3
"""Render golden outputs of real model chat templates (dev-only; not run by CI).

Purpose
    tests/fixtures/chat-templates/<name>.jinja are the chat templates of six real models,
    byte-exact as published on the Hugging Face Hub (where each copy came from is in
    SOURCES below and in tests/fixtures/chat-templates/README.md). This script renders each
    template on a fixed set of conversations exactly the way
    `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...,
    **extra)` does, and writes the results to tests/fixtures/chat-templates/golden.json.
    The Rust chat-template renderer (minijinja) is tested against that file.

    The renderer is transformers itself: a real `PreTrainedTokenizerFast` (the repo's small
    fixture tokenizer, tests/fixtures/tokenizer/tokenizer.json) whose `chat_template`,
    `bos_token` and `eos_token` are set to the model's real values. The templates only read
    `bos_token`/`eos_token` of the special tokens (see "variables" in golden.json), so the
    vocabulary does not matter for `tokenize=False`. No network, no model downloads.

How to run (from the repository root; takes about a second):

    ~/.cache/rlhf-bench-venv/bin/python scripts/make_template_goldens.py

    It overwrites tests/fixtures/chat-templates/golden.json and checks that the templates
    still have the SHA-256 recorded below (so an edited template is caught). Run it twice
    and compare: the output is deterministic (no dates: Llama 3.2 gets `date_string`).

Versions the committed golden.json was made with:

    Python 3.11.7, transformers 5.24.0, jinja2 3.1.6, tokenizers 0.23.3

golden.json layout
    {"<name>": {"model", "source", "template_file", "template_sha256", "bos_token",
                "eos_token", "variables", "variables_with_defaults",
                "cases": [{"name", "messages",
                "add_generation_prompt", "extra", "text" | "error"}]}}
    `extra` holds the extra keyword arguments given to apply_chat_template (they become
    template variables). A case whose rendering raises has `error` (a substring of the
    exception message, which is the template's `raise_exception` text) instead of `text`.
    `variables` lists the names the template reads before it sets them (context variables
    and globals like `raise_exception`, `strftime_now`): what the renderer must provide or
    leave undefined. `variables_with_defaults` are those of them that the template sets
    itself, behind `is defined`, when they are not given (e.g. `date_string`).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.meta
import transformers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
DIR = ROOT / "tests" / "fixtures" / "chat-templates"
FIXTURE_TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizer" / "tokenizer.json"
OUT = DIR / "golden.json"

LLAMA_DATE = "26 Jul 2024"

# name -> model, where the template file was copied from, its SHA-256, and the model's real
# bos/eos token strings (tokenizer_config.json; None = the model has no such token).
SOURCES = {
    "qwen3": {
        "model": "Qwen/Qwen3-0.6B",
        "source": "github.com/ggml-org/llama.cpp@e121edc4324a640be11b7e567edd39b721b0f8e4"
        ":models/templates/Qwen-Qwen3-0.6B.jinja (the Hub tokenizer_config.json chat_template)",
        "sha256": "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5",
        "bos_token": None,
        "eos_token": "<|im_end|>",
    },
    "gemma3": {
        "model": "google/gemma-3-1b-it",
        "source": "github.com/Mesh-LLM/mesh-llm@747bcebe8643a9cddc283192d728765742bbc934"
        ":mesh-llm/src/mlx/testdata/hf_template_corpus.json, entry mlx-community/gemma-3-1b-it-qat-4bit"
        " (tokenizer_config.json); same bytes as ollama/ollama template/index.json 'gemma3-instruct'",
        "sha256": "7de1c58e208eda46e9c7f86397df37ec49883aeece39fb961e0a6b24088dd3c4",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
    },
    "gemma2": {
        "model": "google/gemma-2-2b-it",
        "source": "github.com/ggml-org/llama.cpp@8b576b6c55bc4e6be898b47522f0ef402b93ef62"
        ":models/templates/google-gemma-2-2b-it.jinja (the Hub tokenizer_config.json chat_template)",
        "sha256": "ecd6ae513fe103f0eb62e8ab5bfa8d0fe45c1074fa398b089c93a7e70c15cfd6",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
    },
    "phi4-mini": {
        "model": "microsoft/Phi-4-mini-instruct",
        "source": "github.com/guidance-ai/guidance@0dc7174d5363b8893763e7b4ae9ca7766f4c9883"
        ":guidance/chat.py phi_4_mini_template (copied from the Hub tokenizer_config.json#L104)",
        "sha256": "febf589225c9728ab791f52e8897d7607a823d45368f0a4c92fa68997b40cce9",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
    },
    "phi3": {
        "model": "microsoft/Phi-3-mini-4k-instruct",
        "source": "github.com/guidance-ai/guidance@22e744b13dd6fbaa3e173f57840f60237a7257f6"
        ":guidance/chat.py phi3_mini_template (copied from the Hub tokenizer_config.json#L119)",
        "sha256": "dcaee66df77bfbb789ec541fe713218da30225a526f1db97138fc39ee6dc56aa",
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
    },
    "llama3.2": {
        "model": "meta-llama/Llama-3.2-1B-Instruct",
        "source": "github.com/ggml-org/llama.cpp@8b576b6c55bc4e6be898b47522f0ef402b93ef62"
        ":models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja (the Hub tokenizer_config.json"
        " chat_template; 1B-Instruct has the same bytes, see README)",
        "sha256": "5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
    },
}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


SINGLE = [user("What is the capital of France?")]
SYSTEM_MULTI = [
    system("You are a concise assistant."),
    user("Hi there!"),
    assistant("Hello! How can I help?"),
    user("Name three primary colours."),
]
MULTI = [
    user("Hi there!"),
    assistant("Hello! How can I help?"),
    user("Name three primary colours."),
]
ENDS_WITH_ASSISTANT = [user("Say OK."), assistant("OK.")]
# Leading/trailing whitespace, tabs, blank lines, non-Latin scripts, an emoji (4-byte
# UTF-8), a code block and HTML-like text (templates must not autoescape).
UNICODE = [
    user("  Grüße aus München! 日本語のテキスト 🎉\nSecond line\n\n\tTabbed line  "),
    assistant('Ça va très bien — merci !\n\n```python\nprint("héllo")\n```\n'),
    user("Encore : « guillemets » & <b>not html</b> ☕"),
]
NOT_ALTERNATING = [user("First."), user("Second, without a reply in between.")]

THINK_ANSWER = "<think>\nThe user wants 2+2. That is 4.\n</think>\n\n2 + 2 = 4."
QWEN3_THINK_HISTORY = [user("What is 2+2?"), assistant(THINK_ANSWER), user("And 3+3?")]
QWEN3_THINK_LAST = [user("What is 2+2?"), assistant(THINK_ANSWER)]
QWEN3_REASONING_FIELD = [
    user("What is 2+2?"),
    {"role": "assistant", "content": "2 + 2 = 4.", "reasoning_content": "The user wants 2+2. That is 4."},
]


def case(name, messages, add_generation_prompt, extra=None, error=None):
    return {
        "name": name,
        "messages": messages,
        "add_generation_prompt": add_generation_prompt,
        "extra": dict(extra or {}),
        "expect_error": error,
    }


def common_cases(extra=None, system_error=None):
    """The cases every template gets. `system_error`: the template rejects system messages."""
    return [
        case("single_user_gen", SINGLE, True, extra),
        case("single_user_no_gen", SINGLE, False, extra),
        case("system_multi_turn_gen", SYSTEM_MULTI, True, extra, error=system_error),
        case("multi_turn_gen", MULTI, True, extra),
        case("ends_with_assistant", ENDS_WITH_ASSISTANT, False, extra),
        case("unicode_newlines_gen", UNICODE, True, extra),
    ]


ROLES_MUST_ALTERNATE = "Conversation roles must alternate user/assistant/user/assistant/..."

CASES = {
    "qwen3": common_cases()
    + [
        case("enable_thinking_false_gen", SINGLE, True, {"enable_thinking": False}),
        case("think_in_history_is_stripped", QWEN3_THINK_HISTORY, True),
        case("think_in_last_turn_is_kept", QWEN3_THINK_LAST, False),
        case("reasoning_content_field", QWEN3_REASONING_FIELD, False),
    ],
    "gemma3": common_cases()
    + [
        case("system_folded_into_first_user", [system("Answer in French."), user("Hello!")], True),
        case("roles_not_alternating", NOT_ALTERNATING, True, error=ROLES_MUST_ALTERNATE),
    ],
    "gemma2": common_cases(system_error="System role not supported")
    + [
        case("roles_not_alternating", NOT_ALTERNATING, True, error=ROLES_MUST_ALTERNATE),
    ],
    "phi4-mini": common_cases(),
    "phi3": common_cases(),
    "llama3.2": common_cases(extra={"date_string": LLAMA_DATE}),
}


def _names_in_eval_order(node):
    """Yield the Name nodes under `node` in the order they are evaluated (an assignment's
    value before its target, a loop's iterable before its target and body)."""
    if isinstance(node, jinja2.nodes.Name):
        yield node
        return
    if isinstance(node, jinja2.nodes.Assign):
        children = [node.node, node.target]
    elif isinstance(node, jinja2.nodes.For):
        children = [node.iter, node.target, node.test, *node.body, *node.else_]
    else:
        children = list(node.iter_child_nodes())
    for child in children:
        if child is not None:
            yield from _names_in_eval_order(child)


def template_variables(text):
    """(inputs, inputs_with_defaults) of a template.

    inputs: names whose first use (in evaluation order) is a read, i.e. context variables
    and globals such as `raise_exception`/`strftime_now`. inputs_with_defaults: the inputs
    that the template also sets itself behind an `is defined` test when they are not
    given (e.g. Llama 3.2's `date_string`)."""
    env = jinja2.Environment(extensions=[jinja2.ext.loopcontrols])
    ast = env.parse(text)
    first_use = {}
    for n in _names_in_eval_order(ast):
        first_use.setdefault(n.name, n.ctx)
    stored = {n.name for n in ast.find_all(jinja2.nodes.Name) if n.ctx == "store"}
    tested = {
        t.node.name
        for t in ast.find_all(jinja2.nodes.Test)
        if t.name == "defined" and isinstance(t.node, jinja2.nodes.Name)
    }
    defaulted = stored & tested
    inputs = {name for name, ctx in first_use.items() if ctx == "load"} | defaulted
    inputs.discard("loop")  # Jinja's own loop variable
    return sorted(inputs), sorted(defaulted)


def make_tokenizer(template, bos, eos):
    tok = PreTrainedTokenizerFast(tokenizer_file=str(FIXTURE_TOKENIZER))
    tok.chat_template = template
    tok.bos_token = bos
    tok.eos_token = eos
    # Exactly the special tokens the model has that the template can see.
    expected = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    assert tok.special_tokens_map == expected, tok.special_tokens_map
    return tok


def render(tok, c):
    try:
        text = tok.apply_chat_template(
            c["messages"],
            tokenize=False,
            add_generation_prompt=c["add_generation_prompt"],
            **c["extra"],
        )
    except jinja2.exceptions.TemplateError as e:
        if c["expect_error"] is None:
            raise
        assert c["expect_error"] in str(e), (c["name"], str(e))
        return {"error": c["expect_error"]}
    assert c["expect_error"] is None, f"{c['name']}: expected an error, got {text!r}"
    assert isinstance(text, str)
    return {"text": text}


def main():
    print(f"transformers {transformers.__version__}, jinja2 {jinja2.__version__}", file=sys.stderr)
    golden = {}
    for name, src in SOURCES.items():
        path = DIR / f"{name}.jinja"
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        assert digest == src["sha256"], f"{path} changed: sha256 {digest}"
        template = raw.decode("utf-8")
        tok = make_tokenizer(template, src["bos_token"], src["eos_token"])
        inputs, defaulted = template_variables(template)
        cases = []
        for c in CASES[name]:
            out = {
                "name": c["name"],
                "messages": c["messages"],
                "add_generation_prompt": c["add_generation_prompt"],
                "extra": c["extra"],
            }
            out.update(render(tok, c))
            cases.append(out)
        golden[name] = {
            "model": src["model"],
            "source": src["source"],
            "template_file": f"{name}.jinja",
            "template_sha256": digest,
            "bos_token": src["bos_token"],
            "eos_token": src["eos_token"],
            "variables": inputs,
            "variables_with_defaults": defaulted,
            "cases": cases,
        }
        print(f"{name}: {len(cases)} cases", file=sys.stderr)

    # Sanity checks on behaviours the goldens are meant to pin down.
    by = {n: {c["name"]: c for c in g["cases"]} for n, g in golden.items()}
    q = by["qwen3"]
    assert "<think>" not in q["think_in_history_is_stripped"]["text"]
    assert "<think>\nThe user wants 2+2. That is 4.\n</think>" in q["think_in_last_turn_is_kept"]["text"]
    assert q["enable_thinking_false_gen"]["text"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "Answer in French.\n\nHello!" in by["gemma3"]["system_folded_into_first_user"]["text"]
    assert f"Today Date: {LLAMA_DATE}" in by["llama3.2"]["single_user_gen"]["text"]
    for n, g in golden.items():
        for c in g["cases"]:
            assert "CONTINUE_FINAL_MESSAGE_TAG" not in c.get("text", "")

    data = json.dumps(golden, indent=2, ensure_ascii=False) + "\n"
    OUT.write_text(data, encoding="utf-8", newline="\n")
    print(f"wrote {OUT.relative_to(ROOT)} ({len(data.encode())} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
