//! The optimizer-step loop shared by every algorithm. An algorithm supplies a `Task` (its data and
//! loss); the loop owns data order, gradient accumulation, clipping, the learning-rate schedule,
//! the NaN guard, logging, evaluation and checkpoints.

use anyhow::{anyhow, bail, Result};
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::time::Instant;

use super::arguments::TrainConfig;
use super::interrupt;
use super::metrics::{add_into, format_line, MetricsLogger, Window};
use super::state::{list_checkpoints, load_checkpoint, save_checkpoint, Layout, TrainerState};
use super::step::{Optimizer, StepOutcome};
use crate::model::CausalLm;

/// What one micro-batch contributes to an optimizer step.
pub struct MicroBatchLoss {
    /// Scalar loss, already scaled so that the sum over the step's micro-batches is the step loss.
    pub loss: Tensor,
    /// Metrics scaled the same way (they are summed over micro-batches).
    pub metrics: Vec<(String, f64)>,
    /// Tokens processed (for throughput).
    pub tokens: usize,
}

pub trait Task {
    fn num_examples(&self) -> usize;
    /// Loss of the micro-batch `batch` (example indices), part of an optimizer step over `step_examples`.
    fn micro_batch(
        &mut self,
        model: &CausalLm,
        batch: &[usize],
        step_examples: &[usize],
    ) -> Result<MicroBatchLoss>;
    /// Held-out metrics, named `eval/...`; empty when there is no evaluation data.
    fn evaluate(&mut self, model: &CausalLm) -> Result<Vec<(String, f64)>>;
    /// Trainable parameters outside the model body (e.g. a reward model's scalar head).
    fn extra_parameters(&self) -> Vec<(String, candle_core::Var)> {
        vec![]
    }
}

pub struct TrainOutcome {
    pub steps: u64,
    pub skipped_steps: u64,
    pub last_train_metrics: Vec<(String, f64)>,
    pub eval_metrics: Vec<(String, f64)>,
    pub tokens_per_second: f64,
}

/// Example order: a fresh seeded permutation per epoch, concatenated. Step s takes the next
/// `per_step` indices, so the order depends only on (seed, step) — which is what makes resuming exact.
pub fn step_examples(n: usize, per_step: usize, seed: u64, step: u64) -> Vec<usize> {
    let start = step as usize * per_step;
    let mut out = Vec::with_capacity(per_step);
    let mut epoch = start / n;
    let mut offset = start % n;
    while out.len() < per_step {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(epoch as u64);
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(&mut rng);
        let take = (per_step - out.len()).min(n - offset);
        out.extend_from_slice(&perm[offset..offset + take]);
        epoch += 1;
        offset = 0;
    }
    out
}

pub fn total_steps(cfg: &TrainConfig, n: usize) -> u64 {
    if cfg.max_steps > 0 {
        return cfg.max_steps as u64;
    }
    let per_step = cfg.global_batch();
    ((cfg.num_train_epochs * n as f64) / per_step as f64)
        .ceil()
        .max(1.0) as u64
}

/// Where a run starts: step 0, or, when resuming, the newest checkpoint in `out` (weights and
/// optimizer moments restored in place; refused if it was made with other settings). Returns the
/// state and the checkpoint it came from. With several ranks, every rank must have the same
/// fingerprint; rank 0 alone reads the checkpoint, and its weights, moments and state then go to
/// the others (so every rank starts from the same bits, as DDP does, and the other machines need
/// no copy of the checkpoints).
pub fn start_state(
    out: &Path,
    optimizer: &mut Optimizer,
    fingerprint: &str,
    resume: bool,
    layout: Layout,
) -> Result<(TrainerState, Option<std::path::PathBuf>)> {
    let world = crate::dist::world();
    world.agree("run fingerprint (settings and data)", fingerprint)?;
    let (mut state, from) = if world.is_main() {
        main_start_state(out, optimizer, fingerprint, resume, layout)?
    } else {
        (TrainerState::fresh(fingerprint), None)
    };
    state.layout = Some(layout);
    if world.size() > 1 {
        optimizer.broadcast_from_main()?;
        let text = world.broadcast_bytes(serde_json::to_vec(&state)?);
        state = serde_json::from_slice(&text)?;
    }
    Ok((state, from))
}

