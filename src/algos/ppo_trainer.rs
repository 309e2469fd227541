//! The PPO loop: rollouts with the batched sampler, scoring, per-token KL rewards, GAE, then
//! several epochs of clipped-surrogate / clipped-value updates over minibatches (with gradient
//! accumulation), optionally with the PPO-ptx language-modelling term in the same step.
//! The equations live in `ppo.rs`; this file moves data between them.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

use super::ppo::{gae, policy_loss, token_rewards, value_loss, whiten, KlController};
use crate::data::prompts::Prompt;
use crate::data::sft::Example;
use crate::generate::{generate, Sample, SamplingConfig};
use crate::model::scalar_head::ScalarHead;
use crate::model::{CausalLm, StepInputs};
use crate::ops;
use crate::reward::{Episode, RewardSource};
use crate::tokenize::Tokenizer;
use crate::train::lm_loss::target_nll_sum;
use crate::train::metrics::MetricsLogger;
use crate::train::optim::GradBuffers;
use crate::train::schedule::lr_at;
use crate::train::state::{load_extra_tensors, save_checkpoint};
use crate::train::trainer::{new_optimizer, progress_bar, start_state, step_examples};
use crate::train::TrainConfig;

/// PPO's own settings (TRL's `PPOConfig` names where TRL has one).
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
            sample_every: 10,
        }
    }
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
        if self.ptx_coef < 0.0 {
            bail!("ptx_coef must be ≥ 0");
        }
        Ok(())
    }
}

/// The models PPO works with. The value model is a separate body with a scalar head.
pub struct PpoModels<'a> {
    pub policy: &'a CausalLm,
    pub reference: &'a CausalLm,
    pub value: &'a CausalLm,
    pub value_head: &'a ScalarHead,
}

pub struct PpoOutcome {
    pub iterations: u64,
    pub last_metrics: Vec<(String, f64)>,
}

/// One rollout: every quantity per response token, for each episode.
struct Rollout {
    seqs: Vec<Vec<u32>>,
    starts: Vec<usize>,
    old_logp: Vec<Vec<f32>>,
    old_values: Vec<Vec<f32>>,
    advantages: Vec<Vec<f32>>,
    returns: Vec<Vec<f32>>,
}

/// Puts per-response-token values into the [N, T−1] layout of `completion_logprobs`: response
/// token k of row n sits in column starts[n] − 1 + k.
fn dense(rows: &[&Vec<f32>], starts: &[usize], width: usize) -> Result<Tensor> {
    let mut out = vec![0f32; rows.len() * width];
    for (n, (r, &s)) in rows.iter().zip(starts).enumerate() {
        out[n * width + s - 1..n * width + s - 1 + r.len()].copy_from_slice(r);
    }
    Ok(Tensor::from_vec(out, (rows.len(), width), &Device::Cpu)?)
}

/// The response-token slice of each row of a [N, T−1] tensor.
fn response_columns(t: &Tensor, seqs: &[&[u32]], starts: &[usize]) -> Result<Vec<Vec<f32>>> {
    let rows = t.to_vec2::<f32>()?;
    Ok(rows
        .into_iter()
        .zip(seqs.iter().zip(starts))
        .map(|(r, (s, &st))| r[st - 1..s.len() - 1].to_vec())
        .collect())
}

/// V(s_t) for every position that predicts a response token, [N, T−1].
fn values_of(value: &CausalLm, head: &ScalarHead, seqs: &[&[u32]]) -> Result<Tensor> {
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let inp = StepInputs::right_padded(&value.config, seqs)?;
    let hidden = value.forward_hidden(&inp, None)?.narrow(1, 0, t - 1)?;
    head.all_positions(&hidden)
}

/// One value per response token, for each episode.
type PerToken = Vec<Vec<f32>>;

