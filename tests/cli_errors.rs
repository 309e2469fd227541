//! Bad input gives one `error:` line naming the file, tensor or value, a non-zero exit, no panic and
//! no partial output.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn rlhf(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Asserts failure with a single final `error:` line containing every needle.
fn expect_error(args: &[&str], needles: &[&str]) -> String {
    let (code, stdout, stderr) = rlhf(args);
    assert_ne!(code, 0, "expected failure for {args:?}; stdout: {stdout}");
    assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("error: "),
        "last stderr line is not an error: {stderr}"
    );
    assert_eq!(
        stderr.matches("error:").count(),
        1,
        "more than one error line: {stderr}"
    );
    for n in needles {
        assert!(last.contains(n), "error line lacks {n:?}: {last}");
    }
    last.to_string()
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn tmp_model(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_dir(&fixture(&format!("models/{name}")), &dir);
    (tmp, dir)
}

#[test]
fn missing_model_is_named() {
    expect_error(
        &["logprobs", "--model", "/nonexistent/model", "--ids", "1,2"],
        &["/nonexistent/model", "not found"],
    );
    expect_error(
        &[
            "logprobs",
            "--model",
            "no-such-org/no-such-model",
            "--ids",
            "1,2",
        ],
        &["no-such-org/no-such-model"],
    );
}

#[test]
fn truncated_safetensors_names_the_file() {
    let (_t, dir) = tmp_model("mistral");
    let f = dir.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    let data = std::fs::read(&f).unwrap();
    std::fs::write(&f, &data[..(len / 2) as usize]).unwrap();
    expect_error(
        &["logprobs", "--model", dir.to_str().unwrap(), "--ids", "1,2"],
        &["model.safetensors"],
    );
}

#[test]
fn lying_safetensors_header_names_the_file() {
    let (_t, dir) = tmp_model("mistral");
    let header = br#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[320,32],"data_offsets":[0,40960]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 64]); // far less data than the header claims
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    expect_error(
        &["logprobs", "--model", dir.to_str().unwrap(), "--ids", "1,2"],
        &["model.safetensors", "not a valid safetensors"],
    );
}

#[test]
fn shape_mismatch_names_the_tensor() {
    let (_t, dir) = tmp_model("llama-tied");
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["intermediate_size"] = serde_json::json!(48);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    expect_error(
        &["logprobs", "--model", dir.to_str().unwrap(), "--ids", "1,2"],
        &["mlp.gate_proj.weight", "shape", "[64, 32]", "[48, 32]"],
    );
}

#[test]
fn missing_tensor_is_named() {
    let (_t, dir) = tmp_model("qwen2-f16-sharded");
    // Drop one shard: the index still lists its tensors.
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shard = index["weight_map"]["model.norm.weight"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_file(dir.join(&shard)).unwrap();
    expect_error(
        &["logprobs", "--model", dir.to_str().unwrap(), "--ids", "1,2"],
        &[&shard, "missing"],
    );
}

#[test]
fn unknown_architecture_is_an_error() {
    let (_t, dir) = tmp_model("gpt2");
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["model_type"] = serde_json::json!("bert");
    cfg["architectures"] = serde_json::json!(["BertForMaskedLM"]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    expect_error(
        &["logprobs", "--model", dir.to_str().unwrap(), "--ids", "1,2"],
        &["config.json", "BertForMaskedLM", "unsupported"],
    );
}

#[test]
fn pickle_checkpoints_are_refused() {
    let (_t, dir) = tmp_model("gpt2");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"not really a pickle").unwrap();
    expect_error(
        &["logprobs", "--model", dir.to_str().unwrap(), "--ids", "1,2"],
        &["pickle"],
    );
}

#[test]
fn truncated_gguf_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("broken.gguf");
    let data = std::fs::read(fixture("models/llama-gguf/model.gguf")).unwrap();
    std::fs::write(&f, &data[..data.len() / 3]).unwrap();
    expect_error(
        &["logprobs", "--model", f.to_str().unwrap(), "--ids", "1,2"],
        &["broken.gguf"],
    );
}