fn main_start_state(
    out: &Path,
    optimizer: &mut Optimizer,
    fingerprint: &str,
    resume: bool,
    layout: Layout,
) -> Result<(TrainerState, Option<std::path::PathBuf>)> {
    let fresh = TrainerState::fresh(fingerprint);
    let checkpoints = if resume {
        list_checkpoints(out)
    } else {
        vec![]
    };
    if checkpoints.is_empty() {
        return Ok((fresh, None));
    }
    // The newest checkpoint that loads: a damaged one (a disk that lost the last writes) is
    // passed over, saying so, for the one before it.
    let mut found = None;
    for (_, ck) in checkpoints.iter().rev() {
        match load_checkpoint(ck, optimizer) {
            Ok(state) => {
                found = Some((state, ck.clone()));
                break;
            }
            Err(e) => eprintln!(
                "note: cannot resume from {} ({}); trying the checkpoint before it",
                ck.display(),
                crate::io::one_line_error(&e)
            ),
        }
    }
    let Some((loaded, ck)) = found else {
        bail!(
            "{}: none of the {} checkpoints could be read (see the notes above); start again with --overwrite",
            out.display(),
            checkpoints.len()
        );
    };
    if !crate::train::fingerprint::is_current(&loaded.fingerprint) {
        bail!(
            "{}: checkpoint was written by an older rlhf (fingerprint format before {}); resume it with that version, or start again with --overwrite",
            ck.display(),
            crate::train::fingerprint::FORMAT
        );
    }
    if let Some(was) = loaded.layout.filter(|l| {
        loaded.fingerprint != fingerprint && l.global_accumulation() != layout.global_accumulation()
    }) {
        bail!(
            "{}: checkpoint was written by {} rank(s) × gradient_accumulation_steps {} (a global batch of {} micro-batches); this run has {} × {}: resume with the same product, e.g. mpirun -np {} and gradient_accumulation_steps = {}",
            ck.display(),
            was.ranks,
            was.gradient_accumulation_steps,
            was.global_accumulation(),
            layout.ranks,
            layout.gradient_accumulation_steps,
            was.ranks,
            was.gradient_accumulation_steps
        );
    }
    if loaded.fingerprint != fingerprint {
        bail!(
            "{}: checkpoint was made with different settings (data, model or batch/schedule); resume needs the same configuration",
            ck.display()
        );
    }
    eprintln!("resuming from {} (step {})", ck.display(), loaded.step);
    Ok((loaded, Some(ck)))
}

/// A seed for the random draws of one micro-batch (LoRA dropout) from its place in the run.
pub fn mix_seed(seed: u64, step: u64, micro: u64) -> u64 {
    let mut z =
        seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ micro.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 29)
}

/// The progress bar of a run of `total` `unit`s, starting at `position`.
pub fn progress_bar(total: u64, unit: &str, position: u64) -> ProgressBar {
    if !crate::dist::world().is_main() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}} {unit} {{msg}} [{{elapsed_precise}}<{{eta_precise}}]"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_position(position);
    pb
}

