//! Reading datasets. Every record keeps its file and line so errors can point at it.

pub mod parquet;
mod parquet_thrift;
pub mod preference;
pub mod prompts;
pub mod sft;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

use crate::io::BoundedLine;

/// The longest JSONL record read (one line).
pub const MAX_RECORD_BYTES: usize = 16 << 20;

/// One JSON object per non-empty line. Errors name `file:line` and what was expected.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, Value)>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    let mut reader = std::io::BufReader::new(file);
    let at = |i: usize| format!("{}:{}", path.display(), i + 1);
    for i in 0.. {
        let read = crate::io::read_line_bounded(&mut reader, MAX_RECORD_BYTES)
            .with_context(|| format!("{}: cannot read", at(i)))?;
        let bytes = match read {
            None => break,
            Some(BoundedLine::Line(bytes)) => bytes,
            Some(BoundedLine::TooLong) => bail!(
                "{}: a record over {} MB; records are limited to {} MB (split the text, or it would take far more memory once tokenized)",
                at(i),
                MAX_RECORD_BYTES >> 20,
                MAX_RECORD_BYTES >> 20
            ),
        };
        let line = String::from_utf8(bytes).map_err(|e| {
            anyhow::anyhow!(
                "{}: not UTF-8 text (byte {} of the line)",
                at(i),
                e.utf8_error().valid_up_to() + 1
            )
        })?;
        // A byte-order mark some editors put before the first line is not part of the record;
        // one further down means files were joined (`cat a.jsonl b.jsonl`).
        let line = match line.strip_prefix('\u{feff}') {
            Some(rest) if i == 0 => rest,
            Some(_) => bail!(
                "{}: starts with a byte-order mark (U+FEFF): files joined together? Remove it",
                at(i)
            ),
            None => &line,
        };
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}: expected one JSON object per line", at(i)))?;
        if !v.is_object() {
            bail!("{}: expected a JSON object, found {}", at(i), kind(&v));
        }
        out.push((i + 1, v));
    }
    if out.is_empty() {
        bail!("{}: no records (empty file)", path.display());
    }
    Ok(out)
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Records with their line (JSONL) or row (Parquet) numbers.
pub type Records = Vec<(usize, Value)>;

/// A run's training and held-out records, with the files they came from (for messages).
pub struct TrainEval {
    pub train: Records,
    pub train_origin: String,
    pub eval: Records,
    pub eval_origin: String,
}

/// `train_file`, and `eval_file` or a seeded `eval_split` fraction of the training records held
/// out (none when both are unset).
pub fn read_train_eval(
    train_file: &str,
    eval_file: &str,
    eval_split: f64,
    seed: u64,
) -> Result<TrainEval> {
    if !(0.0..1.0).contains(&eval_split) {
        bail!("eval_split must be in [0, 1), got {eval_split}");
    }
    let records = read_records(Path::new(train_file))?;
    let (train, eval, eval_origin) = if !eval_file.is_empty() {
        (records, read_records(Path::new(eval_file))?, eval_file)
    } else if eval_split > 0.0 {
        let (train, eval) = split_eval(records, eval_split, seed);
        (train, eval, train_file)
    } else {
        (records, vec![], train_file)
    };
    Ok(TrainEval {
        train,
        train_origin: train_file.to_string(),
        eval,
        eval_origin: eval_origin.to_string(),
    })
}

/// Holds out a seeded `fraction` of the records for evaluation: (train, eval).
pub fn split_eval(records: Records, fraction: f64, seed: u64) -> (Records, Records) {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let n_eval = ((records.len() as f64) * fraction).round() as usize;
    let mut idx: Vec<usize> = (0..records.len()).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed));
    let eval_set: std::collections::HashSet<usize> = idx[..n_eval].iter().copied().collect();
    let (mut train, mut eval) = (vec![], vec![]);
    for (i, r) in records.into_iter().enumerate() {
        if eval_set.contains(&i) {
            eval.push(r)
        } else {
            train.push(r)
        }
    }
    (train, eval)
}

/// Records of a JSONL or Parquet file (by extension), each with its line or row number.
pub fn read_records(path: &Path) -> Result<Vec<(usize, Value)>> {
    crate::io::require_regular_file(path)?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") | Some("json") => read_jsonl(path),
        Some("parquet") => parquet::read_parquet(path),
        _ => bail!(
            "{}: unknown data format (expected .jsonl or .parquet)",
            path.display()
        ),
    }
}
