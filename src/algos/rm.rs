//! Reward model (InstructGPT §3.5). For a prompt x with K completions ranked best first,
//!
//! ```text
//! loss(x) = −1/C(K,2) · Σ_{i<j} log σ(r(x, y_i) − r(x, y_j) − m)
//! ```
//!
//! All C(K,2) pairs of one prompt form ONE batch element, so each completion goes through the
//! model once however many pairs it is in. A preference pair is the K = 2 case; m is the record's
//! optional margin.

use anyhow::Result;
use candle_core::{Tensor, Var};

use crate::data::preference::Comparison;
use crate::model::scalar_head::ScalarHead;
use crate::model::CausalLm;
use crate::ops::{log_sigmoid, pairwise_differences};
use crate::train::{MicroBatchLoss, Task};

/// The K-way loss of one prompt; `rewards` [K] are in rank order, best first.
pub fn ranking_loss(rewards: &Tensor, margin: f64) -> Result<Tensor> {
    let diff = (pairwise_differences(rewards)? - margin)?;
    let n = diff.dim(0)?;
    Ok((log_sigmoid(&diff)?.sum_all()? / -(n as f64))?)
}

/// Fraction of a prompt's pairs that the rewards order correctly (ties count as wrong).
pub fn pairwise_accuracy(rewards: &[f32]) -> f64 {
    let k = rewards.len();
    let right = (0..k)
        .flat_map(|i| (i + 1..k).map(move |j| (i, j)))
        .filter(|&(i, j)| rewards[i] > rewards[j])
        .count();
    right as f64 / (k * (k - 1) / 2).max(1) as f64
}

/// `ranking_batching`: how a K-way ranking enters the batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RankingBatching {
    /// All C(K,2) pairs of a prompt in one batch element (InstructGPT).
    PerPrompt,
    /// Every pair its own example (the baseline InstructGPT found to overfit).
    ShuffledPairs,
}

/// Mean score of `seqs` without the head's bias (the bias that centres them is its negation).
pub fn mean_raw_score(
    head: &ScalarHead,
    model: &CausalLm,
    seqs: &[Vec<u32>],
    batch: usize,
) -> Result<f64> {
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let raw = ScalarHead {
        weight: head.weight.clone(),
        bias: 0.0,
    }
    .scores(model, &refs, batch)?;
    Ok(raw.iter().map(|&x| x as f64).sum::<f64>() / raw.len().max(1) as f64)
}

pub struct RmTask {
    pub head: ScalarHead,
    pub train: Vec<Comparison>,
    pub eval: Vec<Comparison>,
    pub eval_batch_size: usize,
}

/// Sums, over comparisons, of the quantities the trainer logs.
#[derive(Default)]
struct Tally {
    loss: f64,
    accuracy: f64,
    chosen: f64,
    rejected: f64,
    pairs_right: f64,
    pairs: f64,
}

impl Tally {
    fn add(&mut self, rewards: &[f32], loss: f64) {
        let acc = pairwise_accuracy(rewards);
        let pairs = (rewards.len() * (rewards.len() - 1) / 2) as f64;
        self.loss += loss;
        self.accuracy += acc;
        self.pairs_right += acc * pairs;
        self.pairs += pairs;
        self.chosen += rewards[0] as f64;
        self.rejected += rewards[rewards.len() - 1] as f64;
    }
}

impl RmTask {
    /// Loss tensors and rewards of a group of comparisons, scored in one batch.
    fn score_group(
        &self,
        model: &CausalLm,
        group: &[&Comparison],
    ) -> Result<(Vec<Tensor>, Vec<Vec<f32>>, usize)> {
        let seqs = Comparison::sequences_of(group);
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let scores = self.head.raw_scores(model, &refs)?;
        let (mut losses, mut rewards, mut offset) = (vec![], vec![], 0);
        for c in group {
            let k = c.completions.len();
            let r = scores.narrow(0, offset, k)?;
            rewards.push(r.to_vec1::<f32>()?);
            losses.push(ranking_loss(&r, c.margin as f64)?);
            offset += k;
        }
        Ok((losses, rewards, seqs.iter().map(Vec::len).sum()))
    }
}

impl Task for RmTask {
    fn num_examples(&self) -> usize {
        self.train.len()
    }

