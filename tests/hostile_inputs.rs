//! Files from strangers: every size read from a model file is bounded before anything is
//! allocated, a header that would crash a reader is an error, and data that is not a file, or a
//! record too large to tokenize, is refused naming the file (and line) — one line, non-zero exit,
//! within seconds.

use crate::common::*;
use candle_core::quantized::gguf_file::{self, Value};
use std::path::Path;
use std::time::Instant;

/// `rlhf logprobs` on `model`: must fail, printing nothing but one line containing `want`.
fn refused(model: &Path, want: &str) {
    let args = [
        "logprobs",
        "--model",
        model.to_str().unwrap(),
        "--text",
        "a b",
    ];
    let err = refuses(&args, want);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// The fixture GGUF written again with metadata `key` set to `value`.
fn gguf_with(dir: &Path, name: &str, key: &str, value: Value) -> std::path::PathBuf {
    let src = fixture("models/llama-gguf/model.gguf");
    let mut f = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut meta: Vec<(String, Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| *k != key)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.push((key.to_string(), value));
    let tensors: Vec<(String, candle_core::quantized::QTensor)> = content
        .tensor_infos
        .keys()
        .map(|n| {
            (
                n.clone(),
                content
                    .tensor(&mut f, n, &candle_core::Device::Cpu)
                    .unwrap(),
            )
        })
        .collect();
    let path = dir.join(name);
    let mut out = std::fs::File::create(&path).unwrap();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut out, &meta_refs, &tensor_refs).unwrap();
    path
}

#[test]
fn crafted_gguf_headers_are_errors_not_crashes_or_allocation_bombs() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // The unmodified rewrite loads (so the cases below fail for their one change).
    let same = gguf_with(d, "same.gguf", "general.name", Value::String("x".into()));
    assert_ok(&run_rlhf(&[
        "logprobs",
        "--model",
        same.to_str().unwrap(),
        "--text",
        "a b",
    ]));
    refused(
        &gguf_with(d, "align0.gguf", "general.alignment", Value::U32(0)),
        "not a valid GGUF",
    );
    refused(
        &gguf_with(
            d,
            "heads0.gguf",
            "llama.attention.head_count",
            Value::U32(0),
        ),
        "must be",
    );
    refused(
        &gguf_with(
            d,
            "layers.gguf",
            "llama.block_count",
            Value::U64(1_000_000_000),
        ),
        "beyond any real model",
    );
    refused(
        &gguf_with(d, "theta.gguf", "llama.rope.freq_base", Value::F32(0.0)),
        "rope_theta",
    );
    // Cut short: the tensors' declared sizes no longer fit.
    let bytes = std::fs::read(&same).unwrap();
    let cut = d.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    refused(&cut, "does not fit in the file");
}

#[test]
fn crafted_config_json_sizes_and_constants_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (key, value, want)) in [
        (
            "num_hidden_layers",
            serde_json::json!(1u64 << 62),
            "beyond any real model",
        ),
        (
            "vocab_size",
            serde_json::json!(1u64 << 40),
            "beyond any real model",
        ),
        ("rope_theta", serde_json::json!(-1.0), "rope_theta"),
        ("rms_norm_eps", serde_json::json!(-1e-6), "epsilon"),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tmp.path().join(format!("m{i}"));
        llama_with(&dir, "config.json", |cfg| cfg[key] = value);
        refused(&dir, want);
    }
}

fn sft_on(train_file: &Path) -> std::process::Output {
    let tmp = tempfile::tempdir().unwrap();
    run_with_sets(
        &["sft"],
        &[
            format!("model=\"{}\"", model_path("llama-tied")),
            format!("train_file=\"{}\"", train_file.display()),
            format!("output_dir=\"{}\"", tmp.path().join("out").display()),
            "max_steps=1".into(),
        ],
    )
}

#[test]
fn data_that_is_not_a_file_or_too_large_a_record_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo.jsonl");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let dir = tmp.path().join("dir.jsonl");
    std::fs::create_dir(&dir).unwrap();
    let big = tmp.path().join("big.jsonl");
    let text = "word ".repeat(4 << 20);
    std::fs::write(
        &big,
        format!("{{\"prompt\": \"a\", \"completion\": \"b\"}}\n{{\"prompt\": \"a\", \"completion\": \"{text}\"}}\n"),
    )
    .unwrap();
    let joined = tmp.path().join("joined.jsonl");
    std::fs::write(
        &joined,
        "{\"text\": \"a b\"}\n\u{feff}{\"text\": \"c d\"}\n",
    )
    .unwrap();
    let latin1 = tmp.path().join("latin1.jsonl");
    std::fs::write(
        &latin1,
        b"{\"prompt\": \"a\", \"completion\": \"caf\xe9\"}\n",
    )
    .unwrap();
    for (path, want) in [
        (&fifo, "not a regular file"),
        (&dir, "is a directory"),
        (&big, "big.jsonl:2: a record over 16 MB"),
        (&joined, "joined.jsonl:2: starts with a byte-order mark"),
        (
            &latin1,
            "latin1.jsonl:1: not UTF-8 text (byte 35 of the line)",
        ),
    ] {
        let t0 = Instant::now();
        let out = sft_on(path);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{err}");
        assert_eq!(error_lines(&err), 1, "{err}");
        assert!(t0.elapsed().as_secs() < 20);
    }
    // A byte-order mark before the first record is not an error.
    let bom = tmp.path().join("bom.jsonl");
    std::fs::write(
        &bom,
        "\u{feff}{\"prompt\": \"a\", \"completion\": \" b c\"}\n",
    )
    .unwrap();
    assert_ok(&sft_on(&bom));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
}

