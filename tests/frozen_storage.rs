//! Frozen weights stored in bf16 (`frozen_dtype`): the products widen each bf16 value exactly and
//! run in f32, so a bf16-stored model computes what an f32 model holding the same (bf16-rounded)
//! weights computes — its log-probs and its LoRA adapters' gradients — in half the bytes.

use candle_core::{DType, Device, Tensor, Var};
use rlhf::model::hparams::ModelConfig;
use rlhf::model::lora::LoraConfig;
use rlhf::model::weights::{read_hf_weights, WeightMap};
use rlhf::model::{CausalLm, FrozenDtype};
use rlhf::ops::{self, OpsPath};

use crate::common::{fixture, golden, ids, max_abs_diff, MODELS};

fn rand(shape: &[usize], seed: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn rel_max(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
    max_abs_diff(a, b) / scale
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn bf16_frozen_matmul_is_the_f32_product_of_the_widened_weights() {
    // n·k above the 4M-element block, so the product spans several widened blocks; m both in the
    // few-row (decode) kernel's range and above it.
    let (n, k) = (66_000, 72);
    let w16 = Tensor::from_vec(rand(&[n, k], 1), (n, k), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let w32 = w16.to_dtype(DType::F32).unwrap();
    for m in [3, 37] {
        let x = Var::from_vec(rand(&[m, k], 2 + m as u64), (m, k), &Device::Cpu).unwrap();
        let y = ops::frozen::matmul_t(x.as_tensor(), &w16, OpsPath::Fast).unwrap();
        let want = x.as_tensor().matmul(&w32.t().unwrap()).unwrap();
        let rel = rel_max(&flat(&y), &flat(&want));
        assert!(rel < 1e-5, "m {m}: forward rel {rel}");
        let dy = Tensor::from_vec(rand(&[m, n], 9), (m, n), &Device::Cpu).unwrap();
        let g = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = flat(g.get(x.as_tensor()).unwrap());
        let rel = rel_max(&dx, &flat(&dy.matmul(&w32).unwrap()));
        assert!(rel < 1e-5, "m {m}: dx rel {rel}");
    }
}

#[test]
fn bf16_lm_head_log_probs_and_their_gradient_match_the_f32_head() {
    // Vocabulary over two widened blocks, rows over two row blocks.
    let (n, v, d) = (1100, 5000, 24);
    let w16 = Tensor::from_vec(rand(&[v, d], 3), (v, d), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let w32 = w16.to_dtype(DType::F32).unwrap();
    let h = Var::from_vec(
        rand(&[n, d], 4).iter().map(|x| 3.0 * x).collect(),
        (n, d),
        &Device::Cpu,
    )
    .unwrap();
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % v as u32).collect();
    let t = Tensor::from_vec(targets, n, &Device::Cpu).unwrap();
    let weights = Tensor::from_vec(rand(&[n], 5), n, &Device::Cpu).unwrap();
    let run = |w: &Tensor| {
        let lp = ops::lm_head::lm_head_logprobs(h.as_tensor(), w, &t).unwrap();
        let g = (&lp * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        (flat(&lp), flat(g.get(h.as_tensor()).unwrap()))
    };
    let (lp16, dh16) = run(&w16);
    let (lp32, dh32) = run(&w32);
    let rel = rel_max(&lp16, &lp32);
    assert!(rel < 1e-5, "log-probs rel {rel}");
    let rel = rel_max(&dh16, &dh32);
    assert!(rel < 1e-5, "dh rel {rel}");
}

fn dir_of(m: &str) -> std::path::PathBuf {
    fixture(&format!("models/{m}"))
}

fn weights(m: &str, matrices_rounded: bool) -> (ModelConfig, WeightMap) {
    let dir = dir_of(m);
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let mut w = read_hf_weights(&dir).unwrap();
    if matrices_rounded {
        let mut out = WeightMap::default();
        for name in w.leftover() {
            let mut t = w.remove(&name).unwrap();
            // Matrices are what bf16 storage rounds; norms and biases stay f32.
            if t.rank() == 2 {
                t = t
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
            }
            out.insert(name, t, dir.clone());
        }
        w = out;
    }
    (cfg, w)
}

/// Σ log π over the golden sequences' tokens, and each adapter parameter's gradient of it.
fn loss_and_adapter_grads(model: &CausalLm, seqs: &[Vec<u32>]) -> (f32, Vec<Vec<f32>>) {
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let starts = vec![1; seqs.len()];
    let (lp, _, _) = model
        .completion_logprobs(&refs, &starts, OpsPath::Fast)
        .unwrap();
    let loss = lp.sum_all().unwrap();
    let g = loss.backward().unwrap();
    let grads = model
        .parameters()
        .iter()
        .map(|(_, v)| flat(g.get(v.as_tensor()).unwrap()))
        .collect();
    (loss.to_scalar().unwrap(), grads)
}

fn stored_bytes(model: &CausalLm) -> usize {
    model
        .state_dict()
        .unwrap()
        .iter()
        .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
        .sum()
}

#[test]
fn a_bf16_base_trains_lora_adapters_as_the_f32_base_of_the_same_weights_does() {
    let lora = LoraConfig {
        use_peft: true,
        lora_r: 4,
        ..LoraConfig::default()
    };
    for &m in MODELS.iter().filter(|m| !m.contains("gguf")) {
        let g = golden(m);
        let seqs: Vec<Vec<u32>> = (0..3).map(|i| ids(&g["single"][i]["ids"])).collect();
        let (cfg, w) = weights(m, false);
        let mut compact = CausalLm::from_weights_as(cfg, w, false, FrozenDtype::Bf16).unwrap();
        let (cfg, w) = weights(m, true);
        let mut wide = CausalLm::from_weights_as(cfg, w, false, FrozenDtype::F32).unwrap();
        let (b16, b32) = (stored_bytes(&compact), stored_bytes(&wide));
        assert!(
            (b16 as f64) < 0.56 * b32 as f64,
            "{m}: {b16} bytes in bf16 vs {b32} in f32"
        );
        compact.add_lora(&lora, 7).unwrap();
        wide.add_lora(&lora, 7).unwrap();
        // B = 0 at init: perturb both adapters' B the same way so A gets a gradient too.
        for model in [&compact, &wide] {
            for (i, (n, v)) in model.parameters().iter().enumerate() {
                if n.ends_with("lora_B.weight") {
                    let t =
                        Tensor::from_vec(rand(v.dims(), i as u64), v.dims(), &Device::Cpu).unwrap();
                    v.set(&(t * 0.1).unwrap()).unwrap();
                }
            }
        }
        let (l16, g16) = loss_and_adapter_grads(&compact, &seqs);
        let (l32, g32) = loss_and_adapter_grads(&wide, &seqs);
        let rel = ((l16 - l32) / l32).abs();
        assert!(rel < 1e-5, "{m}: loss {l16} vs {l32}");
        let worst = g16
            .iter()
            .zip(&g32)
            .map(|(a, b)| rel_max(a, b))
            .fold(0f32, f32::max);
        eprintln!("{m}: bf16-stored base vs f32: loss rel {rel:.1e}, adapter grads worst rel {worst:.1e}, {b16} vs {b32} bytes");
        assert!(worst < 1e-4, "{m}: adapter gradient rel {worst}");
    }
}

#[test]
fn auto_keeps_a_bf16_checkpoint_in_bf16_and_computes_the_same() {
    let m = "llama-untied-bf16";
    let g = golden(m);
    let seqs: Vec<Vec<u32>> = (0..3).map(|i| ids(&g["single"][i]["ids"])).collect();
    let (cfg, w) = weights(m, false);
    let auto = CausalLm::from_weights_as(cfg, w, false, FrozenDtype::Auto).unwrap();
    let matrices: Vec<DType> = auto
        .state_dict()
        .unwrap()
        .iter()
        .filter(|(_, t)| t.rank() == 2)
        .map(|(_, t)| t.dtype())
        .collect();
    assert!(matrices.iter().all(|&d| d == DType::BF16), "{matrices:?}");
    let (cfg, w) = weights(m, false);
    let wide = CausalLm::from_weights_as(cfg, w, false, FrozenDtype::F32).unwrap();
    let a = auto.sequence_logprobs(&seqs).unwrap();
    let b = wide.sequence_logprobs(&seqs).unwrap();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(max_abs_diff(x, y) < 1e-5, "seq {i}: {x:?} vs {y:?}");
    }
    // An f32 checkpoint stays f32 under auto.
    let (cfg, w) = weights("llama-tied", false);
    let f = CausalLm::from_weights_as(cfg, w, false, FrozenDtype::Auto).unwrap();
    assert!(f
        .state_dict()
        .unwrap()
        .iter()
        .all(|(_, t)| t.dtype() == DType::F32));
}
