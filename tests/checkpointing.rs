//! Gradient checkpointing: recomputing each block in the backward pass gives the gradients of
//! the plain graph — full fine-tuning and LoRA (with dropout) on every family — and a training
//! run with it ends where one without it does.

use rlhf::checkpoint::Checkpoint;
use rlhf::model::lora::LoraConfig;
use rlhf::ops::OpsPath;

use crate::common::{assert_ok, golden, ids, model_path, run_with_sets, write_jsonl, MODELS};

fn loss_and_grads(ck: &Checkpoint, seqs: &[Vec<u32>], on: bool) -> (f32, Vec<Vec<f32>>) {
    ck.model.set_gradient_checkpointing(on);
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let starts = vec![1; seqs.len()];
    let loss = ck.model.with_adapter_dropout(7, || {
        let (lp, mask, _) = ck
            .model
            .completion_logprobs(&refs, &starts, OpsPath::Fast)
            .unwrap();
        (lp.sum_all().unwrap() / mask.sum_all().unwrap())
            .unwrap()
            .neg()
            .unwrap()
    });
    let grads = rlhf::model::checkpoint::backward(&loss).unwrap();
    let g = ck
        .model
        .parameters()
        .iter()
        .map(|(n, v)| {
            grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {n}"))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    (loss.to_scalar().unwrap(), g)
}

fn worst_rel(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let num: f32 = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q) * (p - q))
                .sum::<f32>()
                .sqrt();
            let den: f32 = y.iter().map(|q| q * q).sum::<f32>().sqrt();
            num / den.max(1e-20)
        })
        .fold(0.0, f32::max)
}

#[test]
fn checkpointed_blocks_give_the_plain_gradients_on_every_family() {
    for m in MODELS {
        let g = golden(m);
        let seqs: Vec<Vec<u32>> = g["single"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| ids(&s["ids"]))
            .collect();
        for lora in [false, true] {
            let ck = if lora {
                let cfg = LoraConfig {
                    use_peft: true,
                    lora_r: 4,
                    lora_dropout: 0.2,
                    ..LoraConfig::default()
                };
                let ck = Checkpoint::load_for_lora(&model_path(m), &cfg, 5).unwrap();
                // Non-zero B, so that every adapter tensor gets a gradient.
                for (name, v) in ck.model.parameters() {
                    if name.ends_with("lora_B.weight") {
                        let t = (v.as_tensor().ones_like().unwrap() * 0.05).unwrap();
                        v.set(&t).unwrap();
                    }
                }
                ck
            } else {
                Checkpoint::load(&model_path(m), true).unwrap()
            };
            let (l0, g0) = loss_and_grads(&ck, &seqs, false);
            let before = rlhf::model::checkpoint::recomputed_blocks();
            let (l1, g1) = loss_and_grads(&ck, &seqs, true);
            let recomputed = rlhf::model::checkpoint::recomputed_blocks() - before;
            assert_eq!(
                recomputed, ck.model.config.num_layers,
                "{m}: every block recomputed once"
            );
            let worst = worst_rel(&g1, &g0);
            eprintln!("{m} (lora {lora}): loss {l0} vs {l1}, worst gradient rel-L2 {worst:.2e} over {} tensors", g0.len());
            assert_eq!(l0, l1, "{m}: the forward pass must not change");
            assert!(worst < 1e-5, "{m} (lora {lora}): {worst}");
        }
    }
}

#[test]
fn a_run_with_gradient_checkpointing_ends_where_one_without_does() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    let recs: Vec<_> = (0..16)
        .map(|i| serde_json::json!({"text": format!("the {} cat sees {} dogs", i % 5, i % 3)}))
        .collect();
    write_jsonl(&data, &recs);
    let mut outs = vec![];
    for on in [false, true] {
        let out = tmp.path().join(format!("gc-{on}"));
        let sets = [
            format!("model={}", model_path("llama-tied")),
            format!("train_file={}", data.display()),
            format!("output_dir={}", out.display()),
            "max_steps=4".into(),
            "learning_rate=1e-3".into(),
            "per_device_train_batch_size=4".into(),
            "threads=1".into(),
            format!("gradient_checkpointing={on}"),
        ];
        assert_ok(&run_with_sets(&["sft"], &sets));
        outs.push(
            candle_core::safetensors::load(
                out.join("model.safetensors"),
                &candle_core::Device::Cpu,
            )
            .unwrap(),
        );
    }
    let mut worst = 0f32;
    for (name, a) in &outs[0] {
        let b = &outs[1][name];
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        worst = worst.max(d);
    }
    eprintln!("4 SFT steps with/without gradient checkpointing: max |Δw| {worst:.2e}");
    assert!(worst < 1e-6, "{worst}");
}
