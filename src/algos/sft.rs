//! Supervised fine-tuning: L = −Σ_t m_t · log π(y_t | y_<t) / Σ_t m_t, where m_t marks the target
//! tokens (completion or assistant tokens by default). The normaliser counts the targets of the
//! whole optimizer step, so gradient accumulation gives the same update as one large batch.

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::data::sft::Example;
use crate::model::{CausalLm, StepInputs};
use crate::ops;
use crate::train::{MicroBatchLoss, Task};

/// Σ over target tokens of −log π(token | prefix) for a batch of (right-padded) examples, and the
/// number of target tokens.
pub fn target_nll_sum(model: &CausalLm, batch: &[&Example]) -> Result<(Tensor, usize)> {
    target_nll_sum_with(model, batch, ops::default_path())
}

pub fn target_nll_sum_with(
    model: &CausalLm,
    batch: &[&Example],
    path: ops::OpsPath,
) -> Result<(Tensor, usize)> {
    let t = batch.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let pad = |v: &[u32], fill: u32| -> Vec<u32> {
        v.iter()
            .copied()
            .chain(std::iter::repeat_n(fill, t - v.len()))
            .collect()
    };
    let ids: Vec<Vec<u32>> = batch.iter().map(|e| pad(&e.ids, 0)).collect();
    let segments: Vec<Vec<u32>> = batch.iter().map(|e| pad(&e.segments, 0)).collect();
    // targets[t] = 1 means token t is predicted from position t − 1.
    let mask: Vec<f32> = batch
        .iter()
        .flat_map(|e| (1..t).map(move |i| e.targets.get(i).copied().unwrap_or(0) as f32))
        .collect();
    let n_targets = mask.iter().filter(|&&m| m > 0.0).count();
    let inp = StepInputs::from_segments(&model.config, &ids, &segments)?;
    let hidden = model.forward_hidden(&inp, None)?;
    let logp = model.token_logprobs(
        &hidden.narrow(1, 0, t - 1)?,
        &inp.ids.narrow(1, 1, t - 1)?,
        path,
    )?;
    let mask = Tensor::from_vec(mask, (batch.len(), t - 1), &Device::Cpu)?;
    Ok(((logp * mask)?.sum_all()?.neg()?, n_targets))
}

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
