//! Chat templates: the Jinja `chat_template` that ships with a Hugging Face tokenizer, rendered as
//! transformers' `apply_chat_template` renders it, in minijinja's sandbox.
//!
//! transformers compiles the template in a jinja2 `ImmutableSandboxedEnvironment` with
//! `trim_blocks`, `lstrip_blocks` and loop controls, and adds `raise_exception`, `strftime_now` and a
//! `tojson` filter that is Python's `json.dumps(x, ensure_ascii=False)`. We set up the same things,
//! plus minijinja-contrib's Python string/dict methods (`.strip()`, `.startswith()`, `.items()`,
//! `.get()`, ...). What transformers does around the template is reproduced too:
//!
//! * keys whose value is `null` are dropped from every message, and a message's reasoning (from
//!   `reasoning_content`, `thinking` or `reasoning`) is also given under `thinking` and
//!   `reasoning_content`;
//! * the variables are the named special tokens that are set (`bos_token`, `eos_token`, ...; a
//!   token that is not set is undefined, not empty), `tools` and `documents` (`none` unless given),
//!   `messages`, `add_generation_prompt` and any extra variables;
//! * printed values follow Python's `str()`, as jinja2 prints them: `True`, `None`, `1e-05`,
//!   `{'a': [1, 2]}`;
//! * the rendered text is tokenized **without** adding special tokens (the template writes its own
//!   BOS, so adding the post-processor's would give two).
//!
//! `{% generation %}` … `{% endgeneration %}` (the assistant-mask tags of transformers'
//! `AssistantTracker`) render their body unchanged; the mask itself is not computed here.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State, UndefinedBehavior};
use serde_json::{Map, Value as Json};

use crate::text::Tokenizer;

const TEMPLATE_NAME: &str = "chat_template";

/// Nesting deeper than this in `tojson` or a printed value is refused instead of overflowing the stack.
const MAX_DEPTH: usize = 256;

/// Message fields that carry reasoning; transformers copies the first one set to `thinking` and
/// `reasoning_content`.
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// A compiled chat template with the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles `source`. A token given as `None` is left undefined in the template, as transformers
    /// leaves it out of the variables (it still prints as an empty string).
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| anyhow!("chat template: {}", describe(&e)))?;
        env.set_syntax(syntax);
        env.set_debug(false);
        // A budget: a template from a downloaded model must not run (or print) without end.
        env.set_fuel(Some(FUEL));
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", tojson);
        env.add_filter("string", string_filter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        // jinja2 turns every newline of the template source into "\n" (`newline_sequence`).
        let source = source.replace("\r\n", "\n").replace('\r', "\n");
        env.add_template_owned(TEMPLATE_NAME, neutralize_generation_tags(&source))
            .map_err(|e| anyhow!("chat template does not compile: {}", describe(&e)))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
        })
    }

    /// Renders `messages`, a JSON array of `{"role", "content", ...}` objects (content may be a
    /// string or a list of parts; everything is passed through as-is).
    pub fn render(&self, messages: &Json, add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &Map::new())
    }

    /// Same as [`render`](Self::render), with extra template variables (`tools`, `documents`, a
    /// template's own switches such as `enable_thinking`, other special tokens). They override the
    /// special tokens given to [`new`](Self::new), as keyword arguments do in transformers.
    pub fn render_with(
        &self,
        messages: &Json,
        add_generation_prompt: bool,
        extra: &Map<String, Json>,
    ) -> Result<String> {
        for reserved in ["messages", "add_generation_prompt"] {
            if extra.contains_key(reserved) {
                bail!("chat template: `{reserved}` cannot be passed as an extra variable");
            }
        }
        let mut vars = Map::new();
        if let Some(t) = &self.bos_token {
            vars.insert("bos_token".into(), Json::String(t.clone()));
        }
        if let Some(t) = &self.eos_token {
            vars.insert("eos_token".into(), Json::String(t.clone()));
        }
        vars.insert("tools".into(), Json::Null);
        vars.insert("documents".into(), Json::Null);
        for (k, v) in extra {
            vars.insert(k.clone(), v.clone());
        }
        vars.insert("messages".into(), normalize_messages(messages)?);
        vars.insert(
            "add_generation_prompt".into(),
            Json::Bool(add_generation_prompt),
        );
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| anyhow!("chat template: {}", describe(&e)))?;
        let mut out = Capped::default();
        let rendered = template.render_captured_to(json_to_value(&Json::Object(vars)), &mut out);
        if let Err(e) = rendered {
            return Err(if out.overflowed {
                anyhow!(
                    "chat template printed more than {} MB for one conversation; refusing it",
                    MAX_OUTPUT >> 20
                )
            } else if e.kind() == ErrorKind::OutOfFuel {
                anyhow!(
                    "chat template ran past its budget of {FUEL} instructions for one conversation (a loop without end?); refusing it"
                )
            } else if is_raised(&e) {
                anyhow!("chat template raised an error: {}", describe(&e))
            } else {
                anyhow!("chat template failed to render: {}", describe(&e))
            });
        }
        String::from_utf8(out.text).map_err(|_| anyhow!("chat template printed invalid UTF-8"))
    }
}

