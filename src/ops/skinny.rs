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

/// The largest number of rows this kernel takes in training and scoring passes; more rows
/// amortise GEMM packing.
pub const MAX_ROWS: usize = 32;
/// The largest number of rows it takes in a sampler's decoding step. There every matmul is a
/// fresh, short product (one token per sequence), and on the Xeon of bench/RESULTS.md this
/// kernel beat the packing GEMM at 128 rows too: a GRPO rollout of 128 rows took 73 s instead of
/// 96 s (`bench/rollout.sh`).
pub const MAX_DECODE_ROWS: usize = 256;

/// Whether an m-row product goes to this kernel (rather than the GEMM) on the calling thread.
pub fn takes(m: usize) -> bool {
    m <= MAX_ROWS || (m <= MAX_DECODE_ROWS && decoding())
}
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
        // The leftover rows one at a time with the same lanes and sums as the 4-row tile, so a
        // row's result does not depend on how many rows are multiplied with it (data-parallel
        // ranks decoding their shares of a batch sample what one process decoding it all does).
        while i < m {
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut o = 0;
            while o < whole {
                let xv = _mm512_loadu_ps(xp.add(i * k + o));
                for (a, acc) in acc.iter_mut().enumerate() {
                    let wv = _mm512_loadu_ps(wp.add((j + a) * k + o));
                    *acc = _mm512_fmadd_ps(wv, xv, *acc);
                }
                o += L;
            }
            for (a, acc) in acc.iter().enumerate() {
                let mut s = _mm512_reduce_add_ps(*acc);
                for o in whole..k {
                    s += *wp.add((j + a) * k + o) * *xp.add(i * k + o);
                }
                *out.at(i * n + j + a) = s;
            }
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

/// x [m, k] · w [n, k]ᵀ for the rows `takes` admits (f32, CPU).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Skinny)
}

/// A frozen bf16 copy of a weight matrix W [n, k] for decoding steps: half the bytes to stream per
/// token, products in f32 (each bf16 weight widened exactly). For inference only — a copy is not
/// updated by training and carries no gradient.
pub struct Bf16Weights {
    data: Vec<u16>,
    n: usize,
    k: usize,
}

impl Bf16Weights {
    pub fn from_tensor(w: &Tensor) -> Result<Self> {
        let (n, k) = w.dims2()?;
        let v: Vec<f32> = w
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let mut data = vec![0u16; n * k];
        data.par_chunks_mut(1 << 14)
            .zip(v.par_chunks(1 << 14))
            .for_each(|(d, s)| {
                for (d, &x) in d.iter_mut().zip(s) {
                    *d = super::bf16::to_bf16(x);
                }
            });
        Ok(Bf16Weights { data, n, k })
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn view(&self) -> Bf16View<'_> {
        Bf16View {
            data: &self.data,
            n: self.n,
            k: self.k,
        }
    }
}

/// A borrowed bf16 matrix [n, k] (a decode copy, or a frozen weight stored in bf16), as raw bits.
#[derive(Clone, Copy)]
pub struct Bf16View<'a> {
    pub data: &'a [u16],
    pub n: usize,
    pub k: usize,
}

thread_local! {
    static DECODING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While alive, the calling thread's few-row matmuls may use bf16 decode copies (see
/// `Linear::forward`). Only the sampler opens one: its passes are inference.
pub struct DecodeScope(bool);

impl DecodeScope {
    pub fn open() -> DecodeScope {
        DecodeScope(DECODING.with(|d| d.replace(true)))
    }
}

impl Drop for DecodeScope {
    fn drop(&mut self) {
        DECODING.with(|d| d.set(self.0));
    }
}

/// Whether the calling thread is inside a `DecodeScope`.
pub fn decoding() -> bool {
    DECODING.with(|d| d.get())
}

/// Widens 16 bf16 values at `p` to f32.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn widen16(p: *const u16) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let h = _mm256_loadu_si256(p as *const __m256i);
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
}

/// Columns j0..j1 of out = x·wᵀ with w in bf16: 4 × 4 tiles of 16 lanes (AVX-512).
///
/// # Safety
/// AVX-512 present; x is m × k, w n × k, out m × n.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn columns_bf16_avx512(
    x: &[f32],
    w: &[u16],
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
    let wf = |j: usize, o: usize| super::bf16::from_bf16(*wp.add(j * k + o));
    let mut j = j0;
    while j < j1 {
        let a_n = 4.min(j1 - j);
        let mut i = 0;
        while i < m {
            let b_n = 4.min(m - i);
            let mut acc = [_mm512_setzero_ps(); 16];
            let mut o = 0;
            while o < whole {
                let mut wv = [_mm512_setzero_ps(); 4];
                for (a, v) in wv.iter_mut().enumerate().take(a_n) {
                    *v = widen16(wp.add((j + a) * k + o));
                }
                for b in 0..b_n {
                    let xv = _mm512_loadu_ps(xp.add((i + b) * k + o));
                    for a in 0..a_n {
                        acc[4 * a + b] = _mm512_fmadd_ps(wv[a], xv, acc[4 * a + b]);
                    }
                }
                o += L;
            }
            for a in 0..a_n {
                for b in 0..b_n {
                    let mut s = _mm512_reduce_add_ps(acc[4 * a + b]);
                    for o in whole..k {
                        s += wf(j + a, o) * *xp.add((i + b) * k + o);
                    }
                    *out.at((i + b) * n + j + a) = s;
                }
            }
            i += 4;
        }
        j += 4;
    }
}

