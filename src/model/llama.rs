//! The Llama family (Llama, Mistral, Qwen2, SmolLM) in one file: pre-norm decoder blocks with
//! RMSNorm, rotary positions, grouped-query attention and a SwiGLU MLP.

use anyhow::Result;
use candle_core::Tensor;

use super::hparams::ModelConfig;
use super::linear::{Linear, Pass};
use super::weights::WeightMap;
use super::{KvCache, ParamCollector, StepInputs};
use crate::ops;

#[derive(Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Qwen3's per-head RMSNorm weights [head_dim] of q and k.
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
}

#[derive(Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

#[derive(Clone)]
struct Block {
    attn_norm: Tensor,
    attn: Attention,
    mlp_norm: Tensor,
    mlp: Mlp,
}

/// What a block needs of the config.
#[derive(Clone, Copy)]
struct Shape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    activation: ops::Activation,
}

impl Block {
    /// x + attention(norm(x)), then + MLP(norm(·)): [B, T, D] → [B, T, D].
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        s: &Shape,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        attn_bias: &Tensor,
        pass: &Pass,
        cache: Option<(&mut KvCache, usize)>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (path, hd) = (pass.path, s.head_dim);
        let hn = path.rms_norm(x, &self.attn_norm, s.eps)?;
        let heads = |l: &Linear, n: usize, norm: &Option<Tensor>| {
            let x = l.forward(&hn, pass)?.reshape((b, t, n, hd))?;
            match norm {
                Some(w) => path.rms_norm(&x, w, s.eps),
                None => Ok(x),
            }
        };
        let q = path.rope(&heads(&self.attn.q, s.heads, &self.attn.q_norm)?, cos, sin)?;
        let k = path.rope(
            &heads(&self.attn.k, s.kv_heads, &self.attn.k_norm)?,
            cos,
            sin,
        )?;
        let v = heads(&self.attn.v, s.kv_heads, &None)?.transpose(1, 2)?;
        let (k, v) = match cache {
            Some((c, layer)) => c.append(layer, &k, &v)?,
            None => (k, v),
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let a = path.attention(&q, &k, &v, attn_bias, scale)?;
        let x = (x + self.attn.o.forward(&a, pass)?)?;
        let hn = path.rms_norm(&x, &self.mlp_norm, s.eps)?;
        let gate = self.mlp.gate.forward(&hn, pass)?;
        let up = self.mlp.up.forward(&hn, pass)?;
        x + self
            .mlp
            .down
            .forward(&path.gated(&gate, &up, s.activation)?, pass)?
    }

    /// Whether a gradient flows into the block's own tensors (else there is nothing to
    /// checkpoint for).
    fn trains(&self) -> bool {
        self.tensors().iter().any(|t| t.is_variable())
    }

    /// Every tensor of the block (those that train get gradients when it is checkpointed).
    fn tensors(&self) -> Vec<Tensor> {
        let (a, m) = (&self.attn, &self.mlp);
        let mut out = vec![self.attn_norm.clone(), self.mlp_norm.clone()];
        out.extend(self.attn.q_norm.clone());
        out.extend(self.attn.k_norm.clone());
        for l in [&a.q, &a.k, &a.v, &a.o, &m.gate, &m.up, &m.down] {
            out.extend(l.tensors());
        }
        out
    }
}

pub struct Llama {
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    /// None when tied to the input embedding.
    pub(super) lm_head: Option<Tensor>,
    inv_freq: Vec<f32>,
}