/// Instructions one rendering may take: real templates need thousands per message; a template
/// that loops without end stops in a fraction of a second.
const FUEL: u64 = 20_000_000;

/// Bytes one rendering may print.
const MAX_OUTPUT: usize = 16 << 20;

/// The rendered text, refusing to grow past `MAX_OUTPUT`.
#[derive(Default)]
struct Capped {
    text: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > MAX_OUTPUT {
            self.overflowed = true;
            return Err(std::io::Error::other("chat template output too large"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders `messages` with the tokenizer's chat template and tokenizes the text without adding
/// special tokens, as transformers' `apply_chat_template(..., tokenize=True)` does. Returns the
/// text and its token ids.
pub fn apply_chat_template(
    tok: &Tokenizer,
    messages: &Json,
    add_generation_prompt: bool,
) -> Result<(String, Vec<u32>)> {
    let text = render_chat(tok, messages, add_generation_prompt)?;
    let ids = tok.encode(&text, false)?;
    Ok((text, ids))
}

/// Renders `messages` with the tokenizer's chat template (no tokenization).
pub fn render_chat(
    tok: &Tokenizer,
    messages: &Json,
    add_generation_prompt: bool,
) -> Result<String> {
    let source = tok.chat_template.as_deref().ok_or_else(|| {
        anyhow!(
            "the tokenizer has no chat template (none in tokenizer_config.json, chat_template.jinja \
             or the GGUF metadata); give one, or use plain-text data"
        )
    })?;
    let template = cached_template(source, tok.bos_token.as_deref(), tok.eos_token.as_deref())?;
    // transformers passes every named special token that is set (its `special_tokens_map`).
    let mut extra = Map::new();
    for name in [
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
    ] {
        let value = if name == "pad_token" {
            tok.pad_token.clone()
        } else {
            config_token(&tok.config, name)
        };
        if let Some(v) = value {
            extra.insert(name.to_string(), Json::String(v));
        }
    }
    template
        .render_with(messages, add_generation_prompt, &extra)
        .with_context(|| tok.chat_template_origin.clone())
}

/// Compiling a template takes far longer than rendering one; data preparation renders thousands
/// of conversations with the same few templates.
fn cached_template(
    source: &str,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<Arc<ChatTemplate>> {
    type Key = (String, Option<String>, Option<String>);
    static CACHE: OnceLock<Mutex<HashMap<Key, Arc<ChatTemplate>>>> = OnceLock::new();
    let key: Key = (
        source.to_string(),
        bos.map(str::to_string),
        eos.map(str::to_string),
    );
    let cache = CACHE.get_or_init(Default::default);
    if let Some(t) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(t.clone());
    }
    let template = Arc::new(ChatTemplate::new(source, bos, eos)?);
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= 16 {
        map.clear();
    }
    map.insert(key, template.clone());
    Ok(template)
}

/// A special token in tokenizer_config.json: a string or an AddedToken dict `{"content": ...}`.
fn config_token(config: &Json, name: &str) -> Option<String> {
    match config.get(name)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// What transformers does to the messages before rendering: every message must be an object,
/// keys holding `null` are dropped, and reasoning is aliased to `thinking` and `reasoning_content`.
fn normalize_messages(messages: &Json) -> Result<Json> {
    let list = messages
        .as_array()
        .ok_or_else(|| anyhow!("chat messages must be a JSON array of message objects"))?;
    if list.is_empty() {
        bail!("cannot apply a chat template to an empty conversation");
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, message) in list.iter().enumerate() {
        let obj = message
            .as_object()
            .ok_or_else(|| anyhow!("chat message {i} is not an object: {message}"))?;
        let mut msg: Map<String, Json> = obj
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(reasoning) = REASONING_FIELDS.iter().find_map(|k| msg.get(*k)).cloned() {
            let mut aliased = Map::new();
            aliased.insert("thinking".into(), reasoning.clone());
            aliased.extend(msg);
            aliased.insert("reasoning_content".into(), reasoning);
            msg = aliased;
        }
        out.push(Json::Object(msg));
    }
    Ok(Json::Array(out))
}

/// `{% generation %}`/`{% endgeneration %}` become `{% if true %}`/`{% endif %}`: the body renders
/// as-is and the whitespace control of the tags (`-`, `+`, trim/lstrip blocks) is unchanged.
fn neutralize_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos + 2]);
        rest = &rest[pos + 2..];
        let modifier_len = usize::from(rest.starts_with(['-', '+']));
        let after_modifier = &rest[modifier_len..];
        let keyword_start = after_modifier.trim_start();
        let prefix_len = rest.len() - keyword_start.len();
        for (keyword, replacement) in [("endgeneration", "endif"), ("generation", "if true")] {
            let Some(after_keyword) = keyword_start.strip_prefix(keyword) else {
                continue;
            };
            let tail = after_keyword.trim_start();
            let tail = tail.strip_prefix(['-', '+']).unwrap_or(tail);
            if tail.starts_with("%}") {
                out.push_str(&rest[..prefix_len]);
                out.push_str(replacement);
                rest = after_keyword;
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Marks errors that the template raised itself with `raise_exception`.
#[derive(Debug)]
struct RaisedByTemplate;

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("raised by the template")
    }
}

impl std::error::Error for RaisedByTemplate {}

fn is_raised(err: &Error) -> bool {
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        if e.is::<RaisedByTemplate>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// One line: the message (just the template's text for `raise_exception`), the line, and any
/// underlying cause.
fn describe(err: &Error) -> String {
    // An include's error wraps the included template's, which for a template that includes
    // itself nests hundreds deep: say how deep, then the innermost.
    if err.kind() == ErrorKind::BadInclude {
        let mut depth = 1;
        let mut inner = err;
        while let Some(next) =
            std::error::Error::source(inner).and_then(|e| e.downcast_ref::<Error>())
        {
            if next.kind() != ErrorKind::BadInclude {
                return format!(
                    "{{% include %}} failed {depth} level(s) deep: {}",
                    describe(next)
                );
            }
            depth += 1;
            inner = next;
        }
        return format!(
            "{{% include %}} failed {depth} level(s) deep: {}",
            inner.detail().unwrap_or("no detail")
        );
    }
    let mut text = match err.detail() {
        Some(detail) if is_raised(err) => detail.to_string(),
        Some(detail) => format!("{}: {detail}", err.kind()),
        None => err.kind().to_string(),
    };
    if let Some(line) = err.line().filter(|&l| l > 0) {
        let _ = write!(text, " (line {line})");
    }
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        if !e.is::<RaisedByTemplate>() {
            let _ = write!(text, ": {e}");
        }
        source = e.source();
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn raise_exception(message: Value) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, py_str(&message)?).with_source(RaisedByTemplate))
}

/// Python's `datetime.now().strftime(format)`, local time.
fn strftime_now(format: &str) -> Result<String, Error> {
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format {format:?}"),
        )
    })?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// JSON (serde_json) → template values.

