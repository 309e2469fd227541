#![allow(dead_code)]
use std::path::PathBuf;

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

pub fn golden(model: &str) -> serde_json::Value {
    let p = fixture(&format!("models/{model}/golden.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

pub fn model_path(model: &str) -> String {
    let dir = fixture(&format!("models/{model}"));
    let gguf = dir.join("model.gguf");
    if gguf.exists() { gguf } else { dir }
        .to_string_lossy()
        .to_string()
}

pub const MODELS: &[&str] = &[
    "llama-tied",
    "llama-untied-bf16",
    "qwen2-f16-sharded",
    "mistral",
    "gpt2",
    "llama-gguf",
    "qwen3",
    "llama3.2-tied",
    "gemma2",
    "gemma3",
    "phi3",
];

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs the rlhf binary (with backtraces on, so that error messages are checked as users see them).
pub fn run_rlhf(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .env("RUST_BACKTRACE", "1")
        .args(args)
        .output()
        .unwrap()
}

pub fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "rlhf failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn write_jsonl(path: &std::path::Path, lines: &[serde_json::Value]) {
    let text: String = lines.iter().map(|l| l.to_string() + "\n").collect();
    std::fs::write(path, text).unwrap();
}

pub fn read_jsonl(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The first and last logged values of a metric in `dir/metrics.jsonl`.
pub fn metric_first_last(dir: &std::path::Path, key: &str) -> (f64, f64) {
    let values: Vec<f64> = read_jsonl(&dir.join("metrics.jsonl"))
        .iter()
        .filter_map(|m| m.get(key).and_then(|v| v.as_f64()))
        .collect();
    assert!(!values.is_empty(), "metric {key} was never logged");
    (values[0], *values.last().unwrap())
}

/// A tiny deterministic generator (tests must not depend on rand's algorithms).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn below(&mut self, k: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % k
    }
}

/// How many lines of a run's stderr are errors (a bad input must give exactly one).
pub fn error_lines(stderr: &str) -> usize {
    stderr
        .trim()
        .lines()
        .filter(|l| l.starts_with("error"))
        .count()
}

/// `n` words of a ten-word vocabulary: text for the tiny fixture models.
pub fn phrase(rng: &mut Lcg, n: usize) -> String {
    let words = [
        "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "red",
    ];
    (0..n)
        .map(|_| words[rng.below(words.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `rlhf <command…> --set s --set s …`, settings in order (a later one overrides).
pub fn run_with_sets<S: AsRef<str>>(command: &[&str], sets: &[S]) -> std::process::Output {
    let mut args: Vec<&str> = command.to_vec();
    for s in sets {
        args.push("--set");
        args.push(s.as_ref());
    }
    run_rlhf(&args)
}

/// Writes `train.jsonl` and `eval.jsonl` into `dir` and returns their paths.
pub fn write_train_eval(
    dir: &std::path::Path,
    train: &[serde_json::Value],
    eval: &[serde_json::Value],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (tp, ep) = (dir.join("train.jsonl"), dir.join("eval.jsonl"));
    write_jsonl(&tp, train);
    write_jsonl(&ep, eval);
    (tp, ep)
}

/// The largest |Δ| between the log-probs the sampler recorded for each sample's tokens and those
/// of a fresh forward pass of `model` over prompt + sample (PPO's old vs new log-probs).
pub fn sampler_vs_forward_logprobs(
    model: &rlhf::model::CausalLm,
    samples: &[rlhf::generate::Sample],
) -> f32 {
    let seqs: Vec<Vec<u32>> = samples
        .iter()
        .map(|s| s.prompt.iter().chain(&s.tokens).copied().collect())
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let starts: Vec<usize> = samples.iter().map(|s| s.prompt.len()).collect();
    let (lp, _, _) = model
        .completion_logprobs(&refs, &starts, rlhf::ops::default_path())
        .unwrap();
    let lp = lp.to_vec2::<f32>().unwrap();
    samples
        .iter()
        .enumerate()
        .map(|(n, s)| max_abs_diff(&lp[n][starts[n] - 1..seqs[n].len() - 1], &s.model_logprobs))
        .fold(0.0, f32::max)
}

/// A reward program (`exec:sh <path>`) in `dir` that answers 1 exactly when it is given a record
/// whose `answer` column is "7", else 0: it shows the prompt records' columns reach the program.
pub fn answer_is_7_program(dir: &std::path::Path) -> std::path::PathBuf {
    let script = dir.join("answer-is-7.sh");
    std::fs::write(
        &script,
        "while read -r line; do case \"$line\" in *'\"answer\":\"7\"'*) echo '{\"reward\": 1}';; *) echo '{\"reward\": 0}';; esac; done\n",
    )
    .unwrap();
    script
}

/// `n` prompts of three random words, `{"prompt"}` JSONL in `dir` (the RL tests' prompt sets).
pub fn prompts_file(dir: &std::path::Path, n: usize, seed: u64) -> std::path::PathBuf {
    let mut rng = Lcg(seed);
    let words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far"];
    let lines: Vec<serde_json::Value> = (0..n)
        .map(|_| {
            let p: Vec<&str> = (0..3).map(|_| words[rng.below(words.len())]).collect();
            serde_json::json!({"prompt": p.join(" ")})
        })
        .collect();
    let p = dir.join("prompts.jsonl");
    write_jsonl(&p, &lines);
    p
}

/// The values a run logged under `key` in its metrics.jsonl, in order.
pub fn series(dir: &std::path::Path, key: &str) -> Vec<f64> {
    read_jsonl(&dir.join("metrics.jsonl"))
        .iter()
        .filter_map(|m| m.get(key).and_then(|v| v.as_f64()))
        .collect()
}

pub fn avg(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Copies the checkpoints of `from` whose names end with one of `steps` into `to`: a run as it
/// was when interrupted after them.
pub fn copy_checkpoints(from: &std::path::Path, to: &std::path::Path, steps: &[&str]) {
    std::fs::create_dir_all(to.join("checkpoints")).unwrap();
    for entry in std::fs::read_dir(from.join("checkpoints")).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if steps.iter().any(|s| name.ends_with(s)) {
            let dst = to.join("checkpoints").join(&name);
            std::fs::create_dir(&dst).unwrap();
            for f in std::fs::read_dir(&p).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
            }
        }
    }
}
