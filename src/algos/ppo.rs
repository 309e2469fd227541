//! PPO for language models (Ziegler et al., 2019; InstructGPT §3.5). A prompt x and one sampled
//! response y = (y_1 … y_T) form a bandit episode:
//!
//!   r_t = −β·(log π_old(y_t|·) − log π_ref(y_t|·))  + [t = T]·score(x, y)
//!   δ_t = r_t + γ·V(s_{t+1}) − V(s_t),  A_t = Σ_k (γλ)^k δ_{t+k},  R_t = A_t + V(s_t)
//!   L_policy = E_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε)),  ρ_t = π(y_t|·) / π_old(y_t|·)
//!   L_value  = ½·E_t max((V − R_t)², (V_old + clip(V − V_old, ±ε_v) − R_t)²)
//!
//! β is fixed or follows Ziegler's proportional controller toward a target KL. Scores may first be
//! shaped (a penalty for responses that never stop, whitening, clipping). PPO-ptx adds γ_ptx times
//! the language-modelling loss on pretraining text to the same step (the loop's job, `crate::rl`).

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::data::sft::Example;
use crate::generate::SamplingConfig;
use crate::rl::{Advantages, LoopConfig, MicroBatch, Objective, PretrainingMix, Rollout};
use crate::settings::{KeyDoc, Section};
use crate::train::TrainConfig;

/// PPO's settings (TRL's `PPOConfig` names where TRL has one).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    pub total_episodes: usize,
    pub response_length: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub num_ppo_epochs: usize,
    pub num_mini_batches: usize,
    pub kl_coef: f64,
    pub adaptive_kl: bool,
    pub kl_target: f64,
    pub kl_horizon: f64,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    pub gamma: f64,
    pub lam: f64,
    pub whiten_advantages: bool,
    pub missing_eos_penalty: f64,
    pub score_clip: f64,
    pub normalize_scores: bool,
    pub ptx_coef: f64,
    pub ptx_batch_size: usize,
    pub ema_decay: f64,
    pub max_num_seqs: usize,
    pub sample_every: usize,
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            total_episodes: 0,
            response_length: 53,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            num_ppo_epochs: 4,
            num_mini_batches: 1,
            kl_coef: 0.05,
            adaptive_kl: false,
            kl_target: 6.0,
            kl_horizon: 10000.0,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            gamma: 1.0,
            lam: 0.95,
            whiten_advantages: true,
            missing_eos_penalty: 0.0,
            score_clip: 0.0,
            normalize_scores: false,
            ptx_coef: 0.0,
            ptx_batch_size: 8,
            ema_decay: 0.0,
            max_num_seqs: 0,
            sample_every: 10,
        }
    }
}

