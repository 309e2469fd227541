//! Reading datasets. Every record keeps its file and line so errors can point at it.

pub mod parquet;
pub mod preference;
pub mod prompts;
pub mod sft;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::BufRead;
use std::path::Path;

/// One JSON object per non-empty line. Errors name `file:line` and what was expected.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, Value)>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| {
            format!(
                "{}:{}: cannot read line (not UTF-8?)",
                path.display(),
                i + 1
            )
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).with_context(|| {
            format!(
                "{}:{}: expected one JSON object per line",
                path.display(),
                i + 1
            )
        })?;
        if !v.is_object() {
            bail!(
                "{}:{}: expected a JSON object, found {}",
                path.display(),
                i + 1,
                kind(&v)
            );
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

/// Records of a JSONL or Parquet file (by extension), each with its line or row number.
pub fn read_records(path: &Path) -> Result<Vec<(usize, Value)>> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") | Some("json") => read_jsonl(path),
        Some("parquet") => parquet::read_parquet(path),
        _ => bail!(
            "{}: unknown data format (expected .jsonl or .parquet)",
            path.display()
        ),
    }
}
