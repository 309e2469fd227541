//! Reward sources behind one interface: a learned reward model, or a built-in scorer for
//! experiments without one (VADER sentiment, simple rules for tests).

pub mod funcs;
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
    /// The prompt record's other columns (e.g. `answer`), when the prompts came with some.
    pub columns: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

pub trait RewardSource {
    /// Shown in logs and reports.
    fn describe(&self) -> String;
    fn score(&mut self, episodes: &[Episode]) -> Result<Vec<f32>>;
    /// For a sum of reward functions: each one's name and mean over the last scored batch.
    fn components(&self) -> Vec<(String, f64)> {
        Vec::new()
    }
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

/// Whether `spec` names a built-in scorer (`vader`, `rule:…`, or one of `from_funcs`' functions)
/// rather than a reward model.
pub fn is_builtin(spec: &str) -> bool {
    matches!(spec, "vader" | "accuracy" | "think_format")
        || ["rule:", "accuracy:", "format:", "soft_overlong:", "exec:"]
            .iter()
            .any(|p| spec.starts_with(p))
}

/// `reward_funcs` with `reward_weights` (empty: 1 each), one source: the built-in functions
/// `accuracy[:<column>]`, `think_format`, `format:<regex>`, `soft_overlong:<max>:<cache>`,
/// `exec:<command>`, and
/// everything `from_spec` takes.
pub fn from_funcs(
    specs: &[String],
    weights: &[f64],
    policy_tokenizer: &Tokenizer,
    batch_size: usize,
    exec_timeout: std::time::Duration,
) -> Result<Box<dyn RewardSource>> {
    use funcs::{ExecReward, FormatReward, SoftOverlong};
    if !weights.is_empty() && weights.len() != specs.len() {
        anyhow::bail!(
            "reward_weights has {} entries for {} reward_funcs",
            weights.len(),
            specs.len()
        );
    }
    let mut parts: Vec<(String, Box<dyn RewardSource>, f64)> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let (name, source): (String, Box<dyn RewardSource>) = if spec == "think_format" {
            (spec.clone(), Box::new(FormatReward::think_answer()))
        } else if spec == "accuracy" || spec.starts_with("accuracy:") {
            let column = spec.strip_prefix("accuracy:").unwrap_or("answer");
            ("accuracy".into(), Box::new(funcs::Accuracy::new(column)))
        } else if let Some(p) = spec.strip_prefix("format:") {
            ("format".into(), Box::new(FormatReward::new(spec, p)?))
        } else if let Some(rest) = spec.strip_prefix("soft_overlong:") {
            let parse = |s: Option<&str>| s.and_then(|x| x.parse::<usize>().ok());
            let mut it = rest.split(':');
            let (Some(max_len), Some(cache)) = (parse(it.next()), parse(it.next())) else {
                anyhow::bail!(
                    "reward `{spec}`: expected soft_overlong:<max tokens>:<cache tokens>"
                );
            };
            (
                "soft_overlong".into(),
                Box::new(SoftOverlong { max_len, cache }),
            )
        } else if let Some(cmd) = spec.strip_prefix("exec:") {
            ("exec".into(), Box::new(ExecReward::new(cmd, exec_timeout)))
        } else {
            let name = if spec == "vader" || spec.starts_with("rule:") {
                spec.split(':').next().unwrap_or(spec).to_string()
            } else {
                std::path::Path::new(spec)
                    .file_name()
                    .map_or(spec.clone(), |n| n.to_string_lossy().to_string())
            };
            (name, from_spec(spec, policy_tokenizer, batch_size)?)
        };
        // Names are metric keys: the second of two alike gets its position.
        let name = if parts.iter().any(|(n, _, _)| *n == name) {
            format!("{name}_{i}")
        } else {
            name
        };
        parts.push((name, source, weights.get(i).copied().unwrap_or(1.0)));
    }
    Ok(Box::new(funcs::Weighted::new(parts)?))
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
