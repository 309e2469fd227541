//! The Llama family in one file: pre-norm decoder blocks with RMSNorm, rotary positions,
//! grouped-query attention and a gated MLP — Llama, Mistral, Qwen2/3 and SmolLM as they are, and
//! the variations of Gemma 2/3 ((1 + w) norms, four norms per block, scaled embeddings, soft-capped
//! scores, sliding layers with their own RoPE) and Phi-3/4 (packed projections, partial rotary,
//! LongRoPE), each switched on by the config.

use anyhow::Result;
use candle_core::Tensor;

use super::hparams::{local_rope_freqs, rope_freqs, ModelConfig, RopeFreqs};
use super::linear::{Linear, Pass};
use super::weights::WeightMap;
use super::{KvCache, ParamCollector, StepInputs};
use crate::ops;

/// The q, k, v projections: three modules, or Phi-3's one packed `qkv_proj` (q rows, then k, v).
#[derive(Clone)]
enum Qkv {
    Split { q: Linear, k: Linear, v: Linear },
    Packed(Linear),
}

/// The MLP's gate and up projections: two modules, or Phi-3's packed `gate_up_proj` (gate rows
/// first).
#[derive(Clone)]
enum GateUp {
    Split { gate: Linear, up: Linear },
    Packed(Linear),
}

#[derive(Clone)]
struct Attention {
    qkv: Qkv,
    o: Linear,
    /// Qwen3's and Gemma 3's per-head RMSNorm weights [head_dim] of q and k.
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
}

#[derive(Clone)]
struct Mlp {
    gate_up: GateUp,
    down: Linear,
}

#[derive(Clone)]
struct Block {
    /// `input_layernorm`.
    attn_norm: Tensor,
    attn: Attention,
    /// Gemma's norm of the attention output (its `post_attention_layernorm`).
    post_attn_norm: Option<Tensor>,
    /// The norm before the MLP: `post_attention_layernorm`, Gemma's `pre_feedforward_layernorm`.
    mlp_norm: Tensor,
    mlp: Mlp,
    /// Gemma's `post_feedforward_layernorm`.
    post_mlp_norm: Option<Tensor>,
    /// Attends within the sliding window, with the local RoPE where there is one (Gemma).
    sliding: bool,
}

/// What a block needs of the config.
#[derive(Clone, Copy)]
struct Shape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
    eps: f64,
    /// Gemma's norms scale by (1 + w).
    norm_offset: f32,
    activation: ops::Activation,
    attn_scale: f64,
    attn_softcap: Option<f64>,
}

/// The rotary tables and attention bias of one kind of layer, for one forward call.
#[derive(Clone)]
struct LayerInputs {
    cos: Tensor,
    sin: Tensor,
    bias: Tensor,
}

/// What every block of one forward call shares: full layers' inputs, and the sliding layers' when
/// they differ (Gemma).
#[derive(Clone)]
struct CallInputs {
    full: LayerInputs,
    sliding: Option<LayerInputs>,
}

impl CallInputs {
    fn for_block(&self, sliding: bool) -> &LayerInputs {
        match (&self.sliding, sliding) {
            (Some(s), true) => s,
            _ => &self.full,
        }
    }
}

impl Shape {
    fn norm(&self, path: ops::OpsPath, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        if self.norm_offset == 0.0 {
            path.rms_norm(x, w, self.eps)
        } else {
            path.rms_norm(x, &(w + self.norm_offset as f64)?, self.eps)
        }
    }

    /// RoPE on the leading `rotary_dim` dimensions of each head of x [B, T, n, hd] (all of them
    /// but for Phi's partial rotary); returns [B, n, T, hd].
    fn rope(
        &self,
        path: ops::OpsPath,
        x: &Tensor,
        li: &LayerInputs,
    ) -> candle_core::Result<Tensor> {
        let (rd, hd) = (self.rotary_dim, self.head_dim);
        if rd == hd {
            return path.rope(x, &li.cos, &li.sin);
        }
        let rotated = path.rope(&x.narrow(3, 0, rd)?, &li.cos, &li.sin)?;
        let passed = x.narrow(3, rd, hd - rd)?.transpose(1, 2)?;
        Tensor::cat(&[&rotated, &passed], 3)
    }
}

