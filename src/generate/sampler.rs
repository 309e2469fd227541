//! The next-token distribution of one row and the draws from it: the model's own (temperature 1,
//! no truncation) in one pass of exponentials, or transformers' temperature / top-k / top-p.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::SamplingConfig;
use crate::ops;

/// log softmax of one row (f64 sum of the exponentials).
fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let mut e = logits.to_vec();
    let (max, sum) = ops::simd::softmax_in_place(&mut e);
    let lse = max + sum.ln() as f32;
    logits.iter().map(|&x| x - lse).collect()
}

/// The model's distribution over the next token of one row, from one pass of exponentials:
/// probabilities, log-sum-exp and entropy (nats).
pub(super) struct NextToken {
    probs: Vec<f32>,
    pub lse: f32,
    pub entropy: f32,
}

impl NextToken {
    pub fn of(logits: &[f32]) -> NextToken {
        let mut probs = logits.to_vec();
        let (max, sum) = ops::simd::softmax_in_place(&mut probs);
        let lse = max + sum.ln() as f32;
        // H = −Σ p·(x − lse) = lse − Σ p·x.
        let px: f64 = probs
            .iter()
            .zip(logits)
            .filter(|(&p, _)| p > 0.0)
            .map(|(&p, &x)| p as f64 * x as f64)
            .sum();
        NextToken {
            probs,
            lse,
            entropy: (lse as f64 - px) as f32,
        }
    }

    /// Draws a token with one uniform number (the model's own distribution: temperature 1, no
    /// truncation).
    pub fn draw(&self, rng: &mut ChaCha8Rng) -> usize {
        let u: f64 = rng.random();
        let mut cum = 0.0f64;
        let mut last_kept = 0;
        for (i, &p) in self.probs.iter().enumerate() {
            if p == 0.0 {
                continue;
            }
            last_kept = i;
            cum += p as f64;
            if u < cum {
                return i;
            }
        }
        last_kept
    }
}

/// The sampling distribution as log-probs (−∞ for removed tokens): temperature, then top-k, then
/// top-p, in transformers' order and with its tie and boundary rules.
pub fn sampling_logprobs(logits: &[f32], cfg: &SamplingConfig) -> Vec<f32> {
    let mut scaled: Vec<f32> = logits.iter().map(|&x| x / cfg.temperature).collect();
    if cfg.top_k > 0 && cfg.top_k < scaled.len() {
        let mut sorted = scaled.clone();
        sorted.select_nth_unstable_by(cfg.top_k - 1, |a, b| b.total_cmp(a));
        let kth = sorted[cfg.top_k - 1];
        for x in scaled.iter_mut().filter(|x| **x < kth) {
            *x = f32::NEG_INFINITY;
        }
    }
    let mut lp = log_softmax(&scaled);
    if cfg.top_p < 1.0 {
        // Remove the least likely tokens whose cumulative probability stays within 1 − p.
        let mut order: Vec<usize> = (0..lp.len()).collect();
        order.sort_by(|&a, &b| lp[a].total_cmp(&lp[b]));
        let mut cum = 0.0f64;
        let last = order.len() - 1;
        for (rank, &i) in order.iter().enumerate() {
            cum += (lp[i] as f64).exp();
            if cum > 1.0 - cfg.top_p as f64 || rank == last {
                break;
            }
            scaled[i] = f32::NEG_INFINITY;
        }
        lp = log_softmax(&scaled);
    }
    lp
}

pub(super) fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Draws an index from log-probs with one uniform number.
pub(super) fn draw(lp: &[f32], rng: &mut ChaCha8Rng) -> usize {
    let u: f64 = rng.random();
    let mut cum = 0.0f64;
    let mut last_kept = 0;
    for (i, &l) in lp.iter().enumerate() {
        if l == f32::NEG_INFINITY {
            continue;
        }
        last_kept = i;
        cum += (l as f64).exp();
        if u < cum {
            return i;
        }
    }
    last_kept
}
