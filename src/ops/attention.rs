//! Fused causal attention with an additive mask bias and grouped-query heads, with explicit
//! backward. Work is split by (batch row, kv head); each task walks its query heads in blocks of
//! `BLOCK` rows, so at most BLOCK × S scores exist per thread — never the [B, H, T, S] tensors of
//! the composed version (`ops::attention`, the reference). Keys that the bias hides from a whole
//! block (the future, left padding, outside a window) are skipped, which halves causal work.
//!
//! Forward, per block:  S = scale·Q Kᵀ + bias,  P = softmax(S),  O = P V,  keep lse = log Σ exp S.
//! Backward, recomputing P = exp(S − lse):
//!   dV += Pᵀ dO,  dP = dO Vᵀ,  dS = P ⊙ (dP − rowsum(dO ⊙ O)),  dQ = scale·dS K,  dK += scale·dSᵀ Q.
//! With Gemma 2's soft-capping, S = c·tanh(scale·Q Kᵀ / c) + bias, and dS is multiplied by the
//! cap's slope 1 − tanh² before it reaches Q and K.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernel::{matmul, with_contiguous, with_storage, Mat, SharedConst, SharedMut};
use super::simd;

/// Query rows per block.
const BLOCK: usize = 64;
/// Bias entries at or below this hide the key (the masks use −1e30).
const HIDDEN: f32 = -1e29;

/// A 4-D strided view [d0, d1, d2, d3] into a storage, the last stride being 1.
#[derive(Clone, Copy)]
struct View {
    base: SharedConst,
    strides: [usize; 4],
}

impl View {
    fn of(storage: &[f32], l: &Layout, what: &str) -> Result<View> {
        let s = l.stride();
        if s.len() != 4 || s[3] != 1 {
            bail!("attention: {what} must be 4-D with contiguous rows, got strides {s:?}")
        }
        Ok(View {
            base: SharedConst(storage[l.start_offset()..].as_ptr()),
            strides: [s[0], s[1], s[2], s[3]],
        })
    }

    /// The [rows, hd] matrix starting at (i, j, row0).
    fn rows(&self, i: usize, j: usize, row0: usize) -> Mat {
        let s = self.strides;
        Mat {
            // SAFETY: in bounds for every (i, j, row0) inside the tensor's shape.
            ptr: unsafe { self.base.at(i * s[0] + j * s[1] + row0 * s[2]) },
            rs: s[2],
            cs: 1,
        }
    }

    /// The same rows, transposed: [hd, rows].
    fn rows_t(&self, i: usize, j: usize, row0: usize) -> Mat {
        let m = self.rows(i, j, row0);
        Mat {
            ptr: m.ptr,
            rs: 1,
            cs: m.rs,
        }
    }
}

fn f32s(st: &CpuStorage) -> Result<&[f32]> {
    match st {
        CpuStorage::F32(v) => Ok(v.as_slice()),
        _ => bail!("attention: expects f32 tensors"),
    }
}

/// Shapes of one call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    s: usize,
    hd: usize,
}

/// The key range [lo, hi) that any of the bias rows leaves visible.
fn visible_keys(bias_rows: &[f32], s: usize) -> (usize, usize) {
    let (mut lo, mut hi) = (s, 0);
    for row in bias_rows.chunks_exact(s) {
        if let Some(first) = row[..lo].iter().position(|&x| x > HIDDEN) {
            lo = first;
        }
        if let Some(last) = row[hi..].iter().rposition(|&x| x > HIDDEN) {
            hi = hi + last + 1;
        }
    }
    if lo >= hi {
        (0, 0)
    } else {
        (lo, hi)
    }
}

/// The query block at (batch row bi, first query q0): its row count, its bias rows, and the
/// visible key range as (first key, number of keys).
fn query_block(bias: &[f32], dims: Dims, bi: usize, q0: usize) -> (usize, &[f32], usize, usize) {
    let (t, s) = (dims.t, dims.s);
    let rows = BLOCK.min(t - q0);
    let bias_rows = &bias[(bi * t + q0) * s..(bi * t + q0 + rows) * s];
    let (lo, end) = visible_keys(bias_rows, s);
    (rows, bias_rows, lo, end - lo)
}

