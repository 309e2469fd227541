//! LoRA: PEFT adapters made by scripts/make_lora_fixtures.py (transformers + peft) load and give
//! PEFT's log-probs and gradients; a fresh adapter starts exactly at its base; adapter gradients
//! equal the composed reference W' = W + s·B·A; training commands write PEFT adapters that load
//! back, merge, and resume exactly; the reference of a LoRA PPO run is the base.

use candle_core::{Tensor, Var};
use rlhf::checkpoint::Checkpoint;
use rlhf::model::lora::{LoraConfig, TargetModules};
use rlhf::model::peft::Adapter;
use rlhf::ops::OpsPath;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::common::{assert_ok, fixture, floats, ids, model_path, run_with_sets, write_jsonl};

const CAUSAL: &[&str] = &[
    "llama-tied-all-rslora",
    "mistral-qv",
    "qwen2-all",
    "gpt2-all",
];

fn lora_dir(name: &str) -> PathBuf {
    fixture(&format!("lora/{name}"))
}

fn lora_golden(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(lora_dir(name).join("golden.json")).unwrap())
        .unwrap()
}

fn seqs_of(g: &serde_json::Value) -> Vec<Vec<u32>> {
    g["single"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| ids(&s["ids"]))
        .collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| crate::common::max_abs_diff(x, y))
        .fold(0.0, f32::max)
}

/// Each sequence's log-probs, scored alone.
fn one_by_one(ck: &Checkpoint, seqs: &[Vec<u32>]) -> Vec<Vec<f32>> {
    seqs.iter()
        .map(|s| {
            ck.model
                .sequence_logprobs(std::slice::from_ref(s))
                .unwrap()
                .remove(0)
        })
        .collect()
}

/// The base with the fixture adapter attached (not merged).
fn attached(name: &str, trainable: bool) -> Checkpoint {
    let g = lora_golden(name);
    let base = model_path(g["base"].as_str().unwrap());
    let mut ck = Checkpoint::load(&base, false).unwrap();
    let adapter = Adapter::read(&lora_dir(name)).unwrap();
    ck.model.attach_adapter(&adapter, trainable).unwrap();
    ck
}

