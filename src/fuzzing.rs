//! The fuzz targets' bodies: each reads one untrusted input the way a user's run reads it (from a
//! file in a scratch directory, through the same functions) and either succeeds or fails with a
//! short one-line error. A panic, an abort, a hang or an allocation bomb is a bug; so is an error
//! message longer than [`MAX_ERROR_CHARS`].
//!
//! `fuzz/` (cargo-fuzz) calls these from libFuzzer; `tests/fuzz_corpus.rs` runs every committed
//! corpus file and minimised crash through them in `cargo test`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::json;

use crate::checkpoint::Checkpoint;
use crate::data::preference::{prepare_comparisons, ComparisonsFor, PreferenceDataConfig};
use crate::data::sft::{prepare, SftDataConfig};
use crate::io::one_line_error;
use crate::settings::{KeyDoc, Section, Settings};
use crate::text::chat_template::ChatTemplate;
use crate::text::Tokenizer;

/// Longer than this, an error is no longer a line a user reads (a path plus a sentence).
pub const MAX_ERROR_CHARS: usize = 1000;

/// Splits a fuzz input into the several files some targets need.
const SEPARATOR: &[u8] = b"\0\0\0\0";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// `model.safetensors` of a Hugging Face directory (header, dtypes, shapes, offsets).
    SafetensorsFile,
    /// A `.gguf` model file (metadata, tensor table, tokenizer, weights), then a forward pass.
    GgufFile,
    /// `config.json` of a Hugging Face directory → ModelConfig → a model built on the fixture's weights.
    ModelConfig,
    /// `tokenizer.json` ␀␀␀␀ `tokenizer_config.json`, then encode, decode and the chat template.
    TokenizerFiles,
    /// A chat template's source, rendered on a fixed conversation within its fuel budget.
    ChatTemplate,
    /// SFT records (`text`, `prompt`/`completion`, `messages`) in a `.jsonl` file.
    SftJsonl,
    /// Preference pairs and K-way rankings in a `.jsonl` file.
    PreferenceJsonl,
    /// RL prompts in a `.jsonl` file.
    PromptJsonl,
    /// A `.parquet` data file, read as the data its first row looks like.
    ParquetFile,
    /// A command (first byte) and its TOML config ␀␀␀␀ `--set` overrides (one per line).
    TomlSettings,
    /// A PEFT adapter: `adapter_config.json` ␀␀␀␀ `adapter_model.safetensors`, attached to the fixture model.
    PeftAdapter,
    /// One line an `exec:` reward program answers with.
    RewardReply,
}

impl Target {
    pub const ALL: [Target; 12] = [
        Target::SafetensorsFile,
        Target::GgufFile,
        Target::ModelConfig,
        Target::TokenizerFiles,
        Target::ChatTemplate,
        Target::SftJsonl,
        Target::PreferenceJsonl,
        Target::PromptJsonl,
        Target::ParquetFile,
        Target::TomlSettings,
        Target::PeftAdapter,
        Target::RewardReply,
    ];

    /// The fuzz target's name (`fuzz/fuzz_targets/<name>.rs`, `fuzz/corpus/<name>/`).
    pub fn name(self) -> &'static str {
        match self {
            Target::SafetensorsFile => "safetensors_file",
            Target::GgufFile => "gguf_file",
            Target::ModelConfig => "model_config",
            Target::TokenizerFiles => "tokenizer_files",
            Target::ChatTemplate => "chat_template",
            Target::SftJsonl => "sft_jsonl",
            Target::PreferenceJsonl => "preference_jsonl",
            Target::PromptJsonl => "prompt_jsonl",
            Target::ParquetFile => "parquet_file",
            Target::TomlSettings => "toml_settings",
            Target::PeftAdapter => "peft_adapter",
            Target::RewardReply => "reward_reply",
        }
    }
}

/// What the targets read besides their input: the repo's test fixtures, loaded once.
pub struct Harness {
    scratch: PathBuf,
    fixtures: PathBuf,
    tokenizer: Tokenizer,
}