/// Scores of one block, into `p` [rows, n]: scale·Q Kᵀ (soft-capped: c·tanh(·/c), the tanh kept
/// in `tanh_out` for the backward) + bias over keys lo..lo+n.
#[allow(clippy::too_many_arguments)]
fn block_scores(
    p: &mut [f32],
    q: &View,
    k: &View,
    bias_rows: &[f32],
    dims: Dims,
    (b, h, kvh, q0, rows): (usize, usize, usize, usize, usize),
    (lo, n): (usize, usize),
    scale: f32,
    softcap: Option<(f32, &mut [f32])>,
) {
    // SAFETY: p holds rows×n; q and k views cover the requested rows.
    unsafe {
        matmul(
            rows,
            n,
            dims.hd,
            p.as_mut_ptr(),
            n,
            false,
            q.rows(b, h, q0),
            k.rows_t(b, kvh, lo),
            scale,
        );
    }
    if let Some((cap, tanh_out)) = softcap {
        for (x, t) in p[..rows * n].iter_mut().zip(tanh_out.iter_mut()) {
            *t = simd::tanh(*x / cap);
            *x = cap * *t;
        }
    }
    for (r, row) in p[..rows * n].chunks_exact_mut(n).enumerate() {
        let bias = &bias_rows[r * dims.s + lo..r * dims.s + lo + n];
        row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
    }
}

struct Attention {
    bias: Tensor,
    scale: f32,
    softcap: Option<f32>,
    /// log Σ exp(scores) per (b, h, query), saved by the forward for the backward.
    lse: Mutex<Vec<f32>>,
}

