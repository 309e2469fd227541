//! Randomly initialised checkpoints for benchmarks and tests: every tensor the loaders take, under
//! transformers' names and layouts, drawn from a seeded generator so that runs are repeatable.
//!
//! Matrices (embeddings and projections) are N(0, 0.02²), norm weights 1, biases 0 — the plain
//! GPT-2/Llama initialisation without the per-layer rescaling of residual projections.

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::path::PathBuf;

use super::hparams::{Family, ModelConfig};
use super::weights::WeightMap;

const INIT_STD: f64 = 0.02;

/// Fills a new tensor of `shape` with N(0, std²) values (Box–Muller, two values per pair of draws).
pub(crate) fn normal(rng: &mut ChaCha8Rng, shape: &[usize], std: f64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // u1 in (0, 1] so that ln(u1) is finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        out.push((r * c) as f32);
        out.push((r * s) as f32);
    }
    out.truncate(n);
    Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
}

fn filled(shape: &[usize], value: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    Ok(Tensor::from_vec(vec![value; n], shape, &Device::Cpu)?)
}

/// Random weights for `cfg`, with exactly the names and shapes that `CausalLm::from_weights` takes
/// (Llama family under `model.`, GPT-2 under `transformer.` with Conv1D weights stored [in, out]).
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> Result<WeightMap> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut map = WeightMap::default();
    let source = PathBuf::from("<random init>");
    let (d, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let put = |map: &mut WeightMap, name: String, t: Tensor| {
        map.insert(name, t, source.clone());
    };
    match cfg.family {
        Family::Llama => {
            let (qd, kvd) = (
                cfg.num_heads * cfg.head_dim,
                cfg.num_kv_heads * cfg.head_dim,
            );
            put(
                &mut map,
                "model.embed_tokens.weight".into(),
                normal(&mut rng, &[v, d], INIT_STD)?,
            );
            for i in 0..cfg.num_layers {
                let p = format!("model.layers.{i}");
                let linears: Vec<(&str, usize, usize, bool)> = if cfg.packed_projections {
                    vec![
                        ("self_attn.qkv_proj", qd + 2 * kvd, d, cfg.qkv_bias),
                        ("self_attn.o_proj", d, qd, cfg.o_bias),
                        ("mlp.gate_up_proj", 2 * f, d, cfg.mlp_bias),
                        ("mlp.down_proj", d, f, cfg.mlp_bias),
                    ]
                } else {
                    vec![
                        ("self_attn.q_proj", qd, d, cfg.qkv_bias),
                        ("self_attn.k_proj", kvd, d, cfg.qkv_bias),
                        ("self_attn.v_proj", kvd, d, cfg.qkv_bias),
                        ("self_attn.o_proj", d, qd, cfg.o_bias),
                        ("mlp.gate_proj", f, d, cfg.mlp_bias),
                        ("mlp.up_proj", f, d, cfg.mlp_bias),
                        ("mlp.down_proj", d, f, cfg.mlp_bias),
                    ]
                };
                for (name, out, inp, bias) in linears {
                    put(
                        &mut map,
                        format!("{p}.{name}.weight"),
                        normal(&mut rng, &[out, inp], INIT_STD)?,
                    );
                    if bias {
                        put(&mut map, format!("{p}.{name}.bias"), filled(&[out], 0.0)?);
                    }
                }
                // A unit norm: w = 1, or w = 0 where the norm scales by (1 + w) (Gemma).
                let unit = 1.0 - cfg.norm_weight_offset;
                let mut norms = vec!["input_layernorm", "post_attention_layernorm"];
                if cfg.sandwich_norms {
                    norms.extend(["pre_feedforward_layernorm", "post_feedforward_layernorm"]);
                }
                for norm in norms {
                    put(&mut map, format!("{p}.{norm}.weight"), filled(&[d], unit)?);
                }
                if cfg.qk_norm {
                    for norm in ["q_norm", "k_norm"] {
                        put(
                            &mut map,
                            format!("{p}.self_attn.{norm}.weight"),
                            filled(&[cfg.head_dim], unit)?,
                        );
                    }
                }
            }
            let unit = 1.0 - cfg.norm_weight_offset;
            put(&mut map, "model.norm.weight".into(), filled(&[d], unit)?);
        }
        Family::Gpt2 => {
            let npos = cfg.max_position_embeddings;
            put(
                &mut map,
                "transformer.wte.weight".into(),
                normal(&mut rng, &[v, d], INIT_STD)?,
            );
            put(
                &mut map,
                "transformer.wpe.weight".into(),
                normal(&mut rng, &[npos, d], INIT_STD)?,
            );
            for i in 0..cfg.num_layers {
                let p = format!("transformer.h.{i}");
                // Conv1D layout: weight [in, out].
                let convs = [
                    ("attn.c_attn", d, 3 * d),
                    ("attn.c_proj", d, d),
                    ("mlp.c_fc", d, f),
                    ("mlp.c_proj", f, d),
                ];
                for (name, inp, out) in convs {
                    put(
                        &mut map,
                        format!("{p}.{name}.weight"),
                        normal(&mut rng, &[inp, out], INIT_STD)?,
                    );
                    put(&mut map, format!("{p}.{name}.bias"), filled(&[out], 0.0)?);
                }
                for norm in ["ln_1", "ln_2"] {
                    put(&mut map, format!("{p}.{norm}.weight"), filled(&[d], 1.0)?);
                    put(&mut map, format!("{p}.{norm}.bias"), filled(&[d], 0.0)?);
                }
            }
            put(
                &mut map,
                "transformer.ln_f.weight".into(),
                filled(&[d], 1.0)?,
            );
            put(&mut map, "transformer.ln_f.bias".into(), filled(&[d], 0.0)?);
        }
    }
    if !cfg.tie_word_embeddings {
        put(
            &mut map,
            "lm_head.weight".into(),
            normal(&mut rng, &[v, d], INIT_STD)?,
        );
    }
    Ok(map)
}