/// Runs the optimizer steps (resuming from the latest checkpoint when asked).
pub fn train(
    cfg: &TrainConfig,
    model: &CausalLm,
    task: &mut dyn Task,
    resume: bool,
    fingerprint: &str,
) -> Result<TrainOutcome> {
    if model.parameters().is_empty() {
        bail!("the model was loaded without trainable parameters");
    }
    model.set_gradient_checkpointing(cfg.gradient_checkpointing);
    let mut params = model.parameters().to_vec();
    params.extend(task.extra_parameters());
    let out = Path::new(&cfg.output_dir);
    let n = task.num_examples();
    if n == 0 {
        bail!("no training examples");
    }
    let world = crate::dist::world();
    let per_step = cfg.global_batch();
    let total = total_steps(cfg, n);
    let mut optimizer = Optimizer::new(cfg, params, total);
    let (mut state, _) = start_state(out, &mut optimizer, fingerprint, resume, cfg.layout())?;
    let mut logger = main_logger(out, (resume && state.step > 0).then_some(state.step))?;
    let pb = progress_bar(total, "steps", state.step);
    let main = world.is_main();

    let mut window = Window::default();
    let (mut all_tokens, run_start) = (0usize, Instant::now());
    let mut last_train = Vec::new();
    let mut eval_metrics = Vec::new();

    if state.step == 0 && main {
        // The starting point, so that curves show where training began.
        let ev = task.evaluate(model)?;
        if !ev.is_empty() {
            log(&mut logger, 0, &ev)?;
            pb.suspend(|| eprintln!("step 0/{total} {}", format_line(&ev)));
        }
    }
    let mut saved_at = None;
    while state.step < total {
        if let Some(signal) = interrupt::pending_anywhere() {
            pb.abandon();
            let save = || save_checkpoint(out, &optimizer, &state, cfg.save_total_limit, &[]);
            return Err(
                interrupt::Interrupted::after(signal, state.step, saved_at, out, save)?.into(),
            );
        }
        let step = state.step;
        // 1. Gradients of this rank's share of the step's micro-batches.
        let examples = step_examples(n, per_step, cfg.seed, step);
        let micro_batches: Vec<&[usize]> =
            examples.chunks(cfg.per_device_train_batch_size).collect();
        let mine = world.share(micro_batches.len());
        optimizer.start_step(mine.len());
        let mut step_metrics: Vec<(String, f64)> = Vec::new();
        let mut step_tokens = 0;
        for k in mine {
            let dropout_seed = mix_seed(cfg.seed, step, k as u64);
            let micro = micro_batches[k];
            let mb = model
                .with_adapter_dropout(dropout_seed, || task.micro_batch(model, micro, &examples))?;
            optimizer.accumulate(&mb.loss)?;
            if optimizer.step_is_lost() {
                break;
            }
            add_into(&mut step_metrics, &mb.metrics);
            step_tokens += mb.tokens;
        }
        // 2. The update.
        match optimizer
            .step(step)
            .map_err(|e| anyhow!("step {}: {e}", step + 1))
        {
            Ok(StepOutcome::Updated { grad_norm, .. }) => {
                step_tokens = sum_over_ranks(&mut step_metrics, step_tokens)?;
                window.add_tokens(step_tokens);
                all_tokens += step_tokens;
                add_into(&mut step_metrics, &[("grad_norm".to_string(), grad_norm)]);
                if world.size() > 1 {
                    let secs = optimizer.all_reduce_secs();
                    add_into(&mut step_metrics, &[("time/all_reduce".to_string(), secs)]);
                }
                window.add_step(&step_metrics);
            }
            Ok(StepOutcome::Skipped { reason }) => {
                if main {
                    pb.suspend(|| eprintln!("step {}: {reason}; step skipped", step + 1));
                }
                state.skipped_steps += 1;
            }
            Err(e) => {
                pb.abandon();
                return Err(e);
            }
        }
        state.step += 1;
        pb.set_position(state.step);

        // 3. Metrics, evaluation, checkpoint.
        let last = state.step == total;
        if cfg.logging_steps > 0 && state.step.is_multiple_of(cfg.logging_steps as u64) || last {
            let epoch = (state.step as f64 * per_step as f64) / n as f64;
            let lr = optimizer.learning_rate(step);
            if let Some(values) = log_window(&mut window, &mut logger, state.step, lr, epoch)? {
                let loss = values
                    .iter()
                    .find(|(k, _)| k == "loss")
                    .map_or(f64::NAN, |(_, v)| *v);
                let tps = values.last().map_or(0.0, |(_, v)| *v);
                pb.set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
                if pb.is_hidden() && main {
                    eprintln!("step {}/{total} {}", state.step, format_line(&values));
                }
                last_train = values;
            }
        }
        if main
            && ((cfg.eval_steps > 0 && state.step.is_multiple_of(cfg.eval_steps as u64)) || last)
        {
            let ev = task.evaluate(model)?;
            if !ev.is_empty() {
                log(&mut logger, state.step, &ev)?;
                pb.suspend(|| eprintln!("step {}/{total} {}", state.step, format_line(&ev)));
                eval_metrics = ev;
            }
        }
        if main && cfg.save_steps > 0 && (state.step.is_multiple_of(cfg.save_steps as u64) || last)
        {
            save_checkpoint(out, &optimizer, &state, cfg.save_total_limit, &[])?;
            saved_at = Some(state.step);
        }
    }
    pb.finish_and_clear();
    Ok(TrainOutcome {
        steps: state.step,
        skipped_steps: state.skipped_steps,
        last_train_metrics: last_train,
        eval_metrics,
        tokens_per_second: all_tokens as f64 / run_start.elapsed().as_secs_f64().max(1e-9),
    })
}

