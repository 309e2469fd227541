//! Run configuration: a TOML file plus `--set key=value` overrides, checked against the keys each
//! part of a command declares. Unknown keys are errors (with a suggestion), never ignored.

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use std::path::Path;
use toml::{Table, Value};

/// One documented configuration key: name, default (as TOML), and what it does.
pub struct KeyDoc {
    pub key: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// Reads the config file (if any) and applies `key=value` overrides. Values are TOML literals
/// (`lr=1e-5`, `packing=true`, `name="x"`); anything that does not parse as one is a string.
pub fn load_table(path: Option<&Path>, sets: &[String]) -> Result<Table> {
    let mut table = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            text.parse::<Table>()
                .map_err(|e| anyhow::anyhow!("{}: invalid TOML: {}", p.display(), e.message()))?
        }
        None => Table::new(),
    };
    for s in sets {
        let Some((key, raw)) = s.split_once('=') else {
            bail!("--set {s:?}: expected key=value");
        };
        let key = key.trim();
        let value = format!("v = {raw}")
            .parse::<Table>()
            .ok()
            .and_then(|t| t.get("v").cloned())
            .unwrap_or_else(|| Value::String(raw.to_string()));
        table.insert(key.to_string(), value);
    }
    Ok(table)
}

/// Errors on keys that none of `known` declares, suggesting the closest known key.
pub fn check_keys(table: &Table, known: &[&[KeyDoc]], origin: &str) -> Result<()> {
    let all: Vec<&str> = known.iter().flat_map(|k| k.iter().map(|d| d.key)).collect();
    for key in table.keys() {
        if !all.contains(&key.as_str()) {
            let hint = all
                .iter()
                .min_by_key(|k| edit_distance(k, key))
                .filter(|k| edit_distance(k, key) <= 3)
                .map(|k| format!("; did you mean `{k}`?"))
                .unwrap_or_default();
            bail!("{origin}: unknown configuration key `{key}`{hint} (see --help for the keys)");
        }
    }
    Ok(())
}

/// Deserialises the keys of `docs` from the table into a config struct (missing keys → defaults).
pub fn extract<T: DeserializeOwned>(table: &Table, docs: &[KeyDoc], origin: &str) -> Result<T> {
    let mut sub = Table::new();
    for d in docs {
        if let Some(v) = table.get(d.key) {
            sub.insert(d.key.to_string(), v.clone());
        }
    }
    T::deserialize(Value::Table(sub.clone())).map_err(|e| {
        // Name the offending key: find the first one that fails on its own.
        let culprit = sub.iter().find(|(k, v)| {
            let mut one = Table::new();
            one.insert(k.to_string(), (*v).clone());
            T::deserialize(Value::Table(one)).is_err()
        });
        match culprit {
            Some((k, v)) => anyhow::anyhow!("{origin}: `{k} = {v}`: {}", e.to_string().trim()),
            None => anyhow::anyhow!("{origin}: {}", e.to_string().trim()),
        }
    })
}

/// The key table shown by `--help`.
pub fn describe(sections: &[(&str, &[KeyDoc])]) -> String {
    let mut out = String::from("Configuration keys (in --config TOML, or --set key=value):\n");
    for (title, docs) in sections {
        out.push_str(&format!("\n{title}:\n"));
        for d in *docs {
            out.push_str(&format!("  {:<28} {:<14} {}\n", d.key, d.default, d.help));
        }
    }
    out
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