impl Attention {
    /// q, k, v [B, T, n, hd] of the normed input (q and k normed per head where the model does).
    fn project(
        &self,
        s: &Shape,
        hn: &Tensor,
        pass: &Pass,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = hn.dims3()?;
        let hd = s.head_dim;
        let (q, k, v) = match &self.qkv {
            Qkv::Split { q, k, v } => (
                q.forward(hn, pass)?,
                k.forward(hn, pass)?,
                v.forward(hn, pass)?,
            ),
            Qkv::Packed(qkv) => {
                let y = qkv.forward(hn, pass)?;
                let (qd, kvd) = (s.heads * hd, s.kv_heads * hd);
                (
                    y.narrow(2, 0, qd)?,
                    y.narrow(2, qd, kvd)?,
                    y.narrow(2, qd + kvd, kvd)?,
                )
            }
        };
        let heads = |x: Tensor, n: usize, norm: &Option<Tensor>| {
            let x = x.reshape((b, t, n, hd))?;
            match norm {
                Some(w) => s.norm(pass.path, &x, w),
                None => Ok(x),
            }
        };
        Ok((
            heads(q, s.heads, &self.q_norm)?,
            heads(k, s.kv_heads, &self.k_norm)?,
            heads(v, s.kv_heads, &None)?,
        ))
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut out = match &self.qkv {
            Qkv::Split { q, k, v } => vec![q, k, v],
            Qkv::Packed(qkv) => vec![qkv],
        };
        out.push(&self.o);
        out
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = match &mut self.qkv {
            Qkv::Split { q, k, v } => vec![q, k, v],
            Qkv::Packed(qkv) => vec![qkv],
        };
        out.push(&mut self.o);
        out
    }
}

impl Mlp {
    fn forward(&self, s: &Shape, hn: &Tensor, pass: &Pass) -> candle_core::Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Split { gate, up } => (gate.forward(hn, pass)?, up.forward(hn, pass)?),
            GateUp::Packed(gate_up) => {
                let y = gate_up.forward(hn, pass)?;
                let f = y.dim(2)? / 2;
                (
                    y.narrow(2, 0, f)?.contiguous()?,
                    y.narrow(2, f, f)?.contiguous()?,
                )
            }
        };
        self.down
            .forward(&pass.path.gated(&gate, &up, s.activation)?, pass)
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut out = match &self.gate_up {
            GateUp::Split { gate, up } => vec![gate, up],
            GateUp::Packed(gate_up) => vec![gate_up],
        };
        out.push(&self.down);
        out
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = match &mut self.gate_up {
            GateUp::Split { gate, up } => vec![gate, up],
            GateUp::Packed(gate_up) => vec![gate_up],
        };
        out.push(&mut self.down);
        out
    }
}

impl Block {
    /// x + attention(norm(x)), then + MLP(norm(·)) (Gemma also norms each branch's output):
    /// [B, T, D] → [B, T, D].
    fn forward(
        &self,
        s: &Shape,
        x: &Tensor,
        call: &CallInputs,
        pass: &Pass,
        cache: Option<(&mut KvCache, usize)>,
    ) -> candle_core::Result<Tensor> {
        let path = pass.path;
        let li = call.for_block(self.sliding);
        let (q, k, v) = self
            .attn
            .project(s, &s.norm(path, x, &self.attn_norm)?, pass)?;
        let (q, k, v) = (
            s.rope(path, &q, li)?,
            s.rope(path, &k, li)?,
            v.transpose(1, 2)?,
        );
        let (k, v) = match cache {
            Some((c, layer)) => c.append(layer, &k, &v)?,
            None => (k, v),
        };
        let a = path.attention(&q, &k, &v, &li.bias, s.attn_scale, s.attn_softcap)?;
        let mut a = self.attn.o.forward(&a, pass)?;
        if let Some(w) = &self.post_attn_norm {
            a = s.norm(path, &a, w)?;
        }
        let x = (x + a)?;
        let mut m = self
            .mlp
            .forward(s, &s.norm(path, &x, &self.mlp_norm)?, pass)?;
        if let Some(w) = &self.post_mlp_norm {
            m = s.norm(path, &m, w)?;
        }
        x + m
    }

