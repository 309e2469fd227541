//! PPO end to end on the tiny fixture model with a rule reward: the sampler's log-probs are the
//! trainer's old log-probs, reward rises while KL stays bounded, β trades reward for KL, and bad
//! rewards or prompts are caught.

use crate::common::*;
use serde_json::json;
use std::path::Path;

#[test]
fn sampler_logprobs_equal_a_fresh_forward_so_the_first_ratio_is_one() {
    use rlhf::checkpoint::Checkpoint;
    use rlhf::generate::{generate, SamplingConfig};
    let ck = Checkpoint::load(&model_path("llama-tied"), true).unwrap();
    let prompts: Vec<Vec<u32>> = vec![vec![5, 9, 40], vec![7, 8, 100, 120, 33], vec![250]];
    let samples = generate(
        &ck.model,
        &prompts,
        &SamplingConfig {
            max_new_tokens: 12,
            seed: 3,
            stop_ids: vec![2],
            ..Default::default()
        },
    )
    .unwrap();
    let worst = sampler_vs_forward_logprobs(&ck.model, &samples);
    assert!(worst < 1e-5, "|Δ log π| = {worst}");
}

/// `rlhf ppo` (with `flags`, e.g. --resume) on the tiny llama with a rule reward, then `extra`.
fn ppo_with(flags: &[&str], dir: &Path, prompts: &Path, extra: &[&str]) -> std::process::Output {
    let mut sets = vec![
        format!("model=\"{}\"", model_path("llama-tied")),
        format!("prompt_file=\"{}\"", prompts.display()),
        format!("output_dir=\"{}\"", dir.display()),
        "reward=\"rule:ids:100-160\"".into(),
        "response_length=8".into(),
        "learning_rate=3e-3".into(),
        "lr_scheduler_type=\"constant\"".into(),
        "per_device_train_batch_size=16".into(),
        "num_ppo_epochs=2".into(),
        "save_steps=0".into(),
        "sample_every=5".into(),
        "logging_steps=1".into(),
    ];
    sets.extend(extra.iter().map(|e| e.to_string()));
    let mut command = vec!["ppo"];
    command.extend_from_slice(flags);
    run_with_sets(&command, &sets)
}

fn ppo(dir: &Path, prompts: &Path, extra: &[&str]) -> std::process::Output {
    ppo_with(&[], dir, prompts, extra)
}

#[test]
fn reward_rises_with_bounded_kl_and_a_larger_beta_keeps_closer_to_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts_file(tmp.path(), 64, 4);
    let mut results = vec![];
    for beta in ["0.01", "1.0"] {
        let out = tmp.path().join(format!("beta-{beta}"));
        let o = ppo(
            &out,
            &prompts,
            &[&format!("kl_coef={beta}"), "total_episodes=480"],
        );
        assert_ok(&o);
        let scores = series(&out, "objective/scores");
        let kl = series(&out, "objective/kl");
        assert_eq!(scores.len(), 30);
        let (start, end) = (avg(&scores[..5]), avg(&scores[25..]));
        let end_kl = avg(&kl[25..]);
        println!("β {beta}: score {start:.3} → {end:.3}, KL {end_kl:.3}");
        assert!(kl.iter().all(|k| k.is_finite() && *k < 30.0), "KL {kl:?}");
        let ratio = series(&out, "val/first_ratio_max_abs_log");
        assert!(
            ratio.iter().all(|&r| r < 1e-4),
            "first-update ratio off: {ratio:?}"
        );
        for key in [
            "objective/entropy",
            "objective/non_score_reward",
            "objective/rlhf_reward",
            "policy/approxkl_avg",
            "policy/clipfrac_avg",
            "policy/entropy_avg",
            "loss/policy_avg",
            "loss/value_avg",
            "time/generation",
            "time/training",
        ] {
            assert!(!series(&out, key).is_empty(), "{key} not logged");
        }
        assert!(out.join("samples.jsonl").exists() && out.join("model.safetensors").exists());
        results.push((start, end, end_kl));
    }
    let (s0, e0, kl0) = results[0];
    let (_, e1, kl1) = results[1];
    assert!(e0 > s0 + 0.15, "reward did not rise: {s0} → {e0}");
    assert!(
        kl1 < kl0 && e1 < e0,
        "β 1.0 should end closer to the reference with less reward: {results:?}"
    );
}

