//! Learning-rate schedules with linear warm-up, as transformers defines them.

use serde::{Deserialize, Serialize};

/// `lr_scheduler_type`: the shape of the learning rate after warm-up.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

/// Learning rate at optimizer step `step` (0-based) of `total`.
pub fn lr_at(kind: Schedule, peak: f64, warmup: usize, total: usize, step: usize) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / decay_steps).min(1.0);
    match kind {
        Schedule::Linear => peak * (1.0 - progress),
        Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        Schedule::Constant => peak,
    }
}

#[cfg(test)]
mod tests {
    use super::{lr_at, Schedule};

    #[test]
    fn warmup_then_decay() {
        use Schedule::*;
        assert!((lr_at(Linear, 1.0, 4, 14, 0) - 0.25).abs() < 1e-12);
        assert!((lr_at(Linear, 1.0, 4, 14, 3) - 1.0).abs() < 1e-12);
        assert!((lr_at(Linear, 1.0, 4, 14, 9) - 0.5).abs() < 1e-12);
        assert!((lr_at(Cosine, 1.0, 0, 10, 5) - 0.5).abs() < 1e-12);
        assert!((lr_at(Cosine, 1.0, 0, 10, 0) - 1.0).abs() < 1e-12);
        assert_eq!(lr_at(Constant, 3e-4, 0, 10, 7), 3e-4);
    }
}
