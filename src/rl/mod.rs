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
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::Path;
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
use crate::train::state::{load_extra_tensors, save_checkpoint};
use crate::train::trainer::{log, progress_bar, start_state, step_examples};
use crate::train::{Optimizer, StepOutcome, TrainConfig};
pub use rollout::{Collect, Rollout, ValueModel};

/// Phase 2's result: per-token advantages `[N, W]` (0 outside the responses), value targets
/// when a value model learns, and the estimator's metrics for this iteration.
pub struct Advantages {
    pub advantages: Tensor,
    pub returns: Option<Tensor>,
    pub metrics: Vec<(String, f64)>,
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

/// The models of the loop: the policy trains, the value model (if any) trains with it, the
/// reference stays frozen.
pub struct Models<'a> {
    pub policy: &'a CausalLm,
    pub reference: Option<&'a CausalLm>,
    pub value: Option<ValueModel<'a>>,
}

pub struct Outcome {
    pub iterations: u64,
    pub skipped_updates: u64,
    pub last_metrics: Vec<(String, f64)>,
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

pub fn run(
    cfg: &LoopConfig,
    models: &Models,
    objective: &mut dyn Objective,
    run: Run,
) -> Result<Outcome> {
    let train = run.train;
    let out = Path::new(&train.output_dir);
    let updates_per_iteration = (cfg.epochs * cfg.episodes.div_ceil(cfg.minibatch)) as u64;
    let policy_params = models.policy.parameters().to_vec();
    let mut params = policy_params.clone();
    if let Some(v) = models.value {
        for (n, p) in v.body.parameters().iter().chain(&v.head.parameters()) {
            params.push((format!("value.{n}"), p.clone()));
        }
    }
    let mut optimizer = Optimizer::new(train, params, cfg.iterations * updates_per_iteration);
    let mut ema = (cfg.ema_decay > 0.0).then(|| Ema {
        decay: cfg.ema_decay,
        values: policy_params
            .iter()
            .map(|(_, v)| v.as_tensor().detach())
            .collect(),
    });
    let (mut state, resumed_from) = start_state(out, &mut optimizer, run.fingerprint, run.resume)?;
    objective.restore(&state.extra["objective"]);
    if let (Some(e), Some(ck)) = (ema.as_mut(), &resumed_from) {
        let saved = load_extra_tensors(ck)?;
        for (v, (name, _)) in e.values.iter_mut().zip(&policy_params) {
            if let Some(t) = saved.get(&format!("ema.{name}")) {
                *v = t.clone();
            }
        }
    }
    let mut logger =
        MetricsLogger::create(out, (run.resume && state.step > 0).then_some(state.step))?;
    let pb = progress_bar(cfg.iterations, "iterations", state.step);
    let mut window = Window::default();
    let mut last_metrics = vec![];

    while state.step < cfg.iterations {
        let it = state.step;
        let t_start = Instant::now();
        // 1. Collect. Prompt order and sampling noise depend only on (seed, iteration).
        let chosen = step_examples(run.prompts.len(), cfg.episodes, train.seed, it);
        let sampling = SamplingConfig {
            seed: train.seed.wrapping_mul(1_000_003).wrapping_add(it),
            ..cfg.sampling.clone()
        };
        let with = Collect {
            reference: models.reference.filter(|_| objective.needs_reference()),
            value: models.value,
            reward: &mut *run.reward,
            tokenizer: run.tokenizer,
            chunk: cfg.micro_batch,
        };
        let t_passes = Instant::now();
        let rollout = rollout::collect(models.policy, run.prompts, &chosen, &sampling, with)
            .map_err(|e| {
                pb.abandon();
                anyhow!("iteration {}: {e:#}; stopped", it + 1)
            })?;
        let passes_secs =
            t_passes.elapsed().as_secs_f64() - rollout.generation_secs - rollout.scoring_secs;

        // 2. Advantages.
        let t_train = Instant::now();
        let adv = objective.advantages(&rollout)?;

        // 3. Updates: epochs × minibatches, each accumulated over micro-batches.
        let mut stats: Vec<(String, f64)> = Vec::new();
        let (mut n_updates, mut skipped) = (0usize, 0u64);
        let mut first_ratio_dev = 0f64;
        let mut position = it * updates_per_iteration;
        for epoch in 0..cfg.epochs {
            let mut order: Vec<usize> = (0..rollout.len()).collect();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(train.seed ^ 0x9e37_79b9);
            rng.set_stream(it * cfg.epochs as u64 + epoch as u64);
            order.shuffle(&mut rng);
            for (mb_index, minibatch) in order.chunks(cfg.minibatch).enumerate() {
                let tokens: usize = minibatch.iter().map(|&n| rollout.response_len(n)).sum();
                let mut update_stats: Vec<(String, f64)> = Vec::new();
                for part in minibatch.chunks(cfg.micro_batch) {
                    let batch = micro_batch(models, &rollout, &adv, part, tokens)?;
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
                    optimizer.accumulate(&loss)?;
                    for (k, v) in parts {
                        add(&mut update_stats, k, v);
                    }
                }
                if let Some(ptx) = &cfg.ptx {
                    let picked = step_examples(
                        ptx.examples.len(),
                        ptx.batch_size,
                        train.seed ^ 0x0070_7478,
                        position,
                    );
                    let examples: Vec<&Example> =
                        picked.iter().map(|&i| &ptx.examples[i]).collect();
                    let n_targets: usize = examples
                        .iter()
                        .map(|e| e.targets.iter().skip(1).map(|&t| t as usize).sum::<usize>())
                        .sum();
                    let mut ptx_loss = 0.0;
                    for part in examples.chunks(cfg.micro_batch) {
                        let (nll, _) = target_nll_sum(models.policy, part)?;
                        let l = (nll * (ptx.coef / n_targets.max(1) as f64))?;
                        ptx_loss += optimizer.accumulate(&l)? / ptx.coef;
                    }
                    add(&mut update_stats, "ptx/loss", ptx_loss);
                }
                let outcome = optimizer.step(position).map_err(|e| {
                    pb.abandon();
                    anyhow!(
                        "iteration {}, update {}: {e}",
                        it + 1,
                        n_updates + skipped as usize + 1
                    )
                })?;
                position += 1;
                match outcome {
                    StepOutcome::Updated {
                        grad_norm,
                        learning_rate,
                    } => {
                        if let Some(e) = ema.as_mut() {
                            e.update(&policy_params)?;
                        }
                        n_updates += 1;
                        update_stats.push(("grad_norm".into(), grad_norm));
                        update_stats.push(("learning_rate".into(), learning_rate));
                        for (k, v) in &update_stats {
                            add(&mut stats, k, *v);
                        }
                    }
                    StepOutcome::Skipped { reason } => {
                        pb.suspend(|| eprintln!("iteration {}: {reason}; update skipped", it + 1));
                        skipped += 1;
                    }
                }
            }
        }
        let train_secs = t_train.elapsed().as_secs_f64() + passes_secs;
        let kl = rollout.sequence_kl()?;
        objective.end_iteration(kl.as_deref().unwrap_or(&[]));
        state.step += 1;
        state.skipped_steps += skipped;
        pb.set_position(state.step);

        // 4. Metrics (TRL's names), samples, checkpoint.
        let n = rollout.len();
        let mean_score = mean(rollout.scores.iter().map(|&x| x as f64));
        let entropy = mean(rollout.entropies.iter().copied());
        let tokens_per_ep = mean((0..n).map(|i| rollout.response_len(i) as f64));
        let mut m: Vec<(String, f64)> = Vec::new();
        if let Some(kl) = &kl {
            m.push(("objective/kl".into(), mean(kl.iter().copied())));
        }
        m.push(("objective/entropy".into(), entropy));
        m.extend(adv.metrics.iter().cloned());
        m.extend([
            ("objective/scores".into(), mean_score),
            (
                "policy/entropy_avg".into(),
                entropy / tokens_per_ep.max(1.0),
            ),
            (
                "val/num_eos_tokens".into(),
                rollout.stopped.iter().filter(|&&s| s).count() as f64,
            ),
            ("val/response_length".into(), tokens_per_ep),
            ("val/first_ratio_max_abs_log".into(), first_ratio_dev),
            ("time/generation".into(), rollout.generation_secs),
            ("time/scoring".into(), rollout.scoring_secs),
            ("time/training".into(), train_secs),
            (
                "tokens_per_second".into(),
                (0..n).map(|i| rollout.response_len(i)).sum::<usize>() as f64
                    / t_start.elapsed().as_secs_f64().max(1e-9),
            ),
        ]);
        for (k, v) in &stats {
            m.push((k.clone(), v / n_updates.max(1) as f64));
        }
        if skipped > 0 {
            m.push(("skipped_updates".into(), skipped as f64));
        }
        window.add_step(&m);
        let last = state.step == cfg.iterations;
        if train.logging_steps > 0 && state.step.is_multiple_of(train.logging_steps as u64) || last
        {
            let (mut values, _) = window.close();
            values.push((
                "episode".into(),
                (state.step as usize * cfg.episodes) as f64,
            ));
            log(&mut logger, state.step, &values)?;
            let get = |k: &str| {
                values
                    .iter()
                    .find(|(n, _)| n == k)
                    .map_or(f64::NAN, |(_, v)| *v)
            };
            pb.set_message(format!(
                "score {:.3} kl {:.2} ({:.0}s gen, {:.0}s train)",
                get("objective/scores"),
                get("objective/kl"),
                get("time/generation"),
                get("time/training")
            ));
            if pb.is_hidden() {
                eprintln!(
                    "iteration {}/{} {}",
                    state.step,
                    cfg.iterations,
                    format_line(&values)
                );
            }
            last_metrics = values;
        }
        let sample_now = cfg.sample_every > 0
            && (state.step.is_multiple_of(cfg.sample_every as u64) || state.step == 1 || last);
        if sample_now {
            let mut lines = String::new();
            for i in 0..n.min(4) {
                let mut line = serde_json::json!({
                    "iteration": state.step,
                    "prompt": run.prompts[rollout.prompt_index[i]].text,
                    "response": rollout.texts[i],
                    "score": rollout.scores[i],
                });
                if let Some(kl) = &kl {
                    line["kl"] = kl[i].into();
                }
                lines.push_str(&line.to_string());
                lines.push('\n');
            }
            append(out, "samples.jsonl", &lines)?;
        }
        if train.save_steps > 0 && (state.step.is_multiple_of(train.save_steps as u64) || last) {
            state.extra = serde_json::json!({
                "optimizer_steps": optimizer.updates(),
                "objective": objective.state(),
            });
            let extra: Vec<(String, Tensor)> = match &ema {
                Some(e) => policy_params
                    .iter()
                    .zip(&e.values)
                    .map(|((n, _), t)| (format!("ema.{n}"), t.clone()))
                    .collect(),
                None => vec![],
            };
            save_checkpoint(out, &optimizer, &state, train.save_total_limit, &extra)?;
        }
    }
    pb.finish_and_clear();
    // The saved policy is the EMA of its weights when asked for.
    if let Some(e) = ema {
        for ((_, p), t) in policy_params.iter().zip(e.values) {
            p.set(&t)?;
        }
    }
    if state.step == 0 {
        bail!("no iterations to run");
    }
    Ok(Outcome {
        iterations: state.step,
        skipped_updates: state.skipped_steps,
        last_metrics,
    })
}

/// The rollout rows `part` as a micro-batch, with the policy's log-probs and the value model's
/// estimates computed now (with gradients).
fn micro_batch(
    models: &Models,
    rollout: &Rollout,
    adv: &Advantages,
    part: &[usize],
    minibatch_tokens: usize,
) -> Result<MicroBatch> {
    let seqs: Vec<&[u32]> = part
        .iter()
        .map(|&n| rollout.sequences[n].as_slice())
        .collect();
    let starts: Vec<usize> = part.iter().map(|&n| rollout.prompt_lens[n]).collect();
    let (logp, mask, _) = models
        .policy
        .completion_logprobs(&seqs, &starts, ops::default_path())?;
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
