//! The training machinery every algorithm shares: options, the one optimizer step (AdamW with
//! accumulation, clipping, schedule and the NaN guard), the step loop of the offline trainers,
//! metrics, resumable checkpoints and stable fingerprints.

pub mod arguments;
pub mod fingerprint;
pub mod interrupt;
pub mod lm_loss;
pub mod metrics;
pub mod optim;
pub mod output_dir;
pub mod schedule;
pub mod state;
pub mod step;
pub mod trainer;

pub use arguments::{OnNonFinite, Schedule, TrainConfig};
pub use step::{Optimizer, StepOutcome};
pub use trainer::{train, MicroBatchLoss, Task, TrainOutcome};