impl Llama {
    pub fn load(cfg: &ModelConfig, w: &mut WeightMap, pc: &mut ParamCollector) -> Result<Self> {
        let (d, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (qd, kvd) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        // Checkpoints of the bare LlamaModel have no "model." prefix.
        let prefix = if w.contains("model.embed_tokens.weight") {
            "model."
        } else {
            ""
        };
        let mut get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = w.take_stored(&format!("{prefix}{name}"), shape)?;
            Ok(pc.add(&format!("model.{name}"), t)?)
        };
        let embed = get("embed_tokens.weight", &[v, d])?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("layers.{i}");
            let mut linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
                Ok(Linear::new(
                    format!("model.{p}.{name}"),
                    get(&format!("{p}.{name}.weight"), &[out, inp])?,
                    if bias {
                        Some(get(&format!("{p}.{name}.bias"), &[out])?)
                    } else {
                        None
                    },
                ))
            };
            let attn = Attention {
                q: linear("self_attn.q_proj", qd, d, cfg.qkv_bias)?,
                k: linear("self_attn.k_proj", kvd, d, cfg.qkv_bias)?,
                v: linear("self_attn.v_proj", kvd, d, cfg.qkv_bias)?,
                o: linear("self_attn.o_proj", d, qd, cfg.o_bias)?,
                q_norm: None,
                k_norm: None,
            };
            let mlp = Mlp {
                gate: linear("mlp.gate_proj", f, d, cfg.mlp_bias)?,
                up: linear("mlp.up_proj", f, d, cfg.mlp_bias)?,
                down: linear("mlp.down_proj", d, f, cfg.mlp_bias)?,
            };
            let mut attn = attn;
            if cfg.qk_norm {
                let hd = [cfg.head_dim];
                attn.q_norm = Some(get(&format!("{p}.self_attn.q_norm.weight"), &hd)?);
                attn.k_norm = Some(get(&format!("{p}.self_attn.k_norm.weight"), &hd)?);
            }
            blocks.push(Block {
                attn_norm: get(&format!("{p}.input_layernorm.weight"), &[d])?,
                attn,
                mlp_norm: get(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                mlp,
            });
        }
        let norm = get("norm.weight", &[d])?;
        let lm_head = if cfg.tie_word_embeddings || cfg.is_sequence_classifier() {
            w.remove("lm_head.weight");
            None
        } else {
            let t = w.take_stored("lm_head.weight", &[v, d])?;
            Some(pc.add("lm_head.weight", t)?)
        };
        Ok(Llama {
            embed,
            blocks,
            norm,
            lm_head,
            inv_freq: super::hparams::rope_inv_freq(cfg),
        })
    }

    /// Final hidden states [B, T, D] (after the last norm).
    pub fn forward_hidden(
        &self,
        cfg: &ModelConfig,
        inp: &StepInputs,
        pass: &Pass,
        mut cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = inp.ids.dims2()?;
        let (cos, sin) = ops::rope_tables(&self.inv_freq, &inp.position_ids)?;
        let shape = Shape {
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            eps: cfg.norm_eps,
            activation: cfg.activation,
        };
        let mut x = ops::frozen::embedding_rows(&self.embed, &inp.ids.flatten_all()?)?
            .reshape((b, t, cfg.hidden_size))?;
        for (i, blk) in self.blocks.iter().enumerate() {
            x = if pass.checkpoint && cache.is_none() && blk.trains() {
                let (blk, cos, sin, bias) =
                    (blk.clone(), cos.clone(), sin.clone(), inp.attn_bias.clone());
                let params = blk.tensors();
                let f: super::checkpoint::BlockFn = std::sync::Arc::new(move |x, pass| {
                    blk.forward(&shape, x, &cos, &sin, &bias, pass, None)
                });
                super::checkpoint::run(&x, f, pass, params)?
            } else {
                let layer_cache = cache.as_deref_mut().map(|c| (c, i));
                blk.forward(&shape, &x, &cos, &sin, &inp.attn_bias, pass, layer_cache)?
            };
        }
        pass.path.rms_norm(&x, &self.norm, cfg.norm_eps)
    }

    /// Every projection, for adapters and decode copies.
    pub(super) fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.blocks
            .iter_mut()
            .flat_map(|b| {
                let (a, m) = (&mut b.attn, &mut b.mlp);
                [
                    &mut a.q,
                    &mut a.k,
                    &mut a.v,
                    &mut a.o,
                    &mut m.gate,
                    &mut m.up,
                    &mut m.down,
                ]
            })
            .collect()
    }

    pub(super) fn linears(&self) -> Vec<&Linear> {
        self.blocks
            .iter()
            .flat_map(|b| {
                let (a, m) = (&b.attn, &b.mlp);
                [&a.q, &a.k, &a.v, &a.o, &m.gate, &m.up, &m.down]
            })
            .collect()
    }

    /// The unembedding matrix [V, D].
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Tensors under their transformers names and layouts, for saving.
    pub fn state_dict(&self, cfg: &ModelConfig) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (i, blk) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let mut lin = |name: &str, l: &Linear| {
                debug_assert!(l.name.ends_with(name));
                out.push((format!("{p}.{name}.weight"), l.weight.clone()));
                if let Some(b) = &l.bias {
                    out.push((format!("{p}.{name}.bias"), b.clone()));
                }
            };
            lin("self_attn.q_proj", &blk.attn.q);
            lin("self_attn.k_proj", &blk.attn.k);
            lin("self_attn.v_proj", &blk.attn.v);
            lin("self_attn.o_proj", &blk.attn.o);
            lin("mlp.gate_proj", &blk.mlp.gate);
            lin("mlp.up_proj", &blk.mlp.up);
            lin("mlp.down_proj", &blk.mlp.down);
            for (name, w) in [("q_norm", &blk.attn.q_norm), ("k_norm", &blk.attn.k_norm)] {
                if let Some(w) = w {
                    out.push((format!("{p}.self_attn.{name}.weight"), w.clone()));
                }
            }
            out.push((format!("{p}.input_layernorm.weight"), blk.attn_norm.clone()));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                blk.mlp_norm.clone(),
            ));
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let (false, Some(head)) = (cfg.tie_word_embeddings, &self.lm_head) {
            out.push(("lm_head.weight".to_string(), head.clone()));
        }
        out
    }
}