fn json_to_value(v: &Json) -> Value {
    match v {
        Json::Null => Value::from(()),
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(items) => Value::from(items.iter().map(json_to_value).collect::<Vec<_>>()),
        Json::Object(map) => {
            Value::from_pairs(map.iter().map(|(k, v)| (k.as_str(), json_to_value(v))))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Python's str()/repr() for printed values.

/// Prints values the way jinja2 does (Python's `str()`); strings and anything else go through
/// minijinja's own formatter (no auto-escaping is configured).
fn python_formatter(out: &mut Output, state: &mut State, value: &Value) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Number | ValueKind::Seq | ValueKind::Map => {
            out.write_str(&py_str(value)?)
                .map_err(|_| Error::new(ErrorKind::WriteFailure, "cannot write template output"))
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// The `string` filter as Python's `str()`.
fn string_filter(value: &Value) -> Result<Value, Error> {
    if value.kind() == ValueKind::String {
        Ok(value.clone())
    } else {
        Ok(Value::from(py_str(value)?))
    }
}

fn py_str(value: &Value) -> Result<String, Error> {
    match value.kind() {
        ValueKind::String => Ok(value.as_str().unwrap_or_default().to_string()),
        ValueKind::Undefined => Ok(String::new()),
        _ => {
            let mut out = String::new();
            py_repr(&mut out, value, 0)?;
            Ok(out)
        }
    }
}

fn too_deep() -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!("value nested deeper than {MAX_DEPTH} levels"),
    )
}

fn py_repr(out: &mut String, value: &Value, depth: usize) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(too_deep());
    }
    match value.kind() {
        ValueKind::Undefined => out.push_str("Undefined"),
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => push_number(out, value, false),
        ValueKind::String => py_repr_str(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            let tuple = value.is_tuple();
            out.push(if tuple { '(' } else { '[' });
            let mut n = 0;
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(out, &item, depth + 1)?;
                n += 1;
            }
            if tuple && n == 1 {
                out.push(',');
            }
            out.push(if tuple { ')' } else { ']' });
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(out, &key, depth + 1)?;
                out.push_str(": ");
                py_repr(out, &value.get_item(&key)?, depth + 1)?;
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
    Ok(())
}

/// Python's `repr(str)`: single quotes unless the text has a `'` and no `"`; escapes for the
/// quote, backslash and the common non-printable characters.
fn py_repr_str(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if py_unprintable(c) => {
                let cp = c as u32;
                let _ = match cp {
                    0..=0xff => write!(out, "\\x{cp:02x}"),
                    0x100..=0xffff => write!(out, "\\u{cp:04x}"),
                    _ => write!(out, "\\U{cp:08x}"),
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `not str.isprintable()` for the characters that occur in practice: controls, the
/// non-ASCII spaces and separators, and the invisible formatting characters.
fn py_unprintable(c: char) -> bool {
    matches!(c as u32,
        0..=0x1f | 0x7f..=0xa0 | 0xad | 0x1680 | 0x2000..=0x200f | 0x2028..=0x202f | 0x205f..=0x2064
        | 0x3000 | 0xd800..=0xdfff | 0xfeff | 0xfff9..=0xfffb)
}

/// An integer as is; a float as Python's `repr(float)` (`1.0`, `1e-05`, `1e+16`). In JSON, the
/// non-finite values are `NaN`/`Infinity`, as `json.dumps` writes them.
fn push_number(out: &mut String, value: &Value, json: bool) {
    if value.is_integer() {
        let _ = write!(out, "{value}");
        return;
    }
    let x = f64::try_from(value.clone()).unwrap_or(f64::NAN);
    if x.is_nan() {
        out.push_str(if json { "NaN" } else { "nan" });
    } else if x.is_infinite() {
        out.push_str(match (json, x > 0.0) {
            (true, true) => "Infinity",
            (true, false) => "-Infinity",
            (false, true) => "inf",
            (false, false) => "-inf",
        });
    } else {
        out.push_str(&py_float_repr(x));
    }
}

fn py_float_repr(x: f64) -> String {
    // Rust's `{:e}` gives the shortest digits that round-trip, as Python's repr does.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut out = String::from(sign);
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.push_str(&"0".repeat(int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        } else {
            out.push_str("0.");
            out.push_str(&"0".repeat((-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// tojson: Python's json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False).

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn tojson(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::String => {
            Some(v.as_str().unwrap_or_default().to_string())
        }
        Some(v) => {
            let n = v.as_i64().ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                )
            })?;
            Some(" ".repeat(n.clamp(0, 64) as usize))
        }
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Value>>("separators")? {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match (
                parts.first().and_then(Value::as_str),
                parts.get(1).and_then(Value::as_str),
            ) {
                (Some(a), Some(b)) if parts.len() == 2 => (a.to_string(), b.to_string()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings (item, key)",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(out)
}

fn not_serializable(value: &Value) -> Error {
    let type_name = match value.kind() {
        ValueKind::Undefined => "Undefined".to_string(),
        kind => kind.to_string(),
    };
    Error::new(
        ErrorKind::InvalidOperation,
        format!("Object of type {type_name} is not JSON serializable"),
    )
}

fn newline_indent(out: &mut String, style: &JsonStyle, level: usize) {
    if let Some(indent) = &style.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(indent);
        }
    }
}

fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    level: usize,
) -> Result<(), Error> {
    if level > MAX_DEPTH {
        return Err(too_deep());
    }
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => push_number(out, value, true),
        ValueKind::String => json_str(out, value.as_str().unwrap_or_default(), style.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline_indent(out, style, level + 1);
                write_json(out, item, style, level + 1)?;
            }
            newline_indent(out, style, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline_indent(out, style, level + 1);
                json_str(out, key, style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_json(out, item, style, level + 1)?;
            }
            newline_indent(out, style, level);
            out.push('}');
        }
        _ => return Err(not_serializable(value)),
    }
    Ok(())
}

/// Dict keys as `json.dumps` turns them into strings.
fn json_key(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".to_string(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::Number => {
            let mut s = String::new();
            push_number(&mut s, key, true);
            s
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "keys must be str, int, float, bool or None, not {}",
                    key.kind()
                ),
            ))
        }
    })
}