impl Section for PpoConfig {
    const TITLE: &'static str = "ppo";
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::new("total_episodes", "episodes (prompt → response) in the run; 0: num_train_epochs × prompts (max_steps > 0 sets the iterations instead)"),
        KeyDoc::new("response_length", "max new tokens per response"),
        KeyDoc::new("temperature", "sampling temperature of rollouts"),
        KeyDoc::new("top_k", "top-k filter of rollouts (0: off)"),
        KeyDoc::new("top_p", "nucleus filter of rollouts (1: off)"),
        KeyDoc::new("num_ppo_epochs", "passes over each rollout batch"),
        KeyDoc::new("num_mini_batches", "minibatches per rollout batch (rollout batch = per_device_train_batch_size × gradient_accumulation_steps × num_mini_batches)"),
        KeyDoc::new("kl_coef", "β of the per-token KL penalty (InstructGPT: 0.02); the start value when adaptive"),
        KeyDoc::new("adaptive_kl", "adapt β toward kl_target (Ziegler et al.)"),
        KeyDoc::new("kl_target", "target KL (nats per episode) of the adaptive controller"),
        KeyDoc::new("kl_horizon", "horizon (episodes) of the adaptive controller"),
        KeyDoc::new("cliprange", "ε of the clipped surrogate"),
        KeyDoc::new("cliprange_value", "clip range of the value loss"),
        KeyDoc::new("vf_coef", "weight of the value loss"),
        KeyDoc::new("gamma", "discount"),
        KeyDoc::new("lam", "GAE λ"),
        KeyDoc::new("whiten_advantages", "normalise advantages over the batch"),
        KeyDoc::new("missing_eos_penalty", "subtracted from the score of responses that never emit a stop token"),
        KeyDoc::new("score_clip", "clip scores to ±this (0: off)"),
        KeyDoc::new("normalize_scores", "whiten scores over each rollout batch"),
        KeyDoc::new("ptx_coef", "γ_ptx of PPO-ptx (InstructGPT: 27.8); 0 is plain PPO"),
        KeyDoc::new("ptx_batch_size", "pretraining examples per optimizer step (InstructGPT: 8× the RL episodes)"),
        KeyDoc::new("ema_decay", "EMA of the policy weights for the saved model (InstructGPT: 0.992); 0: off"),
        KeyDoc::new("max_num_seqs", "rows that decode at once (vLLM's name; 0: the whole rollout); a finished row's place goes to the next waiting response"),
        KeyDoc::new("sample_every", "log prompts, responses and scores to samples.jsonl every N iterations"),
    ];
}

impl PpoConfig {
    pub fn validate(&self) -> Result<()> {
        if self.response_length == 0 {
            bail!("response_length must be at least 1");
        }
        if self.num_ppo_epochs == 0 || self.num_mini_batches == 0 {
            bail!("num_ppo_epochs and num_mini_batches must be at least 1");
        }
        if !(self.kl_coef >= 0.0 && self.kl_coef.is_finite()) {
            bail!("kl_coef must be ≥ 0");
        }
        if self.adaptive_kl && !(self.kl_target > 0.0 && self.kl_horizon > 0.0) {
            bail!("adaptive_kl needs kl_target > 0 and kl_horizon > 0");
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            bail!("ema_decay must be in [0, 1)");
        }
        if !(0.0..=1.0).contains(&self.lam) || !(0.0..=1.0).contains(&self.gamma) {
            bail!("gamma and lam must be in [0, 1]");
        }
        if !(self.ptx_coef >= 0.0 && self.ptx_coef.is_finite()) {
            bail!("ptx_coef must be ≥ 0");
        }
        if self.ptx_coef > 0.0 && self.ptx_batch_size == 0 {
            bail!("ptx_batch_size must be at least 1 when ptx_coef > 0");
        }
        if !(self.score_clip >= 0.0 && self.missing_eos_penalty.is_finite()) {
            bail!("score_clip must be ≥ 0 and missing_eos_penalty finite");
        }
        Ok(())
    }
}

impl PpoConfig {
    /// The shared loop's settings for a run over `prompts` prompts: rollout batch =
    /// micro-batch × accumulation × `num_mini_batches`; iterations from `max_steps` when set,
    /// else enough batches for `total_episodes` (default: `num_train_epochs` × prompts).
    pub fn loop_config<'a>(
        &self,
        train: &TrainConfig,
        prompts: usize,
        stop_ids: Vec<u32>,
        ptx: &'a [Example],
    ) -> Result<LoopConfig<'a>> {
        let micro_batch = train.per_device_train_batch_size;
        let minibatch = micro_batch * train.global_accumulation();
        let episodes = minibatch
            .checked_mul(self.num_mini_batches)
            .filter(|&n| n <= 1 << 24)
            .context("the rollout batch (per_device_train_batch_size × gradient_accumulation_steps × num_mini_batches) is too large")?;
        let iterations = if train.max_steps > 0 {
            train.max_steps as u64
        } else {
            let total = if self.total_episodes > 0 {
                self.total_episodes
            } else {
                (train.num_train_epochs * prompts as f64).ceil() as usize
            };
            total.div_ceil(episodes).max(1) as u64
        };
        Ok(LoopConfig {
            iterations,
            episodes,
            group_size: 1,
            epochs: self.num_ppo_epochs,
            minibatch,
            micro_batch,
            sampling: SamplingConfig {
                max_new_tokens: self.response_length,
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                stop_ids,
                seed: 0,
                max_rows: self.max_num_seqs,
                ..Default::default()
            },
            sample_every: self.sample_every,
            ptx: (self.ptx_coef > 0.0).then_some(PretrainingMix {
                examples: ptx,
                coef: self.ptx_coef,
                batch_size: self.ptx_batch_size,
            }),
            ema_decay: self.ema_decay,
        })
    }
}

