//! One rollout: episodes sampled from the policy and scored, with the reference's log-probs and
//! the value model's estimates, kept as padded `[N, W]` tensors. Column t of row n holds the
//! quantity for token t + 1 of sequence n — the layout of `CausalLm::completion_logprobs` — and
//! `mask` marks the response tokens; everything outside the response is 0.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::time::Instant;

use super::Reference;
use crate::data::prompts::Prompt;
use crate::generate::{generate, Sample, SamplingConfig};
use crate::model::scalar_head::ScalarHead;
use crate::model::{CausalLm, StepInputs};
use crate::ops;
use crate::reward::{Episode, RewardSource};
use crate::text::Tokenizer;

/// A value model: a body with a scalar head at every position.
#[derive(Clone, Copy)]
pub struct ValueModel<'a> {
    pub body: &'a CausalLm,
    pub head: &'a ScalarHead,
}

impl ValueModel<'_> {
    /// V(s_t) for every position that predicts a token, [N, T − 1] (right-padded batch).
    pub fn values(&self, seqs: &[&[u32]]) -> Result<Tensor> {
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let inp = StepInputs::right_padded(&self.body.config, seqs)?;
        let hidden = self.body.forward_hidden(&inp, None)?.narrow(1, 0, t - 1)?;
        self.head.all_positions(&hidden)
    }
}

pub struct Rollout {
    /// Index of each episode's prompt in the prompt set.
    pub prompt_index: Vec<usize>,
    /// Prompt + response ids (a stop token that ended the response included).
    pub sequences: Vec<Vec<u32>>,
    pub prompt_lens: Vec<usize>,
    /// The response text the reward source judged (without the stop token).
    pub texts: Vec<String>,
    /// Whether a stop token ended the response (false: it ran out of length).
    pub stopped: Vec<bool>,
    /// Σ over the response of the sampling distribution's entropy, per episode.
    pub entropies: Vec<f64>,
    /// The reward source's scores, as returned.
    pub scores: Vec<f32>,
    /// Each reward function's mean score over the batch, when the source is a sum of them.
    pub score_components: Vec<(String, f64)>,
    /// [N, W]: 1 on response tokens.
    pub mask: Tensor,
    /// log π_old of each response token (the sampler's, i.e. the policy's before the update).
    pub old_logp: Tensor,
    /// log π_ref of each response token, when the algorithm uses a reference.
    pub ref_logp: Option<Tensor>,
    /// V(s_t) before each response token, when there is a value model.
    pub values: Option<Tensor>,
    /// Seconds spent sampling, scoring, and in the reference and value passes.
    pub generation_secs: f64,
    pub scoring_secs: f64,
    pub passes_secs: f64,
}

/// What `collect` needs besides the policy and the prompts.
pub struct Collect<'a> {
    pub reference: Option<Reference<'a>>,
    pub value: Option<ValueModel<'a>>,
    pub reward: &'a mut dyn RewardSource,
    pub tokenizer: &'a Tokenizer,
    /// Rows per forward pass of the reference and value models.
    pub chunk: usize,
}

