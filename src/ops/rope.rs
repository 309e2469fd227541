//! Fused rotary embedding ("rotate half" layout of transformers) with explicit backward, applied to
//! the projection output in its natural [B, T, heads, hd] layout, before heads are transposed:
//!
//! y = x·cos + R(x)·sin,  R([a, b]) = [−b, a];   dx = dy·cos + Rᵀ(dy·sin),  Rᵀ([u, v]) = [v, −u].
//!
//! `ops::apply_rope` is the reference.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernel::{contiguous, with_contiguous};

/// Rotates every head vector of x [B, T, n, hd] by the tables cos, sin [B, T, hd]; with
/// `transpose`, applies the transposed rotation (the backward).
fn rotate(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    heads: usize,
    hd: usize,
    transpose: bool,
) -> Vec<f32> {
    let half = hd / 2;
    let mut y = vec![0f32; x.len()];
    // One chunk per (b, t): its heads share one row of the tables.
    y.par_chunks_mut(heads * hd)
        .zip(x.par_chunks(heads * hd))
        .zip(cos.par_chunks(hd).zip(sin.par_chunks(hd)))
        .for_each(|((y, x), (c, s))| {
            for (y, x) in y.chunks_exact_mut(hd).zip(x.chunks_exact(hd)) {
                for i in 0..half {
                    let (a, b) = (x[i], x[i + half]);
                    if transpose {
                        y[i] = a * c[i] + b * s[i + half];
                        y[i + half] = b * c[i + half] - a * s[i];
                    } else {
                        y[i] = a * c[i] - b * s[i];
                        y[i + half] = b * c[i + half] + a * s[i + half];
                    }
                }
            }
        });
    y
}

struct Rope;

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, t, n, hd) = xl.shape().dims4()?;
        if cl.shape().elem_count() != b * t * hd || sl.shape() != cl.shape() || hd % 2 != 0 {
            candle_core::bail!(
                "rope: tables {:?} do not fit x {:?}",
                cl.shape(),
                xl.shape()
            )
        }
        let x = contiguous(xs, xl, self.name())?;
        let (c, s) = (
            contiguous(cs, cl, self.name())?,
            contiguous(ss, sl, self.name())?,
        );
        Ok((
            CpuStorage::F32(rotate(x, c, s, n, hd, false)),
            xl.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, _, n, hd) = x.dims4()?;
        let name = self.name();
        let dx = with_contiguous(dy, name, |dy| {
            with_contiguous(cos, name, |c| {
                with_contiguous(sin, name, |s| Ok(rotate(dy, c, s, n, hd, true)))
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            None,
            None,
        ))
    }
}

/// Fused rotary embedding of x [B, T, n, hd] with tables cos, sin [B, 1, T, hd] (as
/// `ops::rope_tables` makes them); returns [B, T, n, hd].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope)
}
