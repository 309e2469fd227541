//! Fused MLP activations with explicit backward, element by element in one pass:
//!
//! SwiGLU:    y = silu(g)·u,  silu(g) = g·σ(g);
//!            dg = dy·u·σ(g)·(1 + g·(1 − σ(g))),  du = dy·silu(g).
//! GELU-tanh: y = ½x(1 + tanh(c(x + 0.044715x³))), c = √(2/π)   (GPT-2's "gelu_new");
//!            dy/dx = ½(1 + t) + ½x(1 − t²)·c(1 + 3·0.044715x²).
//!
//! The composed versions (`ops::activation` and a product) are the reference.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernel::{contiguous, with_contiguous};
use super::simd::tanh;

/// The MLP activations of the supported families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// The tanh approximation ("gelu_new", "gelu_pytorch_tanh").
    GeluTanh,
    /// The exact erf form ("gelu").
    GeluErf,
    Relu,
}

/// Elements per parallel chunk: large enough to amortise the task, small enough to balance.
const CHUNK: usize = 1 << 14;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + super::simd::exp(-x))
}

crate::widest_fn! {
    fn swiglu_chunk(y: &mut [f32], g: &[f32], u: &[f32]) {
        for i in 0..y.len() {
            y[i] = g[i] * sigmoid(g[i]) * u[i];
        }
    }
}

crate::widest_fn! {
    fn swiglu_grad_chunk(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
        for i in 0..dg.len() {
            let s = sigmoid(g[i]);
            dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            du[i] = dy[i] * g[i] * s;
        }
    }
}

crate::widest_fn! {
    fn gelu_chunk(y: &mut [f32], x: &[f32]) {
        for i in 0..y.len() {
            let v = x[i];
            y[i] = 0.5 * v * (1.0 + tanh(GELU_C * (v + GELU_A * v * v * v)));
        }
    }
}

crate::widest_fn! {
    fn gelu_grad_chunk(dx: &mut [f32], x: &[f32], dy: &[f32]) {
        for i in 0..dx.len() {
            let v = x[i];
            let t = tanh(GELU_C * (v + GELU_A * v * v * v));
            let slope = 0.5 * (1.0 + t)
                + 0.5 * v * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * v * v);
            dx[i] = dy[i] * slope;
        }
    }
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gl.shape() != ul.shape() {
            candle_core::bail!("swiglu: gate {:?} vs up {:?}", gl.shape(), ul.shape())
        }
        let (g, u) = (
            contiguous(gs, gl, self.name())?,
            contiguous(us, ul, self.name())?,
        );
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(y, (g, u))| swiglu_chunk(y, g, u));
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let (dg, du) = with_contiguous(g, name, |g| {
            with_contiguous(u, name, |u| {
                with_contiguous(dy, name, |dy| {
                    let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
                    dg.par_chunks_mut(CHUNK)
                        .zip(du.par_chunks_mut(CHUNK))
                        .zip(g.par_chunks(CHUNK))
                        .zip(u.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
                        .for_each(|(((dg, du), g), (u, dy))| swiglu_grad_chunk(dg, du, g, u, dy));
                    Ok((dg, du))
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dg, g.shape(), g.device())?),
            Some(Tensor::from_vec(du, u.shape(), u.device())?),
        ))
    }
}

const GELU_C: f32 = 0.797_884_6; // √(2/π)
const GELU_A: f32 = 0.044_715;

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| gelu_chunk(y, x));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_contiguous(x, self.name(), |x| {
            with_contiguous(dy, self.name(), |dy| {
                let mut dx = vec![0f32; x.len()];
                dx.par_chunks_mut(CHUNK)
                    .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
                    .for_each(|(dx, (x, dy))| gelu_grad_chunk(dx, x, dy));
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Fused silu(gate)·up.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// Fused tanh-approximated GELU.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluTanh)
}