#[test]
fn peft_adapters_give_peft_logprobs_merged_and_unmerged() {
    for name in CAUSAL {
        let g = lora_golden(name);
        let want: Vec<Vec<f32>> = g["single"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| floats(&s["logprobs"]))
            .collect();
        let seqs = seqs_of(&g);
        // An adapter directory is a model path: its base is found through
        // base_model_name_or_path (here relative to the adapter directory) and merged.
        let merged = Checkpoint::load(lora_dir(name).to_str().unwrap(), false).unwrap();
        let merged_lp = one_by_one(&merged, &seqs);
        let d_merged = max_diff(&merged_lp, &want);
        let unmerged = attached(name, false);
        let unmerged_lp = one_by_one(&unmerged, &seqs);
        let d_unmerged = max_diff(&unmerged_lp, &want);
        let peft_merged: Vec<Vec<f32>> = g["merged_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect();
        let d_vs_merge = max_diff(&merged_lp, &peft_merged);
        let d_ours = max_diff(&merged_lp, &unmerged_lp);
        eprintln!("{name}: merged {d_merged:.2e}, unmerged {d_unmerged:.2e} vs PEFT; merged vs PEFT merge_and_unload {d_vs_merge:.2e}; ours merged vs unmerged {d_ours:.2e}");
        assert!(
            d_merged < 1e-4 && d_unmerged < 1e-4,
            "{name}: {d_merged} / {d_unmerged}"
        );
        assert!(
            d_vs_merge < 1e-4 && d_ours < 1e-5,
            "{name}: {d_vs_merge} / {d_ours}"
        );
        // The adapter changes the outputs (so the comparison above is not the base's).
        let base = Checkpoint::load(&model_path(g["base"].as_str().unwrap()), false).unwrap();
        let base_lp = base.model.sequence_logprobs(&seqs[..1]).unwrap();
        assert!(
            max_diff(&base_lp, &merged_lp[..1]) > 1e-2,
            "{name}: adapter is a no-op"
        );
    }
}

/// L = Σ over sequences of the mean next-token NLL (what the fixture script differentiates).
fn nll_loss(ck: &Checkpoint, seqs: &[Vec<u32>], path: OpsPath) -> Tensor {
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let starts = vec![1; seqs.len()];
    let (lp, mask, _) = ck.model.completion_logprobs(&refs, &starts, path).unwrap();
    let counts = mask.sum(1).unwrap();
    (lp.sum(1).unwrap() / counts)
        .unwrap()
        .sum_all()
        .unwrap()
        .neg()
        .unwrap()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f32>()
        .sqrt();
    let den: f32 = b.iter().map(|y| y * y).sum::<f32>().sqrt();
    num / den.max(1e-12)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// How far `module`'s adapter gradients in `grads` are from the composed ones for the merged
/// weight's gradient dW′: dA = s·Bᵀ·dW′ and dB = s·dW′·Aᵀ (the worse relative L2 of the two).
fn composed_gap(
    ck: &Checkpoint,
    grads: &candle_core::backprop::GradStore,
    module: &str,
    (a, b): (&Tensor, &Tensor),
    dw: &Tensor,
    s: f64,
) -> f32 {
    let want_da = (b.t().unwrap().matmul(dw).unwrap() * s).unwrap();
    let want_db = (dw.matmul(&a.t().unwrap()).unwrap() * s).unwrap();
    let got = |suffix: &str| {
        let n = format!("base_model.model.{module}.{suffix}");
        let v = &ck
            .model
            .parameters()
            .iter()
            .find(|(p, _)| *p == n)
            .unwrap()
            .1;
        flat(grads.get(v.as_tensor()).unwrap())
    };
    rel_l2(&got("lora_A.weight"), &flat(&want_da))
        .max(rel_l2(&got("lora_B.weight"), &flat(&want_db)))
}

#[test]
fn adapter_gradients_equal_pefts() {
    for path in [OpsPath::Fast, OpsPath::Reference] {
        for name in CAUSAL {
            let g = lora_golden(name);
            let ck = attached(name, true);
            let loss = nll_loss(&ck, &seqs_of(&g), path);
            let l = loss.to_scalar::<f32>().unwrap();
            let want_l = g["loss"].as_f64().unwrap() as f32;
            assert!(
                (l - want_l).abs() / want_l < 1e-5,
                "{name}: loss {l} vs PEFT {want_l}"
            );
            let grads = loss.backward().unwrap();
            let want = g["grads"].as_object().unwrap();
            assert_eq!(
                ck.model.parameters().len(),
                want.len(),
                "{name}: trainable tensors"
            );
            let mut worst = 0f32;
            for (pname, var) in ck.model.parameters() {
                let got = flat(grads.get(var.as_tensor()).unwrap());
                let w = floats(
                    want.get(pname)
                        .unwrap_or_else(|| panic!("{name}: PEFT has no {pname}")),
                );
                worst = worst.max(rel_l2(&got, &w));
            }
            eprintln!("{name} ({path:?}): loss {l} (PEFT {want_l}), worst adapter-gradient rel-L2 {worst:.2e}");
            assert!(
                worst < 1e-4,
                "{name}: adapter gradients differ from PEFT's by {worst}"
            );
        }
    }
}

#[test]
fn adapter_gradients_equal_the_composed_reference_on_every_family() {
    // dL/dA = s·Bᵀ·dL/dW' and dL/dB = s·dL/dW'·Aᵀ for the merged weight W' = W + s·B·A: the
    // merged model trained fully gives dL/dW', from which both follow.
    for name in CAUSAL {
        let g = lora_golden(name);
        let seqs = seqs_of(&g);
        let ck = attached(name, true);
        let loss = nll_loss(&ck, &seqs, OpsPath::Fast);
        let grads = loss.backward().unwrap();
        let merged = Checkpoint::load(lora_dir(name).to_str().unwrap(), true).unwrap();
        let merged_loss = nll_loss(&merged, &seqs, OpsPath::Fast);
        let rel = ((loss.to_scalar::<f32>().unwrap() - merged_loss.to_scalar::<f32>().unwrap())
            / merged_loss.to_scalar::<f32>().unwrap())
        .abs();
        assert!(
            rel < 1e-5,
            "{name}: loss of adapter vs merged model differs by {rel}"
        );
        let merged_grads = merged_loss.backward().unwrap();
        let by_name: HashMap<&str, &Var> = merged
            .model
            .parameters()
            .iter()
            .map(|(n, v)| (n.as_str(), v))
            .collect();
        let adapter = Adapter::read(&lora_dir(name)).unwrap();
        let mut worst = 0f32;
        for (module, a) in &adapter.modules {
            let w = by_name[format!("{module}.weight").as_str()];
            // [out, in] for every family (GPT-2's Conv1D weights are transposed on load).
            let dw = merged_grads.get(w.as_tensor()).unwrap();
            worst = worst.max(composed_gap(&ck, &grads, module, (&a.a, &a.b), dw, a.scale));
        }
        eprintln!("{name}: adapter gradients vs composed reference, worst rel-L2 {worst:.2e}");
        assert!(worst < 1e-4, "{name}: {worst}");
    }
}

#[test]
fn a_fresh_adapter_starts_exactly_at_its_base() {
    for m in ["llama-tied", "gpt2", "qwen2-f16-sharded"] {
        let g = crate::common::golden(m);
        let s = ids(&g["single"][2]["ids"]);
        let base = Checkpoint::load(&model_path(m), false).unwrap();
        let want = base
            .model
            .sequence_logprobs(std::slice::from_ref(&s))
            .unwrap();
        let lora = LoraConfig {
            use_peft: true,
            lora_r: 4,
            ..LoraConfig::default()
        };
        let ck = Checkpoint::load_for_lora(&model_path(m), &lora, 3).unwrap();
        let got = ck
            .model
            .sequence_logprobs(std::slice::from_ref(&s))
            .unwrap();
        assert_eq!(got, want, "{m}: B = 0 must leave the outputs bit for bit");
        let per_layer = if m == "gpt2" { 4 } else { 7 };
        assert_eq!(
            ck.model.parameters().len(),
            2 * 2 * per_layer,
            "{m}: A and B of every projection"
        );
        assert!(ck
            .model
            .parameters()
            .iter()
            .all(|(n, _)| n.starts_with("base_model.model.")
                && (n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))));
    }
}

#[test]
fn target_modules_that_match_nothing_are_refused() {
    let lora = LoraConfig {
        use_peft: true,
        lora_target_modules: TargetModules::List(vec!["q_proj".into(), "qkv".into()]),
        ..LoraConfig::default()
    };
    let e = Checkpoint::load_for_lora(&model_path("llama-tied"), &lora, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("`qkv` matches no projection") && e.contains("self_attn.q_proj"),
        "{e}"
    );
}

#[test]
fn unsupported_adapters_are_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dora");
    std::fs::create_dir(&dir).unwrap();
    let src = lora_dir("mistral-qv");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    cfg["use_dora"] = serde_json::json!(true);
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let e = Adapter::read(&dir).err().unwrap().to_string();
    assert!(
        e.contains("adapter_config.json") && e.contains("use_dora"),
        "{e}"
    );
}