#[test]
fn ptx_keeps_the_pretraining_loss_lower() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts_file(tmp.path(), 32, 4);
    let text: Vec<serde_json::Value> = (0..40)
        .map(|i| json!({"text": format!("the cat sat on the mat number {i} and the dog ran far away")}))
        .collect();
    let ptx = tmp.path().join("ptx.jsonl");
    write_jsonl(&ptx, &text);
    let mut losses = vec![];
    for coef in ["0.0", "2.0"] {
        let out = tmp.path().join(format!("ptx-{coef}"));
        let o = ppo(
            &out,
            &prompts,
            &[
                &format!("ptx_coef={coef}"),
                &format!("ptx_file=\"{}\"", ptx.display()),
                "total_episodes=160",
                "ema_decay=0.5",
            ],
        );
        assert_ok(&o);
        let scores = series(&out, "objective/scores");
        println!(
            "ptx_coef {coef}: mean score over the last 5 iterations {:.3}",
            avg(&scores[scores.len() - 5..])
        );
        // Held-out text perplexity of the saved policy.
        let lp = run_rlhf(&[
            "logprobs",
            "--model",
            out.to_str().unwrap(),
            "--text",
            "the dog sat on the mat and the cat ran far away",
            "--json",
        ]);
        assert_ok(&lp);
        let v: serde_json::Value = serde_json::from_slice(&lp.stdout).unwrap();
        let l = v["logprobs"].as_array().unwrap();
        losses.push(-l.iter().map(|x| x.as_f64().unwrap()).sum::<f64>() / l.len() as f64);
    }
    println!(
        "held-out LM loss: PPO {:.3}, PPO-ptx {:.3}",
        losses[0], losses[1]
    );
    assert!(losses[1] < losses[0], "{losses:?}");
}

#[test]
fn bad_reward_and_long_prompts_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    // A reward model whose head is NaN.
    let rm = tmp.path().join("nan-rm");
    std::fs::create_dir(&rm).unwrap();
    let src = fixture("models/llama-rm");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), rm.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Vec<u8>, Vec<usize>)> = vec![];
    for (name, view) in st.tensors() {
        let mut data = view.data().to_vec();
        if name == "score.weight" {
            data = f32::NAN.to_le_bytes().repeat(data.len() / 4);
        }
        owned.push((name.to_string(), data, view.shape().to_vec()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &rm.join("model.safetensors")).unwrap();

    let prompts = prompts_file(tmp.path(), 8, 4);
    let out = tmp.path().join("nan");
    let o = ppo(
        &out,
        &prompts,
        &[&format!("reward=\"{}\"", rm.display()), "total_episodes=16"],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("error:") && last.contains("iteration 1") && last.contains("NaN"),
        "{err}"
    );
    assert!(!out.join("model.safetensors").exists());

    let long = tmp.path().join("long.jsonl");
    write_jsonl(
        &long,
        &[
            json!({"prompt": "a b c d e f g h i j k l m n o p q r s t u v w x y z"}),
            json!({"prompt": "short"}),
        ],
    );
    let out = tmp.path().join("long");
    let o = ppo(
        &out,
        &long,
        &[
            "max_prompt_length=8",
            "total_episodes=16",
            "per_device_train_batch_size=2",
            "num_ppo_epochs=1",
        ],
    );
    assert_ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("prompts: 2 (1 truncated to their last 8 tokens)"),
        "{err}"
    );

    let o = ppo(&tmp.path().join("x"), &prompts, &["reward=\"rule:nope\""]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown rule"));
}

#[test]
fn resuming_from_a_middle_checkpoint_gives_identical_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts_file(tmp.path(), 16, 4);
    let full = tmp.path().join("full");
    let settings = [
        "total_episodes=64",
        "per_device_train_batch_size=4",
        "gradient_accumulation_steps=2",
        "num_mini_batches=2",
        "adaptive_kl=true",
        "kl_target=0.5",
        "ema_decay=0.9",
        "save_steps=1",
        "save_total_limit=10",
    ];
    assert_ok(&ppo(&full, &prompts, &settings));
    // A copy of the run as it was after iteration 2 (of 4), then resumed.
    let part = tmp.path().join("part");
    copy_checkpoints(&full, &part, &["00000001", "00000002"]);
    // The interrupted run had logged iterations 3 and 4 after its last checkpoint.
    std::fs::copy(full.join("metrics.jsonl"), part.join("metrics.jsonl")).unwrap();
    let resumed = ppo_with(&["--resume"], &part, &prompts, &settings);
    assert_ok(&resumed);
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("resuming from"));
    let a = std::fs::read(full.join("model.safetensors")).unwrap();
    let b = std::fs::read(part.join("model.safetensors")).unwrap();
    assert!(a == b, "resumed PPO run ended with different weights");
    // Their lines were replaced by the resumed run's, not repeated: one line per iteration.
    let (f, p) = (
        read_jsonl(&full.join("metrics.jsonl")),
        read_jsonl(&part.join("metrics.jsonl")),
    );
    let steps: Vec<u64> = p.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    for (x, y) in f.iter().zip(&p) {
        assert_eq!(x["objective/scores"], y["objective/scores"]);
    }
}

