//! y = x·Wᵀ for few rows of x (a decoding step: one token per sequence). A general GEMM packs W
//! into its own layout on every call, which for a handful of rows costs as much as the product;
//! here W [N, K] is read in place, in tiles of 3 rows of W × 4 rows of x: 12 accumulators of 8
//! lanes and 4 operands fill AVX2's 16 registers.
//! AVX-512 CPUs take 4 × 4 tiles of 16 lanes; the path is chosen at run time (`path`).
//! The backward is the usual pair of matmuls, so the op is safe anywhere; `Tensor::matmul` is the
//! reference.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::Isa;
use super::kernel::{contiguous, SharedMut};

/// The largest number of rows this kernel takes; more rows amortise GEMM packing.
pub const MAX_ROWS: usize = 32;
const LANES: usize = 8;

/// out[i, j] = Σ_k x[i, k]·w[j, k] for rows i..i+B of x and j..j+A of w.
///
/// # Safety
/// x holds rows i..i+B of length k, w rows j..j+A, out is [·, n] with those entries in bounds.
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn tile<const A: usize, const B: usize>(
    x: *const f32,
    w: *const f32,
    k: usize,
    i: usize,
    j: usize,
    out: SharedMut,
    n: usize,
) {
    let mut acc = [[[0f32; LANES]; B]; A];
    let whole = k / LANES * LANES;
    let mut o = 0;
    while o < whole {
        let mut wv = [[0f32; LANES]; A];
        for (a, v) in wv.iter_mut().enumerate() {
            *v = std::ptr::read_unaligned(w.add((j + a) * k + o) as *const [f32; LANES]);
        }
        let mut xv = [[0f32; LANES]; B];
        for (b, v) in xv.iter_mut().enumerate() {
            *v = std::ptr::read_unaligned(x.add((i + b) * k + o) as *const [f32; LANES]);
        }
        for a in 0..A {
            for b in 0..B {
                for l in 0..LANES {
                    acc[a][b][l] = wv[a][l].mul_add(xv[b][l], acc[a][b][l]);
                }
            }
        }
        o += LANES;
    }
    for a in 0..A {
        for b in 0..B {
            let mut s: f32 = acc[a][b].iter().sum();
            for o in whole..k {
                s += *w.add((j + a) * k + o) * *x.add((i + b) * k + o);
            }
            *out.at((i + b) * n + j + a) = s;
        }
    }
}

/// Columns j0..j1 of out = x·wᵀ (portable version): 4×4 tiles, then the leftover rows of x and w.
///
/// # Safety
/// As for `tile`, over the whole ranges.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn columns(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    j1: usize,
    out: SharedMut,
) {
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut j = j0;
    while j + 4 <= j1 {
        let mut i = 0;
        while i + 4 <= m {
            tile::<4, 4>(xp, wp, k, i, j, out, n);
            i += 4;
        }
        while i < m {
            tile::<4, 1>(xp, wp, k, i, j, out, n);
            i += 1;
        }
        j += 4;
    }
    while j < j1 {
        for i in 0..m {
            tile::<1, 1>(xp, wp, k, i, j, out, n);
        }
        j += 1;
    }
}

/// The AVX2 version of `columns`: tiles of 3 rows of w × 4 rows of x held in 12 registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn columns_avx2(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    j1: usize,
    out: SharedMut,
) {
    use std::arch::x86_64::*;
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let whole = k / LANES * LANES;
    let hsum = |v: __m256| -> f32 {
        let mut a = [0f32; LANES];
        _mm256_storeu_ps(a.as_mut_ptr(), v);
        a.iter().sum()
    };
    let mut j = j0;
    while j + 3 <= j1 {
        let mut i = 0;
        while i + 4 <= m {
            let mut acc = [_mm256_setzero_ps(); 12];
            let mut o = 0;
            while o < whole {
                let w0 = _mm256_loadu_ps(wp.add(j * k + o));
                let w1 = _mm256_loadu_ps(wp.add((j + 1) * k + o));
                let w2 = _mm256_loadu_ps(wp.add((j + 2) * k + o));
                for b in 0..4 {
                    let xv = _mm256_loadu_ps(xp.add((i + b) * k + o));
                    acc[b] = _mm256_fmadd_ps(w0, xv, acc[b]);
                    acc[4 + b] = _mm256_fmadd_ps(w1, xv, acc[4 + b]);
                    acc[8 + b] = _mm256_fmadd_ps(w2, xv, acc[8 + b]);
                }
                o += LANES;
            }
            for a in 0..3 {
                for b in 0..4 {
                    let mut s = hsum(acc[4 * a + b]);
                    for o in whole..k {
                        s += *wp.add((j + a) * k + o) * *xp.add((i + b) * k + o);
                    }
                    *out.at((i + b) * n + j + a) = s;
                }
            }
            i += 4;
        }
        while i < m {
            tile::<3, 1>(xp, wp, k, i, j, out, n);
            i += 1;
        }
        j += 3;
    }
    while j < j1 {
        for i in 0..m {
            tile::<1, 1>(xp, wp, k, i, j, out, n);
        }
        j += 1;
    }
}

