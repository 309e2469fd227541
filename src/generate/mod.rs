//! Batched sampling with a KV cache. Prompts of different lengths are left-padded and run together;
//! each row stops on its own stop tokens and leaves the batch, so finished rows cost nothing.
//! With `max_rows`, at most that many rows decode at once and a finished row's place goes to the
//! next waiting prompt (continuous refill), so a batch never waits for its longest response.
//! A prompt repeated in the input (GRPO's G samples of one prompt) is prefilled once.
//! Every sampled token comes with its log-prob under the sampling distribution and under the model
//! (temperature 1, no truncation) — the numbers PPO needs for the old policy.

mod sampler;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::model::{
    check_ids, left_padded, swap_remove_order, CacheRows, CausalLm, KvCache, StepInputs,
};
use crate::ops;
pub use sampler::sampling_logprobs;
use sampler::{argmax, draw, NextToken};

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
    /// Row i samples from random stream `first_stream + i`: a rank that samples its share of a
    /// batch starting at row r passes r, and draws what one process sampling it all would.
    pub first_stream: u64,
    /// At most this many rows decode at once (0: every row). Bounds the KV cache's memory.
    pub max_rows: usize,
    /// With `max_rows`: a finished row's place goes to the next waiting prompt at once
    /// (continuous refill). Off, rows run in waves of `max_rows`, each waiting for its longest.
    pub refill: bool,
    /// Prefill each distinct prompt once and copy its keys and values to every row that samples
    /// it. Off, every row prefills its own copy (as transformers' `num_return_sequences` does).
    pub share_prefill: bool,
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
            first_stream: 0,
            max_rows: 0,
            refill: true,
            share_prefill: true,
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

/// How a `generate` call ran: what the schedule options changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Decoding steps (forward passes of one token per row).
    pub decode_steps: usize,
    /// Σ over decoding steps of the rows in the step.
    pub row_steps: usize,
    /// Prompts encoded, and their tokens (padding excluded).
    pub prefill_prompts: usize,
    pub prefill_tokens: usize,
    /// Times waiting rows joined the batch.
    pub admissions: usize,
    /// The most rows that decoded together.
    pub peak_rows: usize,
}

/// Samples continuations of every prompt. Row i uses its own random stream (seed, first_stream + i), so a row's
/// sample does not depend on what else is in the batch, nor on when it was admitted.
pub fn generate(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
) -> Result<Vec<Sample>> {
    generate_scheduled(model, prompts, cfg).map(|(s, _)| s)
}