    /// Whether a gradient flows into the block's own tensors (else there is nothing to
    /// checkpoint for).
    fn trains(&self) -> bool {
        self.tensors().iter().any(|t| t.is_variable())
    }

    /// Every tensor of the block (those that train get gradients when it is checkpointed).
    fn tensors(&self) -> Vec<Tensor> {
        let mut out = vec![self.attn_norm.clone(), self.mlp_norm.clone()];
        out.extend(self.post_attn_norm.clone());
        out.extend(self.post_mlp_norm.clone());
        out.extend(self.attn.q_norm.clone());
        out.extend(self.attn.k_norm.clone());
        for l in self.attn.linears().into_iter().chain(self.mlp.linears()) {
            out.extend(l.tensors());
        }
        out
    }
}

#[derive(Clone)]
pub struct Llama {
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    /// None when tied to the input embedding.
    pub(super) lm_head: Option<Tensor>,
    rope: RopeFreqs,
    /// Gemma 3's sliding layers' own RoPE.
    local_rope: Option<RopeFreqs>,
}

/// A block's tensor names: Llama's, or Gemma's four norms.
fn norm_names(sandwich: bool) -> [&'static str; 4] {
    if sandwich {
        [
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ]
    } else {
        ["input_layernorm", "", "post_attention_layernorm", ""]
    }
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
        let [input_norm, post_attn, pre_mlp, post_mlp] = norm_names(cfg.sandwich_norms);
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
            let qkv = if cfg.packed_projections {
                Qkv::Packed(linear("self_attn.qkv_proj", qd + 2 * kvd, d, cfg.qkv_bias)?)
            } else {
                Qkv::Split {
                    q: linear("self_attn.q_proj", qd, d, cfg.qkv_bias)?,
                    k: linear("self_attn.k_proj", kvd, d, cfg.qkv_bias)?,
                    v: linear("self_attn.v_proj", kvd, d, cfg.qkv_bias)?,
                }
            };
            let o = linear("self_attn.o_proj", d, qd, cfg.o_bias)?;
            let gate_up = if cfg.packed_projections {
                GateUp::Packed(linear("mlp.gate_up_proj", 2 * f, d, cfg.mlp_bias)?)
            } else {
                GateUp::Split {
                    gate: linear("mlp.gate_proj", f, d, cfg.mlp_bias)?,
                    up: linear("mlp.up_proj", f, d, cfg.mlp_bias)?,
                }
            };
            let mlp = Mlp {
                gate_up,
                down: linear("mlp.down_proj", d, f, cfg.mlp_bias)?,
            };
            let mut attn = Attention {
                qkv,
                o,
                q_norm: None,
                k_norm: None,
            };
            if cfg.qk_norm {
                let hd = [cfg.head_dim];
                attn.q_norm = Some(get(&format!("{p}.self_attn.q_norm.weight"), &hd)?);
                attn.k_norm = Some(get(&format!("{p}.self_attn.k_norm.weight"), &hd)?);
            }
            let mut norm = |name: &str| -> Result<Option<Tensor>> {
                if name.is_empty() {
                    return Ok(None);
                }
                Ok(Some(get(&format!("{p}.{name}.weight"), &[d])?))
            };
            let (attn_norm, post_attn_norm) = (norm(input_norm)?, norm(post_attn)?);
            let (mlp_norm, post_mlp_norm) = (norm(pre_mlp)?, norm(post_mlp)?);
            blocks.push(Block {
                attn_norm: attn_norm.expect("named"),
                attn,
                post_attn_norm,
                mlp_norm: mlp_norm.expect("named"),
                mlp,
                post_mlp_norm,
                sliding: cfg.sliding_layers[i],
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
            rope: rope_freqs(cfg),
            local_rope: local_rope_freqs(cfg),
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
        let max_position = inp
            .position_ids
            .iter()
            .flatten()
            .copied()
            .max()
            .unwrap_or(0);
        let tables = |f: &RopeFreqs| -> candle_core::Result<(Tensor, Tensor)> {
            let (cos, sin) = ops::rope_tables(f.for_call(max_position), &inp.position_ids)?;
            if f.attention_factor == 1.0 {
                return Ok((cos, sin));
            }
            let a = f.attention_factor as f64;
            Ok(((cos * a)?, (sin * a)?))
        };
        let (cos, sin) = tables(&self.rope)?;
        let full = LayerInputs {
            cos,
            sin,
            bias: inp.attn_bias.clone(),
        };
        let sliding = match (&self.local_rope, &inp.local_attn_bias) {
            (None, None) => None,
            (rope, bias) => {
                let (cos, sin) = match rope {
                    Some(r) => tables(r)?,
                    None => (full.cos.clone(), full.sin.clone()),
                };
                Some(LayerInputs {
                    cos,
                    sin,
                    bias: bias.clone().unwrap_or_else(|| full.bias.clone()),
                })
            }
        };
        let call = CallInputs { full, sliding };
        let shape = Shape {
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            rotary_dim: cfg.rotary_dim,
            eps: cfg.norm_eps,
            norm_offset: cfg.norm_weight_offset,
            activation: cfg.activation,
            attn_scale: cfg.attn_scale,
            attn_softcap: cfg.attn_softcap,
        };
        let mut x = ops::frozen::embedding_rows(&self.embed, &inp.ids.flatten_all()?)?
            .reshape((b, t, cfg.hidden_size))?;
        if let Some(scale) = cfg.embed_scale {
            x = (x * scale as f64)?;
        }
        for (i, blk) in self.blocks.iter().enumerate() {
            x = if pass.checkpoint && cache.is_none() && blk.trains() {
                let (blk, call) = (blk.clone(), call.clone());
                let params = blk.tensors();
                let f: super::checkpoint::BlockFn =
                    std::sync::Arc::new(move |x, pass| blk.forward(&shape, x, &call, pass, None));
                super::checkpoint::run(&x, f, pass, params)?
            } else {
                let layer_cache = cache.as_deref_mut().map(|c| (c, i));
                blk.forward(&shape, &x, &call, pass, layer_cache)?
            };
        }
        shape.norm(pass.path, &x, &self.norm)
    }

    /// Every projection, for adapters and decode copies.
    pub(super) fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.blocks
            .iter_mut()
            .flat_map(|b| {
                let mut out = b.attn.linears_mut();
                out.extend(b.mlp.linears_mut());
                out
            })
            .collect()
    }

    pub(super) fn linears(&self) -> Vec<&Linear> {
        self.blocks
            .iter()
            .flat_map(|b| {
                let mut out = b.attn.linears();
                out.extend(b.mlp.linears());
                out
            })
            .collect()
    }

    /// See `CausalLm::rope_frequencies_change`.
    pub fn rope_frequencies_change(&self, before: u32, now: u32) -> bool {
        !std::ptr::eq(self.rope.for_call(before), self.rope.for_call(now))
    }

    /// The unembedding matrix [V, D].
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Tensors under their transformers names and layouts, for saving.
    pub fn state_dict(&self, cfg: &ModelConfig) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        let names = norm_names(cfg.sandwich_norms);
        for (i, blk) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for l in blk.attn.linears().into_iter().chain(blk.mlp.linears()) {
                // Linear names are the transformers module names.
                out.push((format!("{}.weight", l.name), l.weight.clone()));
                if let Some(b) = &l.bias {
                    out.push((format!("{}.bias", l.name), b.clone()));
                }
            }
            for (name, w) in [("q_norm", &blk.attn.q_norm), ("k_norm", &blk.attn.k_norm)] {
                if let Some(w) = w {
                    out.push((format!("{p}.self_attn.{name}.weight"), w.clone()));
                }
            }
            let norms = [
                Some(&blk.attn_norm),
                blk.post_attn_norm.as_ref(),
                Some(&blk.mlp_norm),
                blk.post_mlp_norm.as_ref(),
            ];
            for (name, w) in names.iter().zip(norms) {
                if let Some(w) = w {
                    out.push((format!("{p}.{name}.weight"), w.clone()));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let (false, Some(head)) = (cfg.tie_word_embeddings, &self.lm_head) {
            out.push(("lm_head.weight".to_string(), head.clone()));
        }
        out
    }
}
