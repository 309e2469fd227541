//! Supervised fine-tuning end to end on the tiny fixture models: memorisation, held-out loss,
//! gradient accumulation, exact resume after kill -9, and bad input caught before training.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn rlhf(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .env("RUST_BACKTRACE", "1")
        .args(args)
        .output()
        .unwrap()
}

fn write(path: &Path, lines: &[serde_json::Value]) {
    let text: String = lines.iter().map(|l| l.to_string() + "\n").collect();
    std::fs::write(path, text).unwrap();
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn last(metrics: &[serde_json::Value], key: &str) -> f64 {
    metrics
        .iter()
        .rev()
        .find_map(|m| m.get(key).and_then(|v| v.as_f64()))
        .unwrap()
}

fn first(metrics: &[serde_json::Value], key: &str) -> f64 {
    metrics
        .iter()
        .find_map(|m| m.get(key).and_then(|v| v.as_f64()))
        .unwrap()
}

/// Sentences from a small grammar: a distribution a tiny model can learn in a few hundred steps.
fn grammar_sentences(n: usize, seed: u64) -> Vec<String> {
    let adj = ["red", "big", "old", "calm"];
    let noun = ["cat", "dog", "bird", "fox"];
    let verb = ["sees", "likes", "finds", "hears"];
    let mut x = seed;
    let mut next = |k: usize| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 33) as usize) % k
    };
    (0..n)
        .map(|_| {
            format!(
                "the {} {} {} the {}.",
                adj[next(4)],
                noun[next(4)],
                verb[next(4)],
                noun[next(4)]
            )
        })
        .collect()
}

fn sft(dir: &Path, model: &str, data: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "sft".to_string(),
        "--set".into(),
        format!("model={model}"),
        "--set".into(),
        format!("train_file={}", data.display()),
        "--set".into(),
        format!("output_dir={}", dir.display()),
    ];
    for e in extra {
        args.push("--set".into());
        args.push(e.to_string());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    rlhf(&refs)
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tiny_model_memorises_a_handful_of_examples() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.jsonl");
    write(
        &data,
        &[
            serde_json::json!({"prompt": "The cat", "completion": " sat on the mat."}),
            serde_json::json!({"prompt": "A dog", "completion": " ran in the park."}),
            serde_json::json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}),
            serde_json::json!({"text": "the quick brown fox"}),
        ],
    );
    let out = tmp.path().join("out");
    for m in ["llama-tied", "gpt2"] {
        let o = sft(
            &out.join(m),
            &model_path(m),
            &data,
            &[
                "learning_rate=3e-3",
                "max_steps=80",
                "per_device_train_batch_size=2",
                "lr_scheduler_type=\"constant\"",
                "logging_steps=10",
            ],
        );
        ok(&o);
        let ms = metrics(&out.join(m));
        let (start, end) = (first(&ms, "loss"), last(&ms, "loss"));
        assert!(end < 0.1 && start > 1.0, "{m}: loss {start} → {end}");
        // The written model loads and is the trained one.
        let ck = rlhf::checkpoint::Checkpoint::load(out.join(m).to_str().unwrap(), false).unwrap();
        assert!(ck.tokenizer.is_some());
        let events = out.join(m).join("tensorboard").read_dir().unwrap().count();
        assert_eq!(events, 1, "{m}: one TensorBoard event file");
    }
}

#[test]
fn held_out_loss_falls_on_the_fine_tuning_distribution() {
    let tmp = tempfile::tempdir().unwrap();
    let train = tmp.path().join("train.jsonl");
    let eval = tmp.path().join("eval.jsonl");
    let lines = |s: Vec<String>| {
        s.into_iter()
            .map(|t| serde_json::json!({"text": t}))
            .collect::<Vec<_>>()
    };
    write(&train, &lines(grammar_sentences(200, 1)));
    write(&eval, &lines(grammar_sentences(40, 2)));
    let out = tmp.path().join("out");
    let o = sft(
        &out,
        &model_path("mistral"),
        &train,
        &[
            &format!("eval_file=\"{}\"", eval.display()),
            "learning_rate=3e-3",
            "max_steps=40",
            "per_device_train_batch_size=8",
            "warmup_steps=5",
        ],
    );
    ok(&o);
    let ms = metrics(&out);
    let (before, after) = (first(&ms, "eval/loss"), last(&ms, "eval/loss"));
    assert!(after < 0.6 * before, "held-out loss {before} → {after}");
    assert!(
        ms.iter().any(|m| m.get("tokens_per_second").is_some()),
        "throughput is logged"
    );
}