impl Attention {
    fn dims(&self, ql: &Layout, kl: &Layout, vl: &Layout) -> Result<Dims> {
        let (b, h, t, hd) = ql.shape().dims4()?;
        let (kb, kv, s, khd) = kl.shape().dims4()?;
        if kb != b || khd != hd || kv == 0 || h % kv != 0 || vl.shape() != kl.shape() {
            bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit",
                ql.shape(),
                kl.shape(),
                vl.shape()
            )
        }
        if self.bias.dims() != [b, 1, t, s] {
            bail!(
                "attention: bias {:?}, expected [{b}, 1, {t}, {s}]",
                self.bias.shape()
            )
        }
        Ok(Dims { b, h, kv, t, s, hd })
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(ql, kl, vl)?;
        let Dims { b, h, kv, t, s, hd } = dims;
        let (q, k, v) = (
            View::of(f32s(qs)?, ql, "q")?,
            View::of(f32s(ks)?, kl, "k")?,
            View::of(f32s(vs)?, vl, "v")?,
        );
        let mut out = vec![0f32; b * t * h * hd];
        let mut lse = vec![0f32; b * h * t];
        let group = h / kv;
        with_contiguous(&self.bias, self.name(), |bias| {
            let (out_ptr, lse_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
            (0..b * kv).into_par_iter().for_each(|task| {
                let (bi, kvh) = (task / kv, task % kv);
                let mut p = vec![0f32; BLOCK.min(t) * s];
                let mut tanh = vec![
                    0f32;
                    if self.softcap.is_some() {
                        BLOCK.min(t) * s
                    } else {
                        0
                    }
                ];
                for hi in kvh * group..(kvh + 1) * group {
                    for q0 in (0..t).step_by(BLOCK) {
                        let (rows, bias_rows, lo, n) = query_block(bias, dims, bi, q0);
                        if n == 0 {
                            continue; // every key hidden: output 0 (the masks never do this)
                        }
                        let at = (bi, hi, kvh, q0, rows);
                        let cap = self.softcap.map(|c| (c, tanh.as_mut_slice()));
                        block_scores(
                            &mut p,
                            &q,
                            &k,
                            bias_rows,
                            dims,
                            at,
                            (lo, n),
                            self.scale,
                            cap,
                        );
                        for (r, row) in p[..rows * n].chunks_exact_mut(n).enumerate() {
                            let (max, sum) = simd::softmax_in_place(row);
                            // SAFETY: (bi, hi, q0 + r) is written by this task only.
                            let lse = max + (sum as f32).ln();
                            unsafe { *lse_ptr.at((bi * h + hi) * t + q0 + r) = lse };
                        }
                        // SAFETY: out rows of head hi belong to this task; p is rows×n.
                        unsafe {
                            matmul(
                                rows,
                                hd,
                                n,
                                out_ptr.at(((bi * t + q0) * h + hi) * hd),
                                h * hd,
                                false,
                                Mat {
                                    ptr: p.as_ptr(),
                                    rs: n,
                                    cs: 1,
                                },
                                v.rows(bi, kvh, lo),
                                1.0,
                            );
                        }
                    }
                }
            });
            Ok(())
        })?;
        *self.lse.lock().expect("lse lock") = lse;
        Ok((CpuStorage::F32(out), Shape::from((b, t, h * hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let lse = self.lse.lock().expect("lse lock");
        let (q, k, v) = (
            rows_contiguous(q)?,
            rows_contiguous(k)?,
            rows_contiguous(v)?,
        );
        let (dq, dk, dv, dims) = with_storage(&q, name, |qv, ql| {
            with_storage(&k, name, |kv_, kl| {
                with_storage(&v, name, |vv, vl| {
                    with_contiguous(out, name, |o| {
                        with_contiguous(dout, name, |d_o| {
                            with_contiguous(&self.bias, name, |bias| {
                                let dims = self.dims(ql, kl, vl)?;
                                let views = (
                                    View::of(qv, ql, "q")?,
                                    View::of(kv_, kl, "k")?,
                                    View::of(vv, vl, "v")?,
                                );
                                let (dq, dk, dv) =
                                    self.backward(dims, views, o, d_o, bias, &lse)?;
                                Ok((dq, dk, dv, dims))
                            })
                        })
                    })
                })
            })
        })?;
        let Dims {
            b, h, kv, t, s, hd, ..
        } = dims;
        let dev = q.device();
        // Gradients in [B, T, heads, hd] memory, handed back as [B, heads, T, hd] views: the
        // layout the projections produced, so no copy is needed on the way back.
        Ok((
            Some(Tensor::from_vec(dq, (b, t, h, hd), dev)?.transpose(1, 2)?),
            Some(Tensor::from_vec(dk, (b, s, kv, hd), dev)?.transpose(1, 2)?),
            Some(Tensor::from_vec(dv, (b, s, kv, hd), dev)?.transpose(1, 2)?),
        ))
    }
}

type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);

impl Attention {
    fn backward(
        &self,
        dims: Dims,
        (q, k, v): (View, View, View),
        out: &[f32],
        dout: &[f32],
        bias: &[f32],
        lse: &[f32],
    ) -> Result<Grads> {
        let Dims { b, h, kv, t, s, hd } = dims;
        let group = h / kv;
        let scale = self.scale;
        let mut dq = vec![0f32; b * t * h * hd];
        let mut dk = vec![0f32; b * s * kv * hd];
        let mut dv = vec![0f32; b * s * kv * hd];
        let (dq_ptr, dk_ptr, dv_ptr) = (
            SharedMut(dq.as_mut_ptr()),
            SharedMut(dk.as_mut_ptr()),
            SharedMut(dv.as_mut_ptr()),
        );
        (0..b * kv).into_par_iter().for_each(|task| {
            let (bi, kvh) = (task / kv, task % kv);
            let mut p = vec![0f32; BLOCK.min(t) * s];
            let mut dp = vec![0f32; BLOCK.min(t) * s];
            let mut tanh = vec![
                0f32;
                if self.softcap.is_some() {
                    BLOCK.min(t) * s
                } else {
                    0
                }
            ];
            // This task's rows of dK and dV: [S, hd] at row stride KV·hd.
            let kv_row0 = (bi * s * kv + kvh) * hd;
            for hi in kvh * group..(kvh + 1) * group {
                for q0 in (0..t).step_by(BLOCK) {
                    let (rows, bias_rows, lo, n) = query_block(bias, dims, bi, q0);
                    if n == 0 {
                        continue;
                    }
                    block_scores(
                        &mut p,
                        &q,
                        &k,
                        bias_rows,
                        dims,
                        (bi, hi, kvh, q0, rows),
                        (lo, n),
                        scale,
                        self.softcap.map(|c| (c, tanh.as_mut_slice())),
                    );
                    let row_of = |r: usize| ((bi * t + q0 + r) * h + hi) * hd;
                    for (r, row) in p[..rows * n].chunks_exact_mut(n).enumerate() {
                        let l = lse[(bi * h + hi) * t + q0 + r];
                        simd::exp_shifted(row, l);
                    }
                    let d_o = Mat {
                        ptr: dout[row_of(0)..].as_ptr(),
                        rs: h * hd,
                        cs: 1,
                    };
                    // SAFETY: p, dp hold rows×n; dQ rows of head hi and dK/dV rows of kv head
                    // kvh belong to this task only; all views cover the rows they are asked for.
                    unsafe {
                        // dP = dO Vᵀ
                        matmul(
                            rows,
                            n,
                            hd,
                            dp.as_mut_ptr(),
                            n,
                            false,
                            d_o,
                            v.rows_t(bi, kvh, lo),
                            1.0,
                        );
                        // dV += Pᵀ dO
                        let p_t = Mat {
                            ptr: p.as_ptr(),
                            rs: 1,
                            cs: n,
                        };
                        matmul(
                            n,
                            hd,
                            rows,
                            dv_ptr.at(kv_row0 + lo * kv * hd),
                            kv * hd,
                            true,
                            p_t,
                            d_o,
                            1.0,
                        );
                    }
                    // dS = P ⊙ (dP − rowsum(dO ⊙ O)), in dp.
                    for r in 0..rows {
                        let at = row_of(r);
                        let delta: f32 = dout[at..at + hd]
                            .iter()
                            .zip(&out[at..at + hd])
                            .map(|(a, b)| a * b)
                            .sum();
                        let (pr, dr) = (&p[r * n..(r + 1) * n], &mut dp[r * n..(r + 1) * n]);
                        dr.iter_mut()
                            .zip(pr)
                            .for_each(|(d, p)| *d = p * (*d - delta));
                        if self.softcap.is_some() {
                            let tr = &tanh[r * n..(r + 1) * n];
                            dr.iter_mut().zip(tr).for_each(|(d, t)| *d *= 1.0 - t * t);
                        }
                    }
                    // SAFETY: as above.
                    unsafe {
                        let ds = Mat {
                            ptr: dp.as_ptr(),
                            rs: n,
                            cs: 1,
                        };
                        let ds_t = Mat {
                            ptr: dp.as_ptr(),
                            rs: 1,
                            cs: n,
                        };
                        // dQ = scale·dS K
                        matmul(
                            rows,
                            hd,
                            n,
                            dq_ptr.at(row_of(0)),
                            h * hd,
                            false,
                            ds,
                            k.rows(bi, kvh, lo),
                            scale,
                        );
                        // dK += scale·dSᵀ Q
                        matmul(
                            n,
                            hd,
                            rows,
                            dk_ptr.at(kv_row0 + lo * kv * hd),
                            kv * hd,
                            true,
                            ds_t,
                            q.rows(bi, hi, q0),
                            scale,
                        );
                    }
                }
            }
        });
        Ok((dq, dk, dv))
    }
}

/// The tensor itself when its rows (last dimension) are contiguous, else a contiguous copy.
fn rows_contiguous(x: &Tensor) -> Result<Tensor> {
    if x.stride().last() == Some(&1) {
        Ok(x.clone())
    } else {
        x.contiguous()
    }
}

/// Fused `ops::attention`: q [B, H, T, hd], k and v [B, KV, S, hd] (any strides with contiguous
/// rows, e.g. transposed views of the projections), bias [B, 1, T, S] → [B, T, H·hd].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let op = Attention {
        bias: bias.contiguous()?.detach(),
        scale: scale as f32,
        softcap: softcap.map(|c| c as f32),
        lse: Mutex::new(vec![]),
    };
    rows_contiguous(q)?.apply_op3(&rows_contiguous(k)?, &rows_contiguous(v)?, op)
}
