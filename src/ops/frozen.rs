//! x·Wᵀ with W frozen (a LoRA run's base, a reward model): autograd's matmul would also compute
//! ∂L/∂W — a third of a training step's GEMM work — and throw it away. This op carries W inside
//! it, so the graph sees only x and the backward pass computes ∂L/∂x = ∂L/∂y · W alone.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::kernel::{contiguous, with_contiguous};
use super::OpsPath;

struct FrozenMatmul {
    w: Tensor,
    path: OpsPath,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul-t"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        // The input is wrapped as a graph-free tensor (one copy of it: rows × in values, small
        // next to the product's rows × in × out work) and multiplied by the dispatching kernels.
        let x = contiguous(storage, layout, self.name())?;
        let x = Tensor::from_slice(x, layout.shape(), &candle_core::Device::Cpu)?;
        let y = self.path.matmul_t(&x, &self.w)?;
        let out = with_contiguous(&y, self.name(), |v| Ok(v.to_vec()))?;
        Ok((CpuStorage::F32(out), y.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.matmul(&self.w)?))
    }
}

/// x [m, k] · wᵀ for a w [n, k] that takes no gradient.
pub fn matmul_t(x: &Tensor, w: &Tensor, path: OpsPath) -> Result<Tensor> {
    x.contiguous()?
        .apply_op1(FrozenMatmul { w: w.clone(), path })
}