#[test]
fn gradient_accumulation_matches_one_large_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    let recs: Vec<_> = grammar_sentences(8, 3)
        .into_iter()
        .map(|t| serde_json::json!({"text": t}))
        .collect();
    write(&data, &recs);
    let common = ["learning_rate=1e-3", "max_steps=3", "max_grad_norm=0.0"];
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    ok(&sft(
        &a,
        &model_path("llama-tied"),
        &data,
        &[
            &common[..],
            &[
                "per_device_train_batch_size=4",
                "gradient_accumulation_steps=1",
            ],
        ]
        .concat(),
    ));
    ok(&sft(
        &b,
        &model_path("llama-tied"),
        &data,
        &[
            &common[..],
            &[
                "per_device_train_batch_size=1",
                "gradient_accumulation_steps=4",
            ],
        ]
        .concat(),
    ));
    let la = rlhf::checkpoint::Checkpoint::load(a.to_str().unwrap(), false).unwrap();
    let lb = rlhf::checkpoint::Checkpoint::load(b.to_str().unwrap(), false).unwrap();
    for ((na, ta), (_, tb)) in la
        .model
        .state_dict()
        .unwrap()
        .iter()
        .zip(lb.model.state_dict().unwrap().iter())
    {
        let x: Vec<f32> = ta.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = tb.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            max_abs_diff(&x, &y) < 1e-5,
            "{na} differs by {}",
            max_abs_diff(&x, &y)
        );
    }
}

fn sha_of(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn kill_dash_nine_then_resume_gives_bit_identical_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    let recs: Vec<_> = grammar_sentences(40, 4)
        .into_iter()
        .map(|t| serde_json::json!({"text": t}))
        .collect();
    write(&data, &recs);
    let steps = 30u64;
    let settings = [
        "learning_rate=2e-3",
        "max_steps=30",
        "per_device_train_batch_size=4",
        "gradient_accumulation_steps=2",
        "save_steps=1",
        "save_total_limit=2",
        "warmup_steps=3",
        "lr_scheduler_type=\"cosine\"",
        "threads=2",
    ];
    let straight = tmp.path().join("straight");
    ok(&sft(
        &straight,
        &model_path("qwen2-f16-sharded"),
        &data,
        &settings,
    ));

    // A pseudo-random kill point (printed so a failure can be reproduced).
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let kill_after = 2 + nanos % (steps - 6);
    eprintln!("killing after checkpoint step {kill_after}");
    let killed = tmp.path().join("killed");
    let mut args: Vec<String> = vec!["sft".into()];
    for s in [
        format!("model={}", model_path("qwen2-f16-sharded")),
        format!("train_file={}", data.display()),
        format!("output_dir={}", killed.display()),
    ]
    .into_iter()
    .chain(settings.iter().map(|s| s.to_string()))
    {
        args.push("--set".into());
        args.push(s);
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(&args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let target = killed
        .join("checkpoints")
        .join(format!("step-{kill_after:08}"));
    let t0 = std::time::Instant::now();
    while !target.exists() && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !killed.join("model.safetensors").exists(),
        "run finished before the kill; make it longer"
    );
    let newest = rlhf::train::state::latest_checkpoint(&killed).unwrap();
    eprintln!("resuming from {}", newest.display());
    args.push("--resume".into());
    let o = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(&args)
        .output()
        .unwrap();
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("resuming from"));
    assert_eq!(
        sha_of(&straight.join("model.safetensors")),
        sha_of(&killed.join("model.safetensors")),
        "resumed weights differ from the uninterrupted run"
    );
    // Resuming appends to the metrics of the first attempt.
    assert!(metrics(&killed).len() >= metrics(&straight).len() - 1);
}