/// The AVX-512 version of `columns`: tiles of 4 rows of w × 4 rows of x in 16 registers of 16
/// lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn columns_avx512(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    j1: usize,
    out: SharedMut,
) {
    use std::arch::x86_64::*;
    const L: usize = 16;
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let whole = k / L * L;
    let mut j = j0;
    while j + 4 <= j1 {
        let mut i = 0;
        while i + 4 <= m {
            let mut acc = [_mm512_setzero_ps(); 16];
            let mut o = 0;
            while o < whole {
                let wv = [0, 1, 2, 3].map(|a| _mm512_loadu_ps(wp.add((j + a) * k + o)));
                for b in 0..4 {
                    let xv = _mm512_loadu_ps(xp.add((i + b) * k + o));
                    for a in 0..4 {
                        acc[4 * a + b] = _mm512_fmadd_ps(wv[a], xv, acc[4 * a + b]);
                    }
                }
                o += L;
            }
            for a in 0..4 {
                for b in 0..4 {
                    let mut s = _mm512_reduce_add_ps(acc[4 * a + b]);
                    for o in whole..k {
                        s += *wp.add((j + a) * k + o) * *xp.add((i + b) * k + o);
                    }
                    *out.at((i + b) * n + j + a) = s;
                }
            }
            i += 4;
        }
        while i < m {
            tile::<4, 1>(xp, wp, k, i, j, out, n);
            i += 1;
        }
        j += 4;
    }
    while j < j1 {
        for i in 0..m {
            tile::<1, 1>(xp, wp, k, i, j, out, n);
        }
        j += 1;
    }
}

/// The path `matmul_t` takes on this CPU.
pub fn path() -> Isa {
    Isa::best()
}

/// x [m, k] · w[n, k]ᵀ → [m, n], parallel over blocks of w's rows, on the given path (which the
/// CPU must have: see `Isa::available`).
pub fn product_on(isa: Isa, x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(
        x.len() >= m * k && w.len() >= n * k,
        "skinny matmul: operand sizes"
    );
    assert!(
        Isa::available().contains(&isa),
        "this CPU lacks {}",
        isa.name()
    );
    let mut out = vec![0f32; m * n];
    let ptr = SharedMut(out.as_mut_ptr());
    // Blocks of 64 rows of w: large enough to stream, small enough to balance two threads.
    let blocks = n.div_ceil(64);
    (0..blocks).into_par_iter().for_each(|blk| {
        let (j0, j1) = (blk * 64, ((blk + 1) * 64).min(n));
        // SAFETY: each block writes columns j0..j1 of out only; x, w, out have the stated sizes;
        // the CPU has the path's instructions (checked above).
        unsafe {
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => columns_avx512(x, w, m, k, n, j0, j1, ptr),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => columns_avx2(x, w, m, k, n, j0, j1, ptr),
                _ => columns(x, w, m, k, n, j0, j1, ptr),
            }
        }
    });
    out
}

fn product(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    product_on(path(), x, w, m, k, n)
}

struct Skinny;

impl CustomOp2 for Skinny {
    fn name(&self) -> &'static str {
        "skinny-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, wk) = wl.shape().dims2()?;
        if wk != k {
            candle_core::bail!("skinny matmul: x {:?} vs w {:?}", xl.shape(), wl.shape())
        }
        let (x, w) = (
            contiguous(xs, xl, self.name())?,
            contiguous(ws, wl, self.name())?,
        );
        Ok((CpuStorage::F32(product(x, w, m, k, n)), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dy.matmul(w)?), Some(dy.t()?.matmul(x)?)))
    }
}

/// x [m, k] · w [n, k]ᵀ for m ≤ `MAX_ROWS` (f32, CPU).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Skinny)
}