/// `generate`, with how it was scheduled.
pub fn generate_scheduled(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
) -> Result<(Vec<Sample>, Schedule)> {
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
    mc.check_context(
        t0.saturating_add(cfg.max_new_tokens),
        &format!("prompt length {t0} + max_new_tokens {}", cfg.max_new_tokens),
    )?;
    let mut samples: Vec<Sample> = prompts
        .iter()
        .map(|p| Sample {
            prompt: p.clone(),
            ..Default::default()
        })
        .collect();
    let mut schedule = Schedule::default();
    if prompts.is_empty() || cfg.max_new_tokens == 0 {
        return Ok((samples, schedule));
    }
    let mut rngs: Vec<ChaCha8Rng> = (0..prompts.len())
        .map(|i| {
            let mut r = ChaCha8Rng::seed_from_u64(cfg.seed);
            r.set_stream(cfg.first_stream + i as u64);
            r
        })
        .collect();
    // Decoding steps may use the model's bf16 weight copies, when it has them.
    let _decoding = ops::skinny::DecodeScope::open();

    // A model whose rotary frequencies change with the length (LongRoPE) re-encodes the whole
    // batch at the switch, as transformers does; its rows all decode together.
    let longest = (t0 + cfg.max_new_tokens) as u32;
    let cap = if cfg.max_rows == 0 || model.rope_frequencies_change(0, longest) {
        prompts.len()
    } else {
        cfg.max_rows.min(prompts.len())
    };
    // Refill once an eighth of the places are free: each admission copies the batch's cache.
    let refill_at = (cap / 8).max(1);
    let mut prefills = Prefills::new(model, prompts, cfg.share_prefill);
    let mut batch = Batch::new(mc.num_layers, cfg.max_new_tokens);
    let mut admitted = 0;
    let plain = cfg.temperature == 1.0 && cfg.top_k == 0 && cfg.top_p >= 1.0;
    loop {
        // Phase 1: waiting prompts take the free places.
        let (free, waiting) = (cap - batch.rows.len(), prompts.len() - admitted);
        if waiting > 0
            && free > 0
            && (batch.rows.is_empty() || (cfg.refill && free >= refill_at.min(waiting)))
        {
            let new: Vec<usize> = (admitted..admitted + free.min(waiting)).collect();
            admitted += new.len();
            batch.admit(&new, &mut prefills)?;
            schedule.admissions += 1;
            schedule.peak_rows = schedule.peak_rows.max(batch.rows.len());
        }
        if batch.rows.is_empty() {
            break;
        }

        // Phase 2: one token for every row; the rows' distributions in parallel, the draws in
        // row order, each from its own stream.
        let next: Vec<NextToken> = batch.logits.par_iter().map(|l| NextToken::of(l)).collect();
        let mut keep = Vec::with_capacity(batch.rows.len());
        // The token each batch row drew, fed back to it unless it finished.
        let mut drawn = vec![0u32; batch.rows.len()];
        for (j, &row) in batch.rows.iter().enumerate() {
            let (logits, model) = (&batch.logits[j], &next[j]);
            let (tok, sample_lp) = if cfg.temperature == 0.0 {
                (argmax(logits), 0.0)
            } else if plain {
                let t = model.draw(&mut rngs[row]);
                (t, logits[t] - model.lse)
            } else {
                let lp = sampling_logprobs(logits, cfg);
                let t = draw(&lp, &mut rngs[row]);
                (t, lp[t])
            };
            let s = &mut samples[row];
            s.tokens.push(tok as u32);
            s.sampling_logprobs.push(sample_lp);
            s.model_logprobs.push(logits[tok] - model.lse);
            s.entropies.push(model.entropy);
            drawn[j] = tok as u32;
            if cfg.stop_ids.contains(&(tok as u32)) {
                s.stopped = true;
            } else if s.tokens.len() < cfg.max_new_tokens {
                keep.push(j);
            }
        }
        let order = batch.keep(&keep)?;
        if batch.rows.is_empty() {
            continue;
        }
        // Each kept row's token, in the row's new place.
        let fed: Vec<u32> = order.iter().map(|&j| drawn[j]).collect();

        // Phase 3: the kept rows' new tokens through the model.
        batch.step(model, fed, &samples, prefills.pad)?;
        schedule.decode_steps += 1;
        schedule.row_steps += batch.rows.len();
    }
    schedule.prefill_prompts = prefills.encoded;
    schedule.prefill_tokens = prefills.encoded_tokens;
    Ok((samples, schedule))
}

/// The rows decoding together: their cache, key masks and next-token logits.
struct Batch {
    /// The prompt index of each batch row.
    rows: Vec<usize>,
    /// Positions the cache reserves when it is rebuilt (the most a row can still add).
    headroom: usize,
    key_mask: Vec<Vec<u8>>,
    cache: KvCache,
    logits: Vec<Vec<f32>>,
}

impl Batch {
    fn new(num_layers: usize, headroom: usize) -> Self {
        Batch {
            rows: vec![],
            headroom,
            key_mask: vec![],
            cache: KvCache::new(num_layers),
            logits: vec![],
        }
    }

    /// Rows `new` join, from their prompts' prefills (made now when not made yet).
    fn admit(&mut self, new: &[usize], prefills: &mut Prefills) -> Result<()> {
        prefills.ensure(new)?;
        // Positions every remaining row has as padding go first.
        let lead = self
            .key_mask
            .iter()
            .map(|m| m.iter().position(|&x| x != 0).unwrap_or(m.len()))
            .min()
            .unwrap_or(0);
        for m in &mut self.key_mask {
            m.drain(..lead);
        }
        let live: Vec<usize> = (0..self.rows.len()).collect();
        let mut parts = vec![CacheRows {
            cache: &self.cache,
            rows: &live,
            from: lead,
        }];
        // The new rows' keys and values, one part per run of rows from the same prefill.
        let picks: Vec<(usize, Vec<usize>)> = new
            .chunk_by(|&a, &b| prefills.slot(a).0 == prefills.slot(b).0)
            .map(|run| {
                let b = prefills.slot(run[0]).0;
                (b, run.iter().map(|&r| prefills.slot(r).1).collect())
            })
            .collect();
        for (b, picked) in &picks {
            let done = prefills.batches[*b].as_ref().expect("a live prefill");
            parts.push(CacheRows {
                cache: &done.cache,
                rows: picked,
                from: 0,
            });
            for &i in picked {
                self.key_mask.push(done.mask[i].clone());
                self.logits.push(done.logits[i].clone());
            }
        }
        let cache = KvCache::gather(&parts, self.headroom)?;
        self.cache = cache;
        let len = self.cache.len();
        for m in &mut self.key_mask {
            if m.len() < len {
                m.splice(0..0, std::iter::repeat_n(0, len - m.len()));
            }
        }
        self.rows.extend_from_slice(new);
        prefills.admitted(new);
        Ok(())
    }

