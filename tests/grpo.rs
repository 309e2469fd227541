//! `rlhf grpo` end to end on the tiny fixture model: groups of G responses per prompt, reward
//! functions (a rule, an external program), TRL's metric names, the first update's ratio of 1,
//! bit-identical resume, and bad reward programs named in one line.

use crate::common::*;
use serde_json::json;
use std::path::Path;

fn grpo_with(flags: &[&str], dir: &Path, prompts: &Path, extra: &[&str]) -> std::process::Output {
    let mut sets = vec![
        format!("model=\"{}\"", model_path("llama-tied")),
        format!("prompt_file=\"{}\"", prompts.display()),
        format!("output_dir=\"{}\"", dir.display()),
        "reward_funcs=[\"rule:ids:100-160\"]".into(),
        "num_generations=4".into(),
        "max_completion_length=8".into(),
        "learning_rate=3e-3".into(),
        "lr_scheduler_type=\"constant\"".into(),
        "per_device_train_batch_size=16".into(),
        "save_steps=0".into(),
        "logging_steps=1".into(),
    ];
    sets.extend(extra.iter().map(|e| e.to_string()));
    let mut command = vec!["grpo"];
    command.extend_from_slice(flags);
    run_with_sets(&command, &sets)
}

#[test]
fn grpo_and_rloo_raise_a_rule_reward_with_trls_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts_file(tmp.path(), 32, 11);
    for (advantage, beta) in [("grpo", "0.0"), ("rloo", "0.05")] {
        let out = tmp.path().join(advantage);
        let o = grpo_with(
            &[],
            &out,
            &prompts,
            &[
                &format!("advantage=\"{advantage}\""),
                &format!("beta={beta}"),
                "max_steps=48",
                "learning_rate=5e-3",
            ],
        );
        assert_ok(&o);
        let reward = series(&out, "reward");
        assert_eq!(reward.len(), 48);
        let (start, end) = (avg(&reward[..6]), avg(&reward[42..]));
        println!("{advantage}: reward {start:.3} → {end:.3}");
        assert!(
            end > start + 0.1,
            "{advantage}: reward did not rise: {start} → {end}"
        );
        let ratio = series(&out, "val/first_ratio_max_abs_log");
        assert!(
            ratio.iter().all(|&r| r < 1e-5),
            "first-update ratio off: {ratio:?}"
        );
        let mut keys = vec![
            "reward",
            "reward_std",
            "rewards/rule/mean",
            "frac_reward_zero_std",
            "completions/mean_length",
            "completions/clipped_ratio",
            "entropy",
            "clip_ratio/low_mean",
            "clip_ratio/high_mean",
            "loss",
        ];
        if beta != "0.0" {
            keys.push("kl");
        }
        for key in keys {
            assert!(
                !series(&out, key).is_empty(),
                "{advantage}: {key} not logged"
            );
        }
        assert!(out.join("model.safetensors").exists());
    }
}

#[test]
fn a_resumed_grpo_run_ends_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts_file(tmp.path(), 8, 11);
    let settings = [
        "max_steps=4",
        "num_iterations=2",
        "per_device_train_batch_size=4",
        "gradient_accumulation_steps=2",
        "beta=0.1",
        "save_steps=2",
        "save_total_limit=10",
    ];
    let full = tmp.path().join("full");
    assert_ok(&grpo_with(&[], &full, &prompts, &settings));
    // A copy of the run as it was after iteration 2 (of 4), then resumed.
    let part = tmp.path().join("part");
    copy_checkpoints(&full, &part, &["00000002"]);
    let resumed = grpo_with(&["--resume"], &part, &prompts, &settings);
    assert_ok(&resumed);
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("resuming from"));
    let a = std::fs::read(full.join("model.safetensors")).unwrap();
    let b = std::fs::read(part.join("model.safetensors")).unwrap();
    assert!(a == b, "resumed GRPO run ended with different weights");
}

