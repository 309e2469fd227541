//! Prompt sets for sampling (PPO and GRPO rollouts, evaluation): `{"prompt": text or messages}`,
//! with any other columns (e.g. a verifiable task's `answer`) kept for the reward functions.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

use crate::text::render_chat;
use crate::text::Tokenizer;

/// A prompt as token ids and as text (what text-based reward sources see), and the record's
/// other columns.
pub struct Prompt {
    pub ids: Vec<u32>,
    pub text: String,
    pub columns: serde_json::Map<String, Value>,
}

/// Prompt ids and text; long prompts keep their end. Returns the prompts and how many were cut.
pub fn read_prompts(
    path: &str,
    tok: &Tokenizer,
    chat: bool,
    max_len: usize,
) -> Result<(Vec<Prompt>, usize)> {
    let records = crate::data::read_records(Path::new(path))?;
    if records.is_empty() {
        bail!("{path}: no prompts");
    }
    let mut out = Vec::with_capacity(records.len());
    let mut truncated = 0;
    for (line, rec) in &records {
        let at = || format!("{path}:{line}");
        let p = rec
            .get("prompt")
            .with_context(|| format!("{}: expected {{\"prompt\": text or messages}}", at()))?;
        let (text, mut ids) = match p {
            Value::String(s) if chat => {
                let text = render_chat(tok, &json!([{"role": "user", "content": s}]), true)
                    .with_context(at)?;
                let ids = tok.encode(&text, false)?;
                (text, ids)
            }
            Value::String(s) => (s.clone(), tok.encode(s, true)?),
            Value::Array(_) => {
                let text = render_chat(tok, p, true).with_context(at)?;
                let ids = tok.encode(&text, false)?;
                (text, ids)
            }
            _ => bail!("{}: \"prompt\" must be a string or a message list", at()),
        };
        if ids.is_empty() {
            bail!("{}: empty prompt", at());
        }
        if ids.len() > max_len {
            ids.drain(..ids.len() - max_len);
            truncated += 1;
        }
        let mut columns = rec.as_object().cloned().unwrap_or_default();
        columns.remove("prompt");
        out.push(Prompt { ids, text, columns });
    }
    Ok((out, truncated))
}