/// The training keys that mean something else in an RL loop: a step is an iteration.
#[test]
fn training_keys_are_honoured_or_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts_file(tmp.path(), 16, 4);
    let quick = ["per_device_train_batch_size=4", "num_ppo_epochs=1"];
    // max_steps sets the iterations; logging_steps logs means every N of them (and the last).
    let out = tmp.path().join("steps");
    let o = ppo(
        &out,
        &prompts,
        &[
            &quick[..],
            &["max_steps=5", "logging_steps=2", "total_episodes=1000"],
        ]
        .concat(),
    );
    assert_ok(&o);
    let steps: Vec<u64> = read_jsonl(&out.join("metrics.jsonl"))
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [2, 4, 5]);
    // eval_steps has no meaning here: refused before any work.
    let out = tmp.path().join("eval");
    let o = ppo(&out, &prompts, &[&quick[..], &["eval_steps=2"]].concat());
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("eval_steps") && err.contains("rlhf eval"),
        "{err}"
    );
    assert!(!out.join("metrics.jsonl").exists());
}

/// A score penalty of 1e30 makes the value loss overflow: with on_nonfinite = "stop" the run
/// stops naming the update, with "skip" every such update is skipped and counted.
#[test]
fn nonfinite_updates_stop_or_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts_file(tmp.path(), 8, 4);
    let overflow = [
        "per_device_train_batch_size=4",
        "num_ppo_epochs=1",
        "total_episodes=8",
        // No response of 8 tokens stops, so every score is −1e30.
        "missing_eos_penalty=1e30",
        "whiten_advantages=false",
        "reward=\"rule:ids:0-1\"",
    ];
    let out = tmp.path().join("stop");
    let o = ppo(&out, &prompts, &overflow);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.lines().last().unwrap();
    assert!(
        last.contains("iteration 1, update 1") && last.contains("non-finite"),
        "{err}"
    );
    assert!(!out.join("model.safetensors").exists());

    let out = tmp.path().join("skip");
    let o = ppo(
        &out,
        &prompts,
        &[&overflow[..], &["on_nonfinite=\"skip\""]].concat(),
    );
    assert_ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("update skipped"));
    let skipped = series(&out, "skipped_updates");
    assert_eq!(skipped, [1.0, 1.0], "one skipped update per iteration");
    // Nothing was applied: the saved policy is the starting one.
    let start = rlhf::checkpoint::Checkpoint::load(&model_path("llama-tied"), false).unwrap();
    let end = rlhf::checkpoint::Checkpoint::load(out.to_str().unwrap(), false).unwrap();
    for ((name, a), (_, b)) in start
        .model
        .state_dict()
        .unwrap()
        .iter()
        .zip(end.model.state_dict().unwrap().iter())
    {
        let (a, b): (Vec<f32>, Vec<f32>) = (
            a.flatten_all().unwrap().to_vec1().unwrap(),
            b.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(a, b, "{name} changed");
    }
}

