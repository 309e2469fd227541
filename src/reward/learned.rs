//! A learned reward model (from `rlhf rm`, or any transformers `*ForSequenceClassification` with
//! one label) as a reward source.

use anyhow::{bail, Result};

use super::{Episode, RewardSource};
use crate::checkpoint::Checkpoint;
use crate::model::scalar_head::ScalarHead;
use crate::text::Tokenizer;

pub struct LearnedReward {
    pub checkpoint: Checkpoint,
    pub head: ScalarHead,
    /// The policy's tokenizer is the reward model's: its ids are scored as they are. Otherwise
    /// the text is tokenised again with the reward model's tokenizer.
    same_tokenizer: bool,
    batch_size: usize,
}

impl LearnedReward {
    pub fn load(spec: &str, policy_tokenizer: &Tokenizer, batch_size: usize) -> Result<Self> {
        let mut checkpoint = Checkpoint::load(spec, false)?;
        if checkpoint.model.score_head.is_none() {
            bail!(
                "{}: not a reward model (no score.weight); train one with `rlhf rm`, or use a built-in scorer (`vader`, `rule:…`)",
                checkpoint.source.display()
            );
        }
        let head = ScalarHead::from_model(&mut checkpoint.model, 0)?;
        let tok = checkpoint.tokenizer()?;
        let same_tokenizer =
            tok.inner.to_string(false).ok() == policy_tokenizer.inner.to_string(false).ok();
        if !same_tokenizer {
            eprintln!(
                "note: the reward model's tokenizer differs from the policy's; responses are scored as text, tokenised again"
            );
        }
        Ok(LearnedReward {
            checkpoint,
            head,
            same_tokenizer,
            batch_size,
        })
    }
}

impl RewardSource for LearnedReward {
    fn describe(&self) -> String {
        format!("reward model {}", self.checkpoint.source.display())
    }

    fn score(&mut self, episodes: &[Episode]) -> Result<Vec<f32>> {
        let max_len = self.checkpoint.model.config.max_position_embeddings;
        let mut seqs = Vec::with_capacity(episodes.len());
        for e in episodes {
            let mut ids = if self.same_tokenizer {
                e.prompt_ids.to_vec()
            } else {
                self.checkpoint.tokenizer()?.encode(e.prompt_text, true)?
            };
            if self.same_tokenizer {
                ids.extend_from_slice(e.response_ids);
            } else {
                ids.extend(
                    self.checkpoint
                        .tokenizer()?
                        .encode(e.response_text, false)?,
                );
            }
            if ids.len() > max_len {
                // Keep the end: the score is read at the last token.
                ids.drain(..ids.len() - max_len);
            }
            if ids.is_empty() {
                bail!("an episode has no tokens to score");
            }
            seqs.push(ids);
        }
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        self.head
            .scores(&self.checkpoint.model, &refs, self.batch_size)
    }
}