/// Scores as PPO learns from them: `missing_eos_penalty` subtracted from responses that never
/// stopped, then whitened over the batch (`normalize_scores`), then clipped to ±`score_clip`.
pub fn shape_scores(raw: &[f32], stopped: &[bool], cfg: &PpoConfig) -> Vec<f32> {
    let mut scores: Vec<f32> = raw
        .iter()
        .zip(stopped)
        .map(|(&s, &stop)| {
            if stop {
                s
            } else {
                s - cfg.missing_eos_penalty as f32
            }
        })
        .collect();
    if cfg.normalize_scores {
        let mut v = vec![scores];
        whiten(&mut v);
        scores = v.pop().unwrap_or_default();
    }
    if cfg.score_clip > 0.0 {
        let c = cfg.score_clip as f32;
        scores.iter_mut().for_each(|s| *s = s.clamp(-c, c));
    }
    scores
}

/// Per-token rewards of one episode (KL penalty on every token, the score on the last).
pub fn token_rewards(logp: &[f32], ref_logp: &[f32], score: f32, beta: f64) -> Vec<f32> {
    let mut r: Vec<f32> = logp
        .iter()
        .zip(ref_logp)
        .map(|(&p, &q)| (-beta * (p - q) as f64) as f32)
        .collect();
    if let Some(last) = r.last_mut() {
        *last += score;
    }
    r
}

/// Generalised advantage estimation over one episode. `values[t]` is V of the state before token
/// t; the state after the last token is terminal (V = 0). Returns (advantages, returns).
pub fn gae(rewards: &[f32], values: &[f32], gamma: f64, lam: f64) -> (Vec<f32>, Vec<f32>) {
    let n = rewards.len();
    let mut adv = vec![0f32; n];
    let mut next_adv = 0f64;
    for t in (0..n).rev() {
        let next_value = if t + 1 < n { values[t + 1] as f64 } else { 0.0 };
        let delta = rewards[t] as f64 + gamma * next_value - values[t] as f64;
        next_adv = delta + gamma * lam * next_adv;
        adv[t] = next_adv as f32;
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// Whitens every value of every episode together: (x − mean) / std.
pub fn whiten(xs: &mut [Vec<f32>]) {
    let n: usize = xs.iter().map(Vec::len).sum();
    if n < 2 {
        return;
    }
    let mean = xs.iter().flatten().map(|&x| x as f64).sum::<f64>() / n as f64;
    let var = xs
        .iter()
        .flatten()
        .map(|&x| (x as f64 - mean).powi(2))
        .sum::<f64>()
        / (n - 1) as f64;
    let std = (var + 1e-8).sqrt();
    for x in xs.iter_mut().flatten() {
        *x = ((*x as f64 - mean) / std) as f32;
    }
}

/// Sums over the masked tokens of a micro-batch (the caller divides by the minibatch's token
/// count, so accumulation equals one large batch).
pub struct SurrogateSums {
    pub loss: Tensor,
    pub clipped: f64,
    pub approx_kl: f64,
    pub ratio: f64,
}

/// The clipped surrogate. All inputs [N, T]; `mask` marks response tokens.
pub fn policy_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip: f64,
) -> Result<SurrogateSums> {
    let log_ratio = (logp - old_logp)?;
    let ratio = log_ratio.exp()?;
    let unclipped = (advantages.neg()? * &ratio)?;
    let clipped = (advantages.neg()? * ratio.clamp(1.0 - clip, 1.0 + clip)?)?;
    let loss = (unclipped.maximum(&clipped)? * mask)?.sum_all()?;
    let masked_sum = |t: &Tensor| -> Result<f64> {
        Ok((t.detach() * mask)?.sum_all()?.to_scalar::<f32>()? as f64)
    };
    Ok(SurrogateSums {
        loss,
        clipped: masked_sum(&clipped.gt(&unclipped)?.to_dtype(candle_core::DType::F32)?)?,
        approx_kl: masked_sum(&(log_ratio.sqr()? * 0.5)?)?,
        ratio: masked_sum(&ratio)?,
    })
}

/// The clipped value loss, summed over masked tokens, and how many tokens were clipped.
pub fn value_loss(
    values: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    clip: f64,
) -> Result<(Tensor, f64)> {
    let clipped_v = (old_values + (values - old_values)?.clamp(-clip, clip)?)?;
    let a = (values - returns)?.sqr()?;
    let b = (clipped_v - returns)?.sqr()?;
    let loss = ((a.maximum(&b)? * mask)?.sum_all()? * 0.5)?;
    let clipped = (b.gt(&a)?.to_dtype(candle_core::DType::F32)? * mask)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    Ok((loss, clipped))
}

/// β: fixed, or Ziegler et al.'s proportional controller toward `target` KL (nats per episode):
/// β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) after each batch of n episodes.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct KlController {
    pub beta: f64,
    pub target: Option<f64>,
    pub horizon: f64,
}

