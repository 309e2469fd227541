//! Training options shared by every algorithm, named as TRL / transformers' TrainingArguments name
//! them so that users' configs carry over.

use serde::{Deserialize, Serialize};

pub use super::schedule::Schedule;
use crate::settings::{KeyDoc, Section};

/// What a step with a non-finite loss or gradient does.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// Stop the run, naming the step (no update, no checkpoint).
    Stop,
    /// Skip the update and go on (counted and reported).
    Skip,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub output_dir: String,
    pub learning_rate: f64,
    pub lr_scheduler_type: Schedule,
    pub warmup_steps: usize,
    pub warmup_ratio: f64,
    pub num_train_epochs: f64,
    /// Overrides num_train_epochs when > 0.
    pub max_steps: usize,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub per_device_eval_batch_size: usize,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub logging_steps: usize,
    pub eval_steps: usize,
    pub save_steps: usize,
    pub save_total_limit: usize,
    /// What a non-finite loss or gradient does.
    pub on_nonfinite: OnNonFinite,
    /// Threads for tensor work (0: all cores).
    pub threads: usize,
    /// bf16 mixed precision: matmul operands in bf16, f32 accumulation (where it pays here).
    pub bf16: bool,
    /// Recompute each block's activations in the backward pass instead of keeping them.
    pub gradient_checkpointing: bool,
    /// How the matrices of models that do not train are stored.
    pub frozen_dtype: crate::model::FrozenDtype,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            output_dir: "out".into(),
            learning_rate: 2e-5,
            lr_scheduler_type: Schedule::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            num_train_epochs: 3.0,
            max_steps: 0,
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            per_device_eval_batch_size: 8,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            logging_steps: 10,
            eval_steps: 0,
            save_steps: 500,
            save_total_limit: 2,
            on_nonfinite: OnNonFinite::Stop,
            threads: 0,
            bf16: false,
            gradient_checkpointing: false,
            frozen_dtype: crate::model::FrozenDtype::Auto,
        }
    }
}

impl Section for TrainConfig {
    const TITLE: &'static str = "training";
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::new(
            "output_dir",
            "where the final model, checkpoints/ and metrics go",
        )
        .path(),
        KeyDoc::new("learning_rate", "peak learning rate (AdamW)"),
        KeyDoc::new(
            "lr_scheduler_type",
            "constant | linear | cosine (after warm-up)",
        ),
        KeyDoc::new(
            "warmup_steps",
            "linear warm-up steps (wins over warmup_ratio)",
        ),
        KeyDoc::new("warmup_ratio", "warm-up as a fraction of all steps"),
        KeyDoc::new(
            "num_train_epochs",
            "passes over the training data (fractions allowed)",
        ),
        KeyDoc::new(
            "max_steps",
            "optimizer steps; overrides num_train_epochs when > 0",
        ),
        KeyDoc::new("per_device_train_batch_size", "examples per micro-batch"),
        KeyDoc::new(
            "gradient_accumulation_steps",
            "micro-batches per optimizer step",
        ),
        KeyDoc::new(
            "per_device_eval_batch_size",
            "examples per evaluation batch",
        ),
        KeyDoc::new(
            "weight_decay",
            "decoupled weight decay on matrices (not norms/biases)",
        ),
        KeyDoc::new("adam_beta1", "AdamW β1"),
        KeyDoc::new("adam_beta2", "AdamW β2"),
        KeyDoc::new("adam_epsilon", "AdamW ε"),
        KeyDoc::new("max_grad_norm", "global gradient-norm clip (0: off)"),
        KeyDoc::new("seed", "seed for data order, splits and sampling"),
        KeyDoc::new(
            "logging_steps",
            "log metrics every N optimizer steps (means over the N)",
        ),
        KeyDoc::new("eval_steps", "evaluate every N steps (0: only at the end)"),
        KeyDoc::new(
            "save_steps",
            "write a resumable checkpoint every N steps (0: never)",
        ),
        KeyDoc::new("save_total_limit", "keep only the newest N checkpoints"),
        KeyDoc::new(
            "on_nonfinite",
            "NaN/Inf loss or gradient: \"stop\" the run or \"skip\" the step",
        ),
        KeyDoc::new("threads", "CPU threads for tensor work (0: all cores)"),
        KeyDoc::new(
            "bf16",
            "bf16 mixed precision: matmul operands in bf16 with f32 accumulation; weights, AdamW moments, norms, softmax, log-probs and the loss stay f32. Used where this CPU's bf16 dot product beats its f32 FMA (measured at start); elsewhere the run stays f32 and says so",
        ),
        KeyDoc::new(
            "gradient_checkpointing",
            "keep only each transformer block's input and recompute its activations in the backward pass: the same gradients, less memory, ~1/3 more compute",
        ),
        KeyDoc::new(
            "frozen_dtype",
            "storage of the weight matrices that do not train (a LoRA base, reference and reward models): \"auto\" keeps bf16 where the checkpoint stores bf16 (lossless) and f32 otherwise; \"bf16\" always (half the memory; rounds an f32 checkpoint's); \"f32\" always. Products run in f32 either way",
        ),
    ];
}

impl TrainConfig {
    /// The settings a resumed run must keep (output path, logging and saving cadence and the
    /// thread count may change), for its fingerprint.
    /// Micro-batches per optimizer step over all ranks: gradient_accumulation_steps on each of
    /// the run's ranks (TRL's and accelerate's meaning; one rank outside `mpirun`).
    pub fn global_accumulation(&self) -> usize {
        self.gradient_accumulation_steps * crate::dist::world().size()
    }

    /// This run's ranks and per-rank accumulation.
    pub fn layout(&self) -> super::state::Layout {
        super::state::Layout {
            ranks: crate::dist::world().size(),
            gradient_accumulation_steps: self.gradient_accumulation_steps,
        }
    }

    /// Examples per optimizer step over all ranks.
    pub fn global_batch(&self) -> usize {
        self.per_device_train_batch_size * self.global_accumulation()
    }

    /// The settings a resumed run must share with the one it resumes. The accumulation is the
    /// global one, so N ranks × k resume what 1 process × N·k wrote (the same global batch).
    pub fn resume_relevant(&self) -> serde_json::Value {
        let kept = TrainConfig {
            gradient_accumulation_steps: self.global_accumulation(),
            output_dir: String::new(),
            logging_steps: 0,
            eval_steps: 0,
            save_steps: 0,
            save_total_limit: 0,
            threads: 0,
            gradient_checkpointing: false,
            ..self.clone()
        };
        serde_json::to_value(kept).unwrap_or_default()
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        if self.per_device_train_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            bail!("per_device_train_batch_size and gradient_accumulation_steps must be at least 1");
        }
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            bail!("learning_rate must be a finite non-negative number");
        }
        if self
            .per_device_train_batch_size
            .checked_mul(self.gradient_accumulation_steps)
            .is_none_or(|n| n > 1 << 32)
        {
            bail!("per_device_train_batch_size × gradient_accumulation_steps is too large");
        }
        if !self.num_train_epochs.is_finite() {
            bail!("num_train_epochs must be a finite number");
        }
        if self.max_steps == 0 && self.num_train_epochs <= 0.0 {
            bail!("set num_train_epochs > 0 or max_steps > 0");
        }
        Ok(())
    }
}
