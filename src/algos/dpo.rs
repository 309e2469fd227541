//! Direct Preference Optimization (Rafailov et al., 2023) and its variants. With the implicit reward
//! r̂(x, y) = β·[log π(y|x) − log π_ref(y|x)] and, for a pair, h = r̂(x, y_w) − r̂(x, y_l):
//!
//!   sigmoid (DPO)    −(1−ε)·log σ(h) − ε·log σ(−h)      ε = label_smoothing (conservative DPO)
//!   hinge            max(0, 1 − h)                       (SLiC)
//!   ipo              (h/β − 1/(2β))²                     log-probs averaged over tokens, as TRL does
//!   plackett_luce    −Σ_k log( exp(r̂_τ(k)) / Σ_{j≥k} exp(r̂_τ(j)) )   over a K-way ranking τ
//!
//! Pair losses on K-way rankings average over the ranking's C(K,2) pairs; Plackett–Luce with K = 2
//! is the sigmoid loss. Reference log-probs are inputs: computed once before training (and cached
//! on disk by the command), so the reference model is not in memory while the policy trains.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

use crate::data::preference::Comparison;
use crate::model::CausalLm;
use crate::ops::{self, log_sigmoid, pairwise_differences};
use crate::train::fingerprint::Fingerprint;
use crate::train::{MicroBatchLoss, Task};

/// `loss_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    #[serde(alias = "dpo")]
    Sigmoid,
    Hinge,
    Ipo,
    PlackettLuce,
}

impl DpoLoss {
    /// IPO compares token-averaged log-probs; the others whole-sequence sums.
    pub fn length_normalized(self) -> bool {
        self == DpoLoss::Ipo
    }
}

#[derive(Clone, Copy, Debug)]
pub struct DpoParams {
    pub loss: DpoLoss,
    pub beta: f64,
    pub label_smoothing: f64,
}

impl DpoParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            bail!("beta must be a positive number");
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            bail!("label_smoothing must be in [0, 0.5)");
        }
        if self.label_smoothing > 0.0 && self.loss != DpoLoss::Sigmoid {
            bail!("label_smoothing applies to loss_type = \"sigmoid\" only");
        }
        Ok(())
    }
}

/// Loss of one prompt. `logratios` [K] = log π(y_k|x) − log π_ref(y_k|x), completions best first.
pub fn dpo_loss(logratios: &Tensor, p: &DpoParams) -> Result<Tensor> {
    let k = logratios.dim(0)?;
    let rewards = (logratios * p.beta)?;
    if p.loss == DpoLoss::PlackettLuce {
        let mut terms = Vec::with_capacity(k - 1);
        for i in 0..k - 1 {
            let rest = rewards.narrow(0, i, k - i)?;
            terms.push((rewards.narrow(0, i, 1)?.squeeze(0)? - logsumexp(&rest)?)?);
        }
        return Ok(Tensor::stack(&terms, 0)?.sum_all()?.neg()?);
    }
    // Unscaled difference of log-ratios, winner minus loser; h = β·diff.
    let diff = pairwise_differences(logratios)?;
    let n = diff.dim(0)?;
    let per_pair = match p.loss {
        DpoLoss::Sigmoid => {
            let h = (&diff * p.beta)?;
            let eps = p.label_smoothing;
            ((log_sigmoid(&h)? * -(1.0 - eps))? - (log_sigmoid(&h.neg()?)? * eps)?)?
        }
        DpoLoss::Hinge => (1.0 - (&diff * p.beta)?)?.relu()?,
        DpoLoss::Ipo => (diff - 1.0 / (2.0 * p.beta))?.sqr()?,
        DpoLoss::PlackettLuce => unreachable!(),
    };
    Ok((per_pair.sum_all()? / n as f64)?)
}

fn logsumexp(x: &Tensor) -> Result<Tensor> {
    let max = x.max(0)?.detach();
    Ok((x.broadcast_sub(&max)?.exp()?.sum(0)?.log()? + max)?)
}