impl Harness {
    /// `fixtures` is the repo's `tests/fixtures`; `scratch` an empty directory of the caller's.
    pub fn new(fixtures: &Path, scratch: &Path) -> Result<Harness> {
        std::fs::create_dir_all(scratch)?;
        Ok(Harness {
            scratch: scratch.to_path_buf(),
            fixtures: fixtures.to_path_buf(),
            tokenizer: Tokenizer::from_hf_dir(&fixtures.join("tokenizer"))?,
        })
    }

    /// Runs `target` on `data`: Ok when the input was accepted, else the error's line. Panics on
    /// a finding.
    pub fn run(&self, target: Target, data: &[u8]) -> Result<(), String> {
        let outcome = match target {
            Target::SafetensorsFile => self.safetensors_file(data),
            Target::GgufFile => self.gguf_file(data),
            Target::ModelConfig => self.model_config(data),
            Target::TokenizerFiles => self.tokenizer_files(data),
            Target::ChatTemplate => chat_template(data),
            Target::SftJsonl => self.sft_jsonl(data),
            Target::PreferenceJsonl => self.preference_jsonl(data),
            Target::PromptJsonl => self.prompt_jsonl(data),
            Target::ParquetFile => self.parquet_file(data),
            Target::TomlSettings => self.toml_settings(data),
            Target::PeftAdapter => self.peft_adapter(data),
            Target::RewardReply => reward_reply(data),
        };
        outcome.map_err(|e| check_message(&e))
    }

