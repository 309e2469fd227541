//! The NaN/Inf guard of the shared training loop: stop (naming the step, no checkpoint of the bad
//! step) or skip, as configured.

use crate::common::*;
use rlhf::algos::sft::SftTask;
use rlhf::checkpoint::Checkpoint;
use rlhf::data::sft::Example;
use rlhf::model::CausalLm;
use rlhf::train::{train, MicroBatchLoss, OnNonFinite, Task, TrainConfig};

/// SFT, except that the loss of optimizer step `bad_step` (1-based) is NaN.
struct Poisoned {
    inner: SftTask,
    calls: usize,
    micro_per_step: usize,
    bad_step: usize,
}

impl Task for Poisoned {
    fn num_examples(&self) -> usize {
        self.inner.num_examples()
    }
    fn micro_batch(
        &mut self,
        model: &CausalLm,
        batch: &[usize],
        step: &[usize],
    ) -> anyhow::Result<MicroBatchLoss> {
        self.calls += 1;
        let mut mb = self.inner.micro_batch(model, batch, step)?;
        if (self.calls - 1) / self.micro_per_step + 1 == self.bad_step {
            mb.loss = (mb.loss * f64::NAN)?;
        }
        Ok(mb)
    }
    fn evaluate(&mut self, model: &CausalLm) -> anyhow::Result<Vec<(String, f64)>> {
        self.inner.evaluate(model)
    }
}

fn task() -> Poisoned {
    let ex = |ids: Vec<u32>| Example {
        targets: (0..ids.len()).map(|i| u8::from(i > 0)).collect(),
        segments: vec![1; ids.len()],
        ids,
    };
    let train = (0..8)
        .map(|i| ex(vec![3 + i, 40 + i, 80 + i, 120 + i, 160 + i]))
        .collect();
    Poisoned {
        inner: SftTask {
            train,
            eval: vec![],
            eval_batch_size: 4,
        },
        calls: 0,
        micro_per_step: 1,
        bad_step: 3,
    }
}

fn cfg(dir: &std::path::Path, policy: OnNonFinite) -> TrainConfig {
    TrainConfig {
        output_dir: dir.to_string_lossy().to_string(),
        learning_rate: 1e-3,
        max_steps: 5,
        per_device_train_batch_size: 2,
        save_steps: 1,
        save_total_limit: 10,
        logging_steps: 1,
        on_nonfinite: policy,
        ..Default::default()
    }
}

#[test]
fn nonfinite_loss_stops_the_run_naming_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = Checkpoint::load(&model_path("llama-tied"), true).unwrap();
    let err = train(
        &cfg(tmp.path(), OnNonFinite::Stop),
        &ck.model,
        &mut task(),
        false,
        "fp",
    )
    .err()
    .expect("must stop");
    let msg = err.to_string();
    assert!(
        msg.contains("step 3") && msg.contains("non-finite loss"),
        "{msg}"
    );
    let steps: Vec<u64> = rlhf::train::state::list_checkpoints(tmp.path())
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, vec![1, 2], "only the good steps were checkpointed");
    // The weights in memory are those of step 2, all finite.
    for (name, v) in ck.model.parameters() {
        let x: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
        assert!(x.iter().all(|x| x.is_finite()), "{name}");
    }
}

#[test]
fn nonfinite_loss_can_skip_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = Checkpoint::load(&model_path("llama-tied"), true).unwrap();
    let outcome = train(
        &cfg(tmp.path(), OnNonFinite::Skip),
        &ck.model,
        &mut task(),
        false,
        "fp",
    )
    .unwrap();
    assert_eq!(outcome.steps, 5);
    assert_eq!(outcome.skipped_steps, 1);
}

#[test]
fn an_update_that_poisons_the_weights_stops_before_checkpointing() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = Checkpoint::load(&model_path("llama-tied"), true).unwrap();
    let mut t = task();
    t.bad_step = usize::MAX;
    let c = TrainConfig {
        learning_rate: 1e39,
        max_grad_norm: 0.0,
        ..cfg(tmp.path(), OnNonFinite::Skip)
    };
    let err = train(&c, &ck.model, &mut t, false, "fp")
        .err()
        .expect("must stop");
    assert!(err.to_string().contains("non-finite"), "{err}");
    assert!(rlhf::train::state::list_checkpoints(tmp.path()).is_empty());
}
