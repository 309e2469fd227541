//! Preference data: pairs and K-way rankings, in TRL's formats.
//!
//! * `{"prompt", "chosen", "rejected"}` (+ optional `"margin"`) — strings or message lists;
//! * `{"chosen", "rejected"}` as two conversations that share their first messages (TRL's
//!   "implicit prompt");
//! * `{"prompt", "completions": [...], "ranking": [...]}` — `ranking` lists completion indices,
//!   best first, each completion exactly once.
//!
//! Every record becomes one `Comparison`: the prompt's ids and its completions' ids in rank order
//! (best first). A pair is the K = 2 case.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::sft::encode_prompt_completion;
use crate::settings::{KeyDoc, Section};
use crate::text::Tokenizer;

#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// Line (JSONL) or row (Parquet) of the record, for messages.
    pub line: usize,
    pub prompt: Vec<u32>,
    /// Completion ids, best first.
    pub completions: Vec<Vec<u32>>,
    /// m in log σ(r_w − r_l − m); 0 unless the record gives one.
    pub margin: f32,
}

impl Comparison {
    /// prompt + completion k, one sequence.
    pub fn sequence(&self, k: usize) -> Vec<u32> {
        let mut s = self.prompt.clone();
        s.extend_from_slice(&self.completions[k]);
        s
    }

    /// prompt + completion for every completion of every comparison, in order.
    pub fn sequences_of(group: &[&Comparison]) -> Vec<Vec<u32>> {
        group
            .iter()
            .flat_map(|c| (0..c.completions.len()).map(|k| c.sequence(k)))
            .collect()
    }