/// Phase 1 of an iteration: sample a response to each chosen prompt, score it, and compute the
/// reference log-probs and values of every response token (no gradients).
pub fn collect(
    policy: &CausalLm,
    prompts: &[Prompt],
    chosen: &[usize],
    sampling: &SamplingConfig,
    with: Collect,
) -> Result<Rollout> {
    let t0 = Instant::now();
    let prompt_ids: Vec<Vec<u32>> = chosen.iter().map(|&i| prompts[i].ids.clone()).collect();
    let samples: Vec<Sample> = generate(policy, &prompt_ids, sampling)?;
    let generation_secs = t0.elapsed().as_secs_f64();

    // Scores of the text without its stop token.
    let t1 = Instant::now();
    let bodies: Vec<&[u32]> = samples.iter().map(Sample::response).collect();
    let texts: Vec<String> = bodies
        .iter()
        .map(|b| with.tokenizer.decode(b, true))
        .collect::<Result<_>>()?;
    let episodes: Vec<Episode> = chosen
        .iter()
        .zip(&samples)
        .zip(bodies.iter().zip(&texts))
        .map(|((&i, s), (b, t))| Episode {
            columns: Some(&prompts[i].columns),
            prompt_ids: &s.prompt,
            response_ids: b,
            prompt_text: &prompts[i].text,
            response_text: t,
        })
        .collect();
    let scores = with.reward.score(&episodes)?;
    if let Some(i) = scores.iter().position(|x| !x.is_finite()) {
        bail!(
            "the reward source ({}) returned {} for the response {:?}",
            with.reward.describe(),
            scores[i],
            texts[i]
        );
    }
    let scoring_secs = t1.elapsed().as_secs_f64();

    let sequences: Vec<Vec<u32>> = samples
        .iter()
        .map(|s| s.prompt.iter().chain(&s.tokens).copied().collect())
        .collect();
    let prompt_lens: Vec<usize> = samples.iter().map(|s| s.prompt.len()).collect();
    let mut rollout = Rollout {
        prompt_index: chosen.to_vec(),
        stopped: samples.iter().map(|s| s.stopped).collect(),
        entropies: samples
            .iter()
            .map(|s| s.entropies.iter().map(|&e| e as f64).sum())
            .collect(),
        texts,
        scores,
        score_components: with.reward.components(),
        mask: Tensor::zeros((0, 0), DType::F32, &Device::Cpu)?,
        old_logp: Tensor::zeros((0, 0), DType::F32, &Device::Cpu)?,
        ref_logp: None,
        values: None,
        sequences,
        prompt_lens,
        generation_secs,
        scoring_secs,
        passes_secs: 0.0,
    };
    let t2 = Instant::now();
    let ones: Vec<Vec<f32>> = samples.iter().map(|s| vec![1.0; s.tokens.len()]).collect();
    rollout.mask = rollout.padded(&ones)?;
    let old: Vec<Vec<f32>> = samples.iter().map(|s| s.model_logprobs.clone()).collect();
    rollout.old_logp = rollout.padded(&old)?;
    rollout.ref_logp = with
        .reference
        .map(|r| {
            rollout.no_grad_pass(with.chunk, |s, st| {
                let logprobs = |m: &CausalLm| {
                    m.completion_logprobs(s, st, ops::default_path())
                        .map(|o| o.0)
                };
                match r {
                    Reference::Model(m) => logprobs(m),
                    Reference::PolicyBase => policy.without_adapters(logprobs),
                }
            })
        })
        .transpose()?;
    rollout.values = with
        .value
        .map(|v| rollout.no_grad_pass(with.chunk, |s, _| v.values(s)))
        .transpose()?;
    rollout.passes_secs = t2.elapsed().as_secs_f64();
    Ok(rollout)
}

/// One rank's episodes as they travel to the other ranks (per-token values as response slices).
#[derive(Default, Serialize, Deserialize)]
struct Share {
    prompt_index: Vec<usize>,
    sequences: Vec<Vec<u32>>,
    prompt_lens: Vec<usize>,
    texts: Vec<String>,
    stopped: Vec<bool>,
    entropies: Vec<f64>,
    scores: Vec<f32>,
    score_components: Vec<(String, f64)>,
    old_logp: Vec<Vec<f32>>,
    ref_logp: Option<Vec<Vec<f32>>>,
    values: Option<Vec<Vec<f32>>>,
}

impl Rollout {
    /// Every rank's episodes, in rank order: with each rank holding its contiguous share of the
    /// batch, the rollout one process would have collected, on every rank (so the advantages'
    /// batch statistics — whitening, group and batch scaling, the KL controller — are computed
    /// over the whole batch, in the same order, everywhere). One rank: itself.
    pub fn gather(self) -> Result<Rollout> {
        let world = crate::dist::world();
        if world.size() == 1 {
            return Ok(self);
        }
        let opt = |t: &Option<Tensor>| t.as_ref().map(|t| self.responses(t)).transpose();
        let mine = Share {
            old_logp: self.responses(&self.old_logp)?,
            ref_logp: opt(&self.ref_logp)?,
            values: opt(&self.values)?,
            prompt_index: self.prompt_index,
            sequences: self.sequences,
            prompt_lens: self.prompt_lens,
            texts: self.texts,
            stopped: self.stopped,
            entropies: self.entropies,
            scores: self.scores,
            score_components: self.score_components,
        };
        let shares: Vec<Share> = world
            .all_gather_bytes(&serde_json::to_vec(&mine)?)
            .iter()
            .map(|b| serde_json::from_slice(b))
            .collect::<std::result::Result<_, _>>()?;
        // Each share's component means, weighted by its episodes.
        let n: usize = shares.iter().map(|s| s.scores.len()).sum();
        let mut score_components = mine.score_components;
        for (i, (_, mean)) in score_components.iter_mut().enumerate() {
            *mean = shares
                .iter()
                .map(|s| s.score_components.get(i).map_or(0.0, |c| c.1) * s.scores.len() as f64)
                .sum::<f64>()
                / n.max(1) as f64;
        }
        let mut all = Share {
            score_components,
            ..Share::default()
        };
        for s in shares {
            all.prompt_index.extend(s.prompt_index);
            all.sequences.extend(s.sequences);
            all.prompt_lens.extend(s.prompt_lens);
            all.texts.extend(s.texts);
            all.stopped.extend(s.stopped);
            all.entropies.extend(s.entropies);
            all.scores.extend(s.scores);
            all.old_logp.extend(s.old_logp);
            if let Some(r) = s.ref_logp {
                all.ref_logp.get_or_insert_default().extend(r);
            }
            if let Some(v) = s.values {
                all.values.get_or_insert_default().extend(v);
            }
        }
        let mut rollout = Rollout {
            prompt_index: all.prompt_index,
            sequences: all.sequences,
            prompt_lens: all.prompt_lens,
            texts: all.texts,
            stopped: all.stopped,
            entropies: all.entropies,
            scores: all.scores,
            score_components: all.score_components,
            mask: Tensor::zeros((0, 0), DType::F32, &Device::Cpu)?,
            old_logp: Tensor::zeros((0, 0), DType::F32, &Device::Cpu)?,
            ref_logp: None,
            values: None,
            generation_secs: self.generation_secs,
            scoring_secs: self.scoring_secs,
            passes_secs: self.passes_secs,
        };
        let ones: Vec<Vec<f32>> = all.old_logp.iter().map(|r| vec![1.0; r.len()]).collect();
        rollout.mask = rollout.padded(&ones)?;
        rollout.old_logp = rollout.padded(&all.old_logp)?;
        rollout.ref_logp = all.ref_logp.map(|r| rollout.padded(&r)).transpose()?;
        rollout.values = all.values.map(|v| rollout.padded(&v)).transpose()?;
        Ok(rollout)
    }