fn text_records(n: usize) -> Vec<serde_json::Value> {
    let words = ["red", "cat", "sees", "the", "big", "dog", "old", "fox"];
    (0..n)
        .map(|i| {
            let t: Vec<&str> = (0..6)
                .map(|j| words[(i * 7 + j * 3) % words.len()])
                .collect();
            serde_json::json!({"text": t.join(" ")})
        })
        .collect()
}

fn sft_lora(out: &Path, data: &Path, model: &str, extra: &[&str]) -> std::process::Output {
    let mut sets = vec![
        format!("model={model}"),
        format!("train_file={}", data.display()),
        format!("output_dir={}", out.display()),
        "use_peft=true".into(),
        "lora_r=4".into(),
        "lora_alpha=8".into(),
        "learning_rate=5e-3".into(),
        "per_device_train_batch_size=4".into(),
        "threads=1".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    run_with_sets(&["sft"], &sets)
}

#[test]
fn sft_with_lora_writes_a_peft_adapter_that_loads_merges_and_leaves_the_base_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    write_jsonl(&data, &text_records(16));
    for m in ["llama-tied", "gpt2"] {
        let out = tmp.path().join(m);
        let o = sft_lora(
            &out,
            &data,
            &model_path(m),
            &["max_steps=8", "lora_dropout=0.1", "logging_steps=1"],
        );
        assert_ok(&o);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            stderr.contains("LoRA: ") && stderr.contains("trainable parameters"),
            "{stderr}"
        );
        assert!(
            out.join("adapter_config.json").exists()
                && out.join("adapter_model.safetensors").exists()
        );
        assert!(
            !out.join("model.safetensors").exists(),
            "{m}: a LoRA run saves the adapter only"
        );
        let (first, last) = crate::common::metric_first_last(&out, "loss");
        assert!(last < first, "{m}: loss {first} → {last}");
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["r"], 4);
        assert_eq!(cfg["fan_in_fan_out"], m == "gpt2");
        let base_dir = std::fs::canonicalize(model_path(m)).unwrap();
        assert_eq!(
            cfg["base_model_name_or_path"],
            base_dir.display().to_string()
        );
        // The adapter (read back) is not zero, and checkpoints hold only adapter tensors.
        let adapter = Adapter::read(&out).unwrap();
        assert!(adapter.modules.values().any(|a| a
            .b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0));
        let ckpt = rlhf::train::state::latest_checkpoint(&out).unwrap();
        let saved = candle_core::safetensors::load(
            ckpt.join("model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert!(
            saved.keys().all(|k| k.contains(".lora_")),
            "{m}: {:?}",
            saved.keys().take(3).collect::<Vec<_>>()
        );
        // Loaded as a model (merged), and merged to disk, it gives the same log-probs; the base
        // files are untouched.
        let s: Vec<u32> = vec![5, 9, 17, 33, 2, 40, 41];
        let as_model = Checkpoint::load(out.to_str().unwrap(), false).unwrap();
        let lp = as_model
            .model
            .sequence_logprobs(std::slice::from_ref(&s))
            .unwrap();
        let merged_dir = tmp.path().join(format!("{m}-merged"));
        assert_ok(&crate::common::run_rlhf(&[
            "merge",
            "--adapter",
            out.to_str().unwrap(),
            "--out",
            merged_dir.to_str().unwrap(),
        ]));
        let merged = Checkpoint::load(merged_dir.to_str().unwrap(), false).unwrap();
        let lp2 = merged
            .model
            .sequence_logprobs(std::slice::from_ref(&s))
            .unwrap();
        assert!(
            max_diff(&lp, &lp2) < 1e-6,
            "{m}: merged on disk vs merged at load"
        );
        let base = Checkpoint::load(&model_path(m), false).unwrap();
        let lp0 = base
            .model
            .sequence_logprobs(std::slice::from_ref(&s))
            .unwrap();
        assert!(
            max_diff(&lp, &lp0) > 1e-3,
            "{m}: training moved the outputs"
        );
        // Commands that take a model take the adapter directory.
        let o = crate::common::run_rlhf(&[
            "logprobs",
            "--model",
            out.to_str().unwrap(),
            "--ids",
            "5,9,17,33,2,40,41",
            "--json",
        ]);
        assert_ok(&o);
        let printed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(crate::common::max_abs_diff(&floats(&printed["logprobs"]), &lp[0]) < 1e-6);
    }
}

