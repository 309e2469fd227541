//! The one optimizer step every trainer takes (SFT, RM and DPO through `trainer::train`, the
//! online-RL loop, the benchmark):
//!
//!   accumulate the micro-batches' gradients → non-finite guard → global-norm clip →
//!   learning rate from the schedule → AdamW in place → poisoned-weights guard → metrics.

use anyhow::{anyhow, Result};
use candle_core::{DType, Tensor, Var};

use super::arguments::{OnNonFinite, TrainConfig};
use super::optim::{AdamW, AdamWConfig, GradBuffers};
use super::schedule::{lr_at, Schedule};

/// What one call of [`Optimizer::step`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum StepOutcome {
    Updated {
        grad_norm: f64,
        learning_rate: f64,
    },
    /// A non-finite loss or gradient under `on_nonfinite = "skip"`: no update.
    Skipped {
        reason: String,
    },
}

/// AdamW over a fixed list of parameters, with the run's clipping, schedule and guards.
pub struct Optimizer {
    params: Vec<(String, Var)>,
    grads: GradBuffers,
    adamw: AdamW,
    schedule: Schedule,
    peak_lr: f64,
    warmup: usize,
    total_steps: usize,
    max_grad_norm: f64,
    on_nonfinite: OnNonFinite,
    /// The first non-finite loss of the step being accumulated.
    nonfinite_loss: Option<f32>,
    /// Seconds the last step spent summing gradients across ranks.
    all_reduce_secs: f64,
}

impl Optimizer {
    /// `total_steps`: how many steps the schedule spans (warm-up included).
    pub fn new(cfg: &TrainConfig, params: Vec<(String, Var)>, total_steps: u64) -> Self {
        let warmup = if cfg.warmup_steps > 0 {
            cfg.warmup_steps
        } else {
            (cfg.warmup_ratio * total_steps as f64).ceil() as usize
        };
        let adamw = AdamW::new(
            &params,
            AdamWConfig {
                beta1: cfg.adam_beta1,
                beta2: cfg.adam_beta2,
                eps: cfg.adam_epsilon,
                weight_decay: cfg.weight_decay,
            },
        );
        Optimizer {
            grads: GradBuffers::new(&params),
            params,
            adamw,
            schedule: cfg.lr_scheduler_type,
            peak_lr: cfg.learning_rate,
            warmup,
            total_steps: total_steps as usize,
            max_grad_norm: cfg.max_grad_norm,
            on_nonfinite: cfg.on_nonfinite,
            nonfinite_loss: None,
            all_reduce_secs: 0.0,
        }
    }

