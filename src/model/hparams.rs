//! Model hyper-parameters, read from a Hugging Face `config.json` (or built from GGUF metadata).
//!
//! One struct covers both families we implement: the Llama family (Llama, Mistral, Qwen2, SmolLM) and
//! GPT-2. The original JSON is kept so that saving writes back what the user gave us.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

pub use crate::ops::Activation;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Pre-norm RMSNorm decoder with rotary positions, SwiGLU MLP and grouped-query attention.
    Llama,
    /// GPT-2: learned positions, LayerNorm, fused QKV in Conv1D layout, GELU (tanh) MLP.
    Gpt2,
}

/// The MLP activation named by config.json's `hidden_act` / `activation_function`.
fn parse_activation(name: &str) -> Result<Activation> {
    Ok(match name {
        "silu" | "swish" => Activation::Silu,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
        "gelu" => Activation::GeluErf,
        "relu" => Activation::Relu,
        other => bail!("unsupported activation function `{other}`"),
    })
}

/// Rotary-embedding frequency scaling (`rope_scaling` in config.json).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's piecewise scaling of low frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub family: Family,
    /// `model_type` of config.json, e.g. "llama", "qwen2", "gpt2".
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the attention output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub activation: Activation,
    /// RMSNorm over each head of q and k before the rotary embedding (Qwen3).
    pub qk_norm: bool,
    /// Mistral's sliding attention window, when it is active.
    pub sliding_window: Option<usize>,
    /// GPT-2: divide attention scores by (layer index + 1).
    pub scale_attn_by_inverse_layer_idx: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The config.json we were given (or built), written back on save.
    pub raw: Value,
}

fn get_usize(v: &Value, key: &str) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .with_context(|| format!("missing or non-integer `{key}`"))
}

fn opt_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

fn opt_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn opt_bool(v: &Value, key: &str) -> Option<bool> {
    v.get(key).and_then(Value::as_bool)
}

