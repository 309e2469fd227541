//! Reward sources behind one interface: a learned reward model, or a built-in scorer for
//! experiments without one (VADER sentiment, simple rules for tests).

mod learned;
mod rule;

pub use learned::LearnedReward;
pub use rule::RuleReward;

use anyhow::Result;

use crate::text::Tokenizer;

/// One sampled episode as the reward source sees it: the policy's token ids (the response without
/// a trailing stop token) and their text.
pub struct Episode<'a> {
    pub prompt_ids: &'a [u32],
    pub response_ids: &'a [u32],
    pub prompt_text: &'a str,
    pub response_text: &'a str,
}

pub trait RewardSource {
    /// Shown in logs and reports.
    fn describe(&self) -> String;
    fn score(&mut self, episodes: &[Episode]) -> Result<Vec<f32>>;
}

/// VADER's compound sentiment of the response, in [−1, 1] (Hutto & Gilbert, 2014; the
/// `vader-parity` crate reproduces vaderSentiment 3.3.2 exactly).
pub struct VaderReward {
    analyzer: vader_parity::SentimentIntensityAnalyzer,
}

impl VaderReward {
    pub fn new() -> Self {
        VaderReward {
            analyzer: vader_parity::SentimentIntensityAnalyzer::new(),
        }
    }

    pub fn compound(&self, text: &str) -> f32 {
        self.analyzer.polarity_scores(text).compound as f32
    }
}

impl Default for VaderReward {
    fn default() -> Self {
        Self::new()
    }
}

impl RewardSource for VaderReward {
    fn describe(&self) -> String {
        "vader (compound sentiment of the response)".into()
    }

    fn score(&mut self, episodes: &[Episode]) -> Result<Vec<f32>> {
        Ok(episodes
            .iter()
            .map(|e| self.compound(e.response_text))
            .collect())
    }
}

/// Whether `spec` names a built-in scorer (`vader`, `rule:…`) rather than a reward model.
pub fn is_builtin(spec: &str) -> bool {
    spec == "vader" || spec.starts_with("rule:")
}

/// `vader`, `rule:…` (see `RuleReward`), or a reward-model directory.
pub fn from_spec(
    spec: &str,
    policy_tokenizer: &Tokenizer,
    batch_size: usize,
) -> Result<Box<dyn RewardSource>> {
    if spec == "vader" {
        return Ok(Box::new(VaderReward::new()));
    }
    if let Some(rule) = spec.strip_prefix("rule:") {
        return Ok(Box::new(RuleReward::parse(rule)?));
    }
    Ok(Box::new(LearnedReward::load(
        spec,
        policy_tokenizer,
        batch_size,
    )?))
}
