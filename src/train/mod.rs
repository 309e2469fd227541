//! The training machinery every algorithm shares: options, AdamW, schedules, the step loop with
//! accumulation, clipping and the NaN guard, metrics, and resumable checkpoints.

pub mod config;
pub mod lm_loss;
pub mod metrics;
pub mod optim;
pub mod schedule;
pub mod state;
pub mod trainer;

pub use config::{TrainConfig, TRAIN_KEYS};
pub use trainer::{train, MicroBatchLoss, Task, TrainOutcome};