/// The tiny Llama copied to `dir`, with its JSON file `file` changed by `edit`.
fn llama_with(dir: &Path, file: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    copy_dir(Path::new(&model_path("llama-tied")), dir);
    let path = dir.join(file);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, json.to_string()).unwrap();
}

#[test]
fn wrong_types_duplicate_tensors_and_shard_paths_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // A number given as a string is an error, not a default.
    let dir = tmp.path().join("string");
    llama_with(&dir, "config.json", |cfg| {
        cfg["max_position_embeddings"] = serde_json::json!("4096")
    });
    refused(
        &dir,
        "`max_position_embeddings` must be a non-negative integer",
    );
    // A tensor in two shards: the second copy is not silently taken.
    let sharded = fixture("models/qwen2-f16-sharded");
    let dup = tmp.path().join("dup");
    copy_dir(&sharded, &dup);
    std::fs::copy(
        dup.join("model-00001-of-00005.safetensors"),
        dup.join("model-00002-of-00005.safetensors"),
    )
    .unwrap();
    refused(&dup, "is also in");
    // A shard named by a path outside the model's directory.
    let escape = tmp.path().join("escape");
    copy_dir(&sharded, &escape);
    let index = escape.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap().replace(
        "model-00005-of-00005.safetensors",
        "../dup/model-00005-of-00005.safetensors",
    );
    std::fs::write(&index, text).unwrap();
    refused(&escape, "is not a file name");
}

/// `rlhf` with `args`: must fail within seconds in one error line containing `want`; its stderr.
fn refuses(args: &[&str], want: &str) -> String {
    let t0 = Instant::now();
    let out = run_rlhf(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?}: accepted");
    assert!(err.contains(want), "{args:?}: {err}");
    assert_eq!(error_lines(&err), 1, "{err}");
    assert!(err.lines().last().unwrap().len() < 600, "{err}");
    assert!(t0.elapsed().as_secs() < 20, "took {:?}", t0.elapsed());
    err.into_owned()
}

#[test]
fn sequences_past_the_context_and_sample_counts_past_the_limit_are_refused() {
    let llama = model_path("llama-tied");
    // 60,000 ids in one argument (under Linux's 128 KB for one).
    let ids = vec!["5"; 60_000].join(",");
    let context = "exceeds the model's context of 64 positions";
    refuses(&["logprobs", "--model", &llama, "--ids", &ids], context);
    let max = usize::MAX.to_string();
    let generate = ["generate", "--model", &llama, "--prompt", "a b"];
    refuses(
        &[&generate[..], &["--max-new-tokens", &max]].concat(),
        context,
    );
    refuses(
        &[&generate[..], &["--num-samples", "100000000000"]].concat(),
        "is more than 10000000 samples",
    );
}

#[test]
fn a_template_that_includes_itself_and_a_dpo_prompt_without_tokens_are_named_briefly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    llama_with(&model, "tokenizer_config.json", |cfg| {
        cfg["chat_template"] = "{% include 'chat_template' %}".into()
    });
    let m = model.to_str().unwrap();
    refuses(
        &["generate", "--model", m, "--chat", "--prompt", "hi"],
        "{% include %} failed",
    );

    let data = tmp.path().join("pairs.jsonl");
    write_jsonl(
        &data,
        &[
            serde_json::json!({"prompt": "a", "chosen": " b", "rejected": " c"}),
            serde_json::json!({"prompt": "", "chosen": " b", "rejected": " c"}),
        ],
    );
    let out = run_with_sets(
        &["dpo"],
        &[
            format!("model=\"{}\"", model_path("llama-tied")),
            format!("train_file=\"{}\"", data.display()),
            format!("output_dir=\"{}\"", tmp.path().join("out").display()),
            "max_steps=1".into(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("pairs.jsonl:2: the prompt has no tokens"),
        "{err}"
    );
    assert_eq!(error_lines(&err), 1, "{err}");
}
