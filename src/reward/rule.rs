//! Rule-based rewards for toy tasks and tests.

use anyhow::{bail, Context, Result};

use super::{Episode, RewardSource};

pub enum RuleReward {
    /// `contains:WORD`: occurrences of WORD in the response (case-insensitive), per word of the
    /// response.
    Contains(String),
    /// `ids:LO-HI`: the share of response tokens whose id is in [LO, HI).
    IdRange(u32, u32),
}

impl RuleReward {
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some(w) = spec.strip_prefix("contains:") {
            if w.is_empty() {
                bail!("rule `contains:` needs a word");
            }
            return Ok(RuleReward::Contains(w.to_lowercase()));
        }
        if let Some(r) = spec.strip_prefix("ids:") {
            let (lo, hi) = r
                .split_once('-')
                .context("rule `ids:LO-HI` needs a range")?;
            let lo: u32 = lo
                .trim()
                .parse()
                .context("rule `ids:LO-HI`: LO is not a number")?;
            let hi: u32 = hi
                .trim()
                .parse()
                .context("rule `ids:LO-HI`: HI is not a number")?;
            if lo >= hi {
                bail!("rule `ids:{r}`: LO must be below HI");
            }
            return Ok(RuleReward::IdRange(lo, hi));
        }
        bail!("unknown rule `{spec}`; expected `contains:WORD` or `ids:LO-HI`")
    }

    fn one(&self, e: &Episode) -> f32 {
        match self {
            RuleReward::Contains(w) => {
                let words = e.response_text.split_whitespace().count().max(1);
                e.response_text.to_lowercase().matches(w.as_str()).count() as f32 / words as f32
            }
            RuleReward::IdRange(lo, hi) => {
                let n = e.response_ids.len().max(1);
                e.response_ids
                    .iter()
                    .filter(|&&t| (*lo..*hi).contains(&t))
                    .count() as f32
                    / n as f32
            }
        }
    }
}

impl RewardSource for RuleReward {
    fn describe(&self) -> String {
        match self {
            RuleReward::Contains(w) => format!("rule: occurrences of {w:?} per response word"),
            RuleReward::IdRange(lo, hi) => format!("rule: share of response ids in [{lo}, {hi})"),
        }
    }

    fn score(&mut self, episodes: &[Episode]) -> Result<Vec<f32>> {
        Ok(episodes.iter().map(|e| self.one(e)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep<'a>(ids: &'a [u32], text: &'a str) -> Episode<'a> {
        Episode {
            columns: None,
            prompt_ids: &[],
            response_ids: ids,
            prompt_text: "",
            response_text: text,
        }
    }

    #[test]
    fn rules_score_what_they_say() {
        let mut r = RuleReward::parse("ids:10-20").unwrap();
        assert_eq!(r.score(&[ep(&[10, 19, 20, 5], "")]).unwrap(), vec![0.5]);
        let mut r = RuleReward::parse("contains:Good").unwrap();
        assert_eq!(
            r.score(&[ep(&[], "good, GOOD and bad")]).unwrap(),
            vec![0.5]
        );
        assert!(RuleReward::parse("ids:5-5").is_err());
        assert!(RuleReward::parse("nope").is_err());
    }
}
