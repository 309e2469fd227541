//! Model hyper-parameters, read from a Hugging Face `config.json` (or built from GGUF metadata).
//!
//! One struct covers both families we implement: the Llama family (Llama, Mistral, Qwen2/3, SmolLM,
//! and with their variations Gemma 2/3 and Phi-3/4) and GPT-2. The original JSON is kept so that
//! saving writes back what the user gave us.

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
    /// Phi-3's LongRoPE: per-frequency factors, the long ones for a forward call that reaches
    /// beyond `original_max_position_embeddings`, and cos/sin scaled by `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
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
    /// RMSNorm over each head of q and k before the rotary embedding (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// The sliding attention window, when a layer uses one (Mistral, Phi-3, Gemma).
    pub sliding_window: Option<usize>,
    /// Which layers attend within the window only: all of them (Mistral, Phi-3) or Gemma's
    /// `layer_types`.
    pub sliding_layers: Vec<bool>,
    /// Gemma's RMSNorm scales by (1 + w): 1; others by w: 0.
    pub norm_weight_offset: f32,
    /// Gemma multiplies the token embeddings by √hidden_size.
    pub embed_scale: Option<f32>,
    /// Gemma's norms on the attention and MLP outputs too (four per block).
    pub sandwich_norms: bool,
    /// The attention scores' scale: head_dim^-½, or Gemma's query_pre_attn_scalar^-½.
    pub attn_scale: f64,
    /// cap·tanh(x / cap) on the attention scores (Gemma 2) and on the final logits (Gemma 2).
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    /// Gemma 3's RoPE base on its sliding layers (unscaled); None: every layer uses `rope_theta`.
    pub local_rope_theta: Option<f64>,
    /// The leading dimensions of each head that rotate (Phi's partial_rotary_factor).
    pub rotary_dim: usize,
    /// Phi-3's packed `qkv_proj` and `gate_up_proj`.
    pub packed_projections: bool,
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

/// The largest value a size in a model's config may have: the largest open models stay far
/// inside these, and a file from a stranger cannot make us allocate without bound.
const SIZE_LIMITS: &[(&str, u64)] = &[
    ("num_hidden_layers", 1 << 10),
    ("n_layer", 1 << 10),
    ("num_attention_heads", 1 << 10),
    ("n_head", 1 << 10),
    ("num_key_value_heads", 1 << 10),
    ("hidden_size", 1 << 17),
    ("n_embd", 1 << 17),
    ("intermediate_size", 1 << 20),
    ("n_inner", 1 << 20),
    ("head_dim", 1 << 13),
    ("vocab_size", 1 << 23),
    ("max_position_embeddings", 1 << 24),
    ("n_positions", 1 << 24),
    ("sliding_window", 1 << 24),
];

/// Real-valued settings of a config that must be numbers when present.
const FLOAT_KEYS: &[&str] = &[
    "rope_theta",
    "rms_norm_eps",
    "layer_norm_epsilon",
    "partial_rotary_factor",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "rope_local_base_freq",
];