    /// The prompt's and then each completion's token ids (what a run's fingerprint covers).
    pub fn token_lists(&self) -> impl Iterator<Item = &[u32]> {
        std::iter::once(self.prompt.as_slice()).chain(self.completions.iter().map(Vec::as_slice))
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PreferenceDataConfig {
    pub max_length: usize,
    pub max_prompt_length: usize,
}

impl Default for PreferenceDataConfig {
    fn default() -> Self {
        PreferenceDataConfig {
            max_length: 1024,
            max_prompt_length: 512,
        }
    }
}

impl Section for PreferenceDataConfig {
    const TITLE: &'static str = "data";
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::new(
            "max_length",
            "prompt + completion tokens kept (completions are cut at the end)",
        ),
        KeyDoc::new(
            "max_prompt_length",
            "prompt tokens kept (the prompt's start is cut, its end kept)",
        ),
    ];
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct PreferenceStats {
    pub records: usize,
    /// Records skipped because their completions were identical (after truncation).
    pub skipped_identical: usize,
    pub truncated_prompts: usize,
    pub truncated_completions: usize,
    pub comparisons: usize,
    /// Σ C(K, 2) over the kept records.
    pub pairs: usize,
}

impl PreferenceStats {
    pub fn summary(&self) -> String {
        format!(
            "{} records → {} comparisons ({} pairs); {} skipped (identical completions); {} prompts and {} completions truncated",
            self.records,
            self.comparisons,
            self.pairs,
            self.skipped_identical,
            self.truncated_prompts,
            self.truncated_completions
        )
    }
}

/// What a record says, before tokenisation: prompt, completions best first, margin.
fn parse_record(rec: &Value) -> Result<(Value, Vec<Value>, f32)> {
    let margin = match rec.get("margin") {
        None | Some(Value::Null) => 0.0,
        Some(v) => v
            .as_f64()
            .filter(|m| m.is_finite())
            .context("\"margin\" must be a finite number")? as f32,
    };
    if let Some(completions) = rec.get("completions") {
        let prompt = rec
            .get("prompt")
            .context("a rankings record needs a \"prompt\"")?
            .clone();
        let completions = completions
            .as_array()
            .context("\"completions\" must be a list")?;
        let ranking = rec.get("ranking").and_then(Value::as_array).context(
            "a rankings record needs \"ranking\": a list of completion indices, best first",
        )?;
        let k = completions.len();
        if k < 2 {
            bail!("a ranking needs at least 2 completions, found {k}");
        }
        if ranking.len() != k {
            bail!(
                "\"ranking\" has {} entries for {k} completions; it must list every completion once",
                ranking.len()
            );
        }
        let mut seen = vec![false; k];
        let mut ordered = Vec::with_capacity(k);
        for r in ranking {
            let i = r
                .as_u64()
                .with_context(|| format!("\"ranking\" entry {r} is not a completion index"))?
                as usize;
            if i >= k {
                bail!("\"ranking\" entry {i} is out of range (there are {k} completions, indexed from 0)");
            }
            if seen[i] {
                bail!("\"ranking\" lists completion {i} twice");
            }
            seen[i] = true;
            ordered.push(completions[i].clone());
        }
        return Ok((prompt, ordered, margin));
    }
    let (Some(chosen), Some(rejected)) = (rec.get("chosen"), rec.get("rejected")) else {
        let keys: Vec<&String> = rec
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        bail!("expected {{\"prompt\", \"chosen\", \"rejected\"}} or {{\"prompt\", \"completions\", \"ranking\"}}; found keys {keys:?}");
    };
    if let Some(prompt) = rec.get("prompt") {
        return Ok((
            prompt.clone(),
            vec![chosen.clone(), rejected.clone()],
            margin,
        ));
    }
    // Implicit prompt: the messages both conversations share.
    let (Some(c), Some(r)) = (chosen.as_array(), rejected.as_array()) else {
        bail!("without a \"prompt\", \"chosen\" and \"rejected\" must be conversations (message lists)");
    };
    let shared = c.iter().zip(r).take_while(|(a, b)| a == b).count();
    if shared == 0 || shared == c.len() || shared == r.len() {
        bail!("without a \"prompt\", \"chosen\" and \"rejected\" must share their first messages and then differ");
    }
    Ok((
        Value::Array(c[..shared].to_vec()),
        vec![
            Value::Array(c[shared..].to_vec()),
            Value::Array(r[shared..].to_vec()),
        ],
        margin,
    ))
}

/// What the comparisons are for, which decides how they are tokenised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComparisonsFor {
    /// A reward model reads its score at the last text token: no EOS; a prompt may be empty.
    RewardModel,
    /// DPO scores each completion given its prompt, to the end of the text: string completions
    /// end with EOS, and the prompt needs at least one token.
    Dpo,
}

/// Tokenises every record for `use_` (errors name `file:line`).
pub fn prepare_comparisons(
    records: &[(usize, Value)],
    origin: &str,
    tok: &Tokenizer,
    cfg: &PreferenceDataConfig,
    use_: ComparisonsFor,
) -> Result<(Vec<Comparison>, PreferenceStats)> {
    let append_eos = use_ == ComparisonsFor::Dpo;
    if records.is_empty() {
        bail!("{origin}: no records");
    }
    let mut stats = PreferenceStats::default();
    let mut out = Vec::with_capacity(records.len());
    for (line, rec) in records {
        stats.records += 1;
        let at = || format!("{origin}:{line}");
        let (prompt, completions, margin) = parse_record(rec).with_context(at)?;
        let mut prompt_ids: Option<Vec<u32>> = None;
        let mut comp_ids = Vec::with_capacity(completions.len());
        for (k, c) in completions.iter().enumerate() {
            let (p, mut c_ids) = encode_prompt_completion(tok, &prompt, c, append_eos)
                .with_context(|| format!("{}: completion {k}", at()))?;
            if c_ids.is_empty() {
                bail!("{}: completion {k} has no tokens", at());
            }
            let p = match &prompt_ids {
                None => {
                    let mut p = p;
                    if p.len() > cfg.max_prompt_length {
                        stats.truncated_prompts += 1;
                        p.drain(..p.len() - cfg.max_prompt_length);
                    }
                    prompt_ids = Some(p);
                    prompt_ids.as_ref().unwrap()
                }
                Some(p) => p,
            };
            if p.is_empty() && use_ == ComparisonsFor::Dpo {
                bail!(
                    "{}: the prompt has no tokens; DPO scores each completion given its prompt",
                    at()
                );
            }
            let room = cfg.max_length.saturating_sub(p.len());
            if room == 0 {
                bail!(
                    "{}: the prompt fills max_length ({} tokens); raise max_length or lower max_prompt_length",
                    at(),
                    cfg.max_length
                );
            }
            if c_ids.len() > room {
                stats.truncated_completions += 1;
                c_ids.truncate(room);
            }
            comp_ids.push(c_ids);
        }
        let identical = (0..comp_ids.len())
            .any(|i| (i + 1..comp_ids.len()).any(|j| comp_ids[i] == comp_ids[j]));
        if identical {
            stats.skipped_identical += 1;
            continue;
        }
        stats.comparisons += 1;
        stats.pairs += comp_ids.len() * (comp_ids.len() - 1) / 2;
        out.push(Comparison {
            line: *line,
            prompt: prompt_ids.unwrap_or_default(),
            completions: comp_ids,
            margin,
        });
    }
    if out.is_empty() {
        bail!(
            "{origin}: no usable comparisons ({} records, all with identical completions)",
            stats.records
        );
    }
    Ok((out, stats))
}

/// Training and held-out comparisons of a run, tokenised for `use_`; prints what was made.
pub fn prepare_train_eval(
    records: &super::TrainEval,
    tok: &Tokenizer,
    cfg: &PreferenceDataConfig,
    use_: ComparisonsFor,
) -> Result<(Vec<Comparison>, Vec<Comparison>)> {
    let (train, stats) =
        prepare_comparisons(&records.train, &records.train_origin, tok, cfg, use_)?;
    eprintln!("train data: {}", stats.summary());
    if records.eval.is_empty() {
        return Ok((train, vec![]));
    }
    let (eval, s) = prepare_comparisons(&records.eval, &records.eval_origin, tok, cfg, use_)?;
    eprintln!("eval data: {}", s.summary());
    Ok((train, eval))
}

impl PreferenceDataConfig {
    /// Lowers the lengths to a model's position limit (the prompt keeps at most half of it).
    pub fn fit_positions(&mut self, limit: Option<usize>) {
        if let Some(limit) = limit.filter(|&l| self.max_length > l) {
            self.max_length = limit;
            self.max_prompt_length = self.max_prompt_length.min(limit / 2);
        }
    }
}

/// Reference completions `{"prompt", "completion"}` (a reward model's normalisation set) as
/// prompt + completion ids, cut to `max_length`.
pub fn read_reference_completions(
    path: &str,
    tok: &Tokenizer,
    max_length: usize,
) -> Result<Vec<Vec<u32>>> {
    let records = super::read_records(std::path::Path::new(path))?;
    let mut out = Vec::with_capacity(records.len());
    for (line, rec) in &records {
        let (Some(p), Some(c)) = (rec.get("prompt"), rec.get("completion")) else {
            bail!("{path}:{line}: expected {{\"prompt\", \"completion\"}}");
        };
        let (mut ids, c_ids) = encode_prompt_completion(tok, p, c, false)
            .map_err(|e| anyhow::anyhow!("{path}:{line}: {e:#}"))?;
        ids.extend(c_ids);
        ids.truncate(max_length);
        out.push(ids);
    }
    Ok(out)
}

/// Splits each K-way comparison into its C(K, 2) pairs (the "shuffled pairs" baseline that
/// InstructGPT found to overfit).
pub fn expand_to_pairs(comparisons: &[Comparison]) -> Vec<Comparison> {
    let mut out = Vec::new();
    for c in comparisons {
        for i in 0..c.completions.len() {
            for j in i + 1..c.completions.len() {
                out.push(Comparison {
                    line: c.line,
                    prompt: c.prompt.clone(),
                    completions: vec![c.completions[i].clone(), c.completions[j].clone()],
                    margin: c.margin,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::parse_record;
    use serde_json::json;

    #[test]
    fn rankings_are_reordered_best_first_and_checked() {
        let (_, c, _) = parse_record(
            &json!({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 0, 1]}),
        )
        .unwrap();
        assert_eq!(c, vec![json!("c"), json!("a"), json!("b")]);
        let err = |v| format!("{:#}", parse_record(&v).unwrap_err());
        assert!(
            err(json!({"prompt": "p", "completions": ["a", "b"], "ranking": [0, 0]}))
                .contains("twice")
        );
        assert!(
            err(json!({"prompt": "p", "completions": ["a", "b"], "ranking": [0, 2]}))
                .contains("out of range")
        );
        assert!(
            err(json!({"prompt": "p", "completions": ["a"], "ranking": [0]}))
                .contains("at least 2")
        );
        assert!(
            err(json!({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 1]}))
                .contains("every completion once")
        );
        assert!(err(json!({"prompt": "p", "chosen": "a"})).contains("expected"));
    }

    #[test]
    fn implicit_prompt_is_the_shared_conversation_start() {
        let u = json!({"role": "user", "content": "hi"});
        let a = json!({"role": "assistant", "content": "hello"});
        let b = json!({"role": "assistant", "content": "go away"});
        let (p, c, m) =
            parse_record(&json!({"chosen": [u.clone(), a.clone()], "rejected": [u.clone(), b.clone()], "margin": 0.5}))
                .unwrap();
        assert_eq!(p, json!([u]));
        assert_eq!(c, vec![json!([a]), json!([b])]);
        assert_eq!(m, 0.5);
    }
}