#[test]
fn out_of_vocabulary_ids_and_empty_prompts_are_errors() {
    let m = model_path("llama-tied");
    expect_error(
        &["logprobs", "--model", &m, "--ids", "1,2,5000"],
        &["5000", "vocab"],
    );
    expect_error(&["logprobs", "--model", &m, "--ids", "1,x"], &["`x`"]);
    expect_error(&["logprobs", "--model", &m, "--ids", "7"], &["at least 2"]);
    expect_error(
        &["generate", "--model", &m, "--prompt", ""],
        &["empty prompt"],
    );
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("prompts.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"fine\"}\n{\"prompt\": \"broken\"\n").unwrap();
    expect_error(
        &[
            "generate",
            "--model",
            &m,
            "--prompts",
            bad.to_str().unwrap(),
        ],
        &["prompts.jsonl:2"],
    );
    std::fs::write(&bad, "{\"prompt\": \"fine\"}\n{\"text\": \"x\"}\n").unwrap();
    expect_error(
        &[
            "generate",
            "--model",
            &m,
            "--prompts",
            bad.to_str().unwrap(),
        ],
        &["prompts.jsonl:2", "\"prompt\""],
    );
}

#[test]
fn convert_never_leaves_partial_output() {
    let tmp = tempfile::tempdir().unwrap();
    // A failing source: nothing is created.
    let out = tmp.path().join("out1");
    expect_error(
        &[
            "convert",
            "--model",
            "/nonexistent",
            "--out",
            out.to_str().unwrap(),
        ],
        &["not found"],
    );
    assert!(!out.exists());
    // An existing non-empty output is not overwritten.
    let out = tmp.path().join("out2");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    expect_error(
        &[
            "convert",
            "--model",
            &model_path("gpt2"),
            "--out",
            out.to_str().unwrap(),
        ],
        &["already exists"],
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    // An unwritable location fails before anything is written.
    expect_error(
        &[
            "convert",
            "--model",
            &model_path("gpt2"),
            "--out",
            "/proc/rlhf-out",
        ],
        &["/proc"],
    );
    // No staging directories are left behind in the parent.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn a_qwen3_config_without_head_dim_or_with_sliding_windows_is_refused() {
    for (key, value, needle) in [
        ("head_dim", serde_json::Value::Null, "needs `head_dim`"),
        (
            "use_sliding_window",
            serde_json::json!(true),
            "use_sliding_window",
        ),
    ] {
        let (_t, dir) = tmp_model("qwen3");
        let cfg_path = dir.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        if value.is_null() {
            cfg.as_object_mut().unwrap().remove(key);
        } else {
            cfg[key] = value;
        }
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        expect_error(
            &["logprobs", "--model", dir.to_str().unwrap(), "--ids", "1,2"],
            &["config.json", needle],
        );
    }
}

#[test]
fn bad_gemma_phi_and_rope_configs_are_one_line_errors() {
    use serde_json::json;
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 8] = [
        (
            "gemma3",
            |c| {
                c.as_object_mut().unwrap().remove("head_dim");
            },
            "needs `head_dim`",
        ),
        (
            "gemma2",
            |c| c["layer_types"] = json!(["sliding_attention", "full_attention", "full_attention"]),
            "`layer_types` has 3 entries for num_hidden_layers = 2",
        ),
        (
            "gemma2",
            |c| c["layer_types"] = json!(["sliding_attention", "global"]),
            "neither",
        ),
        (
            "gemma3",
            |c| c["sliding_window_pattern"] = json!(0),
            "sliding_window_pattern",
        ),
        (
            "gemma2",
            |c| c["use_bidirectional_attention"] = json!(true),
            "use_bidirectional_attention",
        ),
        (
            "phi3",
            |c| c["rope_parameters"]["rope_type"] = json!("dynamic"),
            "rope_scaling type `dynamic` is not supported",
        ),
        (
            "phi3",
            |c| c["rope_parameters"]["short_factor"] = json!([1.0, 1.0]),
            "short_factor has 2 factors",
        ),
        (
            "llama-tied",
            |c| c["rope_scaling"] = json!("linear"),
            "rope_scaling must be an object",
        ),
    ];
    for (model, edit, needle) in cases {
        let (_t, dir) = tmp_model(model);
        let cfg_path = dir.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        edit(&mut cfg);
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        expect_error(
            &["logprobs", "--model", dir.to_str().unwrap(), "--ids", "1,2"],
            &["config.json", needle],
        );
    }
}