/// Completion log-probs of the comparisons' sequences, one row per (comparison, completion):
/// (summed or token-averaged log-probs [N], mean logit over the completion's tokens and the
/// vocabulary [N], tokens in the batch).
pub fn comparison_logprobs(
    model: &CausalLm,
    group: &[&Comparison],
    length_normalized: bool,
) -> Result<(Tensor, Vec<f32>, usize)> {
    let seqs = Comparison::sequences_of(group);
    let starts: Vec<usize> = group
        .iter()
        .flat_map(|c| std::iter::repeat_n(c.prompt.len(), c.completions.len()))
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let (lp, mask, hidden) = model.completion_logprobs(&refs, &starts, ops::default_path())?;
    let count = mask.sum(1)?;
    let mut logps = lp.sum(1)?;
    if length_normalized {
        logps = (logps / &count)?;
    }
    // TRL's logits/* metric: the mean logit over completion tokens and vocabulary, which is
    // hidden · mean(W) — no [N, T, V] logits needed.
    let w_mean = ops::frozen::mean_rows(&model.lm_head_weight().detach())?;
    let mean_logit = hidden
        .detach()
        .broadcast_matmul(&w_mean.unsqueeze(1)?)?
        .squeeze(2)?;
    let mean_logit = ((mean_logit * &mask)?.sum(1)? / &count)?.to_vec1::<f32>()?;
    Ok((logps, mean_logit, seqs.iter().map(Vec::len).sum()))
}

pub struct DpoTask {
    pub params: DpoParams,
    pub train: Vec<Comparison>,
    /// Reference log-probs per comparison and completion (zeros when reference-free).
    pub train_ref: Vec<Vec<f32>>,
    pub eval: Vec<Comparison>,
    pub eval_ref: Vec<Vec<f32>>,
    pub eval_batch_size: usize,
}

#[derive(Default)]
struct Tally {
    loss: f64,
    chosen: f64,
    rejected: f64,
    accuracy: f64,
    logp_chosen: f64,
    logp_rejected: f64,
    logit_chosen: f64,
    logit_rejected: f64,
}

impl Tally {
    fn metrics(&self, prefix: &str, scale: f64) -> Vec<(String, f64)> {
        [
            ("loss", self.loss),
            ("rewards/chosen", self.chosen),
            ("rewards/rejected", self.rejected),
            ("rewards/accuracies", self.accuracy),
            ("rewards/margins", self.chosen - self.rejected),
            ("logps/chosen", self.logp_chosen),
            ("logps/rejected", self.logp_rejected),
            ("logits/chosen", self.logit_chosen),
            ("logits/rejected", self.logit_rejected),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v * scale))
        .collect()
    }
}

impl DpoTask {
    /// Losses of a group (one per comparison) and the metric sums.
    fn group_loss(
        &self,
        model: &CausalLm,
        group: &[&Comparison],
        refs: &[&Vec<f32>],
    ) -> Result<(Vec<Tensor>, Tally, usize)> {
        let (logps, logits, tokens) =
            comparison_logprobs(model, group, self.params.loss.length_normalized())?;
        let ref_flat: Vec<f32> = refs.iter().flat_map(|r| r.iter().copied()).collect();
        let n = ref_flat.len();
        let ratios = (&logps - Tensor::from_vec(ref_flat, n, &Device::Cpu)?)?;
        let ratio_values = ratios.to_vec1::<f32>()?;
        let logp_values = logps.to_vec1::<f32>()?;
        let (mut losses, mut t, mut off) = (vec![], Tally::default(), 0);
        for c in group {
            let k = c.completions.len();
            let loss = dpo_loss(&ratios.narrow(0, off, k)?, &self.params)?;
            let (best, worst) = (off, off + k - 1);
            let beta = self.params.beta;
            t.loss += loss.to_scalar::<f32>()? as f64;
            t.chosen += beta * ratio_values[best] as f64;
            t.rejected += beta * ratio_values[worst] as f64;
            t.accuracy += f64::from(u8::from(ratio_values[best] > ratio_values[worst]));
            t.logp_chosen += logp_values[best] as f64;
            t.logp_rejected += logp_values[worst] as f64;
            t.logit_chosen += logits[best] as f64;
            t.logit_rejected += logits[worst] as f64;
            losses.push(loss);
            off += k;
        }
        Ok((losses, t, tokens))
    }
}