fn expect_error(out: &Output, needles: &[&str]) {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    let line = err.lines().last().unwrap();
    assert!(line.starts_with("error: "), "{err}");
    for n in needles {
        assert!(line.contains(n), "{line:?} lacks {n:?}");
    }
}

fn no_outputs(dir: &Path) {
    assert!(
        !dir.join("model.safetensors").exists(),
        "partial model written"
    );
    assert!(!dir.join("checkpoints").exists(), "checkpoint written");
}

#[test]
fn bad_input_fails_before_training_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_path("llama-tied");
    let data = tmp.path().join("bad.jsonl");
    let out: PathBuf = tmp.path().join("out");

    std::fs::write(&data, "{\"text\": \"fine\"}\n{\"text\": \"broken\"\n").unwrap();
    expect_error(&sft(&out, &m, &data, &[]), &["bad.jsonl:2", "JSON"]);
    no_outputs(&out);

    std::fs::write(
        &data,
        "{\"text\": \"fine\"}\n\n{\"prompt\": \"only a prompt\"}\n",
    )
    .unwrap();
    expect_error(
        &sft(&out, &m, &data, &[]),
        &["bad.jsonl:3", "\"completion\""],
    );
    no_outputs(&out);

    std::fs::write(&data, "").unwrap();
    expect_error(&sft(&out, &m, &data, &[]), &["bad.jsonl", "empty"]);

    // A conversation the template refuses (the ChatML fixture has no such check, so use one that raises).
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"assistant\", \"content\": \"x\"}]}\n",
    )
    .unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixture("models/llama-tied")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let cfg_path = dir.join("tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = serde_json::json!("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user turn') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    expect_error(
        &sft(&out, dir.to_str().unwrap(), &data, &[]),
        &["bad.jsonl:1", "must start with a user turn"],
    );
    no_outputs(&out);

    // Unknown keys are errors with a suggestion; so are bad values.
    std::fs::write(&data, "{\"text\": \"fine\"}\n").unwrap();
    expect_error(
        &sft(&out, &m, &data, &["learning_rat=1e-3"]),
        &["learning_rat", "did you mean `learning_rate`"],
    );
    expect_error(
        &sft(&out, &m, &data, &["lr_scheduler_type=\"sawtooth\""]),
        &["lr_scheduler_type"],
    );
    expect_error(
        &sft(&out, &m, &data, &["per_device_train_batch_size=\"four\""]),
        &["per_device_train_batch_size"],
    );

    // An unwritable output directory is caught before the model is even loaded.
    expect_error(
        &sft(Path::new("/proc/rlhf-sft-out"), &m, &data, &[]),
        &["/proc/rlhf-sft-out"],
    );
}

#[test]
fn sft_help_lists_every_key() {
    let o = rlhf(&["sft", "--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    use rlhf::settings::Section;
    for d in rlhf::train::TrainConfig::KEYS
        .iter()
        .chain(rlhf::data::sft::SftDataConfig::KEYS)
        .chain(rlhf::commands::sft::SftRunConfig::KEYS)
    {
        assert!(text.contains(d.key), "--help lacks {}", d.key);
    }
}

#[test]
fn parquet_rows_are_named_in_errors_like_jsonl_lines() {
    // A pyarrow-written conversational file (tests/fixtures/parquet, see its README): row 1 is a
    // user/assistant exchange, row 2 has no assistant turn to learn from.
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture("parquet/messages_snappy.parquet");
    let out = tmp.path().join("out");
    let o = sft(&out, &model_path("llama-tied"), &data, &["max_steps=2"]);
    expect_error(&o, &["messages_snappy.parquet:2", "no assistant message"]);
    no_outputs(&out);
}
