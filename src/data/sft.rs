//! Supervised fine-tuning data: TRL's formats turned into token ids and a loss mask.
//!
//! * `{"text"}` — language modelling on every token (an EOS is appended when missing);
//! * `{"prompt", "completion"}` — strings or message lists; loss on the completion only by default;
//! * `{"messages": [...]}` — rendered with the model's chat template; loss on assistant turns only
//!   by default.
//!
//! Token-in-token-out: the ids trained on are exactly those of the rendered text, and the masks are
//! computed on those ids (never by re-tokenising a part).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::settings::{KeyDoc, Section};
use crate::text::render_chat;
use crate::text::Tokenizer;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SftDataConfig {
    pub max_length: usize,
    pub packing: bool,
    pub completion_only_loss: bool,
    pub assistant_only_loss: bool,
}

impl Default for SftDataConfig {
    fn default() -> Self {
        SftDataConfig {
            max_length: 1024,
            packing: false,
            completion_only_loss: true,
            assistant_only_loss: true,
        }
    }
}

impl Section for SftDataConfig {
    const TITLE: &'static str = "data";
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::new(
            "max_length",
            "truncate (or pack) sequences to this many tokens",
        ),
        KeyDoc::new(
            "packing",
            "pack short examples into max_length rows (attention stays within each example)",
        ),
        KeyDoc::new(
            "completion_only_loss",
            "prompt/completion data: loss on the completion only",
        ),
        KeyDoc::new(
            "assistant_only_loss",
            "messages data: loss on assistant turns only",
        ),
    ];
}

/// One training sequence. `targets[t]` is 1 when token t is predicted in the loss (from t−1).
/// `segments[t]` numbers the packed example a token belongs to (all 1 when not packed).
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub targets: Vec<u8>,
    pub segments: Vec<u32>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct PrepStats {
    pub examples: usize,
    pub truncated: usize,
    /// Examples left with no target token after truncation (not trained on).
    pub dropped_no_targets: usize,
    pub tokens: usize,
    pub target_tokens: usize,
}

/// Byte spans of assistant replies: for each assistant message, the text its turn adds after the
/// generation prompt, with trailing whitespace (the template's separator) left out.
fn assistant_spans(tok: &Tokenizer, messages: &Value, full: &str) -> Result<Vec<(usize, usize)>> {
    let list = messages.as_array().context("\"messages\" must be a list")?;
    let mut spans = Vec::new();
    for (i, m) in list.iter().enumerate() {
        if m.get("role").and_then(Value::as_str) != Some("assistant") {
            continue;
        }
        let before = render_chat(tok, &Value::Array(list[..i].to_vec()), true)?;
        let through = render_chat(tok, &Value::Array(list[..=i].to_vec()), false)?;
        if !full.starts_with(&through) || !through.starts_with(&before) {
            bail!("the chat template does not render conversations as growing prefixes; cannot find assistant turns");
        }
        let end = through.trim_end().len().max(before.len());
        spans.push((before.len(), end));
    }
    Ok(spans)
}

