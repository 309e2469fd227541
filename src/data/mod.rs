//! Reading datasets. Every record keeps its file and line so errors can point at it.

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