    /// Keeps batch rows `keep` (ascending); the others have finished. Returns the kept rows' old
    /// indices in their new places (for the caller's per-row values).
    fn keep(&mut self, keep: &[usize]) -> Result<Vec<usize>> {
        if keep.len() == self.rows.len() {
            return Ok(keep.to_vec());
        }
        if keep.is_empty() {
            self.rows.clear();
            self.key_mask.clear();
            self.logits.clear();
            self.cache = KvCache::new(self.cache.num_layers());
            return Ok(vec![]);
        }
        // In place: each leaving row's place takes a row from the end of the batch.
        let order = swap_remove_order(keep);
        self.cache.compact(&order)?;
        self.key_mask = order
            .iter()
            .map(|&j| std::mem::take(&mut self.key_mask[j]))
            .collect();
        self.rows = order.iter().map(|&j| self.rows[j]).collect();
        Ok(order)
    }

    /// Feeds each row its newest token and keeps the next-token logits.
    fn step(
        &mut self,
        model: &CausalLm,
        fed: Vec<u32>,
        samples: &[Sample],
        pad: u32,
    ) -> Result<()> {
        let mc = &model.config;
        // The fed token's position: the row's length before it.
        let position = |r: usize| (samples[r].prompt.len() + samples[r].tokens.len() - 1) as u32;
        let now = self.rows.iter().map(|&r| position(r)).max().unwrap_or(0);
        for m in self.key_mask.iter_mut() {
            m.push(1);
        }
        if model.rope_frequencies_change(now.saturating_sub(1), now) {
            // LongRoPE's first step past the original context: as transformers does, the cache
            // (rotated with the short factors) is dropped and the whole sequence encoded again.
            let full: Vec<Vec<u32>> = self
                .rows
                .iter()
                .map(|&r| {
                    samples[r]
                        .prompt
                        .iter()
                        .chain(&samples[r].tokens)
                        .copied()
                        .collect()
                })
                .collect();
            let (ids, mask) = left_padded(&full, pad);
            self.key_mask = mask;
            self.cache = KvCache::new(mc.num_layers);
            self.cache.reserve(self.headroom);
            let inp = StepInputs::from_padded(mc, &ids, &self.key_mask)?;
            let hidden = model.forward_hidden(&inp, Some(&mut self.cache))?;
            let t = ids[0].len();
            self.logits = model
                .logits(&hidden.narrow(1, t - 1, 1)?)?
                .squeeze(1)?
                .to_vec2::<f32>()?;
            return Ok(());
        }
        let inp = StepInputs {
            ids: Tensor::from_vec(fed, (self.rows.len(), 1), &Device::Cpu)?,
            position_ids: self.rows.iter().map(|&r| vec![position(r)]).collect(),
            attn_bias: ops::attention_bias(&self.key_mask, 1, mc.uniform_window())?,
            local_attn_bias: mc
                .mixed_window()
                .map(|w| ops::attention_bias(&self.key_mask, 1, Some(w)))
                .transpose()?,
            path: ops::default_path(),
        };
        let hidden = model.forward_hidden(&inp, Some(&mut self.cache))?;
        self.logits = model.logits(&hidden)?.squeeze(1)?.to_vec2::<f32>()?;
        Ok(())
    }
}

