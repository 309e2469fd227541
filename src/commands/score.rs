//! `rlhf score`: a reward model's scores for a file of texts, as JSONL.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use crate::checkpoint::Checkpoint;
use crate::data::sft::encode_prompt_completion;
use crate::model::scalar_head::ScalarHead;
use crate::text::render_chat;
use crate::text::Tokenizer;

#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    /// Reward model: a directory written by `rlhf rm` or any transformers
    /// `*ForSequenceClassification` with one label.
    #[arg(long)]
    pub model: String,
    /// Records {"prompt", "completion"}, {"messages"} or {"text"} (.jsonl or .parquet).
    #[arg(long)]
    pub data: PathBuf,
    /// Write the scores here (one {"score"} object per record, in input order) instead of stdout.
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Longer inputs are cut at the end (and counted).
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
}

fn record_ids(tok: &Tokenizer, rec: &Value) -> Result<Vec<u32>> {
    if let (Some(p), Some(c)) = (rec.get("prompt"), rec.get("completion")) {
        let (mut ids, c_ids) = encode_prompt_completion(tok, p, c, false)?;
        ids.extend(c_ids);
        return Ok(ids);
    }
    if let Some(m) = rec.get("messages") {
        return tok.encode(&render_chat(tok, m, false)?, false);
    }
    if let Some(t) = rec.get("text").and_then(Value::as_str) {
        if t.is_empty() {
            bail!("empty \"text\"");
        }
        return tok.encode(t, true);
    }
    bail!("expected {{\"prompt\", \"completion\"}}, {{\"messages\"}} or {{\"text\"}}")
}

pub fn run(args: &ScoreArgs) -> Result<()> {
    if let Some(out) = &args.output {
        if out.exists() {
            bail!("{} already exists; not overwriting it", out.display());
        }
    }
    let records = crate::data::read_records(&args.data)?;
    let mut ck = Checkpoint::load(&args.model, false)?;
    if ck.model.score_head.is_none() {
        bail!(
            "{}: not a reward model (no score.weight); train one with `rlhf rm`",
            ck.source.display()
        );
    }
    let head = ScalarHead::from_model(&mut ck.model, 0)?;
    let tok = ck.tokenizer()?;
    let max_len = args.max_length.min(ck.model.config.max_position_embeddings);
    let mut truncated = 0;
    let mut seqs = Vec::with_capacity(records.len());
    for (line, rec) in &records {
        let mut ids =
            record_ids(tok, rec).with_context(|| format!("{}:{line}", args.data.display()))?;
        if ids.is_empty() {
            bail!("{}:{line}: no tokens to score", args.data.display());
        }
        if ids.len() > max_len {
            ids.truncate(max_len);
            truncated += 1;
        }
        seqs.push(ids);
    }
    // Similar lengths share a batch, so little is spent on padding.
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].len());
    let sorted: Vec<&[u32]> = order.iter().map(|&i| seqs[i].as_slice()).collect();
    let t = Instant::now();
    let sorted_scores = head.scores(&ck.model, &sorted, args.batch_size)?;
    let mut scores = vec![0f32; seqs.len()];
    for (k, &i) in order.iter().enumerate() {
        scores[i] = sorted_scores[k];
    }
    let mut text = String::new();
    for s in &scores {
        text.push_str(&json!({ "score": s }).to_string());
        text.push('\n');
    }
    match &args.output {
        Some(path) => crate::io::write_atomic(path, text.as_bytes())?,
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    eprintln!(
        "scored {} records in {:.1}s ({} truncated to {max_len} tokens)",
        scores.len(),
        t.elapsed().as_secs_f64(),
        truncated
    );
    Ok(())
}
