//! Element-wise building blocks written so that the compiler vectorises them, and a way to run a
//! loop at the widest vector width the CPU has (chosen at run time).

/// Defines a function whose body runs compiled for the widest vector instructions this CPU has
/// (AVX-512, else AVX2 + FMA, else the x86-64 baseline), chosen at run time: the body is an
/// `#[inline(always)]` function inlined into one copy per instruction set, so its loops vectorise
/// at that width. (A closure handed to a target-feature wrapper is not reliably inlined across
/// codegen units; a macro-made copy is.)
#[macro_export]
macro_rules! widest_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn body($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                unsafe fn wide($($a: $t),*) $(-> $r)? {
                    body($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) $(-> $r)? {
                    body($($a),*)
                }
                match $crate::ops::cpu::Isa::best() {
                    // SAFETY: the CPU has these instructions (detected at run time).
                    $crate::ops::cpu::Isa::Avx512 => return unsafe { wide($($a),*) },
                    $crate::ops::cpu::Isa::Avx2 => return unsafe { avx2($($a),*) },
                    $crate::ops::cpu::Isa::Scalar => {}
                }
            }
            body($($a),*)
        }
    };
}

/// eˣ in f32, branch-free so that loops over it vectorise: x = n·ln2 + r with |r| ≤ ln2/2,
/// eʳ by a degree-6 polynomial (Cephes' expf coefficients), 2ⁿ built in the exponent bits.
/// Relative error below 2·10⁻⁷ (a few ulp); 0 below −87.3 (where f32's eˣ is subnormal or 0)
/// and +∞ above 88 (f32's eˣ overflows at 88.7).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.336_54, 88.0);
    let n = (xc * LOG2E).round_ties_even();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = er * scale;
    if x < -87.336_54 {
        0.0
    } else if x > 88.0 {
        f32::INFINITY
    } else {
        y
    }
}

/// tanh x = 1 − 2/(e^{2x} + 1), through `exp` (absolute error ~1e-7; ±1 beyond |x| ≈ 44).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// row ← exp(row − shift); returns Σ row, summed in 16 f32 lanes and then in f64.
#[inline(always)]
pub fn exp_shifted_sum(row: &mut [f32], shift: f32) -> f64 {
    let mut lanes = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        for (l, x) in lanes.iter_mut().zip(c.iter_mut()) {
            *x = exp(*x - shift);
            *l += *x;
        }
    }
    let mut sum: f64 = lanes.iter().map(|&l| l as f64).sum();
    for x in chunks.into_remainder() {
        *x = exp(*x - shift);
        sum += *x as f64;
    }
    sum
}

widest_fn! {
    /// row ← softmax(row) in place; returns (max, Σ exp(row − max)) for the log-sum-exp.
    pub fn softmax_in_place(row: &mut [f32]) -> (f32, f64) {
        let m = max(row);
        let sum = exp_shifted_sum(row, m);
        let inv = (1.0 / sum) as f32;
        row.iter_mut().for_each(|x| *x *= inv);
        (m, sum)
    }
}

widest_fn! {
    /// row ← exp(row − max(row)); returns (max, Σ row): one block of a row's log-sum-exp.
    pub fn exp_max_sum(row: &mut [f32]) -> (f32, f64) {
        let m = max(row);
        (m, exp_shifted_sum(row, m))
    }
}

widest_fn! {
    /// row ← exp(row − shift) in place.
    pub fn exp_shifted(row: &mut [f32], shift: f32) {
        row.iter_mut().for_each(|x| *x = exp(*x - shift));
    }
}

/// The largest element (−∞ for an empty slice), in 16 lanes.
#[inline(always)]
pub fn max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = l.max(x);
        }
    }
    let m = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    chunks.remainder().iter().copied().fold(m, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_libm_everywhere() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 87.9 {
            let (a, b) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(0.0), 1.0);
        let mut row: Vec<f32> = (0..37).map(|i| i as f32 * 0.25 - 3.0).collect();
        let m = max(&row);
        assert_eq!(m, 6.0);
        let want: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
        let got = exp_shifted_sum(&mut row, m);
        assert!(((got - want) / want).abs() < 1e-6);
    }
}
