//! Run settings: a TOML file plus `--set key=value` overrides, split into typed sections. Each
//! section is a struct whose `Default` is the one place its defaults are written; `--help` shows
//! them from there. Unknown keys are errors (with a suggestion), never ignored.

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;
use toml::{Table, Value};

/// One documented key of a section.
pub struct KeyDoc {
    pub key: &'static str,
    pub help: &'static str,
    /// Shown instead of the default value (e.g. "first policy").
    pub shown_default: Option<&'static str>,
    /// Must be given (a non-empty value).
    pub required: bool,
    /// A file or directory path: a leading `~/` becomes `$HOME/`.
    pub path: bool,
}

impl KeyDoc {
    /// A key whose default is the section struct's.
    pub const fn new(key: &'static str, help: &'static str) -> Self {
        KeyDoc {
            key,
            help,
            shown_default: None,
            required: false,
            path: false,
        }
    }

    /// A key that must be given.
    pub const fn required(key: &'static str, help: &'static str) -> Self {
        let mut k = Self::shown(key, "(required)", help);
        k.required = true;
        k
    }

    /// A key whose empty default means something said in words.
    pub const fn shown(key: &'static str, shown: &'static str, help: &'static str) -> Self {
        let mut k = Self::new(key, help);
        k.shown_default = Some(shown);
        k
    }

    /// The key names a path (`~/` is expanded).
    pub const fn path(mut self) -> Self {
        self.path = true;
        self
    }
}

/// A group of settings read from the run's table: the struct's fields are its keys.
pub trait Section: Default + Serialize + DeserializeOwned {
    /// The heading of the group in `--help`.
    const TITLE: &'static str;
    const KEYS: &'static [KeyDoc];
}

/// The settings of one run and where they came from (for messages).
pub struct Settings {
    table: Table,
    origin: String,
}

impl Settings {
    /// Reads the config file (if any) and applies `key=value` overrides, refusing keys that none
    /// of `known` declares.
    pub fn load(path: Option<&Path>, sets: &[String], known: &[&[KeyDoc]]) -> Result<Self> {
        let origin = path.map_or("--set".to_string(), |p| p.display().to_string());
        let table = load_table(path, sets)?;
        check_keys(&table, known, &origin)?;
        Ok(Settings { table, origin })
    }

    /// The config file's path, or "--set": what messages about the settings name.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Whether the run's settings give `key` (rather than leaving it at its default).
    pub fn is_given(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// The keys of section `T` (missing keys take the struct's defaults), with `~/` expanded in
    /// paths and required keys checked.
    pub fn section<T: Section>(&self) -> Result<T> {
        let mut table = self.table.clone();
        // Defaults may name paths under `~/` too (e.g. ref_cache_dir): expand those as well.
        let defaults = Value::try_from(T::default()).ok();
        for d in T::KEYS {
            if d.path {
                if !table.contains_key(d.key) {
                    if let Some(v) = defaults.as_ref().and_then(|t| t.get(d.key)) {
                        if v.as_str().is_some_and(|s| s.starts_with("~/")) {
                            table.insert(d.key.to_string(), v.clone());
                        }
                    }
                }
                if let Some(v) = table.get_mut(d.key) {
                    expand_tilde_in(v);
                }
            }
            let given = match table.get(d.key) {
                Some(Value::String(s)) => !s.trim().is_empty(),
                Some(Value::Array(a)) => !a.is_empty(),
                Some(_) => true,
                None => false,
            };
            if d.required && !given {
                bail!("{}: `{}` is required ({})", self.origin, d.key, d.help);
            }
        }
        extract(&table, T::KEYS, &self.origin)
    }
}

fn expand_tilde_in(v: &mut Value) {
    match v {
        Value::String(s) => *s = crate::io::expand_tilde(s),
        Value::Array(items) => items.iter_mut().for_each(expand_tilde_in),
        _ => {}
    }
}

/// Reads the config file (if any) and applies `key=value` overrides. Values are TOML literals
/// (`lr=1e-5`, `packing=true`, `name="x"`); a value that is not one is taken as a bare string
/// (`model=~/sft-out`), unless it starts like a TOML string, array or table: then it is an error,
/// so that a mistyped quote never becomes part of a path.
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
        if key.is_empty() {
            bail!("--set {s:?}: the key is empty");
        }
        table.insert(key.to_string(), parse_value(key, raw)?);
    }
    Ok(table)
}

