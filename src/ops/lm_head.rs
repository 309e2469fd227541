//! Fused "LM head + log-softmax + gather": log p(t_i) = h_i·w_{t_i} − log Σ_v exp(h_i·w_v), computed
//! in chunks of rows so that the [N, V] logits (V ≈ 50k) never exist at once — in the forward or
//! in the backward, which recomputes each chunk's logits instead of storing them.
//! The composed reference is `logits → ops::gather_logprobs`; tests check the two agree.
//! Gemma's final soft-capping, z = c·tanh(h·w / c), happens on each chunk's logits, and its slope
//! 1 − (z/c)² multiplies the logits' gradient in the backward.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::simd;
use super::skinny::Bf16View;

/// Rows per chunk: a chunk's logits are ROWS × V floats (≈ 25 MB for V = 49k).
const ROWS: usize = 128;

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("lm_head_logprobs: {what} must be f32")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("lm_head_logprobs: {what} must be contiguous")
    };
    Ok(&v[a..b])
}

/// logits[r, v] = h[r]·w[v] for `rows` rows starting at `h` (row-major [rows, d]).
fn chunk_logits(h: &[f32], w: &[f32], rows: usize, vocab: usize, d: usize, out: &mut [f32]) {
    // SAFETY: all pointers cover the stated extents: h is rows×d, w is vocab×d (read as its
    // transpose via strides), out is rows×vocab.
    unsafe {
        gemm::gemm(
            rows,
            vocab,
            d,
            out.as_mut_ptr(),
            1,
            vocab as isize,
            false,
            h.as_ptr(),
            1,
            d as isize,
            w.as_ptr(),
            d as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(candle_core::utils::get_num_threads()),
        );
    }
}

/// Turns each row of logits into (softmax, log-sum-exp) in place: row ← exp(row − lse).
fn softmax_rows(logits: &mut [f32], vocab: usize) -> Vec<f32> {
    logits
        .par_chunks_mut(vocab)
        .map(|row| {
            let (max, sum) = simd::softmax_in_place(row);
            max + sum.ln() as f32
        })
        .collect()
}

/// The op; a bf16 unembedding's forward keeps each row's log-sum-exp for the backward.
#[derive(Default)]
struct LmHeadLogprobs {
    softcap: Option<f32>,
    lse: std::sync::Mutex<Vec<f32>>,
}

/// logits ← c·tanh(logits / c) in place; with `slope`, also its derivative 1 − tanh² there.
fn soft_cap(logits: &mut [f32], cap: Option<f32>, slope: Option<&mut [f32]>) {
    let Some(c) = cap else { return };
    match slope {
        Some(slope) => logits
            .par_chunks_mut(1 << 12)
            .zip(slope.par_chunks_mut(1 << 12))
            .for_each(|(z, s)| {
                for (z, s) in z.iter_mut().zip(s) {
                    let t = simd::tanh(*z / c);
                    *z = c * t;
                    *s = 1.0 - t * t;
                }
            }),
        None => logits.par_chunks_mut(1 << 12).for_each(|z| {
            z.iter_mut().for_each(|z| *z = c * simd::tanh(*z / c));
        }),
    }
}

