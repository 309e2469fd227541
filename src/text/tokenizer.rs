//! Tokenizers: Hugging Face `tokenizer.json` (+ `tokenizer_config.json`) or one rebuilt from GGUF
//! metadata, with the special tokens and chat template that travel with them.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::model::gguf::GgufFile;
use candle_core::quantized::gguf_file::Value as GValue;

/// A token's byte range in the text it came from.
pub type ByteSpan = (usize, usize);

pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub chat_template: Option<String>,
    /// Where the chat template came from, for messages.
    pub chat_template_origin: String,
    /// tokenizer_config.json as found (or synthesised), written back on save.
    pub config: Value,
}

/// `bos_token` etc. are a string or an AddedToken dict `{"content": …}`.
fn special_str(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// `chat_template` is a string or a list of named templates (we take "default").
fn template_from_config(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Reads `tokenizer.json` and, when present, `tokenizer_config.json` and `chat_template.jinja`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            bail!(
                "{}: no tokenizer.json (only fast tokenizers are supported)",
                dir.display()
            );
        }
        crate::io::require_regular_file(&path)?;
        // The tokenizers library panics on some malformed files instead of returning an error.
        let inner = crate::io::without_panics(|| tokenizers::Tokenizer::from_file(&path))
            .map_err(|_| anyhow!("{}: cannot load tokenizer: malformed", path.display()))?
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        // ...and on some that it loads, the first time they are used (a post-processor naming a
        // special token the file does not define): use it once here, where that is an error.
        let probe = || {
            for add_special in [false, true] {
                if let Ok(e) = inner.encode("Hello, world! 123", add_special) {
                    let _ = inner.decode(e.get_ids(), false);
                }
            }
        };
        if crate::io::without_panics(probe).is_err() {
            bail!(
                "{}: the tokenizer fails on a test sentence (a post-processor or decoder that names tokens it does not have?)",
                path.display()
            );
        }
        let cfg_path = dir.join("tokenizer_config.json");
        let config: Value = if cfg_path.exists() {
            crate::io::require_regular_file(&cfg_path)?;
            let text = std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("cannot read {}", cfg_path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?
        } else {
            json!({})
        };
        let mut chat_template = template_from_config(config.get("chat_template"));
        let mut chat_template_origin = cfg_path.display().to_string();
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            crate::io::require_regular_file(&jinja)?;
            chat_template = Some(
                std::fs::read_to_string(&jinja)
                    .with_context(|| format!("cannot read {}", jinja.display()))?,
            );
            chat_template_origin = jinja.display().to_string();
        }
        Ok(Tokenizer {
            inner,
            bos_token: special_str(config.get("bos_token")),
            eos_token: special_str(config.get("eos_token")),
            pad_token: special_str(config.get("pad_token")),
            chat_template,
            chat_template_origin,
            config,
        })
    }

    /// Rebuilds the byte-level BPE tokenizer stored in GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let model = g.meta_str("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            bail!("GGUF tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)");
        }
        let tokens = string_array(g, "tokenizer.ggml.tokens")?;
        let merges_raw = string_array(g, "tokenizer.ggml.merges")?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges_raw
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| anyhow!("GGUF merge `{m}` is not two tokens"))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow!("cannot build BPE from GGUF: {e}"))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = g.meta_str("tokenizer.ggml.pre").unwrap_or("gpt2");
        let byte_level = ByteLevel::new(false, true, true);
        match pre {
            "gpt2" | "gpt-2" | "default" => {
                inner.with_pre_tokenizer(Some(byte_level));
            }
            "smollm" => {
                // llama.cpp's smollm pre-tokenizer: every digit alone, then GPT-2's regex.
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    byte_level.into(),
                ])));
            }
            "llama-bpe" | "llama3" | "smaug-bpe" => {
                let split = Split::new(SplitPattern::Regex(REGEX_LLAMA3.into()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| anyhow!("{e}"))?;
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ])));
            }
            "qwen2" => {
                let split = Split::new(SplitPattern::Regex(REGEX_QWEN2.into()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| anyhow!("{e}"))?;
                inner.with_normalizer(Some(NFC)).map_err(|e| anyhow!("{e}"))?;
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ])));
            }
            other => bail!(
                "GGUF pre-tokenizer `{other}` is not supported (supported: gpt2, smollm, llama-bpe, qwen2)"
            ),
        }
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control and user-defined tokens are matched whole in text, as transformers does.
        if let Some(GValue::Array(types)) = g.meta("tokenizer.ggml.token_type") {
            let specials: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter(|(ty, _)| {
                    matches!(
                        ty.to_i32().or_else(|_| ty.to_u32().map(|x| x as i32)),
                        Ok(3) | Ok(4)
                    )
                })
                .map(|(_, t)| AddedToken::from(t.clone(), true))
                .collect();
            inner
                .add_special_tokens(specials)
                .map_err(|e| anyhow!("{e}"))?;
        }
        let tok_at = |key: &str| {
            g.meta_u64(key)
                .and_then(|i| tokens.get(i as usize))
                .cloned()
        };
        let bos_token = tok_at("tokenizer.ggml.bos_token_id");
        let eos_token = tok_at("tokenizer.ggml.eos_token_id");
        let pad_token = tok_at("tokenizer.ggml.padding_token_id");
        let add_bos = matches!(
            g.meta("tokenizer.ggml.add_bos_token"),
            Some(GValue::Bool(true))
        );
        if let (true, Some(bos)) = (add_bos, &bos_token) {
            let id = g.meta_u64("tokenizer.ggml.bos_token_id").unwrap_or(0) as u32;
            let tp = TemplateProcessing::builder()
                .try_single(format!("{bos} $A"))
                .and_then(|b| b.try_pair(format!("{bos} $A {bos} $B")))
                .map_err(|e| anyhow!("{e}"))?
                .special_tokens(vec![(bos.clone(), id)])
                .build()
                .map_err(|e| anyhow!("{e}"))?;
            inner.with_post_processor(Some(tp));
        }
        let chat_template = g.meta_str("tokenizer.chat_template").map(str::to_string);
        let mut config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": add_bos,
            "clean_up_tokenization_spaces": false,
            "model_max_length": g.meta_u64(&format!("{}.context_length", g.arch)).unwrap_or(2048),
        });
        for (k, v) in [
            ("bos_token", &bos_token),
            ("eos_token", &eos_token),
            ("pad_token", &pad_token),
        ] {
            if let Some(v) = v {
                config[k] = json!(v);
            }
        }
        if let Some(t) = &chat_template {
            config["chat_template"] = json!(t);
        }
        Ok(Tokenizer {
            inner,
            bos_token,
            eos_token,
            pad_token,
            chat_template,
            chat_template_origin: "the GGUF metadata's tokenizer.chat_template".into(),
            config,
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (e.g. BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizer failed on input: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids with the byte range of the text each one covers.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Vec<ByteSpan>)> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizer failed on input: {e}"))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("cannot decode token ids: {e}"))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Writes tokenizer.json and tokenizer_config.json (with the chat template) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.inner
            .save(&path, false)
            .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
        let mut config = self.config.clone();
        if !config.is_object() {
            config = json!({});
        }
        if let Some(t) = &self.chat_template {
            config["chat_template"] = json!(t);
        }
        config
            .as_object_mut()
            .unwrap()
            .entry("tokenizer_class")
            .or_insert(json!("PreTrainedTokenizerFast"));
        crate::io::write_json(&dir.join("tokenizer_config.json"), &config)
    }
}

fn string_array(g: &GgufFile, key: &str) -> Result<Vec<String>> {
    match g.meta(key) {
        Some(GValue::Array(a)) => a
            .iter()
            .map(|v| v.to_string().cloned().map_err(|e| anyhow!("{key}: {e}")))
            .collect(),
        _ => bail!("GGUF metadata `{key}` missing or not an array"),
    }
}

const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