/// One `--set` value: a TOML literal, or a bare string.
fn parse_value(key: &str, raw: &str) -> Result<Value> {
    match format!("v = {raw}").parse::<Table>() {
        Ok(mut t) => Ok(t.remove("v").unwrap_or(Value::String(raw.to_string()))),
        Err(e) if raw.trim_start().starts_with(['"', '\'', '[', '{']) => bail!(
            "--set {key}={raw}: not a valid TOML value ({}); write strings with backslashes in single quotes, e.g. {key}='C:\\dir'",
            e.message().trim()
        ),
        Err(_) => Ok(Value::String(raw.to_string())),
    }
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

/// Deserialises the keys of `docs` from the table into a section (missing keys → defaults).
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

/// A section's keys with their defaults, for `--help`.
pub struct SectionHelp {
    title: &'static str,
    keys: &'static [KeyDoc],
    defaults: Table,
}

pub fn help<T: Section>() -> SectionHelp {
    SectionHelp {
        title: T::TITLE,
        keys: T::KEYS,
        defaults: defaults_of::<T>(),
    }
}

fn defaults_of<T: Section>() -> Table {
    match Value::try_from(T::default()) {
        Ok(Value::Table(t)) => t,
        _ => Table::new(),
    }
}

/// The key table shown by `--help`.
pub fn describe(sections: &[SectionHelp]) -> String {
    let mut out = String::from("Configuration keys (in --config TOML, or --set key=value):\n");
    for s in sections {
        out.push_str(&format!("\n{}:\n", s.title));
        for d in s.keys {
            let default = match d.shown_default {
                Some(shown) => shown.to_string(),
                None => s.defaults.get(d.key).map_or(String::new(), show_value),
            };
            out.push_str(&format!("  {:<28} {:<14} {}\n", d.key, default, d.help));
        }
    }
    out
}

/// A default as a user would write it in TOML (small floats in exponent form).
fn show_value(v: &Value) -> String {
    match v {
        Value::Float(f) if *f != 0.0 && (f.abs() < 1e-3 || f.abs() >= 1e6) => format!("{f:e}"),
        Value::Float(f) if f.fract() == 0.0 => format!("{f:.1}"),
        other => other.to_string(),
    }
}

/// Keys of section `T` that its struct has but its docs lack, and the other way round (a test
/// keeps both empty for every section).
pub fn undocumented_keys<T: Section>() -> (Vec<String>, Vec<String>) {
    let fields = defaults_of::<T>();
    let documented: Vec<&str> = T::KEYS.iter().map(|d| d.key).collect();
    let missing_docs = fields
        .keys()
        .filter(|k| !documented.contains(&k.as_str()))
        .cloned()
        .collect();
    let missing_fields = documented
        .iter()
        .filter(|k| !fields.contains_key(**k))
        .map(|k| k.to_string())
        .collect();
    (missing_docs, missing_fields)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_values_are_toml_literals_or_bare_strings() {
        let t = load_table(
            None,
            &[
                "lr=1e-5".into(),
                "packing=true".into(),
                "model=~/sft-out".into(),
                "name=\"x y\"".into(),
                "path='C:\\dir'".into(),
                "reward=rule:ids:1-2".into(),
            ],
        )
        .unwrap();
        assert_eq!(t["lr"], Value::Float(1e-5));
        assert_eq!(t["packing"], Value::Boolean(true));
        assert_eq!(t["model"], Value::String("~/sft-out".into()));
        assert_eq!(t["name"], Value::String("x y".into()));
        assert_eq!(t["path"], Value::String("C:\\dir".into()));
        assert_eq!(t["reward"], Value::String("rule:ids:1-2".into()));
    }

    #[test]
    fn a_quoted_value_that_does_not_parse_is_refused() {
        for bad in [
            "output_dir=\"/tmp/out\\dir\"",
            "x=\"unterminated",
            "x=[1, 2",
        ] {
            let err = load_table(None, &[bad.to_string()])
                .unwrap_err()
                .to_string();
            assert!(err.contains("not a valid TOML value"), "{bad}: {err}");
        }
        assert!(load_table(None, &["=3".to_string()]).is_err());
    }

    #[test]
    fn defaults_are_shown_as_toml() {
        assert_eq!(show_value(&Value::Float(2e-5)), "2e-5");
        assert_eq!(show_value(&Value::Float(3.0)), "3.0");
        assert_eq!(show_value(&Value::Float(0.95)), "0.95");
        assert_eq!(show_value(&Value::String("linear".into())), "\"linear\"");
    }
}
