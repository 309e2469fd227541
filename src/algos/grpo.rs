//! GRPO (DeepSeekMath, Shao et al. 2024) and its critic-free relatives on the shared RL loop.
//! Each prompt gets G = `num_generations` sampled responses; a response's advantage is one number
//! from its group's (or the batch's) rewards, the same for every one of its tokens:
//!
//!   grpo         Â_i = r_i − mean_group(r), divided by std_group(r) + 1e-4 (`scale_rewards =
//!                "group"`), by std_batch(r) + 1e-4 ("batch"), or not at all ("none")
//!   rloo         Â_i = r_i − (Σ_group r − r_i) / (G − 1)            (leave-one-out baseline)
//!   reinforce++  Â_i = (r_i − mean_batch(r)) / (std_batch(r) + 1e-4)
//!
//! (std is the sample standard deviation, n − 1, as torch's `std` is in TRL.) Per token, with
//! ρ = π/π_old and, when β > 0, the k3 estimator of KL(π‖π_ref):
//!
//!   ℓ_t = −min(ρ·Â, clip(ρ, 1 − ε, 1 + ε_high)·Â) + β·(π_ref/π − log(π_ref/π) − 1)
//!
//! and `loss_type` says how the ℓ_t of an optimizer step's responses are averaged (TRL's names):
//!   grpo     mean over each response's tokens, then over the responses
//!   bnpo     Σ ℓ over all tokens / number of tokens
//!   dr_grpo  Σ ℓ / (responses × max_completion_length)
//!   dapo     Σ ℓ / number of tokens (TRL: over the whole accumulated batch; here every
//!            normaliser is already the optimizer step's, so bnpo and dapo coincide)

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::rl::{Advantages, MicroBatch, Objective, Rollout};
use crate::settings::{KeyDoc, Section};

/// How a response's advantage is estimated from the rewards.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum Estimator {
    #[serde(rename = "grpo")]
    Grpo,
    #[serde(rename = "rloo")]
    Rloo,
    #[serde(rename = "reinforce++")]
    ReinforcePlusPlus,
}

/// GRPO's reward scaling (TRL's `scale_rewards`).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    Group,
    Batch,
    None,
}

/// How token losses are averaged (TRL's `loss_type`).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    Grpo,
    Bnpo,
    DrGrpo,
    Dapo,
}

/// GRPO's settings, under TRL's `GRPOConfig` names.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    pub advantage: Estimator,
    pub num_generations: usize,
    pub max_completion_length: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub beta: f64,
    pub epsilon: f64,
    /// 0: the same as `epsilon` (DAPO's clip-higher uses e.g. 0.28).
    pub epsilon_high: f64,
    pub num_iterations: usize,
    pub loss_type: LossType,
    pub scale_rewards: ScaleRewards,
    pub mask_truncated_completions: bool,
    pub max_num_seqs: usize,
    pub sample_every: usize,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            advantage: Estimator::Grpo,
            num_generations: 8,
            max_completion_length: 256,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: 0.0,
            num_iterations: 1,
            loss_type: LossType::Dapo,
            scale_rewards: ScaleRewards::Group,
            mask_truncated_completions: false,
            max_num_seqs: 0,
            sample_every: 10,
        }
    }
}

