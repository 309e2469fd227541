//! GGUF checkpoints (llama.cpp): metadata → config, dequantised tensors → transformers names.
//!
//! llama.cpp's converter permutes the rows of the Llama Q and K projections within each head (it
//! interleaves the two rotary halves); we undo that so the weights match transformers' layout.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::path::Path;

use super::hparams::ModelConfig;
use super::weights::WeightMap;

pub struct GgufFile {
    pub content: Content,
    pub arch: String,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        crate::io::require_regular_file(path)?;
        let mut f =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let file_len = f.metadata()?.len();
        // candle's reader panics on a few hostile headers (a zero `general.alignment`): contain it.
        let read = crate::io::without_panics(|| Content::read(&mut f)).map_err(|_| {
            anyhow::anyhow!(
                "{}: not a valid GGUF file (its header is impossible, e.g. a zero alignment)",
                path.display()
            )
        })?;
        let content =
            read.map_err(|e| anyhow::anyhow!("{}: not a valid GGUF file: {e}", path.display()))?;
        // Every tensor must lie inside the file before anything is allocated for it.
        for (name, info) in &content.tensor_infos {
            let dtype = info.ggml_dtype;
            // An empty tensor gives candle a dangling, misaligned buffer to cast (undefined
            // behaviour); no model has one.
            if info.shape.dims().contains(&0) {
                bail!(
                    "{}: tensor `{name}` has a zero dimension (shape {:?})",
                    path.display(),
                    info.shape.dims()
                );
            }
            let bytes = info
                .shape
                .dims()
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .and_then(|n| (n / dtype.block_size()).checked_mul(dtype.type_size()));
            let end = bytes.and_then(|b| {
                content
                    .tensor_data_offset
                    .checked_add(info.offset)?
                    .checked_add(b as u64)
            });
            if end.is_none_or(|e| e > file_len) {
                bail!(
                    "{}: tensor `{name}` (shape {:?}, {dtype:?}) does not fit in the file ({file_len} bytes)",
                    path.display(),
                    info.shape.dims()
                );
            }
        }
        let arch = match content.metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => bail!(
                "{}: GGUF metadata has no general.architecture",
                path.display()
            ),
        };
        Ok(GgufFile { content, arch })
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        match self.meta(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        self.meta(key).and_then(|v| {
            v.to_u64()
                .ok()
                .or_else(|| v.to_u32().ok().map(u64::from))
                .or_else(|| v.to_i32().ok().map(|x| x as u64))
        })
    }

    fn meta_f64(&self, key: &str) -> Option<f64> {
        self.meta(key)
            .and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
    }

    fn arch_u64(&self, key: &str) -> Result<u64> {
        let full = format!("{}.{key}", self.arch);
        self.meta_u64(&full)
            .with_context(|| format!("GGUF metadata key `{full}` missing"))
    }

    /// A transformers-style config.json for this checkpoint.
    pub fn config(&self) -> Result<ModelConfig> {
        let (model_type, architecture) = match self.arch.as_str() {
            "llama" => ("llama", "LlamaForCausalLM"),
            "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
            other => bail!("unsupported GGUF architecture `{other}` (supported: llama, qwen2)"),
        };
        let a = &self.arch;
        let heads = self.arch_u64("attention.head_count")?;
        let hidden = self.arch_u64("embedding_length")?;
        let vocab = match self.meta_u64(&format!("{a}.vocab_size")) {
            Some(v) => v,
            None => match self.meta("tokenizer.ggml.tokens") {
                Some(Value::Array(t)) => t.len() as u64,
                _ => bail!("GGUF metadata has neither {a}.vocab_size nor tokenizer.ggml.tokens"),
            },
        };
        let tied = !self.content.tensor_infos.contains_key("output.weight");
        let mut raw = json!({
            "architectures": [architecture],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": self.arch_u64("feed_forward_length")?,
            "num_attention_heads": heads,
            "num_hidden_layers": self.arch_u64("block_count")?,
            "num_key_value_heads": self.meta_u64(&format!("{a}.attention.head_count_kv")).unwrap_or(heads),
            "head_dim": self.meta_u64(&format!("{a}.attention.key_length")).unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
            "max_position_embeddings": self.meta_u64(&format!("{a}.context_length")).unwrap_or(2048),
            "rms_norm_eps": self.meta_f64(&format!("{a}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
            "rope_theta": self.meta_f64(&format!("{a}.rope.freq_base")).unwrap_or(10000.0),
            "vocab_size": vocab,
            "tie_word_embeddings": tied,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        for (key, name) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ] {
            if let Some(id) = self.meta_u64(key) {
                raw[name] = json!(id);
            }
        }
        if let Some(ftype) = self.meta_f64(&format!("{a}.rope.scaling.factor")) {
            if self.meta_str(&format!("{a}.rope.scaling.type")) == Some("linear") {
                raw["rope_scaling"] = json!({"rope_type": "linear", "factor": ftype});
            }
        }
        ModelConfig::from_json(raw)
    }

    /// Dequantises every tensor to f32 under transformers' names, undoing the Q/K permutation.
    pub fn weights(&self, path: &Path, cfg: &ModelConfig) -> Result<WeightMap> {
        let mut f =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let permute = self.arch == "llama";
        let mut map = WeightMap::default();
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let Some(hf) = hf_name(name) else {
                if name == "rope_freqs.weight" {
                    bail!(
                        "{}: GGUF rope_freqs (Llama 3.1 rope scaling) is not supported",
                        path.display()
                    );
                }
                bail!("{}: unexpected GGUF tensor `{name}`", path.display());
            };
            let q = self
                .content
                .tensor(&mut f, name, &Device::Cpu)
                .map_err(|e| {
                    anyhow::anyhow!("{}: cannot read tensor `{name}`: {e}", path.display())
                })?;
            let mut t = q.dequantize(&Device::Cpu).map_err(|e| {
                anyhow::anyhow!("{}: cannot dequantise `{name}`: {e}", path.display())
            })?;
            if permute && name.ends_with("attn_q.weight") {
                t = unpermute_rows(&t, cfg.num_heads)?;
            } else if permute && name.ends_with("attn_k.weight") {
                t = unpermute_rows(&t, cfg.num_kv_heads)?;
            } else if permute && (name.ends_with("attn_q.bias") || name.ends_with("attn_k.bias")) {
                bail!(
                    "{}: permuted Q/K biases in GGUF are not supported",
                    path.display()
                );
            }
            map.insert(hf, t, path.to_path_buf());
        }
        Ok(map)
    }
}

/// Inverse of llama.cpp's `permute`: rows grouped per head as (half, pair) go back to (pair, half).
fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let half = rows / heads / 2;
    Ok(t.reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

fn hf_name(gguf: &str) -> Option<String> {
    let simple = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf_part = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_part}.{kind}"))
}
