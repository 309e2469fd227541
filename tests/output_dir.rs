//! Nothing is lost through the output directory: a run holds a lock on it, may not write into
//! its own inputs, keeps earlier results unless resumed or told to overwrite, and refuses values
//! it cannot parse. Each case checks that the earlier model's bytes are unchanged afterwards.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn data(dir: &Path) -> PathBuf {
    let p = dir.join("train.jsonl");
    let lines: Vec<serde_json::Value> = (0..16)
        .map(|i| serde_json::json!({"text": format!("the cat {i} sat on the mat")}))
        .collect();
    write_jsonl(&p, &lines);
    p
}

fn sft_sets(model: &str, data: &Path, out: &str, extra: &[&str]) -> Vec<String> {
    let mut sets = vec![
        format!("model=\"{model}\""),
        format!("train_file=\"{}\"", data.display()),
        format!("output_dir=\"{out}\""),
        "max_steps=2".into(),
        "per_device_train_batch_size=4".into(),
        "save_steps=0".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    sets
}

fn sft(
    model: &str,
    data: &Path,
    out: &str,
    flags: &[&str],
    extra: &[&str],
) -> std::process::Output {
    let mut command = vec!["sft"];
    command.extend_from_slice(flags);
    run_with_sets(&command, &sft_sets(model, data, out, extra))
}

fn refused(o: &std::process::Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "should have been refused:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    let last = err.lines().last().unwrap_or("");
    for n in needles {
        assert!(last.contains(n), "error lacks {n:?}: {last}");
    }
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// A private copy of the tiny model, so that a test may point an output at it.
fn model_copy(dir: &Path) -> PathBuf {
    let src = fixture("models/llama-tied");
    let dst = dir.join("model");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

#[test]
fn a_second_run_into_a_busy_output_dir_fails_at_once_naming_the_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path());
    let out = tmp.path().join("out");
    let model = model_path("llama-tied");
    // A long first run, in the background.
    let mut args: Vec<String> = vec!["sft".into()];
    for s in sft_sets(&model, &d, &out.to_string_lossy(), &["max_steps=100000"]) {
        args.push("--set".into());
        args.push(s);
    }
    let mut first = std::process::Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(&args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = out.join(".rlhf.lock");
    let start = Instant::now();
    while !std::fs::read_to_string(&lock).is_ok_and(|s| s.contains("pid")) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "first run never took the lock"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    let second = sft(&model, &d, &out.to_string_lossy(), &["--overwrite"], &[]);
    let took = t.elapsed();
    first.kill().unwrap();
    first.wait().unwrap();
    refused(
        &second,
        &["in use by another rlhf run", &format!("pid {}", first.id())],
    );
    assert!(took < Duration::from_secs(20), "the refusal took {took:?}");
    // The lock went with the first process: a new run may now claim the directory.
    let again = sft(&model, &d, &out.to_string_lossy(), &["--overwrite"], &[]);
    assert_ok(&again);
    // One run's metrics only, every line valid JSON.
    for line in std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
    {
        serde_json::from_str::<serde_json::Value>(line).unwrap();
    }
}

#[test]
fn an_output_dir_that_is_or_contains_an_input_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path());
    let model = model_copy(tmp.path());
    let weights = model.join("model.safetensors");
    let before = bytes(&weights);
    let m = model.to_string_lossy().to_string();
    refused(
        &sft(&m, &d, &m, &[], &[]),
        &["is the input", "choose another output_dir"],
    );
    refused(&sft(&m, &d, &m, &["--overwrite"], &[]), &["is the input"]);
    // The parent of the data (and of the model) contains inputs.
    let parent = tmp.path().to_string_lossy().to_string();
    refused(&sft(&m, &d, &parent, &[], &[]), &["contains the input"]);
    assert_eq!(bytes(&weights), before, "the input model was modified");
}

#[test]
fn finished_results_are_kept_unless_overwrite_is_given() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path());
    let model = model_path("llama-tied");
    let out = tmp.path().join("out");
    let o = out.to_string_lossy().to_string();
    assert_ok(&sft(&model, &d, &o, &[], &[]));
    let weights = out.join("model.safetensors");
    let first = bytes(&weights);
    // A second run without checkpoints to resume: refused, the model untouched.
    refused(
        &sft(&model, &d, &o, &[], &["learning_rate=1e-2"]),
        &["already holds results", "--overwrite"],
    );
    refused(
        &sft(&model, &d, &o, &["--resume"], &["learning_rate=1e-2"]),
        &["no checkpoint to resume from"],
    );
    assert_eq!(bytes(&weights), first);
    // With --overwrite the new run replaces it.
    assert_ok(&sft(
        &model,
        &d,
        &o,
        &["--overwrite"],
        &["learning_rate=1e-2"],
    ));
    assert_ne!(bytes(&weights), first);
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        lines.lines().count(),
        1,
        "metrics of one run only:\n{lines}"
    );
}

#[test]
fn a_run_with_checkpoints_points_at_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path());
    let model = model_path("llama-tied");
    let out = tmp.path().join("out");
    let o = out.to_string_lossy().to_string();
    assert_ok(&sft(&model, &d, &o, &[], &["save_steps=1"]));
    let first = bytes(&out.join("model.safetensors"));
    refused(&sft(&model, &d, &o, &[], &[]), &["--resume to continue it"]);
    assert_eq!(bytes(&out.join("model.safetensors")), first);
}

#[test]
fn an_empty_output_dir_and_unparsable_values_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path());
    let model = model_path("llama-tied");
    let cwd_before: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .current_dir(tmp.path())
        .args(["sft", "--set", &format!("model=\"{model}\"")])
        .args(["--set", &format!("train_file=\"{}\"", d.display())])
        .args(["--set", "output_dir=\"\"", "--set", "max_steps=1"])
        .output()
        .unwrap();
    refused(&o, &["output_dir is empty"]);
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        cwd_before.len()
    );
    // A backslash inside a double-quoted TOML string is an invalid escape: refused, not taken as
    // a path with quotes in it.
    let bad = format!("\"{}\\dir\"", tmp.path().join("out").display());
    let o = run_with_sets(
        &["sft"],
        &[
            format!("model=\"{model}\""),
            format!("train_file=\"{}\"", d.display()),
            format!("output_dir={bad}"),
        ],
    );
    refused(&o, &["output_dir=", "not a valid TOML value"]);
    assert!(!tmp.path().join("out").exists());
    assert!(std::fs::read_dir(tmp.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains('"')));
}