/// `eos_token_id` may be an integer or a list of integers.
pub fn token_id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// A transformers `*ForSequenceClassification` checkpoint (a reward model): no LM head.
    pub fn is_sequence_classifier(&self) -> bool {
        self.raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .is_some_and(|a| a.ends_with("ForSequenceClassification"))
    }

    /// The transformers class name of this model with a scalar (sequence-classification) head.
    pub fn sequence_classifier_architecture(&self) -> String {
        let given = self
            .raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .unwrap_or("");
        for suffix in ["ForCausalLM", "LMHeadModel", "ForSequenceClassification"] {
            if let Some(stem) = given.strip_suffix(suffix) {
                if !stem.is_empty() {
                    return format!("{stem}ForSequenceClassification");
                }
            }
        }
        let stem = match self.model_type.as_str() {
            "gpt2" => "GPT2",
            "mistral" => "Mistral",
            "qwen2" => "Qwen2",
            "qwen3" => "Qwen3",
            _ => "Llama",
        };
        format!("{stem}ForSequenceClassification")
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let raw: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", path.display()))?;
        Self::from_json(raw).with_context(|| format!("{}", path.display()))
    }

    pub fn from_json(raw: Value) -> Result<Self> {
        let model_type = raw
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let architecture = raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let family = match model_type.as_str() {
            "llama" | "mistral" | "qwen2" | "qwen3" => Family::Llama,
            "gpt2" => Family::Gpt2,
            _ => bail!(
                "unsupported architecture `{}` (model_type `{model_type}`); supported model types: llama, mistral, qwen2, qwen3, gpt2",
                if architecture.is_empty() { "?" } else { &architecture }
            ),
        };
        match family {
            Family::Llama => Self::llama_from_json(raw, model_type),
            Family::Gpt2 => Self::gpt2_from_json(raw, model_type),
        }
    }

    fn llama_from_json(raw: Value, model_type: String) -> Result<Self> {
        let hidden_size = get_usize(&raw, "hidden_size")?;
        let num_heads = get_usize(&raw, "num_attention_heads")?;
        let num_kv_heads = opt_usize(&raw, "num_key_value_heads").unwrap_or(num_heads);
        let is_qwen2 = model_type == "qwen2";
        let is_qwen3 = model_type == "qwen3";
        // Qwen3's head_dim is not hidden_size / heads (and transformers' default for it, 128,
        // is no guide to a checkpoint's): it must be given.
        let head_dim = match opt_usize(&raw, "head_dim") {
            Some(h) => h,
            None if is_qwen3 => bail!("a qwen3 config needs `head_dim`"),
            None => hidden_size / num_heads.max(1),
        };
        let attention_bias = opt_bool(&raw, "attention_bias").unwrap_or(false);
        // transformers 5 writes `rope_parameters`; earlier versions `rope_scaling` + `rope_theta`.
        let rope_scaling =
            parse_rope_scaling(raw.get("rope_scaling").or(raw.get("rope_parameters")))?;
        let rope_theta = opt_f64(&raw, "rope_theta")
            .or_else(|| {
                raw.get("rope_parameters")
                    .and_then(|r| opt_f64(r, "rope_theta"))
            })
            .unwrap_or(10000.0);
        let sliding_window = if model_type == "mistral" {
            opt_usize(&raw, "sliding_window")
        } else if (is_qwen2 || is_qwen3) && opt_bool(&raw, "use_sliding_window").unwrap_or(false) {
            bail!("{model_type} with use_sliding_window=true is not supported")
        } else {
            None
        };
        let cfg = ModelConfig {
            family: Family::Llama,
            vocab_size: get_usize(&raw, "vocab_size")?,
            hidden_size,
            num_layers: get_usize(&raw, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size: get_usize(&raw, "intermediate_size")?,
            max_position_embeddings: opt_usize(&raw, "max_position_embeddings").unwrap_or(2048),
            norm_eps: opt_f64(&raw, "rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: opt_bool(&raw, "tie_word_embeddings").unwrap_or(false),
            qkv_bias: is_qwen2 || attention_bias,
            o_bias: !is_qwen2 && attention_bias,
            mlp_bias: opt_bool(&raw, "mlp_bias").unwrap_or(false),
            activation: parse_activation(
                raw.get("hidden_act")
                    .and_then(Value::as_str)
                    .unwrap_or("silu"),
            )?,
            qk_norm: is_qwen3,
            sliding_window,
            scale_attn_by_inverse_layer_idx: false,
            bos_token_id: opt_usize(&raw, "bos_token_id").map(|x| x as u32),
            eos_token_ids: token_id_list(raw.get("eos_token_id")),
            pad_token_id: opt_usize(&raw, "pad_token_id").map(|x| x as u32),
            model_type,
            raw,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn gpt2_from_json(raw: Value, model_type: String) -> Result<Self> {
        let hidden_size = get_usize(&raw, "n_embd")?;
        let num_heads = get_usize(&raw, "n_head")?;
        if opt_bool(&raw, "reorder_and_upcast_attn").unwrap_or(false) {
            // Only changes numerics under fp16 autocast; in f32 it is the same computation.
        }
        if !opt_bool(&raw, "scale_attn_weights").unwrap_or(true) {
            bail!("GPT-2 with scale_attn_weights=false is not supported");
        }
        let cfg = ModelConfig {
            family: Family::Gpt2,
            vocab_size: get_usize(&raw, "vocab_size")?,
            hidden_size,
            num_layers: get_usize(&raw, "n_layer")?,
            num_heads,
            num_kv_heads: num_heads,
            head_dim: hidden_size / num_heads.max(1),
            intermediate_size: opt_usize(&raw, "n_inner").unwrap_or(4 * hidden_size),
            max_position_embeddings: get_usize(&raw, "n_positions")?,
            norm_eps: opt_f64(&raw, "layer_norm_epsilon").unwrap_or(1e-5),
            rope_theta: 0.0,
            rope_scaling: RopeScaling::None,
            tie_word_embeddings: opt_bool(&raw, "tie_word_embeddings").unwrap_or(true),
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            activation: parse_activation(
                raw.get("activation_function")
                    .and_then(Value::as_str)
                    .unwrap_or("gelu_new"),
            )?,
            sliding_window: None,
            qk_norm: false,
            scale_attn_by_inverse_layer_idx: opt_bool(&raw, "scale_attn_by_inverse_layer_idx")
                .unwrap_or(false),
            bos_token_id: opt_usize(&raw, "bos_token_id").map(|x| x as u32),
            eos_token_ids: token_id_list(raw.get("eos_token_id")),
            pad_token_id: opt_usize(&raw, "pad_token_id").map(|x| x as u32),
            model_type,
            raw,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_layers == 0 {
            bail!(
                "num_attention_heads, num_key_value_heads and num_hidden_layers must be positive"
            );
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if self.family == Family::Gpt2 && !self.hidden_size.is_multiple_of(self.num_heads) {
            bail!(
                "n_embd ({}) is not a multiple of n_head ({})",
                self.hidden_size,
                self.num_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) && self.family == Family::Llama {
            bail!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            );
        }
        if self.vocab_size == 0 || self.hidden_size == 0 {
            bail!("vocab_size and hidden_size must be positive");
        }
        Ok(())
    }

    /// The longest sequence the model takes: GPT-2's learned positions end at `n_positions`;
    /// the rotary families have no hard limit.
    pub fn position_limit(&self) -> Option<usize> {
        (self.family == Family::Gpt2).then_some(self.max_position_embeddings)
    }

    /// `len` lowered to the position limit.
    pub fn fit_length(&self, len: usize) -> usize {
        self.position_limit().map_or(len, |limit| len.min(limit))
    }

    /// Errors when `len` tokens would not fit the model's positions; `what` says where the
    /// length comes from.
    pub fn check_length(&self, len: usize, what: &str) -> Result<()> {
        match self.position_limit() {
            Some(limit) if len > limit => {
                bail!("{what} ({len} tokens) exceeds the model's {limit} positions")
            }
            _ => Ok(()),
        }
    }

    /// Number of parameters (counting tied embeddings once).
    pub fn num_parameters(&self) -> usize {
        let (d, v, f) = (self.hidden_size, self.vocab_size, self.intermediate_size);
        let (h, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let head = if self.tie_word_embeddings { 0 } else { v * d };
        match self.family {
            Family::Llama => {
                let mut attn = d * h * hd + 2 * d * kv * hd + h * hd * d;
                if self.qkv_bias {
                    attn += h * hd + 2 * kv * hd;
                }
                if self.o_bias {
                    attn += d;
                }
                if self.qk_norm {
                    attn += 2 * hd;
                }
                let mlp = 3 * d * f + if self.mlp_bias { 2 * f + d } else { 0 };
                v * d + self.num_layers * (attn + mlp + 2 * d) + d + head
            }
            Family::Gpt2 => {
                let block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d;
                v * d + self.max_position_embeddings * d + self.num_layers * block + 2 * d + head
            }
        }
    }
}

fn parse_rope_scaling(v: Option<&Value>) -> Result<RopeScaling> {
    let Some(v) = v else {
        return Ok(RopeScaling::None);
    };
    if v.is_null() {
        return Ok(RopeScaling::None);
    }
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = || opt_f64(v, "factor").context("rope_scaling.factor missing");
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: opt_f64(v, "low_freq_factor").unwrap_or(1.0),
            high_freq_factor: opt_f64(v, "high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: opt_f64(v, "original_max_position_embeddings")
                .context("rope_scaling.original_max_position_embeddings missing")?,
        },
        other => bail!("rope_scaling type `{other}` is not supported (supported: linear, llama3)"),
    })
}

/// The rotary inverse frequencies, θ^(−2i/d) with the configured scaling, rounded to f32 as
/// transformers computes them.
pub fn rope_inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| {
            let exponent = ((2 * i) as f32 / d as f32) as f64;
            (1.0 / cfg.rope_theta.powf(exponent)) as f32 as f64
        })
        .collect();
    let scaled: Vec<f64> = match &cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_ctx,
        } => {
            let low_wavelen = old_ctx / low_freq_factor;
            let high_wavelen = old_ctx / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_ctx / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    };
    scaled.into_iter().map(|f| f as f32).collect()
}