impl Section for GrpoConfig {
    const TITLE: &'static str = "grpo";
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::new("advantage", "\"grpo\" (group-relative), \"rloo\" (leave-one-out baseline) or \"reinforce++\" (batch-normalised)"),
        KeyDoc::new("num_generations", "G: responses sampled per prompt (at least 2)"),
        KeyDoc::new("max_completion_length", "max new tokens per response"),
        KeyDoc::new("temperature", "sampling temperature"),
        KeyDoc::new("top_k", "top-k filter (0: off)"),
        KeyDoc::new("top_p", "nucleus filter (1: off)"),
        KeyDoc::new("beta", "β of the k3 KL penalty to the reference; 0 loads no reference"),
        KeyDoc::new("epsilon", "ε of the clipped ratio"),
        KeyDoc::new("epsilon_high", "upper clip ε (DAPO's clip-higher); 0: epsilon"),
        KeyDoc::new("num_iterations", "μ: updates on each batch of responses (importance ratios after the first)"),
        KeyDoc::new("loss_type", "\"grpo\" | \"bnpo\" | \"dr_grpo\" | \"dapo\": how token losses are averaged (TRL's definitions)"),
        KeyDoc::new("scale_rewards", "grpo's advantage divided by the group's reward std (\"group\"), the batch's (\"batch\") or not (\"none\")"),
        KeyDoc::new("mask_truncated_completions", "leave responses that hit max_completion_length out of the loss"),
        KeyDoc::new("max_num_seqs", "rows that decode at once (vLLM's name; 0: the whole rollout); a finished row's place goes to the next waiting response"),
        KeyDoc::new("sample_every", "log prompts, responses and rewards to samples.jsonl every N iterations"),
    ];
}

impl GrpoConfig {
    pub fn validate(&self) -> Result<()> {
        if self.num_generations < 2 {
            bail!(
                "num_generations must be at least 2 (advantages compare responses to one prompt)"
            );
        }
        if self.max_completion_length == 0 || self.num_iterations == 0 {
            bail!("max_completion_length and num_iterations must be at least 1");
        }
        for (k, v) in [
            ("beta", self.beta),
            ("epsilon", self.epsilon),
            ("epsilon_high", self.epsilon_high),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{k} must be a finite number ≥ 0, got {v}");
            }
        }
        Ok(())
    }

    fn epsilon_high(&self) -> f64 {
        if self.epsilon_high > 0.0 {
            self.epsilon_high
        } else {
            self.epsilon
        }
    }
}