    /// Seconds the last step spent summing the gradients across ranks (0 with one rank).
    pub fn all_reduce_secs(&self) -> f64 {
        self.all_reduce_secs
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The AdamW state (moments and update count), for checkpoints.
    pub fn adamw(&self) -> &AdamW {
        &self.adamw
    }

    pub fn adamw_mut(&mut self) -> &mut AdamW {
        &mut self.adamw
    }

    /// Rank 0's weights, moments and update count on every rank.
    pub fn broadcast_from_main(&mut self) -> Result<()> {
        let world = crate::dist::world();
        for (_, var) in &self.params {
            var.set(&world.broadcast_tensor(var.as_tensor())?)?;
        }
        for moments in self.adamw.moments_mut() {
            world.broadcast_f32(moments);
        }
        let step = world.broadcast_bytes(self.adamw.step.to_le_bytes().to_vec());
        self.adamw.step = u64::from_le_bytes(step.try_into().map_err(|_| anyhow!("update count"))?);
        Ok(())
    }

    /// Updates applied so far.
    pub fn updates(&self) -> u64 {
        self.adamw.step
    }

    /// The learning rate of step `position` (0-based).
    pub fn learning_rate(&self, position: u64) -> f64 {
        lr_at(
            self.schedule,
            self.peak_lr,
            self.warmup,
            self.total_steps,
            position as usize,
        )
    }

    /// Starts an optimizer step to which this rank will add `micro_batches` micro-batches (the
    /// shape of the pairwise sum; see `GradBuffers`).
    pub fn start_step(&mut self, micro_batches: usize) {
        self.grads.start(micro_batches);
    }

    /// Adds one micro-batch's gradients to the step's sums and returns the loss value. A
    /// non-finite loss is not backpropagated: it marks the step, which `step` then stops or
    /// skips (further micro-batches of the step are wasted work; see `step_is_lost`).
    pub fn accumulate(&mut self, loss: &Tensor) -> Result<f64> {
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if !value.is_finite() {
            self.nonfinite_loss.get_or_insert(value);
            return Ok(value as f64);
        }
        if self.nonfinite_loss.is_none() {
            self.grads
                .add(&self.params, &crate::model::checkpoint::backward(loss)?)?;
        }
        Ok(value as f64)
    }

    /// Whether a non-finite loss already decided that this step will not update.
    pub fn step_is_lost(&self) -> bool {
        self.nonfinite_loss.is_some()
    }

    /// Ends the step at schedule position `position`: the ranks' sums added (all-reduce), clip,
    /// AdamW, guards — identically on every rank. Errors (one line, for the caller to prefix with
    /// the step) when a non-finite value stops the run or the update poisons the weights.
    pub fn step(&mut self, position: u64) -> Result<StepOutcome> {
        let world = crate::dist::world();
        let lost_elsewhere =
            world.any(self.nonfinite_loss.is_some()) && self.nonfinite_loss.is_none();
        self.grads.finish();
        let t = std::time::Instant::now();
        if !lost_elsewhere && self.nonfinite_loss.is_none() {
            for b in &mut self.grads.bufs {
                world.sum_exact(b);
            }
        }
        self.all_reduce_secs = t.elapsed().as_secs_f64();
        let grad_norm = self.grads.global_norm();
        let nonfinite = match self.nonfinite_loss.take() {
            Some(loss) => Some(format!("non-finite loss ({loss})")),
            None if lost_elsewhere => Some("non-finite loss on another rank".to_string()),
            None if !grad_norm.is_finite() => {
                Some(format!("non-finite gradient norm ({grad_norm})"))
            }
            None => None,
        };
        if let Some(what) = nonfinite {
            self.grads.discard();
            return match self.on_nonfinite {
                OnNonFinite::Stop => Err(anyhow!(
                    "{what}; stopped without updating or writing a checkpoint (set on_nonfinite = \"skip\" to skip such steps)"
                )),
                OnNonFinite::Skip => Ok(StepOutcome::Skipped { reason: what }),
            };
        }
        let scale = if self.max_grad_norm > 0.0 && grad_norm > self.max_grad_norm {
            self.max_grad_norm / grad_norm
        } else {
            1.0
        };
        let lr = self.learning_rate(position);
        let poisoned = self.adamw.update(&self.params, &self.grads, lr, scale)?;
        self.grads.discard();
        if let Some(name) = poisoned.first() {
            return Err(anyhow!(
                "the update made {name} non-finite (learning rate {lr:.3e} too high?); stopped without writing a checkpoint"
            ));
        }
        Ok(StepOutcome::Updated {
            grad_norm,
            learning_rate: lr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn one_param(values: &[f32]) -> Vec<(String, Var)> {
        vec![(
            "w".into(),
            Var::from_vec(values.to_vec(), values.len(), &Device::Cpu).unwrap(),
        )]
    }

    #[test]
    fn a_step_clips_to_max_grad_norm_before_adamw() {
        // loss = 3·(w0 + w1): gradient (3, 3), norm √18 > 1, so clipped to (1/√2, 1/√2). AdamW's
        // first step moves every coordinate by lr·ĝ/(|ĝ| + ε) ≈ lr whatever the scale; the
        // recorded norm is the unclipped one.
        let params = one_param(&[1.0, -1.0]);
        let cfg = TrainConfig {
            learning_rate: 0.1,
            lr_scheduler_type: Schedule::Constant,
            ..Default::default()
        };
        let mut opt = Optimizer::new(&cfg, params.clone(), 1);
        let w = params[0].1.as_tensor();
        let loss = (w.sum_all().unwrap() * 3.0).unwrap();
        opt.start_step(1);
        assert_eq!(opt.accumulate(&loss).unwrap(), 0.0);
        let out = opt.step(0).unwrap();
        let StepOutcome::Updated {
            grad_norm,
            learning_rate,
        } = out
        else {
            panic!("{out:?}")
        };
        assert!((grad_norm - 18f64.sqrt()).abs() < 1e-6);
        assert_eq!(learning_rate, 0.1);
        let after: Vec<f32> = w.to_vec1().unwrap();
        assert!(
            (after[0] - 0.9).abs() < 1e-6 && (after[1] + 1.1).abs() < 1e-6,
            "{after:?}"
        );
    }

    #[test]
    fn nonfinite_losses_stop_or_skip_and_leave_the_weights() {
        for policy in [OnNonFinite::Stop, OnNonFinite::Skip] {
            let params = one_param(&[1.0, 2.0]);
            let cfg = TrainConfig {
                on_nonfinite: policy,
                ..Default::default()
            };
            let mut opt = Optimizer::new(&cfg, params.clone(), 1);
            let w = params[0].1.as_tensor();
            let bad = (w.sum_all().unwrap() * f64::NAN).unwrap();
            opt.start_step(2);
            opt.accumulate(&w.sum_all().unwrap()).unwrap();
            assert!(opt.accumulate(&bad).unwrap().is_nan());
            assert!(opt.step_is_lost());
            match (policy, opt.step(0)) {
                (OnNonFinite::Stop, Err(e)) => assert!(e.to_string().contains("non-finite loss")),
                (OnNonFinite::Skip, Ok(StepOutcome::Skipped { reason })) => {
                    assert!(reason.contains("non-finite loss"))
                }
                (p, other) => panic!("{p:?}: {other:?}"),
            }
            assert_eq!(w.to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
            assert_eq!(opt.updates(), 0);
            // The next step starts clean.
            opt.start_step(1);
            opt.accumulate(&w.sum_all().unwrap()).unwrap();
            assert!(matches!(opt.step(1), Ok(StepOutcome::Updated { .. })));
        }
    }
}
