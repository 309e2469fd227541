//! bf16 mixed-precision matmul for training: C = A·B with both operands rounded to bf16
//! (round-to-nearest-even) and the products accumulated in f32, on AVX512-BF16's `vdpbf16ps`
//! (each instruction: 16 f32 lanes += Σ of two bf16 products). Tensors stay f32 everywhere; only
//! the operands of the multiply are bf16 — PyTorch autocast's semantics for matmul.
//!
//! The GEMM: each operand is first converted to bf16 with the reduction index k contiguous (so a
//! pair of consecutive k values is one u32), then packed Goto-style: blocks of KC k-values; B in
//! panels of NR = 32 columns (the two 16-lane vectors of a micro-tile row), A in strips of
//! MR = 12 rows; a 12 × 32 micro-tile keeps 24 accumulators in registers. Work is split over
//! threads by blocks of rows. `reference` computes the same rounding in plain f64 loops for the
//! tests.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::cpu;
use super::kernel::SharedMut;

const MR: usize = 12;
const NR: usize = 32;
/// k-pairs per block: an A strip (12 × 4 B) and a B panel (32 × 4 B) per pair stay in L1.
const KC_PAIRS: usize = 192;
/// Rows per parallel task (a multiple of MR).
const MC: usize = 8 * MR;

/// Whether this CPU can run the bf16 GEMM at all.
pub fn available() -> bool {
    cpu().avx512_bf16
}

/// Whether bf16 matmuls pay here, decided by measuring this CPU: the multiply-accumulate rate of
/// `vdpbf16ps` (bf16 pairs) against `vfmadd231ps` (f32), one core, ~1 ms each. On some CPUs the
/// bf16 instruction issues at a quarter of the FMA's rate and so does less than half its work
/// (measured on an Intel Xeon without AMX); there a bf16 run keeps f32 matmuls.
/// `RLHF_BF16_KERNEL=on|off` overrides the measurement.
#[derive(Clone, Debug)]
pub struct Decision {
    pub use_kernel: bool,
    /// Measured GFLOP/s of one core: (bf16 dot products, f32 FMA); None when not measured.
    pub measured: Option<(f64, f64)>,
    pub reason: String,
}

pub fn decision() -> &'static Decision {
    static D: std::sync::OnceLock<Decision> = std::sync::OnceLock::new();
    D.get_or_init(|| {
        let forced = std::env::var("RLHF_BF16_KERNEL").ok();
        if !available() {
            return Decision {
                use_kernel: false,
                measured: None,
                reason: format!("this CPU ({}) has no AVX512-BF16", cpu().model),
            };
        }
        let measured = measure_throughput();
        let (bf, f) = measured;
        let (use_kernel, why) = match forced.as_deref() {
            Some("on") => (true, "RLHF_BF16_KERNEL=on".to_string()),
            Some("off") => (false, "RLHF_BF16_KERNEL=off".to_string()),
            // A clear margin, so that timer noise does not flip the choice.
            _ => (
                bf >= 1.2 * f,
                format!(
                    "bf16 dot products {bf:.0} vs f32 FMA {f:.0} GFLOP/s per core on {}",
                    cpu().model
                ),
            ),
        };
        Decision {
            use_kernel,
            measured: Some(measured),
            reason: why,
        }
    })
}

