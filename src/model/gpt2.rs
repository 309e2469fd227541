//! GPT-2 in one file: learned absolute positions, pre-norm LayerNorm blocks, fused QKV projection
//! and a GELU MLP. transformers stores its projections as Conv1D ([in, out]); we keep torch.nn.Linear's
//! [out, in] and transpose on load and save.

use anyhow::Result;
use candle_core::{Tensor, D};

use super::hparams::ModelConfig;
use super::linear::{Linear, Pass};
use super::weights::WeightMap;
use super::{KvCache, ParamCollector, StepInputs};

#[derive(Clone)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

#[derive(Clone)]
struct Block {
    ln_1: Norm,
    c_attn: Linear,
    c_proj: Linear,
    ln_2: Norm,
    c_fc: Linear,
    mlp_proj: Linear,
}

/// What a block needs of the config.
#[derive(Clone, Copy)]
struct Shape {
    heads: usize,
    head_dim: usize,
    eps: f64,
    activation: crate::ops::Activation,
}

impl Block {
    /// x + attention(ln_1(x)), then + MLP(ln_2(·)): [B, T, D] → [B, T, D].
    fn forward(
        &self,
        s: &Shape,
        x: &Tensor,
        scale: f64,
        attn_bias: &Tensor,
        pass: &Pass,
        cache: Option<(&mut KvCache, usize)>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let path = pass.path;
        let hn = path.layer_norm(x, &self.ln_1.weight, &self.ln_1.bias, s.eps)?;
        let qkv = self.c_attn.forward(&hn, pass)?;
        let split = |j: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(D::Minus1, j * d, d)?
                .reshape((b, t, s.heads, s.head_dim))?
                .transpose(1, 2)
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let (k, v) = match cache {
            Some((c, layer)) => c.append(layer, &k, &v)?,
            None => (k, v),
        };
        let a = path.attention(&q, &k, &v, attn_bias, scale, None)?;
        let x = (x + self.c_proj.forward(&a, pass)?)?;
        let hn = path.layer_norm(&x, &self.ln_2.weight, &self.ln_2.bias, s.eps)?;
        let m = path.activation(&self.c_fc.forward(&hn, pass)?, s.activation)?;
        x + self.mlp_proj.forward(&m, pass)?
    }

    /// Whether a gradient flows into the block's own tensors (else there is nothing to
    /// checkpoint for).
    fn trains(&self) -> bool {
        self.tensors().iter().any(|t| t.is_variable())
    }

    /// Every tensor of the block (those that train get gradients when it is checkpointed).
    fn tensors(&self) -> Vec<Tensor> {
        let mut out = vec![
            self.ln_1.weight.clone(),
            self.ln_1.bias.clone(),
            self.ln_2.weight.clone(),
            self.ln_2.bias.clone(),
        ];
        for l in [&self.c_attn, &self.c_proj, &self.c_fc, &self.mlp_proj] {
            out.extend(l.tensors());
        }
        out
    }
}

#[derive(Clone)]
pub struct Gpt2 {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
    pub(super) lm_head: Option<Tensor>,
}

/// Conv1D weights whose layout differs from torch.nn.Linear.
pub(crate) fn is_conv1d(name: &str) -> bool {
    name.ends_with("attn.c_attn.weight")
        || name.ends_with("attn.c_proj.weight")
        || name.ends_with("mlp.c_fc.weight")
        || name.ends_with("mlp.c_proj.weight")
}

