//! Batched sampling with a KV cache. Prompts of different lengths are left-padded and run together;
//! each row stops on its own stop tokens and leaves the batch, so finished rows cost nothing.
//! Every sampled token comes with its log-prob under the sampling distribution and under the model
//! (temperature 1, no truncation) — the numbers PPO needs for the old policy.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::model::{check_ids, CausalLm, KvCache, StepInputs};
use crate::ops;

#[derive(Clone, Debug)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: off).
    pub top_p: f32,
    pub stop_ids: Vec<u32>,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            max_new_tokens: 64,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            stop_ids: vec![],
            seed: 0,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub prompt: Vec<u32>,
    /// Generated tokens, including the stop token when one ended the row.
    pub tokens: Vec<u32>,
    /// log-prob of each token under the distribution it was drawn from (0 for greedy).
    pub sampling_logprobs: Vec<f32>,
    /// log-prob of each token under the model's raw next-token distribution.
    pub model_logprobs: Vec<f32>,
    /// Entropy (nats) of the model's raw next-token distribution at each step.
    pub entropies: Vec<f32>,
    /// True when a stop token ended the row (false: it ran out of max_new_tokens).
    pub stopped: bool,
}

impl Sample {
    /// The generated tokens without the stop token that ended the row (the response's text).
    pub fn response(&self) -> &[u32] {
        &self.tokens[..self.tokens.len() - usize::from(self.stopped)]
    }
}

/// log softmax of one row (f64 sum of the exponentials).
fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let mut e = logits.to_vec();
    let (max, sum) = ops::simd::softmax_in_place(&mut e);
    let lse = max + sum.ln() as f32;
    logits.iter().map(|&x| x - lse).collect()
}

/// The model's distribution over the next token of one row, from one pass of exponentials:
/// probabilities, log-sum-exp and entropy (nats).
struct NextToken {
    probs: Vec<f32>,
    lse: f32,
    entropy: f32,
}

