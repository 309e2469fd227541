//! The estimators behind evaluation reports: win rate with a 95% interval, and the sequence-level
//! KL(π‖π_ref) from the policy's own samples.

/// Win rate of `scores` against `baseline` (paired by prompt): a win counts 1, a tie ½.
/// Returns (rate, low, high) with the Wilson score interval at 95%.
pub fn win_rate(scores: &[f32], baseline: &[f32]) -> (f64, f64, f64) {
    assert_eq!(scores.len(), baseline.len(), "paired scores");
    let n = scores.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let wins: f64 = scores
        .iter()
        .zip(baseline)
        .map(|(a, b)| {
            if a > b {
                1.0
            } else if a == b {
                0.5
            } else {
                0.0
            }
        })
        .sum();
    let (lo, hi) = wilson(wins / n as f64, n);
    (wins / n as f64, lo, hi)
}

/// Wilson score interval (z = 1.96) for a proportion p̂ over n trials.
pub fn wilson(p: f64, n: usize) -> (f64, f64) {
    let z = 1.959_963_984_540_054;
    let n = n as f64;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// KL(π‖π_ref) per sequence, estimated as the mean over samples y ~ π of
/// Σ_t [log π(y_t|·) − log π_ref(y_t|·)] (unbiased; single samples can be negative).
pub fn sequence_kl(policy_logps: &[Vec<f32>], reference_logps: &[Vec<f32>]) -> f64 {
    let n = policy_logps.len();
    if n == 0 {
        return f64::NAN;
    }
    policy_logps
        .iter()
        .zip(reference_logps)
        .map(|(p, q)| p.iter().zip(q).map(|(a, b)| (a - b) as f64).sum::<f64>())
        .sum::<f64>()
        / n as f64
}

/// Mean and its standard error.
pub fn mean_sem(xs: &[f32]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
    if xs.len() < 2 {
        return (m, f64::NAN);
    }
    let var = xs.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / (n - 1.0);
    (m, (var / n).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn win_rate_counts_ties_as_half_and_has_the_wilson_interval() {
        let (r, _, _) = win_rate(&[1.0, 2.0, 3.0, 0.0], &[0.0, 2.0, 4.0, -1.0]);
        assert_eq!(r, (1.0 + 0.5 + 0.0 + 1.0) / 4.0);
        // Known values: p̂ = 0.5, n = 100 → [0.4038, 0.5962]; p̂ = 0, n = 10 → [0, 0.2775].
        let (lo, hi) = wilson(0.5, 100);
        assert!(
            (lo - 0.40383).abs() < 1e-4 && (hi - 0.59617).abs() < 1e-4,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson(0.0, 10);
        assert!(lo.abs() < 1e-12 && (hi - 0.27753).abs() < 1e-4, "{hi}");
        let (lo, hi) = wilson(1.0, 10);
        assert!((lo - 0.72247).abs() < 1e-4 && (hi - 1.0).abs() < 1e-12);
    }

    #[test]
    fn kl_estimate_is_exact_when_samples_follow_the_policy() {
        // π = (0.75, 0.25), π_ref = (0.5, 0.5); samples in exact proportion 3:1.
        let (p, q) = ([0.75f32.ln(), 0.25f32.ln()], [0.5f32.ln(), 0.5f32.ln()]);
        let pol = vec![vec![p[0]], vec![p[0]], vec![p[0]], vec![p[1]]];
        let rf = vec![vec![q[0]], vec![q[0]], vec![q[0]], vec![q[1]]];
        let exact = 0.75 * (0.75f64 / 0.5).ln() + 0.25 * (0.25f64 / 0.5).ln();
        assert!((sequence_kl(&pol, &rf) - exact).abs() < 1e-6);
        // Tokens add up; identical models give 0.
        let two = vec![vec![p[0], p[1]]; 1];
        assert!(sequence_kl(&two, &two).abs() < 1e-12);
        let (m, sem) = mean_sem(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (sem - (1.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }
}