/// Prompts prefilled and waiting for their rows to be admitted: each distinct prompt is encoded
/// once (when its first row is admitted) and kept until its last row is.
struct Prefills<'a> {
    model: &'a CausalLm,
    prompts: &'a [Vec<u32>],
    pad: u32,
    /// The distinct prompt of each prompt (each its own when sharing is off).
    distinct_of: Vec<usize>,
    /// Rows not yet admitted, per distinct prompt.
    waiting: Vec<usize>,
    /// (prefill batch, row in it) of each distinct prompt once encoded.
    slots: Vec<Option<(usize, usize)>>,
    /// Prefill batches; dropped once all their rows are admitted.
    batches: Vec<Option<Prefill>>,
    encoded: usize,
    encoded_tokens: usize,
}

struct Prefill {
    cache: KvCache,
    mask: Vec<Vec<u8>>,
    logits: Vec<Vec<f32>>,
    /// Rows of its prompts not yet admitted.
    waiting: usize,
}

impl<'a> Prefills<'a> {
    fn new(model: &'a CausalLm, prompts: &'a [Vec<u32>], share: bool) -> Self {
        let mc = &model.config;
        let pad = mc
            .pad_token_id
            .filter(|&p| (p as usize) < mc.vocab_size)
            .unwrap_or(0);
        let distinct_of = if share {
            distinct_prompts(prompts)
        } else {
            (0..prompts.len()).collect()
        };
        let n = distinct_of.iter().max().map_or(0, |&m| m + 1);
        let mut waiting = vec![0; n];
        for &d in &distinct_of {
            waiting[d] += 1;
        }
        Prefills {
            model,
            prompts,
            pad,
            distinct_of,
            waiting,
            slots: vec![None; n],
            batches: vec![],
            encoded: 0,
            encoded_tokens: 0,
        }
    }

    fn slot(&self, row: usize) -> (usize, usize) {
        self.slots[self.distinct_of[row]].expect("prefilled before admission")
    }

    /// Encodes, in one batch, the distinct prompts of `rows` not encoded yet.
    fn ensure(&mut self, rows: &[usize]) -> Result<()> {
        let mut todo: Vec<usize> = Vec::new(); // a representative prompt index per distinct prompt
        for &r in rows {
            let d = self.distinct_of[r];
            if self.slots[d].is_none() && !todo.iter().any(|&t| self.distinct_of[t] == d) {
                todo.push(r);
            }
        }
        if todo.is_empty() {
            return Ok(());
        }
        let mc = &self.model.config;
        let seqs: Vec<Vec<u32>> = todo.iter().map(|&r| self.prompts[r].clone()).collect();
        self.encoded += seqs.len();
        self.encoded_tokens += seqs.iter().map(Vec::len).sum::<usize>();
        let (ids, mask) = left_padded(&seqs, self.pad);
        let mut cache = KvCache::new(mc.num_layers);
        let inp = StepInputs::from_padded(mc, &ids, &mask)?;
        let hidden = self.model.forward_hidden(&inp, Some(&mut cache))?;
        let t = ids[0].len();
        let logits = self
            .model
            .logits(&hidden.narrow(1, t - 1, 1)?)?
            .squeeze(1)?
            .to_vec2::<f32>()?;
        let b = self.batches.len();
        let mut waiting = 0;
        for (i, &r) in todo.iter().enumerate() {
            let d = self.distinct_of[r];
            self.slots[d] = Some((b, i));
            waiting += self.waiting[d];
        }
        self.batches.push(Some(Prefill {
            cache,
            mask,
            logits,
            waiting,
        }));
        Ok(())
    }

    /// Counts `rows` as admitted; frees prefills none of whose rows wait any more.
    fn admitted(&mut self, rows: &[usize]) {
        for &r in rows {
            let d = self.distinct_of[r];
            self.waiting[d] -= 1;
            let b = self.slots[d].expect("prefilled before admission").0;
            let done = self.batches[b].as_mut().expect("a live prefill");
            done.waiting -= 1;
            if done.waiting == 0 {
                self.batches[b] = None;
            }
        }
    }
}

/// For every prompt, the index of its distinct prompt (numbered by first appearance).
fn distinct_prompts(prompts: &[Vec<u32>]) -> Vec<usize> {
    let mut first: std::collections::HashMap<&[u32], usize> = std::collections::HashMap::new();
    prompts
        .iter()
        .map(|p| {
            let next = first.len();
            *first.entry(p.as_slice()).or_insert(next)
        })
        .collect()
}