/// The SmolLM2-135M architecture (Llama family, tied embeddings).
pub fn smollm2_135m_config() -> ModelConfig {
    ModelConfig::from_json(json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": true,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "float32"
    }))
    .expect("the built-in SmolLM2-135M config is valid")
}

/// The GPT-2 small architecture (124M).
pub fn gpt2_small_config() -> ModelConfig {
    ModelConfig::from_json(json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_positions": 1024,
        "n_ctx": 1024,
        "vocab_size": 50257,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "torch_dtype": "float32"
    }))
    .expect("the built-in GPT-2 small config is valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CausalLm, StepInputs};

    fn check_builds(cfg: ModelConfig) {
        let weights = random_weights(&cfg, 7).unwrap();
        let model = CausalLm::from_weights(cfg.clone(), weights, true).unwrap();
        assert!(
            model.unused_tensors.is_empty(),
            "{:?}",
            model.unused_tensors
        );
        let n: usize = model.parameters().iter().map(|(_, v)| v.elem_count()).sum();
        assert_eq!(n, cfg.num_parameters());
        let ids = vec![vec![1u32, 2, 3]];
        let inp = StepInputs::from_padded(&cfg, &ids, &[vec![1u8; 3]]).unwrap();
        let logits = model.forward(&inp, None).unwrap();
        assert_eq!(logits.dims(), &[1, 3, cfg.vocab_size]);
        let sum = logits.abs().unwrap().sum_all().unwrap();
        assert!(sum.to_scalar::<f32>().unwrap().is_finite());
    }

    #[test]
    fn every_llama_variant_builds_with_its_parameter_count() {
        for m in ["gemma2", "gemma3", "phi3", "qwen3", "llama3.2-tied"] {
            let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join(format!("tests/fixtures/models/{m}/config.json"));
            check_builds(ModelConfig::from_file(&p).unwrap());
        }
    }

    #[test]
    fn smollm2_135m_builds() {
        let cfg = smollm2_135m_config();
        assert_eq!(cfg.head_dim, 64);
        assert!((cfg.num_parameters() as f64 / 1e6 - 134.5).abs() < 0.1);
        check_builds(cfg);
    }

    #[test]
    fn gpt2_small_builds() {
        let cfg = gpt2_small_config();
        assert!((cfg.num_parameters() as f64 / 1e6 - 124.4).abs() < 0.1);
        check_builds(cfg);
    }

    #[test]
    fn same_seed_same_weights_and_plausible_std() {
        let cfg = ModelConfig::from_json(json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 1000
        }))
        .unwrap();
        let name = "model.embed_tokens.weight";
        let get = |seed| {
            random_weights(&cfg, seed)
                .unwrap()
                .take(name, &[1000, 64])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b, c) = (get(1), get(1), get(2));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let var = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / a.len() as f64;
        assert!((var.sqrt() - INIT_STD).abs() < 0.001, "std {}", var.sqrt());
    }
}
