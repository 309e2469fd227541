use candle_core::{Result, Tensor};
use std::sync::Arc;

use crate::ops::skinny::{self, Bf16Weights};
use crate::ops::OpsPath;

/// y = x·Wᵀ + b with W stored [out, in] (torch.nn.Linear's layout), and optionally a frozen bf16
/// copy of W that decoding steps stream instead (`CausalLm::use_bf16_decode_weights`).
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub decode: Option<Arc<Bf16Weights>>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            decode: None,
        }
    }

    pub fn forward(&self, x: &Tensor, path: OpsPath) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (rows, inp) = (
            dims[..dims.len() - 1].iter().product::<usize>(),
            dims[dims.len() - 1],
        );
        let x2 = x.reshape((rows, inp))?;
        let y = match &self.decode {
            Some(w16) if rows <= skinny::MAX_ROWS && skinny::decoding() => {
                skinny::matmul_t_bf16(&x2, w16)?
            }
            _ => path.matmul_t(&x2, &self.weight)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = self.weight.dim(0)?;
        y.reshape(out)
    }
}
