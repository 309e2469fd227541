//! The language-modelling loss on marked target tokens, shared by SFT and PPO-ptx.

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::data::sft::Example;
use crate::model::{CausalLm, StepInputs};
use crate::ops;

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
    let mut inp = StepInputs::from_segments(&model.config, &ids, &segments)?;
    inp.path = path;
    let hidden = model.forward_hidden(&inp, None)?;
    let logp = model.token_logprobs(
        &hidden.narrow(1, 0, t - 1)?,
        &inp.ids.narrow(1, 1, t - 1)?,
        path,
    )?;
    let mask = Tensor::from_vec(mask, (batch.len(), t - 1), &Device::Cpu)?;
    Ok(((logp * mask)?.sum_all()?.neg()?, n_targets))
}