/// (bf16, f32) multiply-accumulate GFLOP/s of one core, best of 3 short runs each.
fn measure_throughput() -> (f64, f64) {
    let best = |f: unsafe fn(usize, f32) -> f32, flop_per_iter: f64| {
        let n = 20_000;
        (0..3)
            .map(|_| {
                let t = std::time::Instant::now();
                // SAFETY: called only when the CPU has AVX512-BF16 (and so AVX-512 F). The
                // operands are opaque to the optimiser, so the loop is not folded away.
                let (n, x) = std::hint::black_box((n, 1.0f32));
                std::hint::black_box(unsafe { f(n, x) });
                n as f64 * flop_per_iter / t.elapsed().as_secs_f64().max(1e-9) / 1e9
            })
            .fold(0.0, f64::max)
    };
    // 16 independent accumulators per iteration: bf16 64 FLOP, f32 32 FLOP per instruction.
    (best(dot_loop, 16.0 * 64.0), best(fma_loop, 16.0 * 32.0))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dot_loop(n: usize, x: f32) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 16];
    let pair = (to_bf16(x) as i32) * 0x1_0001;
    let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
    let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair >> 1));
    for _ in 0..n {
        for x in acc.iter_mut() {
            *x = _mm512_dpbf16_ps(*x, a, b);
        }
    }
    acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop(n: usize, x: f32) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 16];
    let (a, b) = (_mm512_set1_ps(x), _mm512_set1_ps(x * 1e-7));
    for _ in 0..n {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(a, b, *x);
        }
    }
    acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_loop(_: usize, _: f32) -> f32 {
    0.0
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn fma_loop(_: usize, _: f32) -> f32 {
    0.0
}

thread_local! {
    static ON: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Turns bf16 matmuls on or off for the calling thread (a run's forward and backward passes are
/// driven from one thread; the kernels' worker threads follow the caller's choice). Refused when
/// the CPU cannot run the kernel.
pub fn set_enabled(on: bool) -> anyhow::Result<()> {
    if on && !available() {
        anyhow::bail!(
            "bf16 matmuls need AVX512-BF16, which this CPU ({}) lacks",
            cpu().model
        );
    }
    ON.with(|c| c.set(on));
    Ok(())
}

/// Whether the calling thread's matmuls take bf16 operands.
pub fn enabled() -> bool {
    ON.with(|c| c.get())
}

/// The bf16 GEMM's path here, for `rlhf bench` and logs.
pub fn path() -> String {
    if !available() {
        return "unavailable (needs AVX512-BF16)".into();
    }
    let d = decision();
    format!(
        "avx512_bf16 12x32 vdpbf16ps, {} for bf16 runs ({})",
        if d.use_kernel { "used" } else { "not used" },
        d.reason
    )
}

/// f32 → bf16 bits, round to nearest even (NaN stays NaN).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A 2-D f32 matrix in memory: element (r, c) at `data[offset + r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl View<'_> {
    #[inline(always)]
    fn at(&self, r: usize, c: usize) -> f32 {
        self.data[self.offset + r * self.rs + c * self.cs]
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// `rows` × ⌈k/2⌉ u32, row r holding bf16 pairs (k = 2p, 2p + 1) of `row(r)`: the operand with
/// the reduction index contiguous. `v` is read as rows × k (k = v.cols).
fn pairs_by_row(v: View) -> Vec<u32> {
    let (rows, k) = (v.rows, v.cols);
    let kp = k.div_ceil(2);
    let mut out = vec![0u32; rows * kp];
    if v.cs == 1 {
        // Rows contiguous in k: convert each row in a straight pass.
        out.par_chunks_mut(kp).enumerate().for_each(|(r, dst)| {
            let src = &v.data[v.offset + r * v.rs..v.offset + r * v.rs + k];
            for (p, d) in dst.iter_mut().enumerate() {
                let lo = to_bf16(src[2 * p]) as u32;
                let hi = src.get(2 * p + 1).map_or(0, |&x| to_bf16(x) as u32);
                *d = lo | hi << 16;
            }
        });
    } else {
        // Transposing: walk the source in its own order, 64 rows at a time.
        const T: usize = 64;
        out.par_chunks_mut(kp * T)
            .enumerate()
            .for_each(|(blk, dst)| {
                let r0 = blk * T;
                let nr = dst.len() / kp;
                for c in 0..k {
                    for r in 0..nr {
                        let bits = to_bf16(v.at(r0 + r, c)) as u32;
                        let d = &mut dst[r * kp + c / 2];
                        *d |= if c % 2 == 0 { bits } else { bits << 16 };
                    }
                }
            });
    }
    out
}

/// C [m × n] = A [m × k] · B [k × n], bf16 operands, f32 accumulation. Panics when the CPU lacks
/// AVX512-BF16 (`available`) or the shapes disagree.
pub fn gemm(a: View, b: View) -> Vec<f32> {
    assert!(available(), "bf16 GEMM: this CPU lacks AVX512-BF16");
    assert_eq!(a.cols, b.rows, "bf16 GEMM: inner dimensions differ");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut c = vec![0f32; m * n];
    if m == 0 || n == 0 || k == 0 {
        return c;
    }
    let kp = k.div_ceil(2);
    let a2 = pairs_by_row(a);
    let b2 = pairs_by_row(b.t());
    let panels = n.div_ceil(NR);
    let out = SharedMut(c.as_mut_ptr());
    let mut bp = vec![0u32; panels * KC_PAIRS * NR];
    for p0 in (0..kp).step_by(KC_PAIRS) {
        let pc = KC_PAIRS.min(kp - p0);
        // B panels of this k block: [panel][pair][column].
        bp.par_chunks_mut(KC_PAIRS * NR)
            .enumerate()
            .for_each(|(panel, dst)| {
                let j0 = panel * NR;
                for p in 0..pc {
                    for col in 0..NR {
                        let j = j0 + col;
                        dst[p * NR + col] = if j < n { b2[j * kp + p0 + p] } else { 0 };
                    }
                }
            });
        let first = p0 == 0;
        let bp = &bp;
        (0..m.div_ceil(MC)).into_par_iter().for_each(|blk| {
            let i0 = blk * MC;
            let rows = MC.min(m - i0);
            let strips = rows.div_ceil(MR);
            // A strips of this block: [strip][pair][row].
            let mut ap = vec![0u32; strips * pc * MR];
            for s in 0..strips {
                for p in 0..pc {
                    for r in 0..MR {
                        let i = i0 + s * MR + r;
                        ap[(s * pc + p) * MR + r] = if i < m { a2[i * kp + p0 + p] } else { 0 };
                    }
                }
            }
            for panel in 0..panels {
                let j0 = panel * NR;
                let cols = NR.min(n - j0);
                for s in 0..strips {
                    let i = i0 + s * MR;
                    let nrows = MR.min(m - i);
                    // SAFETY: the CPU has AVX512-BF16 (asserted); ap and bp hold pc pairs of this
                    // strip and panel; this task alone writes rows i0..i0 + rows of c, and the
                    // tile lies inside c.
                    unsafe {
                        tile(
                            pc,
                            ap.as_ptr().add(s * pc * MR),
                            bp.as_ptr().add(panel * KC_PAIRS * NR),
                            out,
                            (i, j0, n),
                            (nrows, cols),
                            first,
                        );
                    }
                }
            }
        });
    }
    c
}

/// One 12 × 32 micro-tile of C at (i, j) (row stride ldc), `nrows` × `cols` of it valid:
/// C (+)= A-strip · B-panel over `pc` pairs.
///
/// # Safety
/// AVX512-BF16 present; `a` holds pc × MR u32, `b` pc × NR u32; the valid part of the tile is in
/// bounds of c and written by no other thread.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile(
    pc: usize,
    a: *const u32,
    b: *const u32,
    c: SharedMut,
    (i, j, ldc): (usize, usize, usize),
    (nrows, cols): (usize, usize),
    first: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..pc {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
        for (r, acc) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(p * MR + r) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
        }
    }
    if nrows == MR && cols == NR {
        for (r, acc) in acc.iter().enumerate() {
            let row = c.at((i + r) * ldc + j);
            for (h, v) in acc.iter().enumerate() {
                let dst = row.add(16 * h);
                let v = if first {
                    *v
                } else {
                    _mm512_add_ps(*v, _mm512_loadu_ps(dst))
                };
                _mm512_storeu_ps(dst, v);
            }
        }
        return;
    }
    let mut buf = [0f32; MR * NR];
    for (r, acc) in acc.iter().enumerate() {
        _mm512_storeu_ps(buf.as_mut_ptr().add(r * NR), acc[0]);
        _mm512_storeu_ps(buf.as_mut_ptr().add(r * NR + 16), acc[1]);
    }
    for r in 0..nrows {
        for col in 0..cols {
            let dst = c.at((i + r) * ldc + j + col);
            *dst = if first { 0.0 } else { *dst } + buf[r * NR + col];
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile(
    _: usize,
    _: *const u32,
    _: *const u32,
    _: SharedMut,
    _: (usize, usize, usize),
    _: (usize, usize),
    _: bool,
) {
    unreachable!("bf16 GEMM needs x86-64 with AVX512-BF16")
}

/// The same product in plain loops: bf16-rounded operands, f64 accumulation (for tests).
pub fn reference(a: View, b: View) -> Vec<f32> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let round = |x: f32| from_bf16(to_bf16(x)) as f64;
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|kk| round(a.at(i, kk)) * round(b.at(kk, j)))
                .sum();
            c[i * n + j] = s as f32;
        }
    }
    c
}

/// The view of a 2-D f32 CPU tensor's storage.
fn view<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> candle_core::Result<View<'a>> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{name}: expects f32 tensors");
    };
    let (rows, cols) = l.shape().dims2()?;
    let st = l.stride();
    Ok(View {
        data,
        offset: l.start_offset(),
        rows,
        cols,
        rs: st[0],
        cs: st[1],
    })
}

/// lhs [m, k] · rhs [k, n] with bf16 operands; its backward is two more such products.
struct Bf16Matmul;

impl CustomOp2 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "bf16-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = (view(s1, l1, self.name())?, view(s2, l2, self.name())?);
        if a.cols != b.rows {
            candle_core::bail!("bf16 matmul: {:?} · {:?}", l1.shape(), l2.shape());
        }
        let c = gemm(a, b);
        Ok((CpuStorage::F32(c), Shape::from((a.rows, b.cols))))
    }

    fn bwd(
        &self,
        lhs: &Tensor,
        rhs: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(dy.apply_op2(&rhs.t()?, Bf16Matmul)?),
            Some(lhs.t()?.apply_op2(dy, Bf16Matmul)?),
        ))
    }
}

/// x [m, k] · w [n, k]ᵀ with bf16 operands and f32 accumulation (f32 tensors in and out).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.apply_op2(&w.t()?, Bf16Matmul)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even one (1).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    }
}