/// A JSON string as Python writes it: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`, other control
/// characters as `\u00XX` (lower-case hex); with `ensure_ascii`, everything outside ' '..'~' too.
fn json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && c > '~') => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{:04x}", unit);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        for (x, want) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.25, "-2.25"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
            (123.456, "123.456"),
            (1e100, "1e+100"),
        ] {
            assert_eq!(py_float_repr(x), want, "{x:e}");
        }
    }

    #[test]
    fn generation_tags_become_plain_blocks() {
        let src =
            "{% for m in messages %}{%- generation -%}\n{{ m }}{% endgeneration +%}{% endfor %}";
        assert_eq!(
            neutralize_generation_tags(src),
            "{% for m in messages %}{%- if true -%}\n{{ m }}{% endif +%}{% endfor %}"
        );
        // Other tags and names that merely start with the keyword are left alone.
        let other = "{% set generation_x = 1 %}{{ generation }}";
        assert_eq!(neutralize_generation_tags(other), other);
    }

    #[test]
    fn python_repr_of_strings() {
        let mut s = String::new();
        py_repr_str(&mut s, "it's \"x\"\n\u{1}");
        assert_eq!(s, r#"'it\'s "x"\n\x01'"#);
        s.clear();
        py_repr_str(&mut s, "it's");
        assert_eq!(s, r#""it's""#);
    }
}