    fn micro_batch(
        &mut self,
        model: &CausalLm,
        batch: &[usize],
        step_examples: &[usize],
    ) -> Result<MicroBatchLoss> {
        let group: Vec<&Comparison> = batch.iter().map(|&i| &self.train[i]).collect();
        let (losses, rewards, tokens) = self.score_group(model, &group)?;
        // Every prompt weighs the same in the step, whatever its K.
        let scale = 1.0 / step_examples.len() as f64;
        let loss = (Tensor::stack(&losses, 0)?.sum_all()? * scale)?;
        let mut t = Tally::default();
        for (r, l) in rewards.iter().zip(&losses) {
            t.add(r, l.to_scalar::<f32>()? as f64);
        }
        Ok(MicroBatchLoss {
            loss,
            metrics: vec![
                ("loss".into(), t.loss * scale),
                ("accuracy".into(), t.accuracy * scale),
                ("rewards/chosen".into(), t.chosen * scale),
                ("rewards/rejected".into(), t.rejected * scale),
                ("rewards/margins".into(), (t.chosen - t.rejected) * scale),
            ],
            tokens,
        })
    }

    fn evaluate(&mut self, model: &CausalLm) -> Result<Vec<(String, f64)>> {
        if self.eval.is_empty() {
            return Ok(vec![]);
        }
        let mut t = Tally::default();
        let eval = std::mem::take(&mut self.eval);
        for chunk in eval.chunks(self.eval_batch_size.max(1)) {
            let group: Vec<&Comparison> = chunk.iter().collect();
            let (losses, rewards, _) = self.score_group(model, &group)?;
            for (r, l) in rewards.iter().zip(&losses) {
                t.add(r, l.to_scalar::<f32>()? as f64);
            }
        }
        let n = eval.len() as f64;
        self.eval = eval;
        Ok(vec![
            ("eval/loss".into(), t.loss / n),
            ("eval/accuracy".into(), t.pairs_right / t.pairs.max(1.0)),
            ("eval/rewards/chosen".into(), t.chosen / n),
            ("eval/rewards/rejected".into(), t.rejected / n),
            ("eval/rewards/margins".into(), (t.chosen - t.rejected) / n),
        ])
    }

    fn extra_parameters(&self) -> Vec<(String, Var)> {
        self.head.parameters()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logsig(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    #[test]
    fn ranking_loss_matches_hand_computation_and_its_gradient() {
        let r = [1.0f32, 0.5, -0.25];
        let v = Var::from_vec(r.to_vec(), 3, &Device::Cpu).unwrap();
        let loss = ranking_loss(v.as_tensor(), 0.1).unwrap();
        let (a, b, c) = (r[0] as f64, r[1] as f64, r[2] as f64);
        let want = -(logsig(a - b - 0.1) + logsig(a - c - 0.1) + logsig(b - c - 0.1)) / 3.0;
        assert!((loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-6);
        // d/dr_i of −log σ(r_i − r_j − m) is −σ(r_j − r_i + m); r_j gets the opposite.
        let s = |x: f64| 1.0 / (1.0 + (-x).exp());
        let g_ab = s(b - a + 0.1);
        let g_ac = s(c - a + 0.1);
        let g_bc = s(c - b + 0.1);
        let want_grad = [
            -(g_ab + g_ac) / 3.0,
            (g_ab - g_bc) / 3.0,
            (g_ac + g_bc) / 3.0,
        ];
        let grads = loss.backward().unwrap();
        let got = grads.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        for (g, w) in got.iter().zip(want_grad) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want_grad:?}");
        }
    }

    #[test]
    fn pair_is_the_k2_case_and_accuracy_counts_ordered_pairs() {
        let r = Tensor::new(&[0.3f32, 1.2], &Device::Cpu).unwrap();
        let l = ranking_loss(&r, 0.0).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((l - -logsig(0.3 - 1.2)).abs() < 1e-6);
        assert_eq!(pairwise_accuracy(&[3.0, 2.0, 1.0, 0.0]), 1.0);
        assert_eq!(pairwise_accuracy(&[0.0, 1.0]), 0.0);
        // 4 items, only the last two swapped: 5 of 6 pairs right.
        assert!((pairwise_accuracy(&[3.0, 2.0, 0.0, 1.0]) - 5.0 / 6.0).abs() < 1e-12);
    }
}
