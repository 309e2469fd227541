//! The online-RL loop shared by PPO (and, next, GRPO / RLOO). Each iteration has three phases:
//!
//! 1. collect: sample one response per chosen prompt, score it, and compute the reference
//!    log-probs and values of every response token, into one padded rollout (`rollout.rs`);
//! 2. advantages: the algorithm's estimator turns the rollout into per-token advantages (and
//!    value targets when a value model learns);
//! 3. update: epochs × minibatches of the algorithm's loss through the shared optimizer step,
//!    accumulated over micro-batches, with PPO-ptx's language-modelling term in the same step
//!    when asked;
//!
//! then metrics, samples and a checkpoint. An algorithm is an [`Objective`]: its estimator, its
//! loss and its per-iteration state (PPO's adaptive β); the loop knows nothing else of it.

pub mod rollout;

use anyhow::{anyhow, bail, Result};
use candle_core::{Tensor, Var};
use indicatif::ProgressBar;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::data::prompts::Prompt;
use crate::data::sft::Example;
use crate::generate::SamplingConfig;
use crate::model::CausalLm;
use crate::ops;
use crate::reward::RewardSource;
use crate::text::Tokenizer;
use crate::train::lm_loss::target_nll_sum;
use crate::train::metrics::{format_line, MetricsLogger, Window};
use crate::train::state::{load_extra_tensors, save_checkpoint, TrainerState};
use crate::train::trainer::{
    log, main_logger, mix_seed, progress_bar, start_state, step_examples, sum_over_ranks,
};
use crate::train::{Optimizer, StepOutcome, TrainConfig};
pub use rollout::{Collect, Rollout, ValueModel};

/// Phase 2's result: per-token advantages `[N, W]` (0 outside the responses), value targets
/// when a value model learns, and the estimator's metrics for this iteration.
pub struct Advantages {
    pub advantages: Tensor,
    pub returns: Option<Tensor>,
    pub metrics: Vec<(String, f64)>,
    /// Episodes the loss leaves out entirely (GRPO's `mask_truncated_completions`): their tokens
    /// are masked and not counted in the normalisers.
    pub excluded: Vec<bool>,
}

/// One micro-batch of an update: rows of the rollout, cut to the micro-batch's width, with the
/// policy's (and value model's) outputs now, which carry gradients.
pub struct MicroBatch {
    pub logp: Tensor,
    pub values: Option<Tensor>,
    pub mask: Tensor,
    pub old_logp: Tensor,
    pub ref_logp: Option<Tensor>,
    pub advantages: Tensor,
    pub returns: Option<Tensor>,
    pub old_values: Option<Tensor>,
    /// Response tokens in the whole minibatch (the normaliser that makes accumulation exact).
    pub minibatch_tokens: usize,
    /// Episodes in the whole minibatch (GRPO's per-response normalisers).
    pub minibatch_episodes: usize,
}

/// What an online-RL algorithm brings to the loop.
pub trait Objective {
    /// Whether the rollout needs the reference's log-probs.
    fn needs_reference(&self) -> bool;
    /// Phase 2: advantages (and value targets) of a scored rollout.
    fn advantages(&mut self, rollout: &Rollout) -> Result<Advantages>;
    /// The loss of one micro-batch, scaled so that the sum over a minibatch's micro-batches is
    /// the minibatch loss, and its metric contributions (summed the same way).
    fn loss(&self, batch: &MicroBatch) -> Result<(Tensor, Vec<(&'static str, f64)>)>;
    /// After the iteration's updates (e.g. the adaptive-KL controller), given each episode's
    /// sequence KL.
    fn end_iteration(&mut self, sequence_kl: &[f64]);
    /// State that a checkpoint keeps, and its restore.
    fn state(&self) -> serde_json::Value;
    fn restore(&mut self, state: &serde_json::Value);
}

/// PPO-ptx: the language-modelling loss on pretraining text, γ_ptx times its mean token NLL,
/// added to every update.
pub struct PretrainingMix<'a> {
    pub examples: &'a [Example],
    pub coef: f64,
    pub batch_size: usize,
}

/// The loop's own settings.
pub struct LoopConfig<'a> {
    pub iterations: u64,
    /// Episodes per iteration (the rollout batch).
    pub episodes: usize,
    /// Responses sampled per chosen prompt, consecutive in the rollout (GRPO's G; PPO: 1).
    pub group_size: usize,
    /// Passes over each rollout.
    pub epochs: usize,
    /// Episodes per optimizer step.
    pub minibatch: usize,
    /// Episodes per forward pass (gradient accumulation within a minibatch).
    pub micro_batch: usize,
    /// Sampling of the rollouts (`seed` is replaced per iteration).
    pub sampling: SamplingConfig,
    /// Write prompts, responses and scores to samples.jsonl every N iterations (0: never).
    pub sample_every: usize,
    pub ptx: Option<PretrainingMix<'a>>,
    /// EMA of the policy's weights for the saved model (0: off).
    pub ema_decay: f64,
}