impl CustomOp3 for LmHeadLogprobs {
    fn name(&self) -> &'static str {
        "lm-head-logprobs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = slice(s1, l1, "hidden")?;
        let CpuStorage::U32(t) = s3 else {
            candle_core::bail!("lm_head_logprobs: targets must be u32")
        };
        let t = &t[l3.start_offset()..l3.start_offset() + l3.shape().elem_count()];
        let (n, d) = l1.shape().dims2()?;
        let (vocab, _) = l2.shape().dims2()?;
        if let Some(&bad) = t.iter().find(|&&x| x as usize >= vocab) {
            candle_core::bail!("lm_head_logprobs: target {bad} out of vocabulary {vocab}");
        }
        if let CpuStorage::BF16(wv) = s2 {
            let Some((a, b)) = l2.contiguous_offsets() else {
                candle_core::bail!("lm_head_logprobs: weight must be contiguous")
            };
            use half::slice::HalfFloatSliceExt;
            let w = Bf16View {
                data: wv[a..b].reinterpret_cast(),
                n: vocab,
                k: d,
            };
            let (out, lse) = bf16_forward(h, w, t, n, self.softcap);
            *self.lse.lock().expect("lse lock") = lse;
            return Ok((CpuStorage::F32(out), Shape::from(n)));
        }
        let w = slice(s2, l2, "weight")?;
        let mut out = vec![0f32; n];
        let mut buf = vec![0f32; ROWS.min(n) * vocab];
        for start in (0..n).step_by(ROWS) {
            let rows = ROWS.min(n - start);
            let logits = &mut buf[..rows * vocab];
            chunk_logits(&h[start * d..(start + rows) * d], w, rows, vocab, d, logits);
            soft_cap(logits, self.softcap, None);
            let mut chosen = Vec::with_capacity(rows);
            for r in 0..rows {
                chosen.push(logits[r * vocab + t[start + r] as usize]);
            }
            for (r, lse) in softmax_rows(logits, vocab).into_iter().enumerate() {
                out[start + r] = chosen[r] - lse;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, d) = h.dims2()?;
        let (vocab, _) = w.dims2()?;
        let grad = grad.contiguous()?.to_vec1::<f32>()?;
        let targets = t.to_vec1::<u32>()?;
        if w.dtype() == candle_core::DType::BF16 {
            let lse = self.lse.lock().expect("lse lock");
            let h = h.contiguous()?;
            let dh = super::kernel::with_contiguous(&h, self.name(), |hv| {
                super::frozen::with_bf16(w, |wv| {
                    let g = (&targets[..], &grad[..]);
                    Ok(bf16_backward(hv, wv, g, &lse, self.softcap))
                })
            })?;
            return Ok((Some(Tensor::from_vec(dh, (n, d), h.device())?), None, None));
        }
        let mut dh = vec![0f32; n * d];
        // A frozen unembedding (LoRA's base, a reward model) takes no gradient: skip its GEMM.
        let need_dw = w.track_op();
        let mut dw = vec![0f32; if need_dw { vocab * d } else { 0 }];
        {
            let (hs, hl) = h.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let (Storage::Cpu(hc), Storage::Cpu(wc)) = (&*hs, &*ws) else {
                candle_core::bail!("lm_head_logprobs: CPU only")
            };
            let (hv, wv) = (slice(hc, hl, "hidden")?, slice(wc, wl, "weight")?);
            let mut buf = vec![0f32; ROWS.min(n) * vocab];
            let cap_len = if self.softcap.is_some() { buf.len() } else { 0 };
            let mut slope_buf = vec![0f32; cap_len];
            for start in (0..n).step_by(ROWS) {
                let rows = ROWS.min(n - start);
                let hc = &hv[start * d..(start + rows) * d];
                let dl = &mut buf[..rows * vocab];
                chunk_logits(hc, wv, rows, vocab, d, dl);
                let capped = self.softcap.is_some();
                soft_cap(
                    dl,
                    self.softcap,
                    capped.then(|| &mut slope_buf[..rows * vocab]),
                );
                softmax_rows(dl, vocab);
                // d log p(t) / d logits = onehot(t) − softmax, scaled by the incoming gradient.
                for r in 0..rows {
                    let g = grad[start + r];
                    let row = &mut dl[r * vocab..(r + 1) * vocab];
                    row.iter_mut().for_each(|x| *x *= -g);
                    row[targets[start + r] as usize] += g;
                }
                if capped {
                    let slope = &slope_buf[..rows * vocab];
                    dl.par_chunks_mut(1 << 12)
                        .zip(slope.par_chunks(1 << 12))
                        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d *= s));
                }
                let par = gemm::Parallelism::Rayon(candle_core::utils::get_num_threads());
                // SAFETY: extents as in chunk_logits; dh chunk is rows×d, dw is vocab×d.
                unsafe {
                    // dh[rows, d] = dl[rows, V] · w[V, d]
                    gemm::gemm(
                        rows,
                        d,
                        vocab,
                        dh[start * d..].as_mut_ptr(),
                        1,
                        d as isize,
                        false,
                        dl.as_ptr(),
                        1,
                        vocab as isize,
                        wv.as_ptr(),
                        1,
                        d as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    );
                    if !need_dw {
                        continue;
                    }
                    // dw[V, d] += dlᵀ[V, rows] · h[rows, d]
                    gemm::gemm(
                        vocab,
                        d,
                        rows,
                        dw.as_mut_ptr(),
                        1,
                        d as isize,
                        true,
                        dl.as_ptr(),
                        vocab as isize,
                        1,
                        hc.as_ptr(),
                        1,
                        d as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    );
                }
            }
        }
        let dev = h.device();
        Ok((
            Some(Tensor::from_vec(dh, (n, d), dev)?),
            need_dw
                .then(|| Tensor::from_vec(dw, (vocab, d), dev))
                .transpose()?,
            None,
        ))
    }
}

/// log p(targets[i]) under softmax(hidden[i] · weightᵀ): hidden [N, D], weight [V, D], targets [N]
/// (u32) → [N]. Differentiable in hidden and weight.
pub fn lm_head_logprobs(hidden: &Tensor, weight: &Tensor, targets: &Tensor) -> Result<Tensor> {
    lm_head_logprobs_capped(hidden, weight, targets, None)
}

/// `lm_head_logprobs` with the logits soft-capped to c·tanh(·/c) first (Gemma 2).
pub fn lm_head_logprobs_capped(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    softcap: Option<f64>,
) -> Result<Tensor> {
    hidden.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &targets.contiguous()?,
        LmHeadLogprobs {
            softcap: softcap.map(|c| c as f32),
            ..Default::default()
        },
    )
}