#[test]
fn lora_runs_resume_bit_identically_with_dropout() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    write_jsonl(&data, &text_records(24));
    let sets = [
        "max_steps=6",
        "save_steps=1",
        "save_total_limit=0",
        "lora_dropout=0.2",
        "gradient_accumulation_steps=2",
    ];
    let straight = tmp.path().join("straight");
    assert_ok(&sft_lora(
        &straight,
        &data,
        &model_path("llama-tied"),
        &sets,
    ));
    // Stop after step 3 by running to it, then drop the later checkpoints and resume.
    let cut = tmp.path().join("cut");
    assert_ok(&sft_lora(&cut, &data, &model_path("llama-tied"), &sets));
    for (step, dir) in rlhf::train::state::list_checkpoints(&cut) {
        if step > 3 {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::remove_file(cut.join(f)).unwrap();
    }
    let mut args: Vec<String> = vec![];
    for s in [
        format!("model={}", model_path("llama-tied")),
        format!("train_file={}", data.display()),
        format!("output_dir={}", cut.display()),
        "use_peft=true".into(),
        "lora_r=4".into(),
        "lora_alpha=8".into(),
        "learning_rate=5e-3".into(),
        "per_device_train_batch_size=4".into(),
        "threads=1".into(),
    ]
    .into_iter()
    .chain(sets.iter().map(|s| s.to_string()))
    {
        args.push("--set".into());
        args.push(s);
    }
    let mut cmd = vec!["sft".to_string()];
    cmd.extend(args);
    cmd.push("--resume".into());
    let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let o = crate::common::run_rlhf(&refs);
    assert_ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("(step 3)"));
    assert_eq!(
        std::fs::read(straight.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(cut.join("adapter_model.safetensors")).unwrap(),
        "resumed adapter differs"
    );
    // Dropout is on: a run without it ends elsewhere.
    let nodrop = tmp.path().join("nodrop");
    assert_ok(&sft_lora(
        &nodrop,
        &data,
        &model_path("llama-tied"),
        &[
            "max_steps=6",
            "lora_dropout=0.0",
            "gradient_accumulation_steps=2",
        ],
    ));
    assert_ne!(
        std::fs::read(straight.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(nodrop.join("adapter_model.safetensors")).unwrap()
    );
}

#[test]
fn a_peft_reward_model_adapter_gives_pefts_scores() {
    use rlhf::model::scalar_head::ScalarHead;
    let g = lora_golden("llama-rm-all");
    let mut ck = Checkpoint::load(lora_dir("llama-rm-all").to_str().unwrap(), false).unwrap();
    let head = ScalarHead::from_model(&mut ck.model, 0).unwrap();
    let seqs: Vec<Vec<u32>> = g["seqs"].as_array().unwrap().iter().map(ids).collect();
    let got: Vec<f32> = seqs
        .iter()
        .flat_map(|s| head.scores(&ck.model, &[s.as_slice()], 1).unwrap())
        .collect();
    let d = crate::common::max_abs_diff(&got, &floats(&g["scores"]));
    eprintln!("llama-rm-all: scores {got:?}, max |Δ| vs PEFT {d:.2e}");
    assert!(d < 1e-4, "{got:?} vs {:?}", g["scores"]);
}

/// Every family (the new ones too: Gemma's sandwich norms, Phi-3's packed qkv/gate_up): a fresh
/// adapter with B perturbed gives the loss of the merged weights W' = W + s·B·A, and its
/// gradients are the composed ones, dA = s·Bᵀ·dW' and dB = s·dW'·Aᵀ.
#[test]
fn fresh_adapters_on_every_family_have_the_composed_gradients() {
    let lora = LoraConfig {
        use_peft: true,
        lora_r: 4,
        ..LoraConfig::default()
    };
    for m in crate::common::MODELS {
        let g = crate::common::golden(m);
        let seqs: Vec<Vec<u32>> = (0..3).map(|i| ids(&g["single"][i]["ids"])).collect();
        let ck = Checkpoint::load_for_lora(&model_path(m), &lora, 5).unwrap();
        for (i, (n, v)) in ck.model.parameters().iter().enumerate() {
            if n.ends_with("lora_B.weight") {
                let mut r = crate::common::Lcg(i as u64 + 1);
                let vals: Vec<f32> = (0..v.elem_count())
                    .map(|_| (r.below(2001) as f32 / 1000.0 - 1.0) * 0.2)
                    .collect();
                v.set(&Tensor::from_vec(vals, v.dims(), v.device()).unwrap())
                    .unwrap();
            }
        }
        let (r, alpha, _, rslora) = ck.model.adapter_hparams();
        let s = if rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        let loss = nll_loss(&ck, &seqs, OpsPath::Fast);
        let grads = loss.backward().unwrap();
        let merged = Checkpoint::load(&model_path(m), true).unwrap();
        let by_name: HashMap<&str, &Var> = merged
            .model
            .parameters()
            .iter()
            .map(|(n, v)| (n.as_str(), v))
            .collect();
        let adapters = ck.model.adapter_tensors();
        for (module, a, b) in &adapters {
            let w = by_name[format!("{module}.weight").as_str()];
            let delta = (b.matmul(a).unwrap() * s).unwrap();
            w.set(&(w.as_tensor() + delta).unwrap()).unwrap();
        }
        let merged_loss = nll_loss(&merged, &seqs, OpsPath::Fast);
        let (l, lm) = (
            loss.to_scalar::<f32>().unwrap(),
            merged_loss.to_scalar::<f32>().unwrap(),
        );
        assert!(((l - lm) / lm).abs() < 1e-5, "{m}: loss {l} vs merged {lm}");
        let merged_grads = merged_loss.backward().unwrap();
        let mut worst = 0f32;
        for (module, a, b) in &adapters {
            let dw = merged_grads
                .get(by_name[format!("{module}.weight").as_str()].as_tensor())
                .unwrap();
            worst = worst.max(composed_gap(&ck, &grads, module, (a, b), dw, s));
        }
        eprintln!(
            "{m}: {} adapters, composed-reference gradients worst rel-L2 {worst:.2e}",
            adapters.len()
        );
        assert!(worst < 1e-4, "{m}: {worst}");
    }
}

#[test]
fn lora_keys_without_use_peft_are_pointed_out() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    write_jsonl(&data, &text_records(4));
    let out = tmp.path().join("full");
    let o = sft_lora(
        &out,
        &data,
        &model_path("llama-tied"),
        &["use_peft=false", "max_steps=1"],
    );
    assert_ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("`lora_r` is set but use_peft = false"),
        "{err}"
    );
    // A full run: the whole model is saved, no adapter.
    assert!(out.join("model.safetensors").exists() && !out.join("adapter_config.json").exists());
}
