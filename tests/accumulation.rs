//! Gradient accumulation gives the update of one large batch: DPO, the reward model and PPO's
//! minibatches, each run with the same examples per step as one micro-batch and as several
//! accumulated ones (SFT's case is in sft.rs). Clipping is off so that the comparison is of the
//! gradients themselves, and AdamW's ε is large so that it does not blow the rounding noise of
//! near-zero gradients up to full-size steps; the weights must then agree to float rounding.

use crate::common::*;
use serde_json::json;
use std::path::Path;

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let ck = rlhf::checkpoint::Checkpoint::load(dir.to_str().unwrap(), false).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = ck
        .model
        .state_dict()
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    if let Some(h) = ck.model.score_head {
        out.push((
            "score.weight".into(),
            h.flatten_all().unwrap().to_vec1().unwrap(),
        ));
    }
    out
}

/// The two runs' weights agree within `tol` everywhere, and moved from the start.
fn same_update(a: &Path, b: &Path, tol: f32) {
    let start = weights(Path::new(&model_path("llama-tied")));
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(wa.len(), wb.len());
    let mut moved = 0.0f32;
    for ((name, x), (_, y)) in wa.iter().zip(&wb) {
        let d = max_abs_diff(x, y);
        assert!(d < tol, "{name} differs by {d}");
        if let Some((_, s)) = start.iter().find(|(n, _)| n == name) {
            moved = moved.max(max_abs_diff(x, s));
        }
    }
    assert!(moved > 10.0 * tol, "the runs did not train (moved {moved})");
}

fn run(command: &str, out: &Path, sets: &[String], batch: &str, accumulation: &str) {
    let mut all = sets.to_vec();
    all.extend([
        format!("output_dir=\"{}\"", out.display()),
        format!("per_device_train_batch_size={batch}"),
        format!("gradient_accumulation_steps={accumulation}"),
        "max_grad_norm=0.0".into(),
        "adam_epsilon=1e-3".into(),
        "save_steps=0".into(),
        "learning_rate=1e-3".into(),
        "lr_scheduler_type=\"constant\"".into(),
    ]);
    assert_ok(&run_with_sets(&[command], &all));
}

#[test]
fn dpo_accumulated_micro_batches_equal_one_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Lcg(11);
    let pairs: Vec<serde_json::Value> = (0..8)
        .map(|_| {
            let p = phrase(&mut rng, 3);
            let (nc, nr) = (2 + rng.below(3), 2 + rng.below(3));
            let (c, r) = (phrase(&mut rng, nc), phrase(&mut rng, nr));
            json!({"prompt": p, "chosen": format!(" {c}"), "rejected": format!(" {r} {c}")})
        })
        .collect();
    let data = tmp.path().join("pairs.jsonl");
    write_jsonl(&data, &pairs);
    let sets = vec![
        format!("model=\"{}\"", model_path("llama-tied")),
        format!("train_file=\"{}\"", data.display()),
        "ref_cache_dir=\"\"".into(),
        "max_steps=3".into(),
        "beta=0.5".into(),
    ];
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    run("dpo", &a, &sets, "4", "1");
    run("dpo", &b, &sets, "1", "4");
    same_update(&a, &b, 2e-5);
}

#[test]
fn reward_model_accumulated_micro_batches_equal_one_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Lcg(12);
    // K = 3 rankings and pairs mixed: each prompt weighs the same in a step whatever its K.
    let records: Vec<serde_json::Value> = (0..8)
        .map(|i| {
            let p = phrase(&mut rng, 3);
            let k = if i % 2 == 0 { 3 } else { 2 };
            let completions: Vec<String> = (0..k)
                .map(|j| format!(" {}", phrase(&mut rng, 2 + j)))
                .collect();
            let ranking: Vec<usize> = (0..k).rev().collect();
            json!({"prompt": p, "completions": completions, "ranking": ranking})
        })
        .collect();
    let data = tmp.path().join("rankings.jsonl");
    write_jsonl(&data, &records);
    let sets = vec![
        format!("model=\"{}\"", model_path("llama-tied")),
        format!("train_file=\"{}\"", data.display()),
        "max_steps=3".into(),
        "normalize_rewards=false".into(),
    ];
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    run("rm", &a, &sets, "4", "1");
    run("rm", &b, &sets, "2", "2");
    same_update(&a, &b, 2e-5);
}

#[test]
fn ppo_minibatch_accumulation_equals_one_micro_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Lcg(13);
    let prompts: Vec<serde_json::Value> = (0..8)
        .map(|_| json!({"prompt": phrase(&mut rng, 3)}))
        .collect();
    let data = tmp.path().join("prompts.jsonl");
    write_jsonl(&data, &prompts);
    // One iteration of 4 episodes in one minibatch, two epochs: both runs sample the same
    // responses from the same starting policy, and each update sees the same 4 episodes.
    let sets = vec![
        format!("model=\"{}\"", model_path("llama-tied")),
        format!("prompt_file=\"{}\"", data.display()),
        "reward=\"rule:ids:100-160\"".into(),
        "response_length=6".into(),
        "max_steps=1".into(),
        "num_ppo_epochs=2".into(),
        "num_mini_batches=1".into(),
    ];
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    run("ppo", &a, &sets, "4", "1");
    run("ppo", &b, &sets, "1", "4");
    same_update(&a, &b, 2e-5);
}
