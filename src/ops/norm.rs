//! Fused RMSNorm and LayerNorm over the last dimension, one pass per row, with explicit backward:
//!
//! RMSNorm:   x̂ = x·r, r = 1/√(mean(x²)+ε), y = x̂⊙w;
//!            dx = r·(g − x̂·mean(g⊙x̂)) with g = dy⊙w,  dw = Σ_rows dy⊙x̂.
//! LayerNorm: x̂ = (x−μ)·r, r = 1/√(var+ε), y = x̂⊙w + b;
//!            dx = r·(g − mean(g) − x̂·mean(g⊙x̂)),  dw = Σ_rows dy⊙x̂,  db = Σ_rows dy.
//!
//! The composed versions (`ops::rms_norm`, `ops::layer_norm`) are the reference.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernel::{contiguous, rows_chunk, with_contiguous};

/// Per-row statistics: (mean, 1/std) for LayerNorm, (0, 1/rms) for RMSNorm.
fn row_stats(x: &[f32], eps: f32, centred: bool) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = if centred {
        x.iter().sum::<f32>() / n
    } else {
        0.0
    };
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

fn forward(x: &[f32], w: &[f32], b: Option<&[f32]>, eps: f32, centred: bool) -> Vec<f32> {
    let d = w.len();
    let mut out = vec![0f32; x.len()];
    let chunk = rows_chunk(x.len() / d.max(1)) * d;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(out, x)| {
            for (y, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                let (mean, r) = row_stats(x, eps, centred);
                for i in 0..d {
                    y[i] = (x[i] - mean) * r * w[i] + b.map_or(0.0, |b| b[i]);
                }
            }
        });
    out
}

/// (dx, dw, db) for dy; db is all zeros for RMSNorm (not returned).
fn backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    eps: f32,
    centred: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = w.len();
    let mut dx = vec![0f32; x.len()];
    let chunk = rows_chunk(x.len() / d.max(1)) * d;
    // Each chunk of rows returns its partial (dw, db); the partials are summed at the end.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .map(|(dx, (x, dy))| {
            let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
            let mut xhat = vec![0f32; d];
            for ((dx, x), dy) in dx
                .chunks_exact_mut(d)
                .zip(x.chunks_exact(d))
                .zip(dy.chunks_exact(d))
            {
                let (mean, r) = row_stats(x, eps, centred);
                let (mut mean_g, mut mean_gx) = (0f32, 0f32);
                for i in 0..d {
                    xhat[i] = (x[i] - mean) * r;
                    let g = dy[i] * w[i];
                    mean_g += g;
                    mean_gx += g * xhat[i];
                    dw[i] += dy[i] * xhat[i];
                    db[i] += dy[i];
                }
                let (mean_g, mean_gx) = (mean_g / d as f32, mean_gx / d as f32);
                let shift = if centred { mean_g } else { 0.0 };
                for i in 0..d {
                    dx[i] = r * (dy[i] * w[i] - shift - xhat[i] * mean_gx);
                }
            }
            (dw, db)
        })
        .collect();
    let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
    for (pw, pb) in partials {
        dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    (dx, dw, db)
}

/// `backward` on tensors (made contiguous when they are not).
fn tensor_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f32,
    centred: bool,
    op: &str,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    with_contiguous(x, op, |x| {
        with_contiguous(w, op, |w| {
            with_contiguous(dy, op, |dy| Ok(backward(x, w, dy, eps, centred)))
        })
    })
}

fn check(x: &Layout, w: &Layout, op: &str) -> Result<()> {
    let d = x.shape().dims().last().copied().unwrap_or(0);
    if w.shape().dims() != [d] {
        candle_core::bail!("{op}: weight {:?} does not match rows of {d}", w.shape())
    }
    Ok(())
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check(xl, wl, self.name())?;
        let (x, w) = (
            contiguous(xs, xl, self.name())?,
            contiguous(ws, wl, self.name())?,
        );
        let y = forward(x, w, None, self.eps, false);
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = tensor_backward(x, w, dy, self.eps, false, self.name())?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
        ))
    }
}

struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check(xl, wl, self.name())?;
        check(xl, bl, self.name())?;
        let x = contiguous(xs, xl, self.name())?;
        let (w, b) = (
            contiguous(ws, wl, self.name())?,
            contiguous(bs, bl, self.name())?,
        );
        let y = forward(x, w, Some(b), self.eps, true);
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = tensor_backward(x, w, dy, self.eps, true, self.name())?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// Fused `ops::rms_norm`: x [.., D], weight [D].
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
}

/// Fused `ops::layer_norm`: x [.., D], weight and bias [D].
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}