/// Reference log-probs and old values of a rollout, without gradients, in chunks.
fn rollout_passes(
    models: &PpoModels,
    seqs: &[Vec<u32>],
    starts: &[usize],
    chunk: usize,
) -> Result<(PerToken, PerToken)> {
    let (mut ref_lp, mut vals) = (vec![], vec![]);
    for (s, st) in seqs.chunks(chunk).zip(starts.chunks(chunk)) {
        let refs: Vec<&[u32]> = s.iter().map(Vec::as_slice).collect();
        let (lp, _, _) = models
            .reference
            .completion_logprobs(&refs, st, ops::default_path())?;
        ref_lp.extend(response_columns(&lp.detach(), &refs, st)?);
        let v = values_of(models.value, models.value_head, &refs)?.detach();
        vals.extend(response_columns(&v, &refs, st)?);
    }
    Ok((ref_lp, vals))
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

/// Exponential moving average of the policy's weights (InstructGPT used 0.992).
struct Ema {
    decay: f64,
    values: Vec<Tensor>,
}

impl Ema {
    fn update(&mut self, params: &[(String, Var)]) -> Result<()> {
        for (e, (_, p)) in self.values.iter_mut().zip(params) {
            *e = ((&*e * self.decay)? + (p.as_tensor().detach() * (1.0 - self.decay))?)?;
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
pub fn run_ppo(
    cfg: &PpoConfig,
    train: &TrainConfig,
    models: &PpoModels,
    tokenizer: &Tokenizer,
    stop_ids: &[u32],
    prompts: &[Prompt],
    reward: &mut dyn RewardSource,
    ptx: &[Example],
    resume: bool,
    fingerprint: &str,
) -> Result<PpoOutcome> {
    let out = Path::new(&train.output_dir);
    let micro = train.per_device_train_batch_size;
    let minibatch = micro * train.gradient_accumulation_steps;
    let batch = minibatch * cfg.num_mini_batches;
    let total_episodes = if cfg.total_episodes > 0 {
        cfg.total_episodes
    } else {
        (train.num_train_epochs * prompts.len() as f64).ceil() as usize
    };
    let iterations = (total_episodes.div_ceil(batch)).max(1) as u64;
    let updates_per_iteration = (cfg.num_ppo_epochs * cfg.num_mini_batches) as u64;
    let total_updates = (iterations * updates_per_iteration) as usize;
    let warmup = if train.warmup_steps > 0 {
        train.warmup_steps
    } else {
        (train.warmup_ratio * total_updates as f64).ceil() as usize
    };

    let policy_params = models.policy.parameters().to_vec();
    let mut params = policy_params.clone();
    for (n, v) in models.value.parameters() {
        params.push((format!("value.{n}"), v.clone()));
    }
    params.extend(
        models
            .value_head
            .parameters()
            .into_iter()
            .map(|(n, v)| (format!("value.{n}"), v)),
    );
    let mut optimizer = new_optimizer(train, &params);
    let mut kl_ctl = KlController {
        beta: cfg.kl_coef,
        target: cfg.adaptive_kl.then_some(cfg.kl_target),
        horizon: cfg.kl_horizon,
    };
    let mut ema = (cfg.ema_decay > 0.0).then(|| Ema {
        decay: cfg.ema_decay,
        values: policy_params
            .iter()
            .map(|(_, v)| v.as_tensor().detach())
            .collect(),
    });
    let (mut state, resumed_from) = start_state(out, &params, &mut optimizer, fingerprint, resume)?;
    if let Some(b) = state.extra.get("kl_coef").and_then(|v| v.as_f64()) {
        kl_ctl.beta = b;
    }
    if let (Some(e), Some(ck)) = (ema.as_mut(), &resumed_from) {
        let saved = load_extra_tensors(ck)?;
        for (v, (name, _)) in e.values.iter_mut().zip(&policy_params) {
            if let Some(t) = saved.get(&format!("ema.{name}")) {
                *v = t.clone();
            }
        }
    }
    let mut logger = MetricsLogger::create(out, (resume && state.step > 0).then_some(state.step))?;
    let mut samples_log = String::new();
    let mut grads = GradBuffers::new(&params);
    let pb = progress_bar(iterations, "iterations", state.step);
    let mut last_metrics = vec![];

    while state.step < iterations {
        let it = state.step;
        let t_start = Instant::now();
        // 1. Rollouts. Prompt order and sampling noise depend only on (seed, iteration).
        let chosen = step_examples(prompts.len(), batch, train.seed, it);
        let prompt_ids: Vec<Vec<u32>> = chosen.iter().map(|&i| prompts[i].ids.clone()).collect();
        let sampling = SamplingConfig {
            max_new_tokens: cfg.response_length,
            temperature: cfg.temperature,
            top_k: cfg.top_k,
            top_p: cfg.top_p,
            stop_ids: stop_ids.to_vec(),
            seed: train.seed.wrapping_mul(1_000_003).wrapping_add(it),
        };
        let samples: Vec<Sample> = generate(models.policy, &prompt_ids, &sampling)?;
        let t_gen = t_start.elapsed().as_secs_f64();

        // 2. Scores of the text without its stop token.
        let t_score0 = Instant::now();
        let bodies: Vec<&[u32]> = samples.iter().map(Sample::response).collect();
        let texts: Vec<String> = bodies
            .iter()
            .map(|b| tokenizer.decode(b, true))
            .collect::<Result<_>>()?;
        let episodes: Vec<Episode> = chosen
            .iter()
            .zip(&samples)
            .zip(bodies.iter().zip(&texts))
            .map(|((&i, s), (b, t))| Episode {
                prompt_ids: &s.prompt,
                response_ids: b,
                prompt_text: &prompts[i].text,
                response_text: t,
            })
            .collect();
        let raw_scores = reward.score(&episodes)?;
        if let Some(i) = raw_scores.iter().position(|x| !x.is_finite()) {
            pb.abandon();
            bail!(
                "iteration {}: the reward source ({}) returned {} for the response {:?}; stopped",
                it + 1,
                reward.describe(),
                raw_scores[i],
                texts[i]
            );
        }
        let mut scores: Vec<f32> = raw_scores.clone();
        for (s, sample) in scores.iter_mut().zip(&samples) {
            if !sample.stopped {
                *s -= cfg.missing_eos_penalty as f32;
            }
        }
        if cfg.normalize_scores {
            let mut v = vec![scores.clone()];
            whiten(&mut v);
            scores = v.pop().unwrap();
        }
        if cfg.score_clip > 0.0 {
            let c = cfg.score_clip as f32;
            scores.iter_mut().for_each(|s| *s = s.clamp(-c, c));
        }
        let t_score = t_score0.elapsed().as_secs_f64();

        // 3. Reference log-probs, values, per-token rewards, advantages.
        let t_train0 = Instant::now();
        let seqs: Vec<Vec<u32>> = samples
            .iter()
            .map(|s| s.prompt.iter().chain(&s.tokens).copied().collect())
            .collect();
        let starts: Vec<usize> = samples.iter().map(|s| s.prompt.len()).collect();
        let (ref_lp, old_values) = rollout_passes(models, &seqs, &starts, micro)?;
        let old_logp: Vec<Vec<f32>> = samples.iter().map(|s| s.model_logprobs.clone()).collect();
        let beta = kl_ctl.beta;
        let mut advantages = Vec::with_capacity(batch);
        let mut returns = Vec::with_capacity(batch);
        let mut kl_per_episode = Vec::with_capacity(batch);
        let mut non_score = Vec::with_capacity(batch);
        for n in 0..samples.len() {
            let kl: f64 = old_logp[n]
                .iter()
                .zip(&ref_lp[n])
                .map(|(a, b)| (a - b) as f64)
                .sum();
            kl_per_episode.push(kl);
            non_score.push(-beta * kl);
            let r = token_rewards(&old_logp[n], &ref_lp[n], scores[n], beta);
            let (a, ret) = gae(&r, &old_values[n], cfg.gamma, cfg.lam);
            advantages.push(a);
            returns.push(ret);
        }
        if cfg.whiten_advantages {
            whiten(&mut advantages);
        }
        let rollout = Rollout {
            seqs,
            starts,
            old_logp,
            old_values,
            advantages,
            returns,
        };

        // 4. Updates: epochs × minibatches, each accumulated over micro-batches.
        let mut stats: Vec<(&str, f64)> = Vec::new();
        let mut add = |k: &'static str, v: f64| match stats.iter_mut().find(|(n, _)| *n == k) {
            Some((_, a)) => *a += v,
            None => stats.push((k, v)),
        };
        let mut n_updates = 0usize;
        let mut first_ratio_dev = 0f64;
        for epoch in 0..cfg.num_ppo_epochs {
            let mut order: Vec<usize> = (0..rollout.seqs.len()).collect();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(train.seed ^ 0x9e37_79b9);
            rng.set_stream(it * cfg.num_ppo_epochs as u64 + epoch as u64);
            order.shuffle(&mut rng);
            for (mb_index, mb) in order.chunks(minibatch).enumerate() {
                grads.zero();
                let tokens: usize = mb.iter().map(|&n| rollout.old_logp[n].len()).sum();
                let (
                    mut pg_sum,
                    mut vf_sum,
                    mut clip_sum,
                    mut vclip_sum,
                    mut kl_sum,
                    mut ratio_sum,
                ) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
                for part in mb.chunks(micro) {
                    let s: Vec<&[u32]> = part.iter().map(|&n| rollout.seqs[n].as_slice()).collect();
                    let st: Vec<usize> = part.iter().map(|&n| rollout.starts[n]).collect();
                    let (lp, mask, _) =
                        models
                            .policy
                            .completion_logprobs(&s, &st, ops::default_path())?;
                    let width = lp.dim(1)?;
                    fn rows<'a>(v: &'a [Vec<f32>], part: &[usize]) -> Vec<&'a Vec<f32>> {
                        part.iter().map(|&n| &v[n]).collect()
                    }
                    let pick = |v| rows(v, part);
                    let old = dense(&pick(&rollout.old_logp), &st, width)?;
                    if epoch == 0 && mb_index == 0 {
                        // The sampler's log-probs are the old policy's: before any update the
                        // ratio is 1 up to float noise.
                        let dev = ((&lp - &old)? * &mask)?
                            .abs()?
                            .max_all()?
                            .to_scalar::<f32>()?;
                        first_ratio_dev = first_ratio_dev.max(dev as f64);
                    }
                    let adv = dense(&pick(&rollout.advantages), &st, width)?;
                    let sur = policy_loss(&lp, &old, &adv, &mask, cfg.cliprange)?;
                    let v = values_of(models.value, models.value_head, &s)?;
                    let old_v = dense(&pick(&rollout.old_values), &st, width)?;
                    let ret = dense(&pick(&rollout.returns), &st, width)?;
                    let (vl, vclipped) = value_loss(&v, &old_v, &ret, &mask, cfg.cliprange_value)?;
                    let loss = ((&sur.loss + (&vl * cfg.vf_coef)?)? / tokens as f64)?;
                    pg_sum += sur.loss.to_scalar::<f32>()? as f64;
                    vf_sum += vl.to_scalar::<f32>()? as f64;
                    clip_sum += sur.clipped;
                    vclip_sum += vclipped;
                    kl_sum += sur.approx_kl;
                    ratio_sum += sur.ratio;
                    grads.add(&params, &loss.backward()?)?;
                }
                // PPO-ptx: γ·(mean LM loss on pretraining text), in the same step.
                if cfg.ptx_coef > 0.0 && !ptx.is_empty() {
                    let update = it * updates_per_iteration + n_updates as u64;
                    let picked = step_examples(
                        ptx.len(),
                        cfg.ptx_batch_size,
                        train.seed ^ 0x0070_7478,
                        update,
                    );
                    let examples: Vec<&Example> = picked.iter().map(|&i| &ptx[i]).collect();
                    let n_targets: usize = examples
                        .iter()
                        .map(|e| e.targets.iter().skip(1).map(|&t| t as usize).sum::<usize>())
                        .sum();
                    let mut ptx_loss = 0.0;
                    for part in examples.chunks(micro) {
                        let (nll, _) = target_nll_sum(models.policy, part)?;
                        let l = (nll * (cfg.ptx_coef / n_targets.max(1) as f64))?;
                        ptx_loss += l.to_scalar::<f32>()? as f64 / cfg.ptx_coef;
                        grads.add(&params, &l.backward()?)?;
                    }
                    add("ptx/loss", ptx_loss);
                }
                let norm = grads.global_norm();
                if !norm.is_finite() {
                    pb.abandon();
                    bail!("iteration {}: non-finite gradient norm; stopped without writing a checkpoint", it + 1);
                }
                let scale = if train.max_grad_norm > 0.0 && norm > train.max_grad_norm {
                    train.max_grad_norm / norm
                } else {
                    1.0
                };
                let update = (it * updates_per_iteration) as usize + n_updates;
                let lr = lr_at(
                    &train.lr_scheduler_type,
                    train.learning_rate,
                    warmup,
                    total_updates,
                    update,
                );
                let poisoned = optimizer.update(&params, &grads, lr, scale)?;
                if !poisoned.is_empty() {
                    pb.abandon();
                    bail!("iteration {}: the update made {} non-finite; stopped without writing a checkpoint", it + 1, poisoned[0]);
                }
                if let Some(e) = ema.as_mut() {
                    e.update(&policy_params)?;
                }
                n_updates += 1;
                let t = tokens.max(1) as f64;
                add("loss/policy_avg", pg_sum / t);
                add("loss/value_avg", vf_sum / t);
                add("policy/clipfrac_avg", clip_sum / t);
                add("val/clipfrac_avg", vclip_sum / t);
                add("policy/approxkl_avg", kl_sum / t);
                add("val/ratio", ratio_sum / t);
                add("grad_norm", norm);
                add("learning_rate", lr);
            }
        }
        let t_train = t_train0.elapsed().as_secs_f64();
        let mean_kl = mean(kl_per_episode.iter().copied());
        kl_ctl.update(mean_kl, samples.len());
        state.step += 1;
        pb.set_position(state.step);

        // 5. Metrics (TRL's names), samples, checkpoint.
        let mean_score = mean(raw_scores.iter().map(|&x| x as f64));
        let entropy = mean(
            samples
                .iter()
                .map(|s| s.entropies.iter().map(|&e| e as f64).sum::<f64>()),
        );
        let tokens_per_ep = mean(samples.iter().map(|s| s.tokens.len() as f64));
        let mut m: Vec<(String, f64)> = vec![
            ("objective/kl".into(), mean_kl),
            ("objective/entropy".into(), entropy),
            (
                "objective/non_score_reward".into(),
                mean(non_score.iter().copied()),
            ),
            (
                "objective/rlhf_reward".into(),
                mean(scores.iter().zip(&non_score).map(|(&s, &n)| s as f64 + n)),
            ),
            ("objective/scores".into(), mean_score),
            (
                "policy/entropy_avg".into(),
                entropy / tokens_per_ep.max(1.0),
            ),
            (
                "val/num_eos_tokens".into(),
                samples.iter().filter(|s| s.stopped).count() as f64,
            ),
            ("val/response_length".into(), tokens_per_ep),
            ("val/first_ratio_max_abs_log".into(), first_ratio_dev),
            ("beta".into(), beta),
            ("time/generation".into(), t_gen),
            ("time/scoring".into(), t_score),
            ("time/training".into(), t_train),
            (
                "tokens_per_second".into(),
                samples.iter().map(|s| s.tokens.len()).sum::<usize>() as f64
                    / t_start.elapsed().as_secs_f64().max(1e-9),
            ),
            ("episode".into(), (state.step as usize * batch) as f64),
        ];
        for (k, v) in &stats {
            m.push((k.to_string(), v / n_updates.max(1) as f64));
        }
        let refs: Vec<(&str, f64)> = m.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        logger.log(state.step, &refs)?;
        pb.set_message(format!(
            "score {mean_score:.3} kl {mean_kl:.2} β {beta:.3} ({t_gen:.0}s gen, {t_train:.0}s train)"
        ));
        if pb.is_hidden() {
            eprintln!(
                "iteration {}/{iterations} score {mean_score:.4} kl {mean_kl:.3} beta {beta:.4} gen {t_gen:.1}s score {t_score:.1}s train {t_train:.1}s",
                state.step
            );
        }
        let sample_now = cfg.sample_every > 0
            && (state.step.is_multiple_of(cfg.sample_every as u64)
                || state.step == 1
                || state.step == iterations);
        if sample_now {
            for (n, &i) in chosen.iter().enumerate().take(4) {
                samples_log.push_str(
                    &serde_json::json!({
                        "iteration": state.step,
                        "prompt": prompts[i].text,
                        "response": texts[n],
                        "score": raw_scores[n],
                        "kl": kl_per_episode[n],
                    })
                    .to_string(),
                );
                samples_log.push('\n');
            }
            append(out, "samples.jsonl", &std::mem::take(&mut samples_log))?;
        }
        last_metrics = m;
        let last = state.step == iterations;
        if train.save_steps > 0 && (state.step.is_multiple_of(train.save_steps as u64) || last) {
            state.extra = serde_json::json!({
                "optimizer_steps": optimizer.step,
                "kl_coef": kl_ctl.beta,
            });
            let extra: Vec<(String, Tensor)> = match &ema {
                Some(e) => policy_params
                    .iter()
                    .zip(&e.values)
                    .map(|((n, _), t)| (format!("ema.{n}"), t.clone()))
                    .collect(),
                None => vec![],
            };
            save_checkpoint(
                out,
                &params,
                &optimizer,
                &state,
                train.save_total_limit,
                &extra,
            )?;
        }
    }
    pb.finish_and_clear();
    // The saved policy is the EMA of its weights when asked for.
    if let Some(e) = ema {
        for ((_, p), t) in policy_params.iter().zip(e.values) {
            p.set(&t)?;
        }
    }
    Ok(PpoOutcome {
        iterations: state.step,
        last_metrics,
    })
}

fn append(dir: &Path, name: &str, text: &str) -> Result<()> {
    use std::io::Write;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
