//! Every parameter of every family is trained: backward reaches all of them with finite, non-zero
//! gradients, and a few gradient entries agree with finite differences.

use crate::common::*;
use candle_core::{Tensor, Var};
use rlhf::checkpoint::Checkpoint;
use rlhf::model::{CausalLm, StepInputs};

/// Mean negative log-likelihood of real tokens of a left-padded batch.
fn nll(model: &CausalLm) -> Tensor {
    let ids = vec![
        vec![0, 0, 0, 17, 200, 45, 9],
        vec![33, 2, 150, 7, 81, 64, 3],
    ];
    let mask = vec![vec![0, 0, 0, 1, 1, 1, 1], vec![1; 7]];
    let inp = StepInputs::from_padded(&model.config, &ids, &mask).unwrap();
    let logits = model.forward(&inp, None).unwrap();
    let lp = rlhf::ops::gather_logprobs(
        &logits.narrow(1, 0, 6).unwrap(),
        &inp.ids.narrow(1, 1, 6).unwrap(),
    )
    .unwrap();
    // A target counts when both it and the position predicting it are real tokens.
    let m: Vec<f32> = mask
        .iter()
        .flat_map(|r| (0..6).map(move |t| (r[t] * r[t + 1]) as f32))
        .collect();
    let m = Tensor::from_vec(m, (2, 6), &candle_core::Device::Cpu).unwrap();
    let n = m.sum_all().unwrap();
    (lp * m)
        .unwrap()
        .sum_all()
        .unwrap()
        .neg()
        .unwrap()
        .broadcast_div(&n)
        .unwrap()
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    for m in MODELS {
        let ck = Checkpoint::load(&model_path(m), true).unwrap();
        let params = ck.model.parameters();
        assert!(!params.is_empty());
        let n_elems: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
        assert_eq!(
            n_elems,
            ck.model.config.num_parameters(),
            "{m}: parameter count"
        );
        let grads = nll(&ck.model).backward().unwrap();
        for (name, var) in params {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{m}: no gradient for {name}"));
            let v: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{m}: non-finite gradient in {name}"
            );
            let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!(norm > 0.0, "{m}: zero gradient for {name}");
        }
    }
}

fn loss_value(model: &CausalLm) -> f64 {
    nll(model).to_scalar::<f32>().unwrap() as f64
}

#[test]
fn gradients_agree_with_finite_differences() {
    for m in ["llama-tied", "gpt2", "qwen2-f16-sharded"] {
        let ck = Checkpoint::load(&model_path(m), true).unwrap();
        let grads = nll(&ck.model).backward().unwrap();
        // A weight matrix, a norm, and (for biased models) a bias: check the largest-gradient entry.
        let names: Vec<&(String, Var)> = ck
            .model
            .parameters()
            .iter()
            .filter(|(n, _)| {
                n.contains("layers.1.self_attn.q_proj.weight")
                    || n.contains("layers.0.input_layernorm")
                    || n.contains("layers.0.self_attn.k_proj.bias")
                    || n.contains("h.1.attn.c_attn.weight")
                    || n.contains("h.0.ln_1.bias")
                    || n.contains("wpe")
                    || n.ends_with("embed_tokens.weight")
            })
            .collect();
        assert!(names.len() >= 2, "{m}");
        for (name, var) in names {
            let g: Vec<f32> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let (idx, &analytic) = g
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap();
            let orig: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let eps = 3e-3f32;
            let shape = var.as_tensor().shape().clone();
            let eval = |delta: f32| {
                let mut w = orig.clone();
                w[idx] += delta;
                var.set(&Tensor::from_vec(w, shape.clone(), &candle_core::Device::Cpu).unwrap())
                    .unwrap();
                loss_value(&ck.model)
            };
            let numeric = ((eval(eps) - eval(-eps)) / (2.0 * eps as f64)) as f32;
            eval(0.0);
            let rel = (numeric - analytic).abs() / analytic.abs().max(1e-3);
            assert!(
                rel < 0.01,
                "{m} {name}[{idx}]: analytic {analytic} vs numeric {numeric}"
            );
        }
    }
}