impl LoopConfig<'_> {
    /// Optimizer steps per iteration: epochs × minibatches.
    pub fn updates_per_iteration(&self) -> u64 {
        (self.epochs * self.episodes.div_ceil(self.minibatch)) as u64
    }
}

/// The frozen reference of a run: a model of its own, or the LoRA policy's base — the policy with
/// its adapters off, so no second copy is held.
#[derive(Clone, Copy)]
pub enum Reference<'a> {
    Model(&'a CausalLm),
    PolicyBase,
}

/// The models of the loop: the policy trains, the value model (if any) trains with it, the
/// reference stays frozen.
pub struct Models<'a> {
    pub policy: &'a CausalLm,
    pub reference: Option<Reference<'a>>,
    pub value: Option<ValueModel<'a>>,
}

pub struct Outcome {
    pub iterations: u64,
    pub skipped_updates: u64,
    pub last_metrics: Vec<(String, f64)>,
}

impl Outcome {
    /// The last logged value of metric `key` (NaN when it was never logged).
    pub fn last(&self, key: &str) -> f64 {
        self.last_metrics
            .iter()
            .find(|(n, _)| n == key)
            .map_or(f64::NAN, |(_, v)| *v)
    }
}

/// The data and the run around the loop.
pub struct Run<'a> {
    pub train: &'a TrainConfig,
    pub prompts: &'a [Prompt],
    pub tokenizer: &'a Tokenizer,
    pub reward: &'a mut dyn RewardSource,
    pub resume: bool,
    pub fingerprint: &'a str,
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

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

/// Sums metrics by name (first-seen order).
fn add(acc: &mut Vec<(String, f64)>, k: &str, v: f64) {
    match acc.iter_mut().find(|(n, _)| n == k) {
        Some((_, a)) => *a += v,
        None => acc.push((k.to_string(), v)),
    }
}

/// The state of a run of the loop between iterations.
struct Looping<'a> {
    cfg: &'a LoopConfig<'a>,
    models: &'a Models<'a>,
    train: TrainConfig,
    out: PathBuf,
    policy_params: Vec<(String, Var)>,
    optimizer: Optimizer,
    ema: Option<Ema>,
    state: TrainerState,
    logger: Option<MetricsLogger>,
    pb: ProgressBar,
    window: Window,
    last_metrics: Vec<(String, f64)>,
    /// The iteration of the last checkpoint written.
    saved_at: Option<u64>,
}

/// What phase 3 did: the update metrics (means over the applied updates), how many updates
/// were skipped, and the first update's largest |log ratio|.
struct Updates {
    stats: Vec<(String, f64)>,
    skipped: u64,
    first_ratio_dev: f64,
}

pub fn run(
    cfg: &LoopConfig,
    models: &Models,
    objective: &mut dyn Objective,
    mut run: Run,
) -> Result<Outcome> {
    let mut lp = Looping::start(cfg, models, objective, &run)?;
    while lp.state.step < cfg.iterations {
        if let Some(signal) = crate::train::interrupt::pending_anywhere() {
            return Err(lp.stop(objective, signal));
        }
        let t_start = Instant::now();
        let rollout = lp.collect(objective, &mut run)?;
        let t_train = Instant::now();
        let adv = objective.advantages(&rollout)?;
        let updates = lp.update(objective, &rollout, &adv)?;
        let kl = rollout.sequence_kl()?;
        objective.end_iteration(kl.as_deref().unwrap_or(&[]));
        let train_secs = t_train.elapsed().as_secs_f64() + rollout.passes_secs;
        lp.record(
            objective,
            &run,
            &rollout,
            &adv,
            &updates,
            kl.as_deref(),
            (t_start, train_secs),
        )?;
    }
    lp.finish()
}

