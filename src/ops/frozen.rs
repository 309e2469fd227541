//! x·Wᵀ with W frozen (a LoRA run's base, a reference or reward model): autograd's matmul would
//! also compute ∂L/∂W — a third of a training step's GEMM work — and throw it away. This op
//! carries W inside it, so the graph sees only x and the backward pass computes ∂L/∂x = ∂L/∂y · W
//! alone.
//!
//! A frozen W may be stored in bf16 (`frozen_dtype`): half the memory of every weight that does not
//! train. It is widened to f32 block by block inside the product — each bf16 value widens exactly,
//! so the product is the f32 product of the stored weights — and never exists whole in f32.

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::kernel::{contiguous, with_contiguous};
use super::skinny::{self, Bf16View};
use super::OpsPath;

/// f32 elements widened per block: 16 MB of scratch, large enough that GEMM's packing of the
/// other operand is amortised over many output columns.
const BLOCK_ELEMS: usize = 1 << 22;

struct FrozenMatmul {
    w: Tensor,
    path: OpsPath,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul-t"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout, self.name())?;
        let (m, k) = layout.shape().dims2()?;
        if self.w.dtype() == DType::BF16 {
            let n = self.w.dim(0)?;
            let out = with_bf16(&self.w, |w| {
                Ok(if skinny::takes(m) {
                    skinny::product_bf16(x, w, m)
                } else {
                    matmul_t_widened(x, w, m)
                })
            })?;
            return Ok((CpuStorage::F32(out), Shape::from((m, n))));
        }
        // The input is wrapped as a graph-free tensor (one copy of it: rows × in values, small
        // next to the product's rows × in × out work) and multiplied by the dispatching kernels.
        let x = Tensor::from_slice(x, (m, k), &candle_core::Device::Cpu)?;
        let y = self.path.matmul_t(&x, &self.w)?;
        let out = with_contiguous(&y, self.name(), |v| Ok(v.to_vec()))?;
        Ok((CpuStorage::F32(out), y.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        if self.w.dtype() != DType::BF16 {
            return Ok(Some(dy.matmul(&self.w)?));
        }
        let dy = dy.contiguous()?;
        let (m, n) = dy.dims2()?;
        let k = self.w.dim(1)?;
        let dx = with_contiguous(&dy, self.name(), |dy| {
            with_bf16(&self.w, |w| Ok(matmul_widened(dy, w, m)))
        })?;
        debug_assert_eq!(dx.len(), m * k, "{n}");
        Ok(Some(Tensor::from_vec(dx, (m, k), dy.device())?))
    }
}

/// x [m, k] · wᵀ for a w [n, k] that takes no gradient (f32, or bf16 widened block-wise).
pub fn matmul_t(x: &Tensor, w: &Tensor, path: OpsPath) -> Result<Tensor> {
    x.contiguous()?
        .apply_op1(FrozenMatmul { w: w.clone(), path })
}

/// Runs `f` on the bits of a contiguous bf16 CPU matrix [n, k].
pub fn with_bf16<R>(w: &Tensor, f: impl FnOnce(Bf16View) -> Result<R>) -> Result<R> {
    let (n, k) = w.dims2()?;
    let (s, l) = w.storage_and_layout();
    let Storage::Cpu(CpuStorage::BF16(v)) = &*s else {
        bail!("frozen matmul: expects a bf16 weight on the CPU")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("frozen matmul: expects a contiguous weight")
    };
    f(Bf16View {
        data: bf16_bits(&v[a..b]),
        n,
        k,
    })
}

fn bf16_bits(v: &[bf16]) -> &[u16] {
    use half::slice::HalfFloatSliceExt;
    v.reinterpret_cast()
}

/// Rows r0..r1 of w widened into `dst` (row-major, k per row), in parallel.
fn widen_rows(w: Bf16View, r0: usize, r1: usize, dst: &mut [f32]) {
    let src = &w.data[r0 * w.k..r1 * w.k];
    dst[..src.len()]
        .par_chunks_mut(1 << 14)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(d, s)| {
            for (d, &b) in d.iter_mut().zip(s) {
                *d = super::bf16::from_bf16(b);
            }
        });
}

/// Rows of w per widened block.
fn block_rows(w: Bf16View) -> usize {
    (BLOCK_ELEMS / w.k.max(1)).clamp(1, w.n.max(1))
}

/// Calls `f(r0, r1, block)` for consecutive blocks of `rows` rows of w, each widened to f32
/// (`block` is (r1 − r0) × k) into one reused buffer.
pub(crate) fn for_widened_blocks(
    w: Bf16View,
    rows: usize,
    mut f: impl FnMut(usize, usize, &[f32]),
) {
    let rows = rows.max(1);
    let mut buf = vec![0f32; rows.min(w.n) * w.k];
    for r0 in (0..w.n).step_by(rows) {
        let r1 = (r0 + rows).min(w.n);
        widen_rows(w, r0, r1, &mut buf);
        f(r0, r1, &buf[..(r1 - r0) * w.k]);
    }
}

/// y [m, n] = x [m, k] · wᵀ, w widened a block of its rows (y's columns) at a time: every output
/// element sums over k exactly as the f32 product does.
pub fn matmul_t_widened(x: &[f32], w: Bf16View, m: usize) -> Vec<f32> {
    let (n, k) = (w.n, w.k);
    let mut y = vec![0f32; m * n];
    for_widened_blocks(w, block_rows(w), |r0, r1, buf| {
        // SAFETY: x is m×k, buf holds (r1−r0)×k read as its transpose, y's columns r0..r1 lie
        // inside its m×n extent with row stride n.
        unsafe {
            gemm::gemm(
                m,
                r1 - r0,
                k,
                y[r0..].as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                buf.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(candle_core::utils::get_num_threads()),
            );
        }
    });
    y
}

/// dx [m, k] = dy [m, n] · w [n, k], accumulated over widened blocks of w's rows.
pub fn matmul_widened(dy: &[f32], w: Bf16View, m: usize) -> Vec<f32> {
    let (n, k) = (w.n, w.k);
    let mut dx = vec![0f32; m * k];
    for_widened_blocks(w, block_rows(w), |r0, r1, buf| {
        // SAFETY: dy's columns r0..r1 (row stride n), buf (r1−r0)×k, dx m×k.
        unsafe {
            gemm::gemm(
                m,
                k,
                r1 - r0,
                dx.as_mut_ptr(),
                1,
                k as isize,
                r0 > 0,
                dy[r0..].as_ptr(),
                1,
                n as isize,
                buf.as_ptr(),
                1,
                k as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(candle_core::utils::get_num_threads()),
            );
        }
    });
    dx
}

/// The mean of w's rows [k] in f32, for a matrix of either storage (no whole f32 copy of a bf16 one).
pub fn mean_rows(w: &Tensor) -> Result<Tensor> {
    if w.dtype() != DType::BF16 {
        return w.mean(0);
    }
    let k = w.dim(1)?;
    let mean = with_bf16(w, |v| {
        let mut sum = vec![0f64; k];
        for row in v.data.chunks_exact(k) {
            for (s, &b) in sum.iter_mut().zip(row) {
                *s += super::bf16::from_bf16(b) as f64;
            }
        }
        Ok(sum
            .into_iter()
            .map(|s| (s / v.n.max(1) as f64) as f32)
            .collect::<Vec<_>>())
    })?;
    Tensor::from_vec(mean, k, w.device())
}

/// Rows of an embedding table [V, D] as f32 [ids, D], whichever way the table is stored.
pub fn embedding_rows(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    table.index_select(ids, 0)?.to_dtype(DType::F32)
}