    /// The scratch directory holding `files` and nothing else (what an earlier input left there
    /// is removed; the directory itself is kept, for speed).
    fn dir_with(&self, files: &[(&str, &[u8])]) -> Result<PathBuf> {
        let dir = self.scratch.join("input");
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if !files.iter().any(|(name, _)| entry.file_name() == *name) {
                std::fs::remove_file(entry.path())?;
            }
        }
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes)?;
        }
        Ok(dir)
    }

    fn fixture(&self, path: &str) -> Result<Vec<u8>> {
        Ok(std::fs::read(self.fixtures.join(path))?)
    }

    fn safetensors_file(&self, data: &[u8]) -> Result<()> {
        let config = self.fixture("models/llama-tied/config.json")?;
        let dir = self.dir_with(&[("config.json", &config), ("model.safetensors", data)])?;
        forward(&Checkpoint::load(&dir.display().to_string(), false)?)
    }

    fn gguf_file(&self, data: &[u8]) -> Result<()> {
        let dir = self.dir_with(&[("model.gguf", data)])?;
        let ck = Checkpoint::load(&dir.join("model.gguf").display().to_string(), false)?;
        if let Some(tok) = &ck.tokenizer {
            let ids = tok.encode("Hello, world", false)?;
            tok.decode(&ids, false)?;
        }
        forward(&ck)
    }

    fn model_config(&self, data: &[u8]) -> Result<()> {
        let weights = self.fixture("models/llama-tied/model.safetensors")?;
        let dir = self.dir_with(&[("config.json", data), ("model.safetensors", &weights)])?;
        forward(&Checkpoint::load(&dir.display().to_string(), false)?)
    }

    fn tokenizer_files(&self, data: &[u8]) -> Result<()> {
        let (tokenizer, config) = split2(data);
        let mut files = vec![("tokenizer.json", tokenizer)];
        if let Some(config) = config {
            files.push(("tokenizer_config.json", config));
        }
        let tok = Tokenizer::from_hf_dir(&self.dir_with(&files)?)?;
        let ids = tok.encode("Hello <|im_start|> wörld\n\t 123", true)?;
        tok.decode(&ids, false)?;
        tok.decode(&[0, 1, 2, 299, 300, u32::MAX], true)?;
        if tok.chat_template.is_some() {
            render_both(|m, g| crate::text::chat_template::render_chat(&tok, m, g))?;
        }
        Ok(())
    }

    fn sft_jsonl(&self, data: &[u8]) -> Result<()> {
        let dir = self.dir_with(&[("train.jsonl", data)])?;
        self.sft_records(&dir.join("train.jsonl"))
    }

    /// As SFT data, then packed with the loss on every token.
    fn sft_records(&self, path: &Path) -> Result<()> {
        let records = crate::data::read_records(path)?;
        let origin = path.display().to_string();
        let plain = SftDataConfig {
            max_length: 64,
            ..Default::default()
        };
        prepare(&records, &origin, &self.tokenizer, &plain)?;
        let packed = SftDataConfig {
            packing: true,
            completion_only_loss: false,
            assistant_only_loss: false,
            ..plain
        };
        prepare(&records, &origin, &self.tokenizer, &packed)?;
        Ok(())
    }

    fn preference_jsonl(&self, data: &[u8]) -> Result<()> {
        let dir = self.dir_with(&[("prefs.jsonl", data)])?;
        self.preference_records(&dir.join("prefs.jsonl"))
    }

    fn preference_records(&self, path: &Path) -> Result<()> {
        let records = crate::data::read_records(path)?;
        let cfg = PreferenceDataConfig::default();
        let origin = path.display().to_string();
        for use_ in [ComparisonsFor::Dpo, ComparisonsFor::RewardModel] {
            prepare_comparisons(&records, &origin, &self.tokenizer, &cfg, use_)?;
        }
        Ok(())
    }

    fn prompt_jsonl(&self, data: &[u8]) -> Result<()> {
        let dir = self.dir_with(&[("prompts.jsonl", data)])?;
        self.prompt_records(&dir.join("prompts.jsonl"))
    }

    fn prompt_records(&self, path: &Path) -> Result<()> {
        let path = path.display().to_string();
        for chat in [false, true] {
            crate::data::prompts::read_prompts(&path, &self.tokenizer, chat, 32)?;
        }
        Ok(())
    }

    /// A Parquet file read as the data its first row looks like: preferences, prompts or SFT.
    fn parquet_file(&self, data: &[u8]) -> Result<()> {
        let dir = self.dir_with(&[("data.parquet", data)])?;
        let path = dir.join("data.parquet");
        let records = crate::data::read_records(&path)?;
        let first = &records[0].1;
        let has = |key: &str| first.get(key).is_some_and(|v| !v.is_null());
        if has("chosen") || has("completions") {
            self.preference_records(&path)
        } else if has("messages") || has("text") || has("completion") {
            self.sft_records(&path)
        } else {
            self.prompt_records(&path)
        }
    }

    fn toml_settings(&self, data: &[u8]) -> Result<()> {
        let Some((&command, rest)) = data.split_first() else {
            return Ok(());
        };
        let (toml, sets) = split2(rest);
        let sets: Vec<String> = sets
            .map(|s| {
                String::from_utf8_lossy(s)
                    .lines()
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let dir = self.dir_with(&[("run.toml", toml)])?;
        read_command_settings(command, &dir.join("run.toml"), &sets)
    }

    fn peft_adapter(&self, data: &[u8]) -> Result<()> {
        let (config, weights) = split2(data);
        let fixture = self.fixture("lora/llama-tied-all-rslora/adapter_model.safetensors")?;
        let dir = self.dir_with(&[
            ("adapter_config.json", config),
            ("adapter_model.safetensors", weights.unwrap_or(&fixture)),
        ])?;
        let adapter = crate::model::peft::Adapter::read(&dir)?;
        let base = self
            .fixtures
            .join("models/llama-tied")
            .display()
            .to_string();
        let mut ck = Checkpoint::load(&base, false)?;
        ck.model.attach_adapter(&adapter, false)?;
        forward(&ck)
    }
}

/// The error's line; panics when it is empty or too long to read.
fn check_message(e: &anyhow::Error) -> String {
    let line = one_line_error(e);
    assert!(!line.trim().is_empty(), "an error without a message");
    let n = line.chars().count();
    assert!(
        n <= MAX_ERROR_CHARS,
        "an error of {n} characters: {}…",
        line.chars().take(300).collect::<String>()
    );
    line
}

/// `a ␀␀␀␀ b` → (a, Some(b)); without the separator, (all, None).
fn split2(data: &[u8]) -> (&[u8], Option<&[u8]>) {
    match data.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        Some(i) => (&data[..i], Some(&data[i + SEPARATOR.len()..])),
        None => (data, None),
    }
}