impl<'a> Looping<'a> {
    /// The optimizer over the policy (and value model), the EMA, and where the run starts: step
    /// 0 or, resuming, the newest checkpoint (weights, moments, the objective's state, the EMA).
    fn start(
        cfg: &'a LoopConfig<'a>,
        models: &'a Models<'a>,
        objective: &mut dyn Objective,
        run: &Run,
    ) -> Result<Self> {
        let train = run.train.clone();
        let out = PathBuf::from(&train.output_dir);
        models
            .policy
            .set_gradient_checkpointing(train.gradient_checkpointing);
        if let Some(v) = models.value {
            v.body
                .set_gradient_checkpointing(train.gradient_checkpointing);
        }
        let policy_params = models.policy.parameters().to_vec();
        let mut params = policy_params.clone();
        if let Some(v) = models.value {
            for (n, p) in v.body.parameters().iter().chain(&v.head.parameters()) {
                params.push((format!("value.{n}"), p.clone()));
            }
        }
        let total_updates = cfg.iterations * cfg.updates_per_iteration();
        let mut optimizer = Optimizer::new(&train, params, total_updates);
        let mut ema = (cfg.ema_decay > 0.0).then(|| Ema {
            decay: cfg.ema_decay,
            values: policy_params
                .iter()
                .map(|(_, v)| v.as_tensor().detach())
                .collect(),
        });
        let (state, resumed_from) = start_state(
            &out,
            &mut optimizer,
            run.fingerprint,
            run.resume,
            train.layout(),
        )?;
        objective.restore(&state.extra["objective"]);
        if let (Some(e), Some(ck)) = (ema.as_mut(), &resumed_from) {
            let saved = load_extra_tensors(ck)?;
            for (v, (name, _)) in e.values.iter_mut().zip(&policy_params) {
                if let Some(t) = saved.get(&format!("ema.{name}")) {
                    *v = t.clone();
                }
            }
        }
        if let Some(e) = ema.as_mut() {
            // Rank 0 read the checkpoint.
            for v in &mut e.values {
                *v = crate::dist::world().broadcast_tensor(v)?;
            }
        }
        let resumed_at = (run.resume && state.step > 0).then_some(state.step);
        let logger = main_logger(&out, resumed_at)?;
        Ok(Looping {
            cfg,
            models,
            train,
            out,
            policy_params,
            optimizer,
            ema,
            logger,
            pb: progress_bar(cfg.iterations, "iterations", state.step),
            state,
            window: Window::default(),
            last_metrics: vec![],
            saved_at: None,
        })
    }

    /// Phase 1. Prompt order and sampling noise depend only on (seed, iteration). Each rank
    /// samples and scores its contiguous share of the episodes; the shares are then gathered.
    fn collect(&self, objective: &dyn Objective, run: &mut Run) -> Result<Rollout> {
        let it = self.state.step;
        let g = self.cfg.group_size.max(1);
        let chosen: Vec<usize> = step_examples(
            run.prompts.len(),
            self.cfg.episodes / g,
            self.train.seed,
            it,
        )
        .into_iter()
        .flat_map(|i| std::iter::repeat_n(i, g))
        .collect();
        let mine = crate::dist::world().share(chosen.len());
        let sampling = SamplingConfig {
            seed: self.train.seed.wrapping_mul(1_000_003).wrapping_add(it),
            first_stream: mine.start as u64,
            ..self.cfg.sampling.clone()
        };
        let with = Collect {
            reference: self
                .models
                .reference
                .filter(|_| objective.needs_reference()),
            value: self.models.value,
            reward: &mut *run.reward,
            tokenizer: run.tokenizer,
            chunk: self.cfg.micro_batch,
        };
        rollout::collect(
            self.models.policy,
            run.prompts,
            &chosen[mine],
            &sampling,
            with,
        )
        .and_then(Rollout::gather)
        .map_err(|e| {
            self.pb.abandon();
            anyhow!("iteration {}: {e:#}; stopped", it + 1)
        })
    }

