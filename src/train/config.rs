//! Training options shared by every algorithm, named as TRL / transformers' TrainingArguments name
//! them so that users' configs carry over.

use serde::{Deserialize, Serialize};

use crate::config::KeyDoc;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub output_dir: String,
    pub learning_rate: f64,
    pub lr_scheduler_type: String,
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
    /// "stop" or "skip": what a non-finite loss or gradient does.
    pub on_nonfinite: String,
    /// Threads for tensor work (0: all cores).
    pub threads: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            output_dir: "out".into(),
            learning_rate: 2e-5,
            lr_scheduler_type: "linear".into(),
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
            on_nonfinite: "stop".into(),
            threads: 0,
        }
    }
}

pub const TRAIN_KEYS: &[KeyDoc] = &[
    KeyDoc {
        key: "output_dir",
        default: "\"out\"",
        help: "where the final model, checkpoints/ and metrics go",
    },
    KeyDoc {
        key: "learning_rate",
        default: "2e-5",
        help: "peak learning rate (AdamW)",
    },
    KeyDoc {
        key: "lr_scheduler_type",
        default: "\"linear\"",
        help: "constant | linear | cosine (after warm-up)",
    },
    KeyDoc {
        key: "warmup_steps",
        default: "0",
        help: "linear warm-up steps (wins over warmup_ratio)",
    },
    KeyDoc {
        key: "warmup_ratio",
        default: "0.0",
        help: "warm-up as a fraction of all steps",
    },
    KeyDoc {
        key: "num_train_epochs",
        default: "3.0",
        help: "passes over the training data (fractions allowed)",
    },
    KeyDoc {
        key: "max_steps",
        default: "0",
        help: "optimizer steps; overrides num_train_epochs when > 0",
    },
    KeyDoc {
        key: "per_device_train_batch_size",
        default: "8",
        help: "examples per micro-batch",
    },
    KeyDoc {
        key: "gradient_accumulation_steps",
        default: "1",
        help: "micro-batches per optimizer step",
    },
    KeyDoc {
        key: "per_device_eval_batch_size",
        default: "8",
        help: "examples per evaluation batch",
    },
    KeyDoc {
        key: "weight_decay",
        default: "0.0",
        help: "decoupled weight decay on matrices (not norms/biases)",
    },
    KeyDoc {
        key: "adam_beta1",
        default: "0.9",
        help: "AdamW β1",
    },
    KeyDoc {
        key: "adam_beta2",
        default: "0.999",
        help: "AdamW β2",
    },
    KeyDoc {
        key: "adam_epsilon",
        default: "1e-8",
        help: "AdamW ε",
    },
    KeyDoc {
        key: "max_grad_norm",
        default: "1.0",
        help: "global gradient-norm clip (0: off)",
    },
    KeyDoc {
        key: "seed",
        default: "42",
        help: "seed for data order, splits and sampling",
    },
    KeyDoc {
        key: "logging_steps",
        default: "10",
        help: "log metrics every N optimizer steps",
    },
    KeyDoc {
        key: "eval_steps",
        default: "0",
        help: "evaluate every N steps (0: only at the end)",
    },
    KeyDoc {
        key: "save_steps",
        default: "500",
        help: "write a resumable checkpoint every N steps (0: never)",
    },
    KeyDoc {
        key: "save_total_limit",
        default: "2",
        help: "keep only the newest N checkpoints",
    },
    KeyDoc {
        key: "on_nonfinite",
        default: "\"stop\"",
        help: "NaN/Inf loss or gradient: \"stop\" the run or \"skip\" the step",
    },
    KeyDoc {
        key: "threads",
        default: "0",
        help: "CPU threads for tensor work (0: all cores)",
    },
];

impl TrainConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        if !["constant", "linear", "cosine"].contains(&self.lr_scheduler_type.as_str()) {
            bail!(
                "lr_scheduler_type must be constant, linear or cosine, got {:?}",
                self.lr_scheduler_type
            );
        }
        if !["stop", "skip"].contains(&self.on_nonfinite.as_str()) {
            bail!(
                "on_nonfinite must be \"stop\" or \"skip\", got {:?}",
                self.on_nonfinite
            );
        }
        if self.per_device_train_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            bail!("per_device_train_batch_size and gradient_accumulation_steps must be at least 1");
        }
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            bail!("learning_rate must be a finite non-negative number");
        }
        if self.max_steps == 0 && self.num_train_epochs <= 0.0 {
            bail!("set num_train_epochs > 0 or max_steps > 0");
        }
        Ok(())
    }
}