impl Gpt2 {
    pub fn load(cfg: &ModelConfig, w: &mut WeightMap, pc: &mut ParamCollector) -> Result<Self> {
        let (d, v, f, npos) = (
            cfg.hidden_size,
            cfg.vocab_size,
            cfg.intermediate_size,
            cfg.max_position_embeddings,
        );
        let prefix = if w.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let mut get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let full = format!("{prefix}{name}");
            let t = if is_conv1d(name) {
                let stored = [shape[1], shape[0]];
                w.take_stored(&full, &stored)?.t()?.contiguous()?
            } else {
                w.take_stored(&full, shape)?
            };
            Ok(pc.add(&format!("transformer.{name}"), t)?)
        };
        let wte = get("wte.weight", &[v, d])?;
        let wpe = get("wpe.weight", &[npos, d])?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("h.{i}");
            let mut norm = |name: &str| -> Result<Norm> {
                Ok(Norm {
                    weight: get(&format!("{p}.{name}.weight"), &[d])?,
                    bias: get(&format!("{p}.{name}.bias"), &[d])?,
                })
            };
            let ln_1 = norm("ln_1")?;
            let ln_2 = norm("ln_2")?;
            let mut linear = |name: &str, out: usize, inp: usize| -> Result<Linear> {
                Ok(Linear::new(
                    format!("transformer.{p}.{name}"),
                    get(&format!("{p}.{name}.weight"), &[out, inp])?,
                    Some(get(&format!("{p}.{name}.bias"), &[out])?),
                ))
            };
            blocks.push(Block {
                ln_1,
                c_attn: linear("attn.c_attn", 3 * d, d)?,
                c_proj: linear("attn.c_proj", d, d)?,
                ln_2,
                c_fc: linear("mlp.c_fc", f, d)?,
                mlp_proj: linear("mlp.c_proj", d, f)?,
            });
        }
        let ln_f = Norm {
            weight: get("ln_f.weight", &[d])?,
            bias: get("ln_f.bias", &[d])?,
        };
        for i in 0..cfg.num_layers {
            // Causal-mask buffers that old checkpoints carry.
            w.remove(&format!("{prefix}h.{i}.attn.bias"));
            w.remove(&format!("{prefix}h.{i}.attn.masked_bias"));
        }
        let lm_head = if cfg.tie_word_embeddings || cfg.is_sequence_classifier() {
            w.remove("lm_head.weight");
            None
        } else {
            let t = w.take_stored("lm_head.weight", &[v, d])?;
            Some(pc.add("lm_head.weight", t)?)
        };
        Ok(Gpt2 {
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
        })
    }

    pub fn forward_hidden(
        &self,
        cfg: &ModelConfig,
        inp: &StepInputs,
        pass: &Pass,
        mut cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = inp.ids.dims2()?;
        let (h, hd, d) = (cfg.num_heads, cfg.head_dim, cfg.hidden_size);
        let pos: Vec<u32> = inp.position_ids.iter().flatten().copied().collect();
        if let Some(&p) = pos
            .iter()
            .find(|&&p| p as usize >= cfg.max_position_embeddings)
        {
            candle_core::bail!(
                "position {p} is beyond GPT-2's {} learned positions (n_positions)",
                cfg.max_position_embeddings
            );
        }
        let pos = Tensor::from_vec(pos, b * t, inp.ids.device())?;
        let tok = crate::ops::frozen::embedding_rows(&self.wte, &inp.ids.flatten_all()?)?;
        let pos = crate::ops::frozen::embedding_rows(&self.wpe, &pos)?;
        let mut x = (tok + pos)?.reshape((b, t, d))?;
        let shape = Shape {
            heads: h,
            head_dim: hd,
            eps: cfg.norm_eps,
            activation: cfg.activation,
        };
        let path = pass.path;
        for (i, blk) in self.blocks.iter().enumerate() {
            let mut scale = 1.0 / (hd as f64).sqrt();
            if cfg.scale_attn_by_inverse_layer_idx {
                scale /= (i + 1) as f64;
            }
            x = if pass.checkpoint && cache.is_none() && blk.trains() {
                let (blk, bias) = (blk.clone(), inp.attn_bias.clone());
                let params = blk.tensors();
                let f: super::checkpoint::BlockFn = std::sync::Arc::new(move |x, pass| {
                    blk.forward(&shape, x, scale, &bias, pass, None)
                });
                super::checkpoint::run(&x, f, pass, params)?
            } else {
                let layer_cache = cache.as_deref_mut().map(|c| (c, i));
                blk.forward(&shape, &x, scale, &inp.attn_bias, pass, layer_cache)?
            };
        }
        path.layer_norm(&x, &self.ln_f.weight, &self.ln_f.bias, cfg.norm_eps)
    }

    /// Every projection, for adapters and decode copies.
    pub(super) fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.blocks
            .iter_mut()
            .flat_map(|b| [&mut b.c_attn, &mut b.c_proj, &mut b.c_fc, &mut b.mlp_proj])
            .collect()
    }

    pub(super) fn linears(&self) -> Vec<&Linear> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.c_attn, &b.c_proj, &b.c_fc, &b.mlp_proj])
            .collect()
    }

    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.wte)
    }

    /// Tensors under transformers' GPT2LMHeadModel names, Conv1D weights back in [in, out].
    pub fn state_dict(&self, cfg: &ModelConfig) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut out = vec![
            ("transformer.wte.weight".to_string(), self.wte.clone()),
            ("transformer.wpe.weight".to_string(), self.wpe.clone()),
        ];
        for (i, blk) in self.blocks.iter().enumerate() {
            let p = format!("transformer.h.{i}");
            out.push((format!("{p}.ln_1.weight"), blk.ln_1.weight.clone()));
            out.push((format!("{p}.ln_1.bias"), blk.ln_1.bias.clone()));
            for (name, l) in [
                ("attn.c_attn", &blk.c_attn),
                ("attn.c_proj", &blk.c_proj),
                ("mlp.c_fc", &blk.c_fc),
                ("mlp.c_proj", &blk.mlp_proj),
            ] {
                out.push((format!("{p}.{name}.weight"), l.weight.t()?.contiguous()?));
                if let Some(b) = &l.bias {
                    out.push((format!("{p}.{name}.bias"), b.clone()));
                }
            }
            out.push((format!("{p}.ln_2.weight"), blk.ln_2.weight.clone()));
            out.push((format!("{p}.ln_2.bias"), blk.ln_2.bias.clone()));
        }
        out.push((
            "transformer.ln_f.weight".to_string(),
            self.ln_f.weight.clone(),
        ));
        out.push(("transformer.ln_f.bias".to_string(), self.ln_f.bias.clone()));
        if let (false, Some(head)) = (cfg.tie_word_embeddings, &self.lm_head) {
            out.push(("lm_head.weight".to_string(), head.clone()));
        }
        Ok(out)
    }
}