    /// Phase 3: epochs × minibatches, each one optimizer step accumulated over micro-batches
    /// (with PPO-ptx's term in the same step).
    fn update(
        &mut self,
        objective: &dyn Objective,
        rollout: &Rollout,
        adv: &Advantages,
    ) -> Result<Updates> {
        let (cfg, it) = (self.cfg, self.state.step);
        let world = crate::dist::world();
        let mut stats: Vec<(String, f64)> = Vec::new();
        let (mut applied, mut skipped) = (0usize, 0u64);
        let mut first_ratio_dev = 0f64;
        let mut position = it * cfg.updates_per_iteration();
        for epoch in 0..cfg.epochs {
            let mut order: Vec<usize> = (0..rollout.len()).collect();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.train.seed ^ 0x9e37_79b9);
            rng.set_stream(it * cfg.epochs as u64 + epoch as u64);
            order.shuffle(&mut rng);
            for (mb_index, minibatch) in order.chunks(cfg.minibatch).enumerate() {
                let kept = |n: &&usize| !adv.excluded.get(**n).copied().unwrap_or(false);
                let tokens: usize = minibatch
                    .iter()
                    .filter(kept)
                    .map(|&n| rollout.response_len(n))
                    .sum();
                let episodes = minibatch.iter().filter(kept).count();
                let mut update_stats: Vec<(String, f64)> = Vec::new();
                // This rank's share of the minibatch's micro-batches (and of PPO-ptx's).
                let parts: Vec<&[usize]> = minibatch.chunks(cfg.micro_batch).collect();
                let mine = world.share(parts.len());
                let ptx_parts = cfg.ptx.as_ref().map_or(0..0, |p| {
                    world.share(p.batch_size.div_ceil(cfg.micro_batch))
                });
                self.optimizer.start_step(mine.len() + ptx_parts.len());
                for k in mine {
                    let part = parts[k];
                    let seed = mix_seed(self.train.seed, position, k as u64);
                    let models = self.models;
                    let batch =
                        models
                            .policy
                            .with_adapter_dropout(seed, || match &models.value {
                                Some(v) => v.body.with_adapter_dropout(seed ^ 1, || {
                                    micro_batch(models, rollout, adv, part, (tokens, episodes))
                                }),
                                None => micro_batch(models, rollout, adv, part, (tokens, episodes)),
                            })?;
                    if epoch == 0 && mb_index == 0 {
                        // The sampler's log-probs are the old policy's: before any update the
                        // ratio is 1 up to float noise.
                        let dev = ((&batch.logp - &batch.old_logp)? * &batch.mask)?
                            .abs()?
                            .max_all()?
                            .to_scalar::<f32>()?;
                        first_ratio_dev = first_ratio_dev.max(dev as f64);
                    }
                    let (loss, parts) = objective.loss(&batch)?;
                    self.optimizer.accumulate(&loss)?;
                    for (k, v) in parts {
                        add(&mut update_stats, k, v);
                    }
                }
                if let Some(ptx) = &cfg.ptx {
                    let loss = self.pretraining_term(ptx, position, ptx_parts)?;
                    add(&mut update_stats, "ptx/loss", loss);
                }
                let outcome = self.optimizer.step(position).map_err(|e| {
                    self.pb.abandon();
                    let n = applied + skipped as usize + 1;
                    anyhow!("iteration {}, update {n}: {e}", it + 1)
                })?;
                position += 1;
                match outcome {
                    StepOutcome::Updated {
                        grad_norm,
                        learning_rate,
                    } => {
                        if let Some(e) = self.ema.as_mut() {
                            e.update(&self.policy_params)?;
                        }
                        applied += 1;
                        sum_over_ranks(&mut update_stats, 0)?;
                        update_stats.push(("grad_norm".into(), grad_norm));
                        if world.size() > 1 {
                            let secs = self.optimizer.all_reduce_secs();
                            update_stats.push(("time/all_reduce".into(), secs));
                        }
                        update_stats.push(("learning_rate".into(), learning_rate));
                        for (k, v) in &update_stats {
                            add(&mut stats, k, *v);
                        }
                    }
                    StepOutcome::Skipped { reason } => {
                        if world.is_main() {
                            self.pb.suspend(|| {
                                eprintln!("iteration {}: {reason}; update skipped", it + 1)
                            });
                        }
                        skipped += 1;
                    }
                }
            }
        }
        for (_, v) in &mut stats {
            *v /= applied.max(1) as f64;
        }
        Ok(Updates {
            stats,
            skipped,
            first_ratio_dev,
        })
    }

    /// PPO-ptx: γ_ptx × the mean token NLL of a batch of pretraining text, accumulated into the
    /// update at `position` (this rank: its share `mine` of the micro-batches); returns the NLL.
    fn pretraining_term(
        &mut self,
        ptx: &PretrainingMix,
        position: u64,
        mine: std::ops::Range<usize>,
    ) -> Result<f64> {
        let picked = step_examples(
            ptx.examples.len(),
            ptx.batch_size,
            self.train.seed ^ 0x0070_7478,
            position,
        );
        let examples: Vec<&Example> = picked.iter().map(|&i| &ptx.examples[i]).collect();
        let n_targets: usize = examples
            .iter()
            .map(|e| e.targets.iter().skip(1).map(|&t| t as usize).sum::<usize>())
            .sum();
        let mut nll = 0.0;
        let parts: Vec<&[&Example]> = examples.chunks(self.cfg.micro_batch).collect();
        for part in &parts[mine] {
            let (sum, _) = target_nll_sum(self.models.policy, part)?;
            let l = (sum * (ptx.coef / n_targets.max(1) as f64))?;
            nll += self.optimizer.accumulate(&l)? / ptx.coef;
        }
        Ok(nll)
    }

    /// After an iteration: metrics (TRL's names; logged as means every `logging_steps`),
    /// samples, and a checkpoint every `save_steps`.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        objective: &dyn Objective,
        run: &Run,
        rollout: &Rollout,
        adv: &Advantages,
        updates: &Updates,
        kl: Option<&[f64]>,
        (t_start, train_secs): (Instant, f64),
    ) -> Result<()> {
        self.state.step += 1;
        self.state.skipped_steps += updates.skipped;
        self.pb.set_position(self.state.step);
        let step = self.state.step;
        let last = step == self.cfg.iterations;
        let mut m = iteration_metrics(rollout, adv, kl, updates);
        m.push(("time/training".into(), train_secs));
        let tokens: usize = (0..rollout.len()).map(|i| rollout.response_len(i)).sum();
        let secs = t_start.elapsed().as_secs_f64().max(1e-9);
        m.push(("tokens_per_second".into(), tokens as f64 / secs));
        self.window.add_step(&m);
        let logging = self.train.logging_steps as u64;
        if logging > 0 && step.is_multiple_of(logging) || last {
            let (mut values, _) = self.window.close();
            values.push(("episode".into(), (step as usize * self.cfg.episodes) as f64));
            log(&mut self.logger, step, &values)?;
            let get = |k: &str| {
                values
                    .iter()
                    .find(|(n, _)| n == k)
                    .map_or(f64::NAN, |(_, v)| *v)
            };
            self.pb.set_message(format!(
                "score {:.3} kl {:.2} ({:.0}s gen, {:.0}s train)",
                get("objective/scores"),
                get("objective/kl"),
                get("time/generation"),
                get("time/training")
            ));
            if self.pb.is_hidden() && self.logger.is_some() {
                let total = self.cfg.iterations;
                eprintln!("iteration {step}/{total} {}", format_line(&values));
            }
            self.last_metrics = values;
        }
        let every = self.cfg.sample_every as u64;
        let main = crate::dist::world().is_main();
        if main && every > 0 && (step.is_multiple_of(every) || step == 1 || last) {
            append(
                &self.out,
                "samples.jsonl",
                &sample_lines(step, run, rollout, kl),
            )?;
        }
        let save = self.train.save_steps as u64;
        if main && save > 0 && (step.is_multiple_of(save) || last) {
            self.save(objective)?;
        }
        Ok(())
    }

    /// Writes the checkpoint of the iterations done so far (rank 0): weights, moments, the
    /// objective's state and the EMA.
    fn save(&mut self, objective: &dyn Objective) -> Result<PathBuf> {
        self.state.extra = serde_json::json!({
            "optimizer_steps": self.optimizer.updates(),
            "objective": objective.state(),
        });
        let extra: Vec<(String, Tensor)> = match &self.ema {
            Some(e) => self
                .policy_params
                .iter()
                .zip(&e.values)
                .map(|((n, _), t)| (format!("ema.{n}"), t.clone()))
                .collect(),
            None => vec![],
        };
        let keep = self.train.save_total_limit;
        let path = save_checkpoint(&self.out, &self.optimizer, &self.state, keep, &extra)?;
        self.saved_at = Some(self.state.step);
        Ok(path)
    }

    /// After SIGINT/SIGTERM (on any rank): a checkpoint of the iterations done, then the error
    /// that ends the run with 128 + the signal.
    fn stop(&mut self, objective: &dyn Objective, signal: i32) -> anyhow::Error {
        self.pb.abandon();
        let (step, saved_at, out) = (self.state.step, self.saved_at, self.out.clone());
        let save = || self.save(objective);
        match crate::train::interrupt::Interrupted::after(signal, step, saved_at, &out, save) {
            Ok(stop) => stop.into(),
            Err(e) => e,
        }
    }

    /// The end of the run: the saved policy is the EMA of its weights when asked for.
    fn finish(self) -> Result<Outcome> {
        self.pb.finish_and_clear();
        if let Some(e) = self.ema {
            for ((_, p), t) in self.policy_params.iter().zip(e.values) {
                p.set(&t)?;
            }
        }
        if self.state.step == 0 {
            bail!("no iterations to run");
        }
        Ok(Outcome {
            iterations: self.state.step,
            skipped_updates: self.state.skipped_steps,
            last_metrics: self.last_metrics,
        })
    }
}