fn check_size(key: &str, value: u64) -> Result<()> {
    let Some((_, limit)) = SIZE_LIMITS.iter().find(|(k, _)| *k == key) else {
        return Ok(());
    };
    if value > *limit {
        bail!("{key} = {value} is beyond any real model (at most {limit}); refusing the config");
    }
    Ok(())
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
                // Gemma3ForSequenceClassification is the multimodal model's.
                if !stem.is_empty() && stem != "Gemma3" {
                    return format!("{stem}ForSequenceClassification");
                }
            }
        }
        let stem = match self.model_type.as_str() {
            "gpt2" => "GPT2",
            "mistral" => "Mistral",
            "qwen2" => "Qwen2",
            "qwen3" => "Qwen3",
            "gemma2" => "Gemma2",
            "gemma3_text" => "Gemma3Text",
            "phi3" => "Phi3",
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
        // Before anything is built (or allocated) from them; a value of the wrong type is an
        // error, not a default.
        for (key, _) in SIZE_LIMITS {
            match raw.get(*key) {
                None | Some(Value::Null) => {}
                Some(v) => match v.as_u64() {
                    Some(n) => check_size(key, n)?,
                    None => bail!("`{key}` must be a non-negative integer, got {v}"),
                },
            }
        }
        for key in FLOAT_KEYS {
            if let Some(v) = raw.get(*key).filter(|v| !v.is_null() && !v.is_number()) {
                bail!("`{key}` must be a number, got {v}");
            }
        }
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
            "llama" | "mistral" | "qwen2" | "qwen3" | "gemma2" | "gemma3_text" | "phi3" => {
                Family::Llama
            }
            "gpt2" => Family::Gpt2,
            _ => bail!(
                "unsupported architecture `{}` (model_type `{model_type}`); supported model types: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, gpt2",
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
        let num_layers = get_usize(&raw, "num_hidden_layers")?;
        let mt = model_type.as_str();
        let (is_qwen2, is_qwen3, is_phi3) = (mt == "qwen2", mt == "qwen3", mt == "phi3");
        let (is_gemma2, is_gemma3) = (mt == "gemma2", mt == "gemma3_text");
        let is_gemma = is_gemma2 || is_gemma3;
        // Qwen3's and Gemma's head_dim is not hidden_size / heads (and transformers' defaults
        // for it are no guide to a checkpoint's): it must be given.
        let head_dim = match opt_usize(&raw, "head_dim") {
            Some(h) => h,
            None if is_qwen3 || is_gemma => bail!("a {mt} config needs `head_dim`"),
            None => hidden_size / num_heads.max(1),
        };
        let attention_bias = opt_bool(&raw, "attention_bias").unwrap_or(false);
        if opt_bool(&raw, "use_bidirectional_attention").unwrap_or(false) {
            bail!("{mt} with use_bidirectional_attention=true (a non-causal encoder) is not supported");
        }
        let rope = RopeKeys::read(&raw, is_gemma3)?;
        let rotary_dim = match rope.partial_rotary_factor {
            Some(f) if !(f > 0.0 && f <= 1.0) => {
                bail!("partial_rotary_factor must be in (0, 1], got {f}")
            }
            Some(f) => (head_dim as f64 * f) as usize,
            None => head_dim,
        };
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            bail!("the rotary dimension ({rotary_dim} of head_dim {head_dim}) must be even and positive");
        }
        let max_position_embeddings = opt_usize(&raw, "max_position_embeddings").unwrap_or(2048);
        let rope_scaling = parse_rope_scaling(
            rope.scaling,
            RopeContext {
                max_position_embeddings,
                original_max_position_embeddings: opt_usize(
                    &raw,
                    "original_max_position_embeddings",
                ),
                rotary_dim,
                phi3: is_phi3,
            },
        )?;
        let window = opt_usize(&raw, "sliding_window");
        let (sliding_window, sliding_layers) = if mt == "mistral" || is_phi3 {
            (window, vec![window.is_some(); num_layers])
        } else if is_gemma {
            let layers = gemma_sliding_layers(&raw, num_layers, is_gemma3)?;
            if layers.iter().any(|&s| s) && window.is_none() {
                bail!("{mt}: `layer_types` has sliding layers but `sliding_window` is missing");
            }
            (window, layers)
        } else if (is_qwen2 || is_qwen3) && opt_bool(&raw, "use_sliding_window").unwrap_or(false) {
            bail!("{model_type} with use_sliding_window=true is not supported")
        } else {
            (None, vec![false; num_layers])
        };
        let softcap = |key: &str| -> Result<Option<f64>> {
            match opt_f64(&raw, key) {
                Some(c) if !(c.is_finite() && c > 0.0) => {
                    bail!("`{key}` must be positive, got {c}")
                }
                c => Ok(c),
            }
        };
        let activation = raw
            .get("hidden_activation")
            .filter(|_| is_gemma)
            .or(raw.get("hidden_act"))
            .and_then(Value::as_str)
            .unwrap_or(if is_gemma {
                "gelu_pytorch_tanh"
            } else {
                "silu"
            });
        let attn_scale = if is_gemma {
            // transformers' default when the key is absent.
            1.0 / opt_f64(&raw, "query_pre_attn_scalar")
                .unwrap_or(256.0)
                .sqrt()
        } else {
            1.0 / (head_dim as f64).sqrt()
        };
        let cfg = ModelConfig {
            family: Family::Llama,
            vocab_size: get_usize(&raw, "vocab_size")?,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size: get_usize(&raw, "intermediate_size")?,
            max_position_embeddings,
            norm_eps: opt_f64(&raw, "rms_norm_eps").unwrap_or(if is_phi3 { 1e-5 } else { 1e-6 }),
            rope_theta: rope.theta,
            rope_scaling,
            tie_word_embeddings: opt_bool(&raw, "tie_word_embeddings").unwrap_or(is_gemma),
            qkv_bias: is_qwen2 || attention_bias,
            o_bias: !is_qwen2 && attention_bias,
            mlp_bias: opt_bool(&raw, "mlp_bias").unwrap_or(false),
            activation: parse_activation(activation)?,
            qk_norm: is_qwen3 || is_gemma3,
            sliding_window,
            sliding_layers,
            norm_weight_offset: if is_gemma { 1.0 } else { 0.0 },
            embed_scale: is_gemma.then(|| (hidden_size as f64).sqrt() as f32),
            sandwich_norms: is_gemma,
            attn_scale,
            // Gemma 3's attention ignores attn_logit_softcapping (transformers never passes it).
            attn_softcap: if is_gemma2 {
                softcap("attn_logit_softcapping")?
            } else {
                None
            },
            final_softcap: if is_gemma {
                softcap("final_logit_softcapping")?
            } else {
                None
            },
            local_rope_theta: rope.local_theta,
            rotary_dim,
            packed_projections: is_phi3,
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
            sliding_layers: vec![],
            norm_weight_offset: 0.0,
            embed_scale: None,
            sandwich_norms: false,
            attn_scale: 1.0 / ((hidden_size / num_heads.max(1)).max(1) as f64).sqrt(),
            attn_softcap: None,
            final_softcap: None,
            local_rope_theta: None,
            rotary_dim: 0,
            packed_projections: false,
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
        if self.family == Family::Llama && self.sliding_layers.len() != self.num_layers {
            bail!(
                "{} layer types for {} layers",
                self.sliding_layers.len(),
                self.num_layers
            );
        }
        if self.vocab_size == 0 || self.hidden_size == 0 {
            bail!("vocab_size and hidden_size must be positive");
        }
        for (key, value) in [
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            check_size(key, value as u64)?;
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            bail!(
                "the norm epsilon must be finite and ≥ 0, got {}",
                self.norm_eps
            );
        }
        if self.family == Family::Llama && !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bail!(
                "rope_theta must be finite and positive, got {}",
                self.rope_theta
            );
        }
        Ok(())
    }

    /// The window every layer attends within (Mistral, Phi-3), when all of them do.
    pub fn uniform_window(&self) -> Option<usize> {
        self.sliding_window
            .filter(|_| !self.sliding_layers.is_empty() && self.sliding_layers.iter().all(|&s| s))
    }

    /// The window of the sliding layers when only some layers slide (Gemma).
    pub fn mixed_window(&self) -> Option<usize> {
        self.sliding_window
            .filter(|_| self.sliding_layers.iter().any(|&s| s) && self.uniform_window().is_none())
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

    /// Errors when a sequence a user gives the model directly (to score or to continue) is
    /// longer than the context it was made for: GPT-2's positions, or `max_position_embeddings`
    /// of the rotary families, beyond which attention's memory grows with the square of the
    /// length for positions the model never saw.
    pub fn check_context(&self, len: usize, what: &str) -> Result<()> {
        let limit = self.max_position_embeddings;
        if len > limit {
            bail!("{what} ({len} tokens) exceeds the model's context of {limit} positions (max_position_embeddings)");
        }
        Ok(())
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
                let norms = if self.sandwich_norms { 4 * d } else { 2 * d };
                v * d + self.num_layers * (attn + mlp + norms) + d + head
            }
            Family::Gpt2 => {
                let block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d;
                v * d + self.max_position_embeddings * d + self.num_layers * block + 2 * d + head
            }
        }
    }
}