/// The portable version: the same products in plain loops.
///
/// # Safety
/// x is m × k, w n × k, out m × n.
#[allow(clippy::too_many_arguments)]
unsafe fn columns_bf16(
    x: &[f32],
    w: &[u16],
    m: usize,
    k: usize,
    n: usize,
    j0: usize,
    j1: usize,
    out: SharedMut,
) {
    for j in j0..j1 {
        let row = &w[j * k..(j + 1) * k];
        for i in 0..m {
            let xr = &x[i * k..(i + 1) * k];
            let s: f32 = xr
                .iter()
                .zip(row)
                .map(|(&a, &b)| a * super::bf16::from_bf16(b))
                .sum();
            *out.at(i * n + j) = s;
        }
    }
}

/// x [m, k] · wᵀ with bf16 weights, on the given path (AVX-512, else the portable loops).
pub fn product_bf16_on(isa: Isa, x: &[f32], w: Bf16View, m: usize) -> Vec<f32> {
    let (n, k) = (w.n, w.k);
    assert!(x.len() >= m * k, "bf16 decode matmul: operand sizes");
    assert!(
        Isa::available().contains(&isa),
        "this CPU lacks {}",
        isa.name()
    );
    let mut out = vec![0f32; m * n];
    let ptr = SharedMut(out.as_mut_ptr());
    (0..n.div_ceil(64)).into_par_iter().for_each(|blk| {
        let (j0, j1) = (blk * 64, ((blk + 1) * 64).min(n));
        // SAFETY: each block writes columns j0..j1 of out only; sizes as stated; the CPU has
        // the path's instructions (checked above).
        unsafe {
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => columns_bf16_avx512(x, w.data, m, k, n, j0, j1, ptr),
                _ => columns_bf16(x, w.data, m, k, n, j0, j1, ptr),
            }
        }
    });
    out
}

struct SkinnyBf16<'a>(Bf16View<'a>);

impl candle_core::CustomOp1 for SkinnyBf16<'_> {
    fn name(&self) -> &'static str {
        "skinny-matmul-bf16-weights"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        if k != self.0.k {
            candle_core::bail!(
                "bf16 decode matmul: x {:?} vs w [{}, {}]",
                l.shape(),
                self.0.n,
                self.0.k
            )
        }
        let x = contiguous(s, l, self.name())?;
        let out = product_bf16(x, self.0, m);
        Ok((CpuStorage::F32(out), Shape::from((m, self.0.n))))
    }
}

/// Whether bf16 decode copies are faster than the f32 path here: they have an AVX-512 kernel;
/// elsewhere the f32 kernels are the faster choice and the copies are not made.
pub fn bf16_decode_available() -> bool {
    path() == Isa::Avx512
}

/// x [m, k] · wᵀ with the bf16 copy of w (rows as `takes` admits; no gradient).
pub fn matmul_t_bf16(x: &Tensor, w: &Bf16Weights) -> Result<Tensor> {
    matmul_t_bf16_view(x, w.view())
}

/// x [m, k] · wᵀ for a borrowed bf16 w (rows as `takes` admits; no gradient).
pub fn matmul_t_bf16_view(x: &Tensor, w: Bf16View) -> Result<Tensor> {
    x.contiguous()?.detach().apply_op1_no_bwd(&SkinnyBf16(w))
}

/// The few-row product into a plain buffer, on the fastest path this CPU has.
pub fn product_bf16(x: &[f32], w: Bf16View, m: usize) -> Vec<f32> {
    let isa = if bf16_decode_available() {
        Isa::Avx512
    } else {
        Isa::Scalar
    };
    product_bf16_on(isa, x, w, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row's product is the same bits whatever rows are multiplied with it, on every path this
    /// CPU has: the data-parallel ranks decode their share of a batch and must sample the tokens
    /// one process decoding all of it samples.
    #[test]
    fn a_rows_product_does_not_depend_on_the_other_rows() {
        let (k, n) = (77, 70);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let x: Vec<f32> = (0..9 * k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.021)
            .collect();
        for isa in Isa::available() {
            let all = product_on(isa, &x, &w, 9, k, n);
            for (start, m) in [(0, 1), (4, 5), (1, 3), (8, 1), (2, 7)] {
                let part = product_on(isa, &x[start * k..], &w, m, k, n);
                for r in 0..m {
                    let (a, b) = (&all[(start + r) * n..][..n], &part[r * n..][..n]);
                    assert!(
                        a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()),
                        "{}: row {} of {m} from {start}",
                        isa.name(),
                        r
                    );
                }
            }
        }
    }
}