/// The metrics of one iteration that the loop knows: the rollout's (scores, lengths, entropy,
/// KL, times), the estimator's, and the updates'.
fn iteration_metrics(
    rollout: &Rollout,
    adv: &Advantages,
    kl: Option<&[f64]>,
    updates: &Updates,
) -> Vec<(String, f64)> {
    let n = rollout.len();
    let entropy = mean(rollout.entropies.iter().copied());
    let tokens_per_ep = mean((0..n).map(|i| rollout.response_len(i) as f64));
    let mut m: Vec<(String, f64)> = Vec::new();
    if let Some(kl) = kl {
        m.push(("objective/kl".into(), mean(kl.iter().copied())));
    }
    m.push(("objective/entropy".into(), entropy));
    m.extend(adv.metrics.iter().cloned());
    let eos = rollout.stopped.iter().filter(|&&s| s).count() as f64;
    m.extend([
        (
            "objective/scores".into(),
            mean(rollout.scores.iter().map(|&x| x as f64)),
        ),
        (
            "policy/entropy_avg".into(),
            entropy / tokens_per_ep.max(1.0),
        ),
        ("val/num_eos_tokens".into(), eos),
        ("val/response_length".into(), tokens_per_ep),
        (
            "val/first_ratio_max_abs_log".into(),
            updates.first_ratio_dev,
        ),
        ("time/generation".into(), rollout.generation_secs),
        ("time/scoring".into(), rollout.scoring_secs),
    ]);
    m.extend(updates.stats.iter().cloned());
    if updates.skipped > 0 {
        m.push(("skipped_updates".into(), updates.skipped as f64));
    }
    m
}