/// Log-probabilities of a short sequence: a model that loaded must also run.
fn forward(ck: &Checkpoint) -> Result<()> {
    let vocab = ck.model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..4).map(|i| i % vocab.max(1)).collect();
    ck.model.sequence_logprobs(&[ids])?;
    Ok(())
}

/// What most templates accept: alternating user and assistant turns.
fn plain_conversation() -> serde_json::Value {
    json!([
        {"role": "user", "content": "Hi <b>there</b>"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
    ])
}

/// What some templates accept: a system turn, reasoning, tool calls and results, content parts.
fn rich_conversation() -> serde_json::Value {
    json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": "", "reasoning_content": "call the tool",
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": null},
    ])
}

/// The plain conversation must render for the input to count as accepted; the rich one only
/// has to fail cleanly.
fn render_both(render: impl Fn(&serde_json::Value, bool) -> Result<String>) -> Result<()> {
    for add_generation_prompt in [false, true] {
        render(&plain_conversation(), add_generation_prompt)?;
    }
    if let Err(e) = render(&rich_conversation(), true) {
        check_message(&e);
    }
    Ok(())
}

fn chat_template(data: &[u8]) -> Result<()> {
    let Ok(source) = std::str::from_utf8(data) else {
        return Ok(());
    };
    let template = ChatTemplate::new(source, Some("<s>"), Some("</s>"))?;
    render_both(|m, g| template.render(m, g))
}

fn reward_reply(data: &[u8]) -> Result<()> {
    let line = String::from_utf8_lossy(data);
    crate::reward::funcs::parse_exec_answer(&line, "python3 reward.py", 7)?;
    Ok(())
}

/// Reads the settings of command `command % 5` (sft, rm, dpo, ppo, grpo) as that command does
/// before it loads anything.
fn read_command_settings(command: u8, config: &Path, sets: &[String]) -> Result<()> {
    use crate::commands::{dpo, grpo, ppo, rm, sft};
    use crate::data::sft::SftDataConfig as SftData;
    use crate::model::lora::LoraConfig;
    use crate::train::TrainConfig;
    let run_keys: &[KeyDoc] = match command % 5 {
        0 => sft::SftRunConfig::KEYS,
        1 => rm::RmRunConfig::KEYS,
        2 => dpo::DpoRunConfig::KEYS,
        3 => ppo::PpoRunConfig::KEYS,
        _ => grpo::GrpoRunConfig::KEYS,
    };
    let algo_keys: &[KeyDoc] = match command % 5 {
        0 => SftData::KEYS,
        1 | 2 => PreferenceDataConfig::KEYS,
        3 => crate::algos::ppo::PpoConfig::KEYS,
        _ => crate::algos::grpo::GrpoConfig::KEYS,
    };
    let known = [run_keys, algo_keys, TrainConfig::KEYS, LoraConfig::KEYS];
    let settings = Settings::load(Some(config), sets, &known)?;
    settings.section::<TrainConfig>()?.validate()?;
    crate::commands::lora_settings(&settings)?;
    match command % 5 {
        0 => {
            settings.section::<sft::SftRunConfig>()?;
            settings.section::<SftData>()?;
        }
        1 => {
            settings.section::<rm::RmRunConfig>()?;
            settings.section::<PreferenceDataConfig>()?;
        }
        2 => {
            settings.section::<dpo::DpoRunConfig>()?;
            settings.section::<PreferenceDataConfig>()?;
        }
        3 => {
            settings.section::<ppo::PpoRunConfig>()?;
            settings
                .section::<crate::algos::ppo::PpoConfig>()?
                .validate()?;
        }
        _ => {
            settings.section::<grpo::GrpoRunConfig>()?;
            settings
                .section::<crate::algos::grpo::GrpoConfig>()?
                .validate()?;
        }
    }
    Ok(())
}