fn text_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Token ids of a prompt and of its completion (strings, or message lists rendered with the chat
/// template: the completion's ids are what the full render adds after the prompt's generation
/// prompt). Strings get the tokenizer's special tokens on the prompt, and an EOS after the
/// completion when `append_eos`.
pub fn encode_prompt_completion(
    tok: &Tokenizer,
    prompt: &Value,
    completion: &Value,
    append_eos: bool,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let eos = tok.eos_token.as_deref().and_then(|e| tok.token_id(e));
    Ok(match (prompt, completion) {
        (Value::String(p), Value::String(c)) => {
            if c.is_empty() {
                bail!("empty completion");
            }
            let mut c_ids = tok.encode(c, false)?;
            if let (true, Some(e)) = (append_eos, eos) {
                if c_ids.last() != Some(&e) {
                    c_ids.push(e);
                }
            }
            (tok.encode(p, true)?, c_ids)
        }
        (Value::Array(p), Value::Array(c)) => {
            if c.is_empty() {
                bail!("empty completion (no messages)");
            }
            let all: Vec<Value> = p.iter().chain(c.iter()).cloned().collect();
            let prefix = render_chat(tok, prompt, true)?;
            let full = render_chat(tok, &Value::Array(all), false)?;
            if !full.starts_with(&prefix) {
                bail!(
                    "the chat template does not render the prompt as a prefix of the conversation"
                );
            }
            let (ids, offsets) = tok.encode_with_offsets(&full, false)?;
            let split = offsets
                .iter()
                .position(|&(s, _)| s >= prefix.len())
                .unwrap_or(ids.len());
            (ids[..split].to_vec(), ids[split..].to_vec())
        }
        _ => bail!("the prompt and its completions must all be strings or all be message lists"),
    })
}

/// Tokenises one record into ids and targets (before truncation).
fn tokenize_record(
    tok: &Tokenizer,
    rec: &Value,
    cfg: &SftDataConfig,
) -> Result<(Vec<u32>, Vec<u8>)> {
    let eos = tok.eos_token.as_deref().and_then(|e| tok.token_id(e));
    if let Some(messages) = rec.get("messages") {
        if messages.as_array().is_none_or(|a| a.is_empty()) {
            bail!("\"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects");
        }
        let text = render_chat(tok, messages, false)?;
        let (ids, offsets) = tok.encode_with_offsets(&text, false)?;
        // A token is an assistant token when it overlaps an assistant span, as transformers'
        // `return_assistant_tokens_mask` decides.
        let targets = if cfg.assistant_only_loss {
            let spans = assistant_spans(tok, messages, &text)?;
            if spans.is_empty() {
                bail!("no assistant message to learn from (set assistant_only_loss = false to train on all tokens)");
            }
            offsets
                .iter()
                .map(|&(s, e)| u8::from(e > s && spans.iter().any(|&(a, b)| e > a && s < b)))
                .collect()
        } else {
            vec![1; ids.len()]
        };
        return Ok((ids, targets));
    }
    if let (Some(prompt), Some(completion)) = (rec.get("prompt"), rec.get("completion")) {
        let (prompt_ids, completion_ids) = encode_prompt_completion(tok, prompt, completion, true)?;
        let n_prompt = prompt_ids.len();
        let ids: Vec<u32> = prompt_ids.into_iter().chain(completion_ids).collect();
        let targets = (0..ids.len())
            .map(|i| u8::from(!cfg.completion_only_loss || i >= n_prompt))
            .collect();
        return Ok((ids, targets));
    }
    if let Some(text) = text_field(rec, "text") {
        if text.is_empty() {
            bail!("empty \"text\"");
        }
        let mut ids = tok.encode(text, true)?;
        if let Some(e) = eos {
            if ids.last() != Some(&e) {
                ids.push(e);
            }
        }
        let n = ids.len();
        return Ok((ids, vec![1; n]));
    }
    let keys: Vec<&String> = rec
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    bail!("expected {{\"text\"}}, {{\"prompt\", \"completion\"}} or {{\"messages\"}}; found keys {keys:?}")
}

/// Tokenises every record (errors name `file:line`), truncates, and packs when asked.
pub fn prepare(
    records: &[(usize, Value)],
    origin: &str,
    tok: &Tokenizer,
    cfg: &SftDataConfig,
) -> Result<(Vec<Example>, PrepStats)> {
    if cfg.max_length < 2 {
        bail!("max_length must be at least 2");
    }
    let mut stats = PrepStats::default();
    let mut singles = Vec::with_capacity(records.len());
    for (line, rec) in records {
        let (mut ids, mut targets) =
            tokenize_record(tok, rec, cfg).with_context(|| format!("{origin}:{line}"))?;
        stats.examples += 1;
        if ids.len() > cfg.max_length {
            stats.truncated += 1;
            ids.truncate(cfg.max_length);
            targets.truncate(cfg.max_length);
        }
        // The first token has no context, so it is never a target.
        targets[0] = 0;
        if targets.iter().all(|&t| t == 0) {
            stats.dropped_no_targets += 1;
            continue;
        }
        stats.tokens += ids.len();
        stats.target_tokens += targets.iter().map(|&t| t as usize).sum::<usize>();
        let n = ids.len();
        singles.push(Example {
            ids,
            targets,
            segments: vec![1; n],
        });
    }
    if singles.is_empty() {
        bail!(
            "{origin}: no usable examples ({} records, {} without any target token)",
            stats.examples,
            stats.dropped_no_targets
        );
    }
    let out = if cfg.packing {
        pack(singles, cfg.max_length)
    } else {
        singles
    };
    Ok((out, stats))
}

/// Training and held-out examples of a run (held-out ones never packed), with a one-line
/// summary of what was made.
pub struct SftData {
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    pub summary: String,
}

pub fn prepare_train_eval(
    records: &super::TrainEval,
    tok: &Tokenizer,
    cfg: &SftDataConfig,
) -> Result<SftData> {
    let (train, stats) = prepare(&records.train, &records.train_origin, tok, cfg)?;
    let eval = if records.eval.is_empty() {
        vec![]
    } else {
        let unpacked = SftDataConfig {
            packing: false,
            ..cfg.clone()
        };
        prepare(&records.eval, &records.eval_origin, tok, &unpacked)?.0
    };
    let summary = format!(
        "{} examples ({} truncated to {} tokens, {} without targets skipped) → {} training rows, {} tokens ({} targets); {} eval examples",
        stats.examples,
        stats.truncated,
        cfg.max_length,
        stats.dropped_no_targets,
        train.len(),
        stats.tokens,
        stats.target_tokens,
        eval.len()
    );
    Ok(SftData {
        train,
        eval,
        summary,
    })
}

/// Pretraining text (PPO-ptx, perplexity): `{"text"}` records of a JSONL/Parquet file, or the
/// paragraphs (blank-line separated) of a `.txt` file, as language-modelling examples of at most
/// `max_length` tokens. Returns the examples and a one-line summary.
pub fn read_pretraining_text(
    path: &str,
    tok: &Tokenizer,
    max_length: usize,
) -> Result<(Vec<Example>, String)> {
    let records: Vec<(usize, Value)> = if path.ends_with(".txt") {
        crate::io::require_regular_file(std::path::Path::new(path))?;
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
        let paragraphs: Vec<&str> = text
            .split("\n\n")
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        let limit = super::MAX_RECORD_BYTES;
        if let Some(i) = paragraphs.iter().position(|p| p.len() > limit) {
            bail!(
                "{path}: paragraph {} is over {} MB; split it with blank lines",
                i + 1,
                limit >> 20
            );
        }
        paragraphs
            .into_iter()
            .enumerate()
            .map(|(i, p)| (i + 1, serde_json::json!({ "text": p })))
            .collect()
    } else {
        super::read_records(std::path::Path::new(path))?
    };
    let cfg = SftDataConfig {
        max_length,
        ..Default::default()
    };
    let (examples, stats) = prepare(&records, path, tok, &cfg)?;
    let summary = format!(
        "{} examples ({} truncated to {max_length} tokens), {} tokens",
        stats.examples, stats.truncated, stats.tokens
    );
    Ok((examples, summary))
}

/// Greedy packing in data order: examples fill rows of up to `max_length` tokens, each keeping its
/// own segment number so that attention and positions stay within it.
pub fn pack(examples: Vec<Example>, max_length: usize) -> Vec<Example> {
    let mut rows: Vec<Example> = Vec::new();
    let mut cur = Example {
        ids: vec![],
        targets: vec![],
        segments: vec![],
    };
    let mut seg = 0u32;
    for ex in examples {
        if !cur.ids.is_empty() && cur.ids.len() + ex.ids.len() > max_length {
            rows.push(std::mem::replace(
                &mut cur,
                Example {
                    ids: vec![],
                    targets: vec![],
                    segments: vec![],
                },
            ));
            seg = 0;
        }
        seg += 1;
        cur.segments.extend(std::iter::repeat_n(seg, ex.ids.len()));
        cur.ids.extend(ex.ids);
        cur.targets.extend(ex.targets);
    }
    if !cur.ids.is_empty() {
        rows.push(cur);
    }
    rows
}
