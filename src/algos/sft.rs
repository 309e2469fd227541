//! Supervised fine-tuning: L = −Σ_t m_t · log π(y_t | y_<t) / Σ_t m_t, where m_t marks the target
//! tokens (completion or assistant tokens by default). The normaliser counts the targets of the
//! whole optimizer step, so gradient accumulation gives the same update as one large batch.

use anyhow::Result;

use crate::data::sft::Example;
use crate::model::CausalLm;
use crate::train::{MicroBatchLoss, Task};

pub use crate::train::lm_loss::{target_nll_sum, target_nll_sum_with};

pub struct SftTask {
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    pub eval_batch_size: usize,
}

fn targets(e: &Example) -> usize {
    e.targets.iter().skip(1).map(|&x| x as usize).sum()
}

impl Task for SftTask {
    fn num_examples(&self) -> usize {
        self.train.len()
    }

    fn micro_batch(
        &mut self,
        model: &CausalLm,
        batch: &[usize],
        step_examples: &[usize],
    ) -> Result<MicroBatchLoss> {
        let step_targets: usize = step_examples.iter().map(|&i| targets(&self.train[i])).sum();
        let examples: Vec<&Example> = batch.iter().map(|&i| &self.train[i]).collect();
        let (nll, _) = target_nll_sum(model, &examples)?;
        let loss = (nll / step_targets.max(1) as f64)?;
        let value = loss.to_scalar::<f32>()? as f64;
        Ok(MicroBatchLoss {
            loss,
            metrics: vec![("loss".into(), value)],
            tokens: examples.iter().map(|e| e.ids.len()).sum(),
        })
    }

    fn evaluate(&mut self, model: &CausalLm) -> Result<Vec<(String, f64)>> {
        if self.eval.is_empty() {
            return Ok(vec![]);
        }
        let (mut nll, mut n) = (0.0f64, 0usize);
        for chunk in self.eval.chunks(self.eval_batch_size.max(1)) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let (s, k) = target_nll_sum(model, &refs)?;
            nll += s.to_scalar::<f32>()? as f64;
            n += k;
        }
        let loss = nll / n.max(1) as f64;
        Ok(vec![
            ("eval/loss".into(), loss),
            ("eval/perplexity".into(), loss.exp()),
        ])
    }
}