impl Task for DpoTask {
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
        let refs: Vec<&Vec<f32>> = batch.iter().map(|&i| &self.train_ref[i]).collect();
        let (losses, t, tokens) = self.group_loss(model, &group, &refs)?;
        let scale = 1.0 / step_examples.len() as f64;
        Ok(MicroBatchLoss {
            loss: (Tensor::stack(&losses, 0)?.sum_all()? * scale)?,
            metrics: t.metrics("", scale),
            tokens,
        })
    }

    fn evaluate(&mut self, model: &CausalLm) -> Result<Vec<(String, f64)>> {
        if self.eval.is_empty() {
            return Ok(vec![]);
        }
        let mut total = Tally::default();
        for (chunk, refs) in self
            .eval
            .chunks(self.eval_batch_size.max(1))
            .zip(self.eval_ref.chunks(self.eval_batch_size.max(1)))
        {
            let group: Vec<&Comparison> = chunk.iter().collect();
            let refs: Vec<&Vec<f32>> = refs.iter().collect();
            let (_, t, _) = self.group_loss(model, &group, &refs)?;
            for (a, b) in [
                (&mut total.loss, t.loss),
                (&mut total.chosen, t.chosen),
                (&mut total.rejected, t.rejected),
                (&mut total.accuracy, t.accuracy),
                (&mut total.logp_chosen, t.logp_chosen),
                (&mut total.logp_rejected, t.logp_rejected),
                (&mut total.logit_chosen, t.logit_chosen),
                (&mut total.logit_rejected, t.logit_rejected),
            ] {
                *a += b;
            }
        }
        Ok(total.metrics("eval/", 1.0 / self.eval.len() as f64))
    }
}

/// Reference log-probs of every completion, computed without gradients in batches (with several
/// ranks, each computes its share of the batches and every rank gets them all).
pub fn reference_logprobs(
    model: &CausalLm,
    comparisons: &[Comparison],
    length_normalized: bool,
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let world = crate::dist::world();
    let batches: Vec<&[Comparison]> = comparisons.chunks(batch_size.max(1)).collect();
    let mut out = Vec::with_capacity(comparisons.len());
    for chunk in &batches[world.share(batches.len())] {
        let group: Vec<&Comparison> = chunk.iter().collect();
        let (logps, _, _) = comparison_logprobs(model, &group, length_normalized)?;
        let v = logps.detach().to_vec1::<f32>()?;
        let mut off = 0;
        for c in chunk.iter() {
            out.push(v[off..off + c.completions.len()].to_vec());
            off += c.completions.len();
        }
    }
    world.concat_shares(out)
}

/// Reference log-probs cached on disk, keyed by a digest of the reference weights, the
/// completions' token ids and the length normalisation: a second run on the same data skips the
/// reference, and the reference need not be in memory while the policy trains.
pub struct ReferenceCache {
    dir: Option<PathBuf>,
    weights: String,
}

/// The cache files' layout; older files are not read (they are recomputed and replaced).
const CACHE_FORMAT: &str = "ref-logps-v2";

impl ReferenceCache {
    /// A cache in `dir` (empty: none) for `reference`'s weights.
    pub fn new(dir: &str, reference: &CausalLm) -> Result<Self> {
        if dir.is_empty() {
            return Ok(ReferenceCache {
                dir: None,
                weights: String::new(),
            });
        }
        let mut f = Fingerprint::new("weights");
        for (name, t) in reference.state_dict()? {
            let dims: Vec<u32> = t.dims().iter().map(|&d| d as u32).collect();
            let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            f.bytes(name.as_bytes()).ids(&dims).floats(&values);
        }
        // A LoRA policy computes its reference log-probs with its adapters on.
        for (name, a, b) in reference.adapter_tensors() {
            for t in [a, b] {
                let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                f.bytes(name.as_bytes()).floats(&values);
            }
        }
        Ok(ReferenceCache {
            dir: Some(PathBuf::from(dir)),
            weights: f.finish(),
        })
    }

