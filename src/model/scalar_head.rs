//! A scalar head on a language-model body, read at each sequence's last real token: InstructGPT's
//! reward model and PPO's value model. transformers calls it `*ForSequenceClassification` with
//! `num_labels = 1`: `score.weight` is [1, D] and there is no bias.
//!
//! Reward normalisation adds a constant (`bias`) to every score. transformers' class has no place
//! for it, so it travels in config.json as `rlhf_score_bias`; transformers' logit + bias = our score.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;

use super::{CausalLm, StepInputs};

pub const BIAS_KEY: &str = "rlhf_score_bias";

pub struct ScalarHead {
    /// [1, D]
    pub weight: Var,
    pub bias: f64,
}

impl ScalarHead {
    /// The checkpoint's `score.weight` when it has one, else a fresh head drawn like transformers
    /// initialises it (normal, std = `initializer_range`, 0.02 by default).
    pub fn from_model(lm: &mut CausalLm, seed: u64) -> Result<Self> {
        let d = lm.config.hidden_size;
        let bias = lm
            .config
            .raw
            .get(BIAS_KEY)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0);
        let weight = match lm.score_head.take() {
            Some(w) => {
                if w.dims() != [1, d] {
                    bail!(
                        "tensor score.weight has shape {:?}, expected [1, {d}] (a single-label head)",
                        w.dims()
                    );
                }
                w.to_dtype(DType::F32)?
            }
            None => {
                let std = lm
                    .config
                    .raw
                    .get("initializer_range")
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(0.02);
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                super::init::normal(&mut rng, &[1, d], std)?
            }
        };
        Ok(ScalarHead {
            weight: Var::from_tensor(&weight)?,
            bias,
        })
    }

    pub fn parameters(&self) -> Vec<(String, Var)> {
        vec![("score.weight".to_string(), self.weight.clone())]
    }

    /// Scores [B] (without the bias) of hidden states [B, T, D] read at positions `last[b]`.
    pub fn head_at(&self, hidden: &Tensor, last: &[usize]) -> Result<Tensor> {
        let (b, t, d) = hidden.dims3()?;
        let rows: Vec<u32> = last
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * t + p) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, b, hidden.device())?;
        let picked = hidden.reshape((b * t, d))?.index_select(&rows, 0)?;
        Ok(picked.matmul(&self.weight.as_tensor().t()?)?.squeeze(1)?)
    }

    /// The head at every position: [B, T, D] → [B, T] (a value model's V(s_t)).
    pub fn all_positions(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, t, d) = hidden.dims3()?;
        Ok(hidden
            .reshape((b * t, d))?
            .matmul(&self.weight.as_tensor().t()?)?
            .reshape((b, t))?)
    }

    /// Scores [B] of token sequences (right-padded into one batch), without the bias, with the
    /// autograd graph when the model is trainable.
    pub fn raw_scores(&self, lm: &CausalLm, seqs: &[&[u32]]) -> Result<Tensor> {
        if seqs.iter().any(|s| s.is_empty()) {
            bail!("cannot score an empty sequence");
        }
        let inp = StepInputs::right_padded(&lm.config, seqs)?;
        let hidden = lm.forward_hidden(&inp, None)?;
        let last: Vec<usize> = seqs.iter().map(|s| s.len() - 1).collect();
        self.head_at(&hidden, &last)
    }

    /// Scores with the bias, as plain numbers, in batches of `batch_size`.
    pub fn scores(&self, lm: &CausalLm, seqs: &[&[u32]], batch_size: usize) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(batch_size.max(1)) {
            let s = self.raw_scores(lm, chunk)?.detach();
            out.extend(
                s.to_vec1::<f32>()?
                    .into_iter()
                    .map(|x| x + self.bias as f32),
            );
        }
        Ok(out)
    }
}