/// Sample standard deviation (n − 1), 0 for fewer than two values.
fn std(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let m = xs.iter().sum::<f64>() / xs.len() as f64;
    (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

const STD_EPS: f64 = 1e-4;

/// Each response's advantage from the rewards of its group (consecutive runs of `g`) or batch;
/// also the fraction of groups whose rewards are all equal (no signal).
pub fn advantages(
    rewards: &[f64],
    g: usize,
    estimator: Estimator,
    scale: ScaleRewards,
) -> Result<(Vec<f64>, f64)> {
    if g < 2 || !rewards.len().is_multiple_of(g) {
        bail!("{} rewards do not form groups of {g}", rewards.len());
    }
    let groups: Vec<&[f64]> = rewards.chunks(g).collect();
    let zero_std = groups.iter().filter(|r| std(r) == 0.0).count() as f64 / groups.len() as f64;
    let batch_std = std(rewards);
    let adv = match estimator {
        Estimator::Grpo => groups
            .iter()
            .flat_map(|r| {
                let (m, s) = (mean(r), std(r));
                r.iter().map(move |x| match scale {
                    ScaleRewards::Group => (x - m) / (s + STD_EPS),
                    ScaleRewards::Batch => (x - m) / (batch_std + STD_EPS),
                    ScaleRewards::None => x - m,
                })
            })
            .collect(),
        Estimator::Rloo => groups
            .iter()
            .flat_map(|r| {
                let sum: f64 = r.iter().sum();
                r.iter().map(move |x| x - (sum - x) / (g - 1) as f64)
            })
            .collect(),
        Estimator::ReinforcePlusPlus => {
            let m = mean(rewards);
            rewards
                .iter()
                .map(|x| (x - m) / (batch_std + STD_EPS))
                .collect()
        }
    };
    Ok((adv, zero_std))
}

/// Sums over one micro-batch of the token losses and the clipping counts.
pub struct TokenSums {
    /// The micro-batch's loss, already divided as `loss_type` says by the minibatch's
    /// normaliser (so micro-batches add up to the minibatch's loss).
    pub loss: Tensor,
    pub kl: f64,
    pub clipped_low: f64,
    pub clipped_high: f64,
}

/// The clipped, optionally KL-penalised token losses of a micro-batch, normalised.
/// `logp`, `old_logp`, `ref_logp`, `mask`: [N, T]; `advantages`: [N, T] (one value per row).
#[allow(clippy::too_many_arguments)]
pub fn token_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    ref_logp: Option<&Tensor>,
    advantages: &Tensor,
    mask: &Tensor,
    cfg: &GrpoConfig,
    minibatch_responses: usize,
    minibatch_tokens: usize,
) -> Result<TokenSums> {
    let ratio = (logp - old_logp)?.exp()?;
    let (lo, hi) = (1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high());
    let unclipped = (&ratio * advantages)?;
    let clipped = (ratio.clamp(lo, hi)? * advantages)?;
    let mut per_token = unclipped.minimum(&clipped)?.neg()?;
    let mut kl = 0.0;
    if let (Some(r), true) = (ref_logp, cfg.beta > 0.0) {
        // k3 = exp(ref − logp) − (ref − logp) − 1 ≥ 0
        let d = (r - logp)?;
        let k3 = ((d.exp()? - &d)? - 1.0)?;
        kl = (k3.detach() * mask)?.sum_all()?.to_scalar::<f32>()? as f64;
        per_token = (per_token + (k3 * cfg.beta)?)?;
    }
    let masked = (per_token * mask)?;
    let loss = match cfg.loss_type {
        LossType::Grpo => {
            let lengths = mask.sum(1)?.clamp(1.0, f64::MAX)?;
            ((masked.sum(1)? / lengths)?.sum_all()? / minibatch_responses.max(1) as f64)?
        }
        LossType::Bnpo | LossType::Dapo => (masked.sum_all()? / minibatch_tokens.max(1) as f64)?,
        LossType::DrGrpo => {
            (masked.sum_all()? / (minibatch_responses.max(1) * cfg.max_completion_length) as f64)?
        }
    };
    let count = |t: Tensor| -> Result<f64> {
        Ok((t.to_dtype(DType::F32)? * mask)?
            .sum_all()?
            .to_scalar::<f32>()? as f64)
    };
    let zero = advantages.zeros_like()?;
    let ratio = ratio.detach();
    Ok(TokenSums {
        loss,
        kl,
        // TRL's clip_ratio/low_mean and high_mean: the ratio clipped where it binds.
        clipped_low: count(
            (ratio.lt(lo)?.to_dtype(DType::F32)? * advantages.lt(&zero)?.to_dtype(DType::F32)?)?,
        )?,
        clipped_high: count(
            (ratio.gt(hi)?.to_dtype(DType::F32)? * advantages.gt(&zero)?.to_dtype(DType::F32)?)?,
        )?,
    })
}

/// GRPO / RLOO / REINFORCE++ as an objective of the shared loop.
pub struct Grpo {
    pub cfg: GrpoConfig,
}

impl Objective for Grpo {
    fn needs_reference(&self) -> bool {
        self.cfg.beta > 0.0
    }

    fn advantages(&mut self, rollout: &Rollout) -> Result<Advantages> {
        let g = self.cfg.num_generations;
        let rewards: Vec<f64> = rollout.scores.iter().map(|&s| s as f64).collect();
        let (adv, zero_std) = advantages(&rewards, g, self.cfg.advantage, self.cfg.scale_rewards)?;
        let rows: Vec<Vec<f32>> = (0..rollout.len())
            .map(|n| vec![adv[n] as f32; rollout.response_len(n)])
            .collect();
        // Responses that ran out of length leave the loss (and its normalisers) when asked.
        let excluded: Vec<bool> = if self.cfg.mask_truncated_completions {
            rollout.stopped.iter().map(|&s| !s).collect()
        } else {
            vec![]
        };
        let group_std: Vec<f64> = rewards.chunks(g).map(std).collect();
        let lengths: Vec<f64> = (0..rollout.len())
            .map(|n| rollout.response_len(n) as f64)
            .collect();
        let clipped = rollout.stopped.iter().filter(|&&s| !s).count() as f64;
        let tokens: f64 = lengths.iter().sum();
        let entropy: f64 = rollout.entropies.iter().sum();
        let mut metrics = vec![("entropy".to_string(), entropy / tokens.max(1.0))];
        for (name, m) in &rollout.score_components {
            metrics.push((format!("rewards/{name}/mean"), *m));
        }
        metrics.extend([
            ("reward".into(), mean(&rewards)),
            ("reward_std".into(), mean(&group_std)),
            ("frac_reward_zero_std".into(), zero_std),
            ("completions/mean_length".into(), mean(&lengths)),
            (
                "completions/clipped_ratio".into(),
                clipped / rollout.len().max(1) as f64,
            ),
        ]);
        Ok(Advantages {
            advantages: rollout.padded(&rows)?,
            returns: None,
            metrics,
            excluded,
        })
    }

    fn loss(&self, b: &MicroBatch) -> Result<(Tensor, Vec<(&'static str, f64)>)> {
        let sums = token_loss(
            &b.logp,
            &b.old_logp,
            b.ref_logp.as_ref(),
            &b.advantages,
            &b.mask,
            &self.cfg,
            b.minibatch_episodes,
            b.minibatch_tokens,
        )?;
        let t = b.minibatch_tokens.max(1) as f64;
        let mut stats = vec![
            ("loss", sums.loss.to_scalar::<f32>()? as f64),
            ("clip_ratio/low_mean", sums.clipped_low / t),
            ("clip_ratio/high_mean", sums.clipped_high / t),
            (
                "clip_ratio/region_mean",
                (sums.clipped_low + sums.clipped_high) / t,
            ),
        ];
        if self.cfg.beta > 0.0 {
            stats.push(("kl", sums.kl / t));
        }
        Ok((sums.loss, stats))
    }

    fn end_iteration(&mut self, _sequence_kl: &[f64]) {}

    fn state(&self) -> serde_json::Value {
        serde_json::json!({})
    }

    fn restore(&mut self, _state: &serde_json::Value) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    /// A group of 4 with rewards 1, 0, 0, 1 (mean ½, sample std 1/√3) and one of all-equal 2s.
    #[test]
    fn advantages_match_hand_computed_values() {
        let r = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0];
        let s = 1.0 / 3f64.sqrt();
        let (a, zero) = advantages(&r, 4, Estimator::Grpo, ScaleRewards::Group).unwrap();
        let h = 0.5 / (s + 1e-4);
        close(&a, &[h, -h, -h, h, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(zero, 0.5);
        let (a, _) = advantages(&r, 4, Estimator::Grpo, ScaleRewards::None).unwrap();
        close(&a, &[0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]);
        // The batch's sample std: mean 1.25, Σ(x − 1.25)² = 2·0.0625 + 2·1.5625 + 4·0.5625
        // = 5.5, over 7.
        let bs = (5.5f64 / 7.0).sqrt();
        let (a, _) = advantages(&r, 4, Estimator::Grpo, ScaleRewards::Batch).unwrap();
        let h = 0.5 / (bs + 1e-4);
        close(&a, &[h, -h, -h, h, 0.0, 0.0, 0.0, 0.0]);
        // RLOO: 1 − (2 − 1)/3 = 2/3, 0 − 2/3 = −2/3.
        let (a, _) = advantages(&r, 4, Estimator::Rloo, ScaleRewards::Group).unwrap();
        close(
            &a,
            &[
                2.0 / 3.0,
                -2.0 / 3.0,
                -2.0 / 3.0,
                2.0 / 3.0,
                0.0,
                0.0,
                0.0,
                0.0,
            ],
        );
        // REINFORCE++: (r − 1.25) / (std_batch + 1e-4).
        let (a, _) = advantages(&r, 4, Estimator::ReinforcePlusPlus, ScaleRewards::Group).unwrap();
        let d = bs + 1e-4;
        let (one, zero, two) = (-0.25 / d, -1.25 / d, 0.75 / d);
        close(&a, &[one, zero, zero, one, two, two, two, two]);
        assert!(advantages(&r[..7], 4, Estimator::Grpo, ScaleRewards::Group).is_err());
    }

    fn t(rows: &[&[f32]]) -> Tensor {
        let w = rows[0].len();
        Tensor::from_vec(rows.concat(), (rows.len(), w), &Device::Cpu).unwrap()
    }

    /// Two responses, lengths 2 and 1 (mask), advantages 1 and −2, on the first iteration
    /// (π = π_old, ratio 1): every token loss is −Â.
    #[test]
    fn each_loss_type_normalises_as_trl_defines_it() {
        let logp = Var::from_tensor(&t(&[&[-1.0, -2.0], &[-0.5, 0.0]])).unwrap();
        let old = logp.as_tensor().detach();
        let mask = t(&[&[1.0, 1.0], &[1.0, 0.0]]);
        let adv = t(&[&[1.0, 1.0], &[-2.0, -2.0]]);
        let run = |loss_type| {
            let cfg = GrpoConfig {
                loss_type,
                max_completion_length: 4,
                ..GrpoConfig::default()
            };
            let s = token_loss(logp.as_tensor(), &old, None, &adv, &mask, &cfg, 2, 3).unwrap();
            s.loss.to_scalar::<f32>().unwrap() as f64
        };
        // token losses: row 0: −1, −1; row 1: +2.
        close(&[run(LossType::Grpo)], &[(-1.0 + 2.0) / 2.0]);
        close(&[run(LossType::Bnpo)], &[(-2.0 + 2.0) / 3.0]);
        close(&[run(LossType::Dapo)], &[0.0]);
        close(&[run(LossType::DrGrpo)], &[(-2.0 + 2.0) / (2.0 * 4.0)]);
        // With β, the k3 term: ref − logp = d, k3 = e^d − d − 1.
        let r = t(&[&[-1.5, -2.0], &[-0.5, 0.0]]);
        let cfg = GrpoConfig {
            beta: 0.1,
            loss_type: LossType::Bnpo,
            ..GrpoConfig::default()
        };
        let s = token_loss(logp.as_tensor(), &old, Some(&r), &adv, &mask, &cfg, 2, 3).unwrap();
        let k3 = (-0.5f64).exp() + 0.5 - 1.0;
        close(&[s.kl], &[k3]);
        close(
            &[s.loss.to_scalar::<f32>().unwrap() as f64],
            &[0.1 * k3 / 3.0],
        );
        // The policy gradient of −Â·ρ at ρ = 1 is −Â / normaliser per token.
        let cfg = GrpoConfig::default();
        let s = token_loss(logp.as_tensor(), &old, None, &adv, &mask, &cfg, 2, 3).unwrap();
        let g = s.loss.backward().unwrap();
        let grad: Vec<f32> = g
            .get(logp.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = [-1.0 / 3.0, -1.0 / 3.0, 2.0 / 3.0, 0.0];
        for (a, b) in grad.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{grad:?}");
        }
    }

    /// Clipping: with Â > 0 a ratio above 1 + ε_high stops the gradient and is counted high;
    /// with Â < 0 a ratio below 1 − ε is counted low.
    #[test]
    fn the_clip_binds_where_it_should_and_is_counted() {
        let logp = Var::from_tensor(&t(&[&[0.5], &[-0.5]])).unwrap();
        let old = t(&[&[0.0], &[0.0]]);
        let mask = t(&[&[1.0], &[1.0]]);
        let adv = t(&[&[1.0], &[-1.0]]);
        let cfg = GrpoConfig {
            epsilon: 0.2,
            epsilon_high: 0.28,
            ..GrpoConfig::default()
        };
        let s = token_loss(logp.as_tensor(), &old, None, &adv, &mask, &cfg, 2, 2).unwrap();
        assert_eq!((s.clipped_high, s.clipped_low), (1.0, 1.0));
        // Both tokens are clipped: loss = (−1.28 + 0.8)/2, no gradient.
        close(
            &[s.loss.to_scalar::<f32>().unwrap() as f64],
            &[(-1.28 + 0.8) / 2.0],
        );
        let g = s.loss.backward().unwrap();
        let grad: Vec<f32> = g
            .get(logp.as_tensor())
            .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
            .unwrap_or(vec![0.0, 0.0]);
        assert!(grad.iter().all(|x| x.abs() < 1e-7), "{grad:?}");
    }
}