/// samples.jsonl lines: the first four episodes of the iteration.
fn sample_lines(step: u64, run: &Run, rollout: &Rollout, kl: Option<&[f64]>) -> String {
    let mut lines = String::new();
    for i in 0..rollout.len().min(4) {
        let mut line = serde_json::json!({
            "iteration": step,
            "prompt": run.prompts[rollout.prompt_index[i]].text,
            "response": rollout.texts[i],
            "score": rollout.scores[i],
        });
        if let Some(kl) = kl {
            line["kl"] = kl[i].into();
        }
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    lines
}

/// The rollout rows `part` as a micro-batch, with the policy's log-probs and the value model's
/// estimates computed now (with gradients).
fn micro_batch(
    models: &Models,
    rollout: &Rollout,
    adv: &Advantages,
    part: &[usize],
    (minibatch_tokens, minibatch_episodes): (usize, usize),
) -> Result<MicroBatch> {
    let seqs: Vec<&[u32]> = part
        .iter()
        .map(|&n| rollout.sequences[n].as_slice())
        .collect();
    let starts: Vec<usize> = part.iter().map(|&n| rollout.prompt_lens[n]).collect();
    let (logp, mut mask, _) =
        models
            .policy
            .completion_logprobs(&seqs, &starts, ops::default_path())?;
    if part
        .iter()
        .any(|&n| adv.excluded.get(n).copied().unwrap_or(false))
    {
        let keep: Vec<f32> = part
            .iter()
            .map(|&n| f32::from(u8::from(!adv.excluded.get(n).copied().unwrap_or(false))))
            .collect();
        let keep = Tensor::from_vec(keep, (part.len(), 1), mask.device())?;
        mask = mask.broadcast_mul(&keep)?;
    }
    let width = logp.dim(1)?;
    let pick = |t: &Tensor| Rollout::select(t, part, width);
    let pick_opt = |t: &Option<Tensor>| t.as_ref().map(pick).transpose();
    Ok(MicroBatch {
        values: models.value.map(|v| v.values(&seqs)).transpose()?,
        old_logp: pick(&rollout.old_logp)?,
        ref_logp: pick_opt(&rollout.ref_logp)?,
        advantages: pick(&adv.advantages)?,
        returns: pick_opt(&adv.returns)?,
        old_values: pick_opt(&rollout.values)?,
        logp,
        mask,
        minibatch_tokens,
        minibatch_episodes,
    })
}

fn append(dir: &Path, name: &str, text: &str) -> Result<()> {
    use std::io::Write;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
