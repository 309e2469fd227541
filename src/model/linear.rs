use candle_core::{Result, Tensor};
use std::sync::Arc;

use super::lora::{Dropout, LoraAdapter};
use crate::ops::skinny::{self, Bf16Weights};
use crate::ops::OpsPath;

/// How one forward pass runs: the ops path, and whether LoRA adapters apply (a LoRA run's
/// reference is its base with them off) with training dropout.
#[derive(Clone)]
pub struct Pass {
    pub path: OpsPath,
    pub adapters: bool,
    pub dropout: Option<Dropout>,
    /// Recompute each block's activations in the backward pass instead of keeping them
    /// (training only; `gradient_checkpointing`).
    pub checkpoint: bool,
}

/// y = x·Wᵀ + b (+ a LoRA update) with W stored [out, in] (torch.nn.Linear's layout), and
/// optionally a frozen bf16 copy of W that decoding steps stream instead
/// (`CausalLm::use_bf16_decode_weights`).
#[derive(Clone)]
pub struct Linear {
    /// The module's transformers name (`model.layers.0.self_attn.q_proj`): what LoRA targets
    /// match and what PEFT calls it.
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub decode: Option<Arc<Bf16Weights>>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn new(name: String, weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            name,
            weight,
            bias,
            decode: None,
            lora: None,
        }
    }

    /// Weight, bias and adapter tensors.
    pub fn tensors(&self) -> Vec<Tensor> {
        let mut out = vec![self.weight.clone()];
        out.extend(self.bias.clone());
        if let Some(l) = &self.lora {
            out.push(l.a.clone());
            out.push(l.b.clone());
        }
        out
    }

    /// (in, out) features.
    pub fn features(&self) -> Result<(usize, usize)> {
        let (out, inp) = self.weight.dims2()?;
        Ok((inp, out))
    }

    pub fn forward(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (rows, inp) = (
            dims[..dims.len() - 1].iter().product::<usize>(),
            dims[dims.len() - 1],
        );
        let x2 = x.reshape((rows, inp))?;
        let mut y = match &self.decode {
            Some(w16) if skinny::takes(rows) && skinny::decoding() => {
                skinny::matmul_t_bf16(&x2, w16)?
            }
            // A frozen weight under an input that takes gradients: skip ∂L/∂W; a bf16-stored
            // one is widened block-wise inside the product.
            _ if self.weight.dtype() == candle_core::DType::BF16
                || (!self.weight.track_op() && x2.track_op()) =>
            {
                crate::ops::frozen::matmul_t(&x2, &self.weight, pass.path)?
            }
            _ => pass.path.matmul_t(&x2, &self.weight)?,
        };
        if let (Some(lora), true) = (&self.lora, pass.adapters) {
            y = (y + lora.forward(&x2, pass.dropout.as_ref())?)?;
        }
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = self.weight.dim(0)?;
        y.reshape(out)
    }
}