#[test]
fn ppo_with_lora_uses_the_base_as_reference_and_saves_an_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts_file(tmp.path(), 64, 4);
    let out = tmp.path().join("lora");
    let o = ppo(
        &out,
        &prompts,
        &[
            "use_peft=true",
            "lora_r=8",
            "lora_alpha=16",
            "learning_rate=2e-2",
            "kl_coef=0.05",
            "total_episodes=192",
        ],
    );
    assert_ok(&o);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("reference: the policy's base (LoRA adapters off)"),
        "{stderr}"
    );
    let kl = series(&out, "objective/kl");
    let scores = series(&out, "objective/scores");
    println!("LoRA PPO: KL {kl:?}\nscores {scores:?}");
    // The adapter starts at zero: the policy equals its reference until the first update...
    assert!(kl[0].abs() < 1e-4, "KL at the start {}", kl[0]);
    // ...and the reference stays the base while the adapter trains (were it the adapted
    // policy itself, KL would stay 0).
    assert!(avg(&kl[kl.len() - 3..]) > 1e-3, "KL {kl:?}");
    assert!(
        avg(&scores[scores.len() - 3..]) > avg(&scores[..3]),
        "scores {scores:?}"
    );
    assert!(out.join("adapter_config.json").exists() && !out.join("model.safetensors").exists());
}

/// `reward` takes rlhf grpo's reward functions too: a program reward fed the prompt records'
/// columns scores every episode, and the value model starts from the policy (there is no reward
/// model to start it from).
#[test]
fn ppo_takes_a_reward_function_with_the_prompt_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("problems.jsonl");
    let records: Vec<serde_json::Value> = (0..16)
        .map(|i| serde_json::json!({"prompt": format!("problem {i} of the set"), "answer": "7"}))
        .collect();
    write_jsonl(&prompts, &records);
    let script = answer_is_7_program(tmp.path());
    let out = tmp.path().join("ppo");
    let o = ppo(
        &out,
        &prompts,
        &[
            &format!("reward=\"exec:sh {}\"", script.display()),
            "max_steps=1",
        ],
    );
    assert_ok(&o);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(
        log.contains(&format!("value model: from {}", model_path("llama-tied"))),
        "{log}"
    );
    assert_eq!(series(&out, "objective/scores"), vec![1.0]);
}

/// Sizes whose products overflow (the first probe panicked dividing by a wrapped zero) and an
/// endless epoch count are refused in one line before anything trains.
#[test]
fn batch_arithmetic_that_overflows_and_endless_epochs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts_file(tmp.path(), 8, 4);
    let huge = (1u64 << 62).to_string();
    for (extra, want) in [
        (
            format!("num_mini_batches={huge}"),
            "per_device_train_batch_size × gradient_accumulation_steps × num_mini_batches) is too large",
        ),
        (
            format!("gradient_accumulation_steps={huge}"),
            "per_device_train_batch_size × gradient_accumulation_steps is too large",
        ),
        ("num_train_epochs=inf".into(), "num_train_epochs must be a finite number"),
    ] {
        let out = ppo(&tmp.path().join("out"), &prompts, &[&extra]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra}: accepted");
        assert!(err.contains(want), "{extra}: {err}");
        assert_eq!(error_lines(&err), 1, "{err}");
    }
}