/// The RoPE keys of a config in either form: transformers 5's `rope_parameters` (for Gemma 3 one
/// per layer type) or the hub's `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`).
struct RopeKeys<'a> {
    theta: f64,
    local_theta: Option<f64>,
    scaling: Option<&'a Value>,
    partial_rotary_factor: Option<f64>,
}

impl<'a> RopeKeys<'a> {
    fn read(raw: &'a Value, gemma3: bool) -> Result<Self> {
        let params = raw.get("rope_parameters").filter(|v| !v.is_null());
        let (global, local) = match params.and_then(|p| p.get("full_attention")) {
            Some(full) => (Some(full), params.and_then(|p| p.get("sliding_attention"))),
            None => (params, None),
        };
        // The hub's rope_scaling wins over rope_parameters, as transformers reads them.
        let scaling = match raw.get("rope_scaling") {
            Some(v) if !v.is_null() => Some(v),
            _ => global,
        };
        let theta = opt_f64(raw, "rope_theta")
            .or_else(|| global.and_then(|g| opt_f64(g, "rope_theta")))
            .unwrap_or(if gemma3 { 1e6 } else { 1e4 });
        let local_theta = gemma3.then(|| {
            opt_f64(raw, "rope_local_base_freq")
                .or_else(|| local.and_then(|l| opt_f64(l, "rope_theta")))
                .unwrap_or(1e4)
        });
        for (key, t) in [
            ("rope_theta", Some(theta)),
            ("rope_local_base_freq", local_theta),
        ] {
            if let Some(t) = t.filter(|t| !(t.is_finite() && *t > 0.0)) {
                bail!("`{key}` must be positive, got {t}");
            }
        }
        Ok(RopeKeys {
            theta,
            local_theta,
            scaling,
            partial_rotary_factor: global
                .and_then(|g| opt_f64(g, "partial_rotary_factor"))
                .or_else(|| opt_f64(raw, "partial_rotary_factor")),
        })
    }
}