impl KlController {
    pub fn update(&mut self, kl: f64, episodes: usize) {
        if let Some(target) = self.target {
            let error = (kl / target - 1.0).clamp(-0.2, 0.2);
            self.beta *= 1.0 + error * episodes as f64 / self.horizon;
        }
    }
}

/// PPO as an objective of the shared RL loop: shaped scores and the per-token KL penalty →
/// GAE with the value model → whitened advantages; the clipped surrogate plus the clipped value
/// loss, normalised by the minibatch's response tokens.
pub struct Ppo {
    pub cfg: PpoConfig,
    pub kl: KlController,
}

impl Ppo {
    pub fn new(cfg: PpoConfig) -> Self {
        let kl = KlController {
            beta: cfg.kl_coef,
            target: cfg.adaptive_kl.then_some(cfg.kl_target),
            horizon: cfg.kl_horizon,
        };
        Ppo { cfg, kl }
    }
}

impl Objective for Ppo {
    fn needs_reference(&self) -> bool {
        true
    }

    fn advantages(&mut self, rollout: &Rollout) -> Result<Advantages> {
        let Some(ref_logp) = &rollout.ref_logp else {
            bail!("PPO needs the reference's log-probs");
        };
        let Some(values) = &rollout.values else {
            bail!("PPO needs a value model");
        };
        let scores = shape_scores(&rollout.scores, &rollout.stopped, &self.cfg);
        let (old, reference, values) = (
            rollout.responses(&rollout.old_logp)?,
            rollout.responses(ref_logp)?,
            rollout.responses(values)?,
        );
        let beta = self.kl.beta;
        let (mut advantages, mut returns) = (Vec::new(), Vec::new());
        let mut non_score = Vec::new();
        for n in 0..rollout.len() {
            let kl: f64 = old[n]
                .iter()
                .zip(&reference[n])
                .map(|(a, b)| (a - b) as f64)
                .sum();
            non_score.push(-beta * kl);
            let r = token_rewards(&old[n], &reference[n], scores[n], beta);
            let (a, ret) = gae(&r, &values[n], self.cfg.gamma, self.cfg.lam);
            advantages.push(a);
            returns.push(ret);
        }
        if self.cfg.whiten_advantages {
            whiten(&mut advantages);
        }
        let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
        let rlhf: Vec<f64> = scores
            .iter()
            .zip(&non_score)
            .map(|(&s, &k)| s as f64 + k)
            .collect();
        Ok(Advantages {
            advantages: rollout.padded(&advantages)?,
            returns: Some(rollout.padded(&returns)?),
            metrics: vec![
                ("objective/non_score_reward".into(), mean(&non_score)),
                ("objective/rlhf_reward".into(), mean(&rlhf)),
                ("beta".into(), beta),
            ],
            excluded: vec![],
        })
    }