impl NextToken {
    fn of(logits: &[f32]) -> NextToken {
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
    fn draw(&self, rng: &mut ChaCha8Rng) -> usize {
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

fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Draws an index from log-probs with one uniform number.
fn draw(lp: &[f32], rng: &mut ChaCha8Rng) -> usize {
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

/// Samples continuations of every prompt. Row i uses its own random stream (seed, i), so a row's
/// sample does not depend on what else is in the batch.
/// The first row of each distinct prompt, and for every prompt the index of its distinct row.
fn distinct_rows(prompts: &[Vec<u32>]) -> (Vec<usize>, Vec<usize>) {
    let mut first: std::collections::HashMap<&[u32], usize> = std::collections::HashMap::new();
    let mut distinct = Vec::new();
    let row_of = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            *first.entry(p.as_slice()).or_insert_with(|| {
                distinct.push(i);
                distinct.len() - 1
            })
        })
        .collect();
    (distinct, row_of)
}

pub fn generate(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
) -> Result<Vec<Sample>> {
    let mc = &model.config;
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        bail!("prompt {i} is empty: generation needs at least one prompt token");
    }
    check_ids(mc, prompts)?;
    if cfg.temperature < 0.0 || !cfg.temperature.is_finite() {
        bail!(
            "temperature must be ≥ 0 (0 is greedy), got {}",
            cfg.temperature
        );
    }
    if !(cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
        bail!("top_p must be in (0, 1], got {}", cfg.top_p);
    }
    let t0 = prompts.iter().map(Vec::len).max().unwrap_or(0);
    mc.check_length(
        t0 + cfg.max_new_tokens,
        &format!("prompt length {t0} + max_new_tokens {}", cfg.max_new_tokens),
    )?;
    let mut samples: Vec<Sample> = prompts
        .iter()
        .map(|p| Sample {
            prompt: p.clone(),
            ..Default::default()
        })
        .collect();
    if prompts.is_empty() || cfg.max_new_tokens == 0 {
        return Ok(samples);
    }
    let pad = mc
        .pad_token_id
        .filter(|&p| (p as usize) < mc.vocab_size)
        .unwrap_or(0);
    let mut rngs: Vec<ChaCha8Rng> = (0..prompts.len())
        .map(|i| {
            let mut r = ChaCha8Rng::seed_from_u64(cfg.seed);
            r.set_stream(i as u64);
            r
        })
        .collect();

    // Prefill the whole left-padded batch.
    let mut key_mask: Vec<Vec<u8>> = Vec::with_capacity(prompts.len());
    let mut ids = Vec::with_capacity(prompts.len());
    for p in prompts {
        let n = t0 - p.len();
        key_mask.push(
            std::iter::repeat_n(0, n)
                .chain(std::iter::repeat_n(1, p.len()))
                .collect(),
        );
        ids.push(
            std::iter::repeat_n(pad, n)
                .chain(p.iter().copied())
                .collect::<Vec<u32>>(),
        );
    }
    // Decoding steps may use the model's bf16 weight copies, when it has them.
    let _decoding = ops::skinny::DecodeScope::open();
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    let mut cache = KvCache::new(mc.num_layers);
    // A prompt repeated in the batch (GRPO's G samples of one prompt) is prefilled once; its
    // keys and values are copied to each of its rows.
    let (distinct, row_of) = distinct_rows(prompts);
    let pick = |rows: &[usize]| -> (Vec<Vec<u32>>, Vec<Vec<u8>>) {
        (
            rows.iter().map(|&r| ids[r].clone()).collect(),
            rows.iter().map(|&r| key_mask[r].clone()).collect(),
        )
    };
    let (prefill_ids, prefill_mask) = pick(&distinct);
    let inp = StepInputs::from_padded(mc, &prefill_ids, &prefill_mask)?;
    let hidden = model.forward_hidden(&inp, Some(&mut cache))?;
    let distinct_logits = model
        .logits(&hidden.narrow(1, t0 - 1, 1)?)?
        .squeeze(1)?
        .to_vec2::<f32>()?;
    if distinct.len() < prompts.len() {
        let rows: Vec<u32> = row_of.iter().map(|&r| r as u32).collect();
        cache.select_rows(&Tensor::from_vec(rows, prompts.len(), &Device::Cpu)?)?;
    }
    let mut logits: Vec<Vec<f32>> = row_of.iter().map(|&r| distinct_logits[r].clone()).collect();

    // `active[j]` is the prompt index of batch row j.
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    for step in 0..cfg.max_new_tokens {
        let mut keep = Vec::with_capacity(active.len());
        let mut fed = Vec::with_capacity(active.len());
        // The rows' distributions in parallel; the draws in row order, each from its own stream.
        let next: Vec<NextToken> = logits.par_iter().map(|l| NextToken::of(l)).collect();
        let plain = cfg.temperature == 1.0 && cfg.top_k == 0 && cfg.top_p >= 1.0;
        for (j, &row) in active.iter().enumerate() {
            let model = &next[j];
            let (tok, sample_lp) = if cfg.temperature == 0.0 {
                (argmax(&logits[j]), 0.0)
            } else if plain {
                let t = model.draw(&mut rngs[row]);
                (t, logits[j][t] - model.lse)
            } else {
                let lp = sampling_logprobs(&logits[j], cfg);
                let t = draw(&lp, &mut rngs[row]);
                (t, lp[t])
            };
            let s = &mut samples[row];
            s.tokens.push(tok as u32);
            s.sampling_logprobs.push(sample_lp);
            s.model_logprobs.push(logits[j][tok] - model.lse);
            s.entropies.push(model.entropy);
            if cfg.stop_ids.contains(&(tok as u32)) {
                s.stopped = true;
            } else {
                keep.push(j);
                fed.push(tok as u32);
            }
        }
        if keep.is_empty() || step + 1 == cfg.max_new_tokens {
            break;
        }
        if keep.len() < active.len() {
            let rows = Tensor::from_vec(
                keep.iter().map(|&j| j as u32).collect::<Vec<_>>(),
                keep.len(),
                &Device::Cpu,
            )?;
            cache.select_rows(&rows)?;
            key_mask = keep.iter().map(|&j| key_mask[j].clone()).collect();
            active = keep.iter().map(|&j| active[j]).collect();
        }
        for m in key_mask.iter_mut() {
            m.push(1);
        }
        let position_ids: Vec<Vec<u32>> = active.iter().map(|&r| vec![next_pos[r]]).collect();
        let max_before = active.iter().map(|&r| next_pos[r] - 1).max().unwrap_or(0);
        for &r in &active {
            next_pos[r] += 1;
        }
        let max_now = max_before + 1;
        if model.rope_frequencies_change(max_before, max_now) {
            // LongRoPE's first step past the original context: as transformers does, the cache
            // (rotated with the short factors) is dropped and the whole sequence encoded again.
            let full: Vec<Vec<u32>> = active
                .iter()
                .map(|&r| {
                    let n = t0 - prompts[r].len();
                    std::iter::repeat_n(pad, n)
                        .chain(prompts[r].iter().copied())
                        .chain(samples[r].tokens.iter().copied())
                        .collect()
                })
                .collect();
            cache = KvCache::new(mc.num_layers);
            let inp = StepInputs::from_padded(mc, &full, &key_mask)?;
            let hidden = model.forward_hidden(&inp, Some(&mut cache))?;
            let t = full[0].len();
            logits = model
                .logits(&hidden.narrow(1, t - 1, 1)?)?
                .squeeze(1)?
                .to_vec2::<f32>()?;
            continue;
        }
        let inp = StepInputs {
            ids: Tensor::from_vec(fed, (active.len(), 1), &Device::Cpu)?,
            position_ids,
            attn_bias: ops::attention_bias(&key_mask, 1, mc.uniform_window())?,
            local_attn_bias: mc
                .mixed_window()
                .map(|w| ops::attention_bias(&key_mask, 1, Some(w)))
                .transpose()?,
            path: ops::default_path(),
        };
        let hidden = model.forward_hidden(&inp, Some(&mut cache))?;
        logits = model.logits(&hidden)?.squeeze(1)?.to_vec2::<f32>()?;
    }
    Ok(samples)
}
