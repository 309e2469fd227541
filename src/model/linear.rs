use candle_core::{Result, Tensor};

use crate::ops::OpsPath;

/// y = x·Wᵀ + b with W stored [out, in] (torch.nn.Linear's layout).
#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor, path: OpsPath) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (rows, inp) = (
            dims[..dims.len() - 1].iter().product::<usize>(),
            dims[dims.len() - 1],
        );
        let y = path.matmul_t(&x.reshape((rows, inp))?, &self.weight)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = self.weight.dim(0)?;
        y.reshape(out)
    }
}