/// Vocabulary entries per widened block of a bf16 unembedding, and hidden rows per product.
const VOCAB_BLOCK: usize = 2048;
const BLOCK_ROWS: usize = 1024;

/// The bf16 unembedding's forward, vocabulary blocks outermost so that each block is widened
/// once: a running (max, Σ exp) per row gives its log-sum-exp. Returns (log p(target), lse).
fn bf16_forward(
    h: &[f32],
    w: Bf16View,
    t: &[u32],
    n: usize,
    softcap: Option<f32>,
) -> (Vec<f32>, Vec<f32>) {
    let (vocab, d) = (w.n, w.k);
    let mut stats = vec![(f32::NEG_INFINITY, 0f64); n];
    let mut chosen = vec![0f32; n];
    let vb = VOCAB_BLOCK.min(vocab);
    let mut buf = vec![0f32; BLOCK_ROWS.min(n) * vb];
    super::frozen::for_widened_blocks(w, vb, |v0, v1, wbuf| {
        let nv = v1 - v0;
        for r0 in (0..n).step_by(BLOCK_ROWS) {
            let rows = BLOCK_ROWS.min(n - r0);
            let logits = &mut buf[..rows * nv];
            chunk_logits(&h[r0 * d..(r0 + rows) * d], wbuf, rows, nv, d, logits);
            soft_cap(logits, softcap, None);
            logits
                .par_chunks_mut(nv)
                .zip(stats[r0..r0 + rows].par_iter_mut())
                .zip(chosen[r0..r0 + rows].par_iter_mut())
                .zip(&t[r0..r0 + rows])
                .for_each(|(((row, (m, s)), c), &target)| {
                    let target = target as usize;
                    if (v0..v0 + nv).contains(&target) {
                        *c = row[target - v0];
                    }
                    let (bm, bs) = simd::exp_max_sum(row);
                    let new = m.max(bm);
                    *s = *s * ((*m - new) as f64).exp() + bs * ((bm - new) as f64).exp();
                    *m = new;
                });
        }
    });
    let lse: Vec<f32> = stats.iter().map(|&(m, s)| m + s.ln() as f32).collect();
    let out = chosen.iter().zip(&lse).map(|(c, l)| c - l).collect();
    (out, lse)
}

/// ∂/∂h of Σ grad[r]·log p(t_r) for a frozen bf16 unembedding, block by block of the vocabulary:
/// dh += (onehot − softmax)·g · wblock.
fn bf16_backward(
    h: &[f32],
    w: Bf16View,
    (t, grad): (&[u32], &[f32]),
    lse: &[f32],
    softcap: Option<f32>,
) -> Vec<f32> {
    let (vocab, d) = (w.n, w.k);
    let n = lse.len();
    let mut dh = vec![0f32; n * d];
    let vb = VOCAB_BLOCK.min(vocab);
    let mut buf = vec![0f32; BLOCK_ROWS.min(n) * vb];
    let mut slope = vec![0f32; if softcap.is_some() { buf.len() } else { 0 }];
    let par = gemm::Parallelism::Rayon(candle_core::utils::get_num_threads());
    super::frozen::for_widened_blocks(w, vb, |v0, v1, wbuf| {
        let nv = v1 - v0;
        for r0 in (0..n).step_by(BLOCK_ROWS) {
            let rows = BLOCK_ROWS.min(n - r0);
            let dl = &mut buf[..rows * nv];
            chunk_logits(&h[r0 * d..(r0 + rows) * d], wbuf, rows, nv, d, dl);
            soft_cap(dl, softcap, softcap.map(|_| &mut slope[..rows * nv]));
            dl.par_chunks_mut(nv).enumerate().for_each(|(r, row)| {
                let (g, target) = (grad[r0 + r], t[r0 + r] as usize);
                simd::exp_shifted(row, lse[r0 + r]);
                row.iter_mut().for_each(|x| *x *= -g);
                if (v0..v0 + nv).contains(&target) {
                    row[target - v0] += g;
                }
            });
            if softcap.is_some() {
                dl.par_chunks_mut(1 << 12)
                    .zip(slope[..rows * nv].par_chunks(1 << 12))
                    .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d *= s));
            }
            // SAFETY: dl is rows×nv, wbuf nv×d, dh's rows r0.. are rows×d.
            unsafe {
                gemm::gemm(
                    rows,
                    d,
                    nv,
                    dh[r0 * d..].as_mut_ptr(),
                    1,
                    d as isize,
                    v0 > 0,
                    dl.as_ptr(),
                    1,
                    nv as isize,
                    wbuf.as_ptr(),
                    1,
                    d as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
        }
    });
    dh
}