/// What the scaling types need beyond their own keys.
struct RopeContext {
    max_position_embeddings: usize,
    original_max_position_embeddings: Option<usize>,
    rotary_dim: usize,
    phi3: bool,
}

/// Gemma's per-layer attention kinds: `layer_types` when given, else every second layer (Gemma 2)
/// or all but every `sliding_window_pattern`-th (Gemma 3, default 6) slides.
fn gemma_sliding_layers(raw: &Value, layers: usize, gemma3: bool) -> Result<Vec<bool>> {
    if let Some(types) = raw.get("layer_types").filter(|v| !v.is_null()) {
        let types = types.as_array().context("`layer_types` must be a list")?;
        if types.len() != layers {
            bail!(
                "`layer_types` has {} entries for num_hidden_layers = {layers}",
                types.len()
            );
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => bail!("`layer_types` entry {t} is neither \"sliding_attention\" nor \"full_attention\""),
            })
            .collect();
    }
    let pattern = if gemma3 {
        match opt_usize(raw, "sliding_window_pattern").unwrap_or(6) {
            0 => bail!("`sliding_window_pattern` must be at least 1"),
            p => p,
        }
    } else {
        2
    };
    Ok((0..layers).map(|i| (i + 1) % pattern != 0).collect())
}

fn parse_rope_scaling(v: Option<&Value>, ctx: RopeContext) -> Result<RopeScaling> {
    let Some(v) = v else {
        return Ok(RopeScaling::None);
    };
    if v.is_null() {
        return Ok(RopeScaling::None);
    }
    if !v.is_object() {
        bail!("rope_scaling must be an object, got {v}");
    }
    let kind = match v.get("rope_type").or_else(|| v.get("type")) {
        Some(k) => k
            .as_str()
            .with_context(|| format!("rope_scaling.rope_type must be a string, got {k}"))?,
        None => {
            let keys: Vec<&String> = v
                .as_object()
                .map(|o| o.keys().collect())
                .unwrap_or_default();
            if !keys.is_empty() {
                // transformers reads this as the default rope too, and warns the same way.
                // A few keys, escaped and cut: the file may hold thousands.
                let shown = format!("{:?}", &keys[..keys.len().min(4)]);
                let more = if keys.len() > 4 { " and more" } else { "" };
                eprintln!(
                    "note: rope_scaling has no rope_type, so {}{more} are not used (plain RoPE)",
                    crate::io::printable(&shown)
                );
            }
            "default"
        }
    };
    let factor = || -> Result<f64> {
        match opt_f64(v, "factor") {
            Some(f) if f.is_finite() && f > 0.0 => Ok(f),
            Some(f) => bail!("rope_scaling.factor must be positive, got {f}"),
            None => bail!("rope_scaling.factor missing"),
        }
    };
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
        // Phi-3 configs also spell LongRoPE "su" (and transformers reads "yarn" there as it).
        "longrope" | "su" => longrope(v, &ctx)?,
        "yarn" if ctx.phi3 => longrope(v, &ctx)?,
        other => bail!(
            "rope_scaling type `{other}` is not supported (supported: linear, llama3, longrope)"
        ),
    })
}