/// The metrics of a step summed over ranks (the same names in the same order on every rank, as
/// every rank ran the same micro-batch code), and its tokens; returns the tokens.
pub fn sum_over_ranks(metrics: &mut [(String, f64)], tokens: usize) -> Result<usize> {
    let world = crate::dist::world();
    if world.size() == 1 {
        return Ok(tokens);
    }
    // Sums of vectors of different lengths would not be sums: check first.
    let mut count = [metrics.len() as f64];
    world.sum_f64(&mut count);
    if count[0] != (metrics.len() * world.size()) as f64 {
        bail!("the ranks logged different metrics for a step (a rank without micro-batches?)");
    }
    let mut values: Vec<f64> = metrics.iter().map(|(_, v)| *v).collect();
    values.push(tokens as f64);
    world.sum_f64(&mut values);
    for ((_, m), v) in metrics.iter_mut().zip(&values) {
        *m = *v;
    }
    Ok(values[values.len() - 1] as usize)
}

/// The metrics files, written by rank 0 alone (None on the other ranks).
pub fn main_logger(out: &Path, resumed_at: Option<u64>) -> Result<Option<MetricsLogger>> {
    if !crate::dist::world().is_main() {
        return Ok(None);
    }
    MetricsLogger::create(out, resumed_at).map(Some)
}

/// Logs the window's means (with the learning rate, epoch and throughput) and starts a new one;
/// nothing when no step of the window updated.
fn log_window(
    window: &mut Window,
    logger: &mut Option<MetricsLogger>,
    step: u64,
    lr: f64,
    epoch: f64,
) -> Result<Option<Vec<(String, f64)>>> {
    let had_updates = window.steps() > 0;
    let (mut values, tokens_per_second) = window.close();
    if !had_updates {
        return Ok(None);
    }
    values.push(("learning_rate".into(), lr));
    values.push(("epoch".into(), epoch));
    values.push(("tokens_per_second".into(), tokens_per_second));
    log(logger, step, &values)?;
    Ok(Some(values))
}

/// One metrics line (JSONL + TensorBoard), on rank 0.
pub fn log(logger: &mut Option<MetricsLogger>, step: u64, values: &[(String, f64)]) -> Result<()> {
    let Some(logger) = logger else {
        return Ok(());
    };
    let refs: Vec<(&str, f64)> = values.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    logger.log(step, &refs)
}

#[cfg(test)]
mod tests {
    use super::step_examples;

    #[test]
    fn data_order_is_a_permutation_per_epoch_and_depends_only_on_seed_and_step() {
        let n = 10;
        let mut seen = Vec::new();
        for s in 0..5 {
            seen.extend(step_examples(n, 2, 7, s));
        }
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        // Steps spanning an epoch boundary continue into the next permutation.
        let a = step_examples(n, 4, 7, 2);
        assert_eq!(a[..2], seen[8..10]);
        assert_eq!(step_examples(n, 3, 7, 5), step_examples(n, 3, 7, 5));
        assert_ne!(step_examples(n, 10, 7, 0), step_examples(n, 10, 8, 0));
    }
}