    fn loss(&self, b: &MicroBatch) -> Result<(Tensor, Vec<(&'static str, f64)>)> {
        let (Some(v), Some(old_v), Some(ret)) = (&b.values, &b.old_values, &b.returns) else {
            bail!("PPO needs a value model");
        };
        let sur = policy_loss(
            &b.logp,
            &b.old_logp,
            &b.advantages,
            &b.mask,
            self.cfg.cliprange,
        )?;
        let (vl, vclipped) = value_loss(v, old_v, ret, &b.mask, self.cfg.cliprange_value)?;
        let t = b.minibatch_tokens as f64;
        let loss = ((&sur.loss + (&vl * self.cfg.vf_coef)?)? / t)?;
        let stats = vec![
            ("loss/policy_avg", sur.loss.to_scalar::<f32>()? as f64 / t),
            ("loss/value_avg", vl.to_scalar::<f32>()? as f64 / t),
            ("policy/clipfrac_avg", sur.clipped / t),
            ("val/clipfrac_avg", vclipped / t),
            ("policy/approxkl_avg", sur.approx_kl / t),
            ("val/ratio", sur.ratio / t),
        ];
        Ok((loss, stats))
    }

    fn end_iteration(&mut self, sequence_kl: &[f64]) {
        let mean = sequence_kl.iter().sum::<f64>() / sequence_kl.len().max(1) as f64;
        self.kl.update(mean, sequence_kl.len());
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "kl_coef": self.kl.beta })
    }

    fn restore(&mut self, state: &serde_json::Value) {
        if let Some(b) = state.get("kl_coef").and_then(serde_json::Value::as_f64) {
            self.kl.beta = b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn rewards_put_the_score_on_the_last_token() {
        let r = token_rewards(&[-1.0, -2.0, -0.5], &[-1.5, -2.0, -1.0], 2.0, 0.1);
        let want = [-0.05, 0.0, -0.05 + 2.0];
        for (a, b) in r.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{r:?}");
        }
    }

    #[test]
    fn gae_matches_the_recursion_by_hand() {
        let (r, v) = ([0.0f32, 0.0, 1.0], [0.5f32, 0.6, 0.7]);
        let (adv, ret) = gae(&r, &v, 1.0, 0.95);
        let d2 = 1.0 - 0.7;
        let d1 = 0.0 + 0.7 - 0.6;
        let d0 = 0.0 + 0.6 - 0.5;
        let a2 = d2;
        let a1 = d1 + 0.95 * a2;
        let a0 = d0 + 0.95 * a1;
        for (x, y) in adv.iter().zip([a0, a1, a2]) {
            assert!((*x as f64 - y).abs() < 1e-6);
        }
        // λ = 1, γ = 1: the return is the sum of future rewards.
        let (_, ret1) = gae(&r, &v, 1.0, 1.0);
        assert!(ret1.iter().all(|&x| (x - 1.0).abs() < 1e-6), "{ret1:?}");
        assert!((ret[2] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn surrogate_clips_and_its_gradient_vanishes_outside_the_trust_region() {
        let dev = Device::Cpu;
        // Token 0: ratio e^0.5 > 1.2 with A > 0 → clipped, no gradient. Token 1: ratio 1, A < 0.
        let logp = Var::from_vec(vec![0.5f32, 0.0], (1, 2), &dev).unwrap();
        let old = Tensor::zeros((1, 2), candle_core::DType::F32, &dev).unwrap();
        let adv = Tensor::new(&[[1.0f32, -2.0]], &dev).unwrap();
        let mask = Tensor::ones((1, 2), candle_core::DType::F32, &dev).unwrap();
        let s = policy_loss(logp.as_tensor(), &old, &adv, &mask, 0.2).unwrap();
        let want = -1.2 + 2.0;
        assert!((s.loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-6);
        assert_eq!(s.clipped, 1.0);
        assert!((s.approx_kl - 0.125).abs() < 1e-6);
        let g = s.loss.backward().unwrap();
        let g = g.get(logp.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        // d/dlogp of −A·ρ at ρ = 1 is −A = 2.
        assert!(
            g[0][0].abs() < 1e-7 && (g[0][1] - 2.0).abs() < 1e-6,
            "{g:?}"
        );
    }

    #[test]
    fn value_loss_takes_the_pessimistic_branch() {
        let dev = Device::Cpu;
        let v = Tensor::new(&[[1.0f32, 0.0]], &dev).unwrap();
        let old = Tensor::new(&[[0.0f32, 0.0]], &dev).unwrap();
        let ret = Tensor::new(&[[2.0f32, 1.0]], &dev).unwrap();
        let mask = Tensor::ones((1, 2), candle_core::DType::F32, &dev).unwrap();
        let (l, clipped) = value_loss(&v, &old, &ret, &mask, 0.2).unwrap();
        // token 0: max((1−2)², (0.2−2)²) = 3.24; token 1: 1.
        assert!((l.to_scalar::<f32>().unwrap() - 0.5 * 4.24).abs() < 1e-5);
        assert_eq!(clipped, 1.0);
    }

    #[test]
    fn adaptive_beta_moves_toward_the_target() {
        let mut c = KlController {
            beta: 0.1,
            target: Some(6.0),
            horizon: 10000.0,
        };
        c.update(12.0, 1000);
        assert!((c.beta - 0.1 * 1.02).abs() < 1e-12);
        c.update(0.0, 1000);
        assert!(c.beta < 0.1 * 1.02);
        let mut fixed = KlController {
            beta: 0.1,
            target: None,
            horizon: 1.0,
        };
        fixed.update(100.0, 10);
        assert_eq!(fixed.beta, 0.1);
    }

    fn shaping(eos: f64, normalize: bool, clip: f64) -> PpoConfig {
        PpoConfig {
            missing_eos_penalty: eos,
            normalize_scores: normalize,
            score_clip: clip,
            ..Default::default()
        }
    }

    #[test]
    fn each_score_shaping_option_does_what_it_says() {
        let raw = [1.0f32, -2.0, 0.5, 3.0];
        let stopped = [true, false, true, false];
        assert_eq!(shape_scores(&raw, &stopped, &shaping(0.0, false, 0.0)), raw);
        // missing_eos_penalty: only the responses that never stopped lose it.
        assert_eq!(
            shape_scores(&raw, &stopped, &shaping(0.5, false, 0.0)),
            [1.0, -2.5, 0.5, 2.5]
        );
        // score_clip: to ±c.
        assert_eq!(
            shape_scores(&raw, &stopped, &shaping(0.0, false, 1.0)),
            [1.0, -1.0, 0.5, 1.0]
        );
        // normalize_scores: mean 0 and (sample) standard deviation 1 over the batch.
        let n = shape_scores(&raw, &stopped, &shaping(0.0, true, 0.0));
        let mean = n.iter().sum::<f32>() / 4.0;
        let var = n.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 3.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5, "{n:?}");
        // The order: penalty, then normalisation, then the clip.
        let all = shape_scores(&raw, &stopped, &shaping(0.5, true, 0.1));
        assert!(all.iter().all(|x| x.abs() <= 0.1 + 1e-7), "{all:?}");
    }

    /// A two-episode rollout by hand: responses of 3 and 2 tokens after prompts of 2 and 3.
    fn rollout() -> Rollout {
        let dev = Device::Cpu;
        let t = |rows: [[f32; 4]; 2]| Tensor::new(&rows, &dev).unwrap();
        Rollout {
            prompt_index: vec![0, 1],
            sequences: vec![vec![1, 2, 3, 4, 5], vec![1, 2, 3, 4, 5]],
            prompt_lens: vec![2, 3],
            texts: vec!["a".into(), "b".into()],
            stopped: vec![true, false],
            entropies: vec![0.0, 0.0],
            scores: vec![1.0, 0.25],
            score_components: vec![],
            mask: t([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]),
            old_logp: t([[0.0, -1.0, -2.0, -0.5], [0.0, 0.0, -1.5, -0.25]]),
            ref_logp: Some(t([[0.0, -1.2, -1.5, -0.5], [0.0, 0.0, -1.0, -0.75]])),
            values: Some(t([[0.0, 0.5, 0.25, 0.75], [0.0, 0.0, 0.1, -0.2]])),
            generation_secs: 0.0,
            scoring_secs: 0.0,
            passes_secs: 0.0,
        }
    }

    #[test]
    fn advantages_are_gae_of_the_kl_shaped_rewards_then_whitened_if_asked() {
        let r = rollout();
        let cfg = PpoConfig {
            kl_coef: 0.1,
            lam: 0.9,
            missing_eos_penalty: 0.5,
            whiten_advantages: false,
            ..Default::default()
        };
        let mut ppo = Ppo::new(cfg.clone());
        let a = ppo.advantages(&r).unwrap();
        // By hand: r_t = −β(old − ref), the shaped score on the last token, GAE with γ = 1.
        let by_hand = |old: &[f32], rf: &[f32], v: &[f32], score: f32| {
            let rewards: Vec<f64> = (0..old.len())
                .map(|i| {
                    let kl = -0.1 * (old[i] - rf[i]) as f64;
                    kl + if i + 1 == old.len() {
                        score as f64
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut adv = vec![0f64; old.len()];
            let mut next = 0.0;
            for i in (0..old.len()).rev() {
                let next_v = if i + 1 < old.len() {
                    v[i + 1] as f64
                } else {
                    0.0
                };
                next = rewards[i] + next_v - v[i] as f64 + 0.9 * next;
                adv[i] = next;
            }
            adv
        };
        let want = [
            by_hand(
                &[-1.0, -2.0, -0.5],
                &[-1.2, -1.5, -0.5],
                &[0.5, 0.25, 0.75],
                1.0,
            ),
            // The second response never stopped: its score pays the penalty.
            by_hand(&[-1.5, -0.25], &[-1.0, -0.75], &[0.1, -0.2], 0.25 - 0.5),
        ];
        let got = r.responses(&a.advantages).unwrap();
        for (g, w) in got.iter().zip(&want) {
            for (x, y) in g.iter().zip(w) {
                assert!((*x as f64 - y).abs() < 1e-6, "{got:?} vs {want:?}");
            }
        }
        // Returns are advantages + values; everything outside the responses is 0.
        let ret = r.responses(a.returns.as_ref().unwrap()).unwrap();
        assert!((ret[0][0] - (got[0][0] + 0.5)).abs() < 1e-6);
        let full = a.advantages.to_vec2::<f32>().unwrap();
        assert_eq!((full[0][0], full[1][0], full[1][1]), (0.0, 0.0, 0.0));

        // whiten_advantages: the same advantages, normalised over all response tokens.
        let mut whitened = Ppo::new(PpoConfig {
            whiten_advantages: true,
            ..cfg
        });
        let w = r
            .responses(&whitened.advantages(&r).unwrap().advantages)
            .unwrap();
        let flat: Vec<f64> = got.iter().flatten().map(|&x| x as f64).collect();
        let mean = flat.iter().sum::<f64>() / 5.0;
        let sd = (flat.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 4.0).sqrt();
        for (x, y) in w.iter().flatten().zip(&flat) {
            assert!((*x as f64 - (y - mean) / sd).abs() < 1e-5);
        }
    }
}