fn longrope(v: &Value, ctx: &RopeContext) -> Result<RopeScaling> {
    let factors = |key: &str| -> Result<Vec<f64>> {
        let list: Vec<f64> = v
            .get(key)
            .and_then(Value::as_array)
            .with_context(|| format!("rope_scaling.{key} missing"))?
            .iter()
            .map(|x| x.as_f64().filter(|f| f.is_finite() && *f > 0.0))
            .collect::<Option<_>>()
            .with_context(|| format!("rope_scaling.{key} must hold positive numbers"))?;
        if list.len() != ctx.rotary_dim / 2 {
            bail!(
                "rope_scaling.{key} has {} factors; the rotary dimension {} needs {}",
                list.len(),
                ctx.rotary_dim,
                ctx.rotary_dim / 2
            );
        }
        Ok(list)
    };
    // The top-level key wins over the one inside the rope parameters, as in transformers.
    let original = ctx
        .original_max_position_embeddings
        .or_else(|| opt_usize(v, "original_max_position_embeddings"))
        .filter(|&o| o > 0)
        .context("longrope needs a positive `original_max_position_embeddings`")?;
    let factor =
        opt_f64(v, "factor").unwrap_or(ctx.max_position_embeddings as f64 / original as f64);
    let attention_factor = match opt_f64(v, "attention_factor") {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
    };
    Ok(RopeScaling::LongRope {
        short_factor: factors("short_factor")?,
        long_factor: factors("long_factor")?,
        original_max_position_embeddings: original,
        attention_factor,
    })
}

/// The rotary frequencies of one kind of layer, and how a forward call picks among them.
#[derive(Clone, Debug)]
pub struct RopeFreqs {
    pub inv_freq: Vec<f32>,
    /// LongRoPE's frequencies for a call whose positions reach beyond `.1` tokens.
    pub long: Option<(Vec<f32>, usize)>,
    /// What cos and sin are multiplied by (LongRoPE's attention factor; else 1).
    pub attention_factor: f32,
}

impl RopeFreqs {
    /// The frequencies of a forward call whose largest position id is `max_position`: as
    /// transformers decides it, one choice for every row and position of the call.
    pub fn for_call(&self, max_position: u32) -> &[f32] {
        match &self.long {
            Some((long, original)) if max_position as usize + 1 > *original => long,
            _ => &self.inv_freq,
        }
    }
}

/// θ^(−2i/d) for i < d/2, rounded to f32 as transformers computes it.
fn base_inv_freq(theta: f64, d: usize) -> Vec<f32> {
    (0..d / 2)
        .map(|i| {
            let exponent = ((2 * i) as f32 / d as f32) as f64;
            (1.0 / theta.powf(exponent)) as f32
        })
        .collect()
}

/// The frequencies of the full-attention layers (every layer but Gemma 3's sliding ones): over the
/// rotary dimensions, with the configured scaling.
pub fn rope_freqs(cfg: &ModelConfig) -> RopeFreqs {
    let d = cfg.rotary_dim;
    let base = base_inv_freq(cfg.rope_theta, d);
    let plain = |inv_freq: Vec<f32>| RopeFreqs {
        inv_freq,
        long: None,
        attention_factor: 1.0,
    };
    match &cfg.rope_scaling {
        RopeScaling::None => plain(base),
        RopeScaling::Linear { factor } => {
            plain(base.iter().map(|&f| (f as f64 / factor) as f32).collect())
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_ctx,
        } => {
            let low_wavelen = old_ctx / low_freq_factor;
            let high_wavelen = old_ctx / high_freq_factor;
            plain(
                base.iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_ctx / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        };
                        scaled as f32
                    })
                    .collect(),
            )
        }
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            attention_factor,
        } => {
            // 1 / (factor · θ^(2i/d)), each step in f32 as transformers does it.
            let with = |factors: &[f64]| -> Vec<f32> {
                (0..d / 2)
                    .map(|i| {
                        let exponent = ((2 * i) as f32 / d as f32) as f64;
                        let power = cfg.rope_theta.powf(exponent) as f32;
                        1.0 / (factors[i] as f32 * power)
                    })
                    .collect()
            };
            RopeFreqs {
                inv_freq: with(short_factor),
                long: Some((with(long_factor), *original_max_position_embeddings)),
                attention_factor: *attention_factor as f32,
            }
        }
    }
}

/// Gemma 3's sliding layers: their own base, unscaled, over the whole head.
pub fn local_rope_freqs(cfg: &ModelConfig) -> Option<RopeFreqs> {
    cfg.local_rope_theta.map(|theta| RopeFreqs {
        inv_freq: base_inv_freq(theta, cfg.head_dim),
        long: None,
        attention_factor: 1.0,
    })
}