#[test]
fn an_external_reward_program_scores_and_its_failures_stop_the_run_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts_file(tmp.path(), 8, 11);
    // The same prompts with an extra column, which reward functions see.
    let with_answers = tmp.path().join("with-answers.jsonl");
    let records: Vec<serde_json::Value> = read_jsonl(&prompts)
        .into_iter()
        .map(|mut r| {
            r["answer"] = json!("7");
            r
        })
        .collect();
    write_jsonl(&with_answers, &records);
    // Reward 1 when the program is given the record's answer column: every group then has zero
    // reward spread.
    let script = answer_is_7_program(tmp.path());
    let out = tmp.path().join("ok");
    let o = grpo_with(
        &[],
        &out,
        &with_answers,
        &[
            &format!(
                "reward_funcs=[\"exec:sh {}\", \"think_format\", \"accuracy\"]",
                script.display()
            ),
            "reward_weights=[2.0, 1.0, 0.0]",
            "max_steps=2",
            "per_device_train_batch_size=8",
        ],
    );
    assert_ok(&o);
    assert_eq!(series(&out, "rewards/exec/mean"), vec![1.0, 1.0]);
    assert_eq!(series(&out, "rewards/think_format/mean"), vec![0.0, 0.0]);
    assert_eq!(series(&out, "rewards/accuracy/mean").len(), 2);
    assert_eq!(series(&out, "reward"), vec![2.0, 2.0]);
    assert_eq!(series(&out, "frac_reward_zero_std"), vec![1.0, 1.0]);

    let bad = tmp.path().join("bad.sh");
    std::fs::write(&bad, "read -r line; echo 'not json'\n").unwrap();
    let out = tmp.path().join("bad");
    let o = grpo_with(
        &[],
        &out,
        &prompts,
        &[
            &format!("reward_funcs=[\"exec:sh {}\"]", bad.display()),
            "max_steps=1",
            "per_device_train_batch_size=8",
        ],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.lines().last().unwrap();
    assert!(
        last.contains("exec:sh") && last.contains("answer 1 is not JSON"),
        "{err}"
    );
    assert!(!out.join("model.safetensors").exists());

    // accuracy on prompts without the column: named, not scored as 0.
    let out = tmp.path().join("nocol");
    let o = grpo_with(
        &[],
        &out,
        &prompts,
        &[
            "reward_funcs=[\"accuracy\"]",
            "max_steps=1",
            "per_device_train_batch_size=8",
        ],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no `answer` column"));

    // A batch that is not whole groups is refused before any work.
    let out = tmp.path().join("groups");
    let o = grpo_with(
        &[],
        &out,
        &prompts,
        &["per_device_train_batch_size=6", "max_steps=1"],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("multiple of num_generations"));
    // eval_steps has no meaning here: refused, as in rlhf ppo.
    let out = tmp.path().join("eval");
    let o = grpo_with(&[], &out, &prompts, &["eval_steps=2", "max_steps=1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("eval_steps") && err.contains("rlhf eval"),
        "{err}"
    );
    assert!(!out.join("metrics.jsonl").exists());
}

#[test]
fn a_larger_beta_keeps_grpo_closer_to_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts_file(tmp.path(), 32, 11);
    let mut end_kl = vec![];
    for beta in ["0.01", "1.0"] {
        let out = tmp.path().join(format!("beta-{beta}"));
        let o = grpo_with(
            &[],
            &out,
            &prompts,
            &[
                &format!("beta={beta}"),
                "max_steps=32",
                "learning_rate=5e-3",
            ],
        );
        assert_ok(&o);
        let kl = series(&out, "kl");
        assert_eq!(kl.len(), 32);
        assert!(
            kl.iter().all(|k| k.is_finite() && *k < 5.0),
            "β {beta}: KL {kl:?}"
        );
        end_kl.push(avg(&kl[24..]));
    }
    println!("end KL: β 0.01 {:.4}, β 1.0 {:.4}", end_kl[0], end_kl[1]);
    assert!(end_kl[1] < end_kl[0], "β 1.0 should end closer: {end_kl:?}");
}

/// A reward program that computes what a built-in computes gives the same run, byte for byte:
/// `format:^ ` (the response starts with a space) as a shell script on the JSON line.
#[test]
fn a_script_reward_gives_the_same_run_as_the_equivalent_builtin() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts_file(tmp.path(), 16, 11);
    let script = tmp.path().join("starts-with-space.sh");
    std::fs::write(
        &script,
        "while read -r line; do case \"$line\" in *'\"completion\":\" '*) echo '{\"reward\": 1}';; *) echo '{\"reward\": 0}';; esac; done\n",
    )
    .unwrap();
    let mut models = vec![];
    for (name, func) in [
        ("builtin", "format:^ ".to_string()),
        ("script", format!("exec:sh {}", script.display())),
    ] {
        let out = tmp.path().join(name);
        let o = grpo_with(
            &[],
            &out,
            &prompts,
            &[&format!("reward_funcs=[\"{func}\"]"), "max_steps=6"],
        );
        assert_ok(&o);
        models.push((
            series(&out, "reward"),
            std::fs::read(out.join("model.safetensors")).unwrap(),
        ));
    }
    assert_eq!(models[0].0, models[1].0, "the rewards differ");
    assert!(
        models[0].0.iter().any(|&r| r > 0.0 && r < 1.0),
        "no reward signal: {:?}",
        models[0].0
    );
    assert!(models[0].1 == models[1].1, "the trained models differ");
}