    pub fn len(&self) -> usize {
        self.sequences.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    /// W: the width of the per-token tensors.
    pub fn width(&self) -> usize {
        self.sequences.iter().map(Vec::len).max().unwrap_or(1) - 1
    }

    /// The columns of episode n's response tokens.
    pub fn response_columns(&self, n: usize) -> Range<usize> {
        self.prompt_lens[n] - 1..self.sequences[n].len() - 1
    }

    pub fn response_len(&self, n: usize) -> usize {
        self.response_columns(n).len()
    }

    /// The response part of each row of a `[N, W]` tensor.
    pub fn responses(&self, t: &Tensor) -> Result<Vec<Vec<f32>>> {
        let rows = t.to_vec2::<f32>()?;
        Ok(rows
            .into_iter()
            .enumerate()
            .map(|(n, r)| r[self.response_columns(n)].to_vec())
            .collect())
    }

    /// A `[N, W]` tensor holding `rows[n]` in episode n's response columns, 0 elsewhere.
    pub fn padded(&self, rows: &[Vec<f32>]) -> Result<Tensor> {
        let w = self.width();
        let mut out = vec![0f32; rows.len() * w];
        for (n, r) in rows.iter().enumerate() {
            let cols = self.response_columns(n);
            if r.len() != cols.len() {
                bail!(
                    "episode {n}: {} values for {} response tokens",
                    r.len(),
                    cols.len()
                );
            }
            out[n * w + cols.start..n * w + cols.end].copy_from_slice(r);
        }
        Ok(Tensor::from_vec(out, (rows.len(), w), &Device::Cpu)?)
    }

    /// Σ over each response of log π_old − log π_ref (the sequence-level KL estimate), when a
    /// reference was computed.
    pub fn sequence_kl(&self) -> Result<Option<Vec<f64>>> {
        let Some(r) = &self.ref_logp else {
            return Ok(None);
        };
        let (old, reference) = (self.responses(&self.old_logp)?, self.responses(r)?);
        Ok(Some(
            old.iter()
                .zip(&reference)
                .map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y) as f64).sum())
                .collect(),
        ))
    }

    /// Runs `pass` over the sequences in chunks of `chunk` rows (without gradients) and lays its
    /// `[n, w]` outputs into one `[N, W]` tensor, masked to the responses.
    fn no_grad_pass(
        &self,
        chunk: usize,
        pass: impl Fn(&[&[u32]], &[usize]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let w = self.width();
        let mut parts = Vec::new();
        for (seqs, starts) in self
            .sequences
            .chunks(chunk)
            .zip(self.prompt_lens.chunks(chunk))
        {
            let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
            let out = pass(&refs, starts)?.detach();
            let width = out.dim(1)?;
            parts.push(out.pad_with_zeros(1, 0, w - width)?);
        }
        Ok((Tensor::cat(&parts, 0)? * &self.mask)?)
    }

    /// Rows `rows` of a `[N, W]` tensor, cut to the first `width` columns.
    pub fn select(t: &Tensor, rows: &[usize], width: usize) -> Result<Tensor> {
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, rows.len(), &Device::Cpu)?;
        Ok(t.index_select(&idx, 0)?.narrow(1, 0, width)?)
    }
}