    /// The cached log-probs of `comparisons` under `key` at `path`, if that file has them.
    fn lookup(
        &self,
        path: Option<&std::path::Path>,
        key: &str,
        comparisons: &[Comparison],
        what: &str,
    ) -> Option<Vec<Vec<f32>>> {
        let p = path.filter(|p| p.exists())?;
        let cached = crate::io::read_json(p)
            .ok()
            .filter(|v| v["format"] == CACHE_FORMAT && v["key"] == key);
        let logps: Option<Vec<Vec<f32>>> =
            cached.and_then(|v| serde_json::from_value(v["logps"].clone()).ok());
        match logps.filter(|l| {
            l.len() == comparisons.len()
                && l.iter()
                    .zip(comparisons)
                    .all(|(l, c)| l.len() == c.completions.len())
        }) {
            Some(l) => {
                eprintln!("{what}: reference log-probs from cache {}", p.display());
                Some(l)
            }
            None => {
                eprintln!(
                    "{what}: the reference cache {} is not in this version's format; computing it again",
                    p.display()
                );
                None
            }
        }
    }

    /// The reference log-probs of `comparisons` (see [`reference_logprobs`]), from the cache when
    /// it has them; `what` names the set in messages.
    pub fn logprobs(
        &self,
        reference: &CausalLm,
        comparisons: &[Comparison],
        length_normalized: bool,
        batch_size: usize,
        what: &str,
    ) -> Result<Vec<Vec<f32>>> {
        let mut key = Fingerprint::new(CACHE_FORMAT);
        key.bytes(self.weights.as_bytes())
            .json(&serde_json::json!(length_normalized));
        for ids in comparisons.iter().flat_map(Comparison::token_lists) {
            key.ids(ids);
        }
        let key = key.finish();
        // Rank 0 alone reads and writes the cache; what it finds goes to every rank.
        let world = crate::dist::world();
        let path = self
            .dir
            .as_ref()
            .filter(|_| world.is_main())
            .map(|d| d.join(format!("{key}.json")));
        let found = self.lookup(path.as_deref(), &key, comparisons, what);
        if let Some(l) = world.broadcast_json(found)? {
            return Ok(l);
        }
        let t = Instant::now();
        let logps = reference_logprobs(reference, comparisons, length_normalized, batch_size)?;
        eprintln!(
            "{what}: reference log-probs of {} completions computed in {:.1}s",
            logps.iter().map(Vec::len).sum::<usize>(),
            t.elapsed().as_secs_f64()
        );
        if let Some(p) = path {
            let written = std::fs::create_dir_all(p.parent().unwrap_or(&p))
                .map_err(anyhow::Error::from)
                .and_then(|_| {
                    let text = serde_json::to_vec(&serde_json::json!({
                        "format": CACHE_FORMAT,
                        "key": key,
                        "logps": logps,
                    }))?;
                    crate::io::write_atomic(&p, &text)
                });
            if let Err(e) = written {
                eprintln!(
                    "note: cannot write the reference cache {} ({}); going on without it",
                    p.display(),
                    crate::io::one_line_error(&e)
                );
            }
        }
        Ok(logps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn sig(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    fn params(loss: DpoLoss, beta: f64, eps: f64) -> DpoParams {
        DpoParams {
            loss,
            beta,
            label_smoothing: eps,
        }
    }

    /// Loss value and gradient with respect to the log-ratios.
    fn eval(ratios: &[f32], p: DpoParams) -> (f64, Vec<f64>) {
        let v = Var::from_vec(ratios.to_vec(), ratios.len(), &Device::Cpu).unwrap();
        let loss = dpo_loss(v.as_tensor(), &p).unwrap();
        let g = loss.backward().unwrap();
        let grad = g.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        (
            loss.to_scalar::<f32>().unwrap() as f64,
            grad.into_iter().map(f64::from).collect(),
        )
    }

    #[test]
    fn sigmoid_loss_and_its_gradient_weight() {
        // log-ratios: chosen +0.7, rejected −0.4; β = 0.1 → h = 0.11.
        let (loss, grad) = eval(&[0.7, -0.4], params(DpoLoss::Sigmoid, 0.1, 0.0));
        let h: f64 = 0.1 * (0.7 + 0.4);
        assert!((loss - -sig(h).ln()).abs() < 1e-6);
        // The paper's gradient: −β·σ(r̂_l − r̂_w) on the chosen log-prob, the opposite on rejected.
        let w = 0.1 * sig(-h);
        assert!(
            (grad[0] + w).abs() < 1e-6 && (grad[1] - w).abs() < 1e-6,
            "{grad:?}"
        );
    }

    #[test]
    fn at_the_start_policy_equals_reference_and_the_weight_is_half_beta() {
        // h = 0 exactly: the first step when π = π_ref. The paper's weight σ(r̂_l − r̂_w) is ½.
        let (loss, grad) = eval(&[0.0, 0.0], params(DpoLoss::Sigmoid, 0.1, 0.0));
        assert!((loss - std::f64::consts::LN_2).abs() < 1e-6);
        assert!(
            (grad[0] + 0.05).abs() < 1e-7 && (grad[1] - 0.05).abs() < 1e-7,
            "{grad:?}"
        );
    }

    #[test]
    fn conservative_hinge_and_ipo_match_hand_values() {
        let (l, _) = eval(&[0.7, -0.4], params(DpoLoss::Sigmoid, 0.5, 0.2));
        let h: f64 = 0.5 * 1.1;
        assert!((l - (-0.8 * sig(h).ln() - 0.2 * sig(-h).ln())).abs() < 1e-6);
        let (l, g) = eval(&[0.7, -0.4], params(DpoLoss::Hinge, 0.5, 0.0));
        assert!((l - (1.0 - h)).abs() < 1e-6);
        assert!((g[0] + 0.5).abs() < 1e-6);
        let (l, _) = eval(&[0.7, 0.3], params(DpoLoss::Hinge, 0.5, 0.0));
        assert!((l - 0.8).abs() < 1e-6);
        let (l, _) = eval(&[3.0, -0.4], params(DpoLoss::Hinge, 1.0, 0.0));
        assert_eq!(l, 0.0);
        let (l, g) = eval(&[0.7, -0.4], params(DpoLoss::Ipo, 0.5, 0.0));
        assert!((l - (1.1f64 - 1.0).powi(2)).abs() < 1e-6);
        assert!((g[0] - 2.0 * 0.1).abs() < 1e-5);
    }

    #[test]
    fn plackett_luce_with_two_is_dpo_and_matches_hand_value_for_three() {
        for ratios in [[0.7f32, -0.4], [-1.3, 0.2]] {
            let (pl, gpl) = eval(&ratios, params(DpoLoss::PlackettLuce, 0.3, 0.0));
            let (d, gd) = eval(&ratios, params(DpoLoss::Sigmoid, 0.3, 0.0));
            assert!((pl - d).abs() < 1e-6);
            assert!((gpl[0] - gd[0]).abs() < 1e-6 && (gpl[1] - gd[1]).abs() < 1e-6);
        }
        let r = [0.5f64, 0.1, -0.2];
        let beta = 2.0;
        let (l, _) = eval(
            &[r[0] as f32, r[1] as f32, r[2] as f32],
            params(DpoLoss::PlackettLuce, beta, 0.0),
        );
        let e: Vec<f64> = r.iter().map(|x| (beta * x).exp()).collect();
        let want = -((e[0] / (e[0] + e[1] + e[2])).ln() + (e[1] / (e[1] + e[2])).ln());
        assert!((l - want).abs() < 1e-5, "{l} vs {want}");
    }

    #[test]
    fn pair_losses_average_over_ranking_pairs() {
        let (l, _) = eval(&[0.5, 0.1, -0.2], params(DpoLoss::Sigmoid, 1.0, 0.0));
        let want = -(sig(0.4).ln() + sig(0.7).ln() + sig(0.3).ln()) / 3.0;
        assert!((l - want).abs() < 1e-6);
    }
}
