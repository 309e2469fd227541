//! Where models come from and go to: an HF directory, a `.gguf` file, or a repo id in the local
//! Hugging Face cache; saved back as an HF directory that transformers loads.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::io::{read_json, write_json, StagedDir};
use crate::model::gguf::GgufFile;
use crate::model::hparams::{token_id_list, ModelConfig};
use crate::model::lora::LoraConfig;
use crate::model::peft::{self, Adapter, AdapterOut};
use crate::model::scalar_head::ScalarHead;
use crate::model::weights::read_hf_weights;
use crate::model::CausalLm;
use crate::text::Tokenizer;

/// A model with what travels with it.
pub struct Checkpoint {
    pub model: CausalLm,
    pub tokenizer: Option<Tokenizer>,
    /// generation_config.json, when there is one.
    pub generation_config: Option<Value>,
    pub source: PathBuf,
    /// What a PEFT adapter trained on this model names as its base (`base_model_name_or_path`):
    /// the repo id or the absolute path of the base weights.
    pub base_name: String,
    /// A LoRA run whose adapters started at zero: its base (adapters off) is its starting model.
    pub fresh_adapters: bool,
}

pub enum Source {
    HfDir(PathBuf),
    Gguf(PathBuf),
    /// A PEFT LoRA adapter directory (adapter_config.json names the base).
    Adapter(PathBuf),
}

/// A model's parts before they become a `CausalLm`.
struct Parts {
    config: ModelConfig,
    weights: crate::model::weights::WeightMap,
    tokenizer: Option<Tokenizer>,
    generation_config: Option<Value>,
    source: PathBuf,
    base_name: String,
}

/// Resolves a user-given model path: directory, `.gguf` file, or `org/name` in the HF cache.
pub fn resolve(spec: &str) -> Result<Source> {
    let expanded = crate::io::expand_tilde(spec);
    let spec = expanded.as_str();
    let p = Path::new(spec);
    if p.is_dir() {
        if !p.join("config.json").exists() && crate::model::peft::is_adapter_dir(p) {
            return Ok(Source::Adapter(p.to_path_buf()));
        }
        if !p.join("config.json").exists() {
            bail!(
                "{}: not a model directory (no config.json) or a PEFT adapter (no adapter_config.json)",
                p.display()
            );
        }
        return Ok(Source::HfDir(p.to_path_buf()));
    }
    if p.is_file() {
        if spec.ends_with(".gguf") || is_gguf(p) {
            return Ok(Source::Gguf(p.to_path_buf()));
        }
        bail!("{}: not a .gguf file or a model directory", p.display());
    }
    if let Some(dir) = find_in_hf_cache(spec)? {
        return Ok(Source::HfDir(dir));
    }
    bail!(
        "model `{spec}` not found: not a directory, not a .gguf file, and not in the local Hugging Face cache ({}); rlhf never downloads",
        hf_cache_dir().display()
    )
}

fn is_gguf(p: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hf_cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(d);
    }
    if let Ok(d) = std::env::var("HF_HOME") {
        return PathBuf::from(d).join("hub");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/huggingface/hub")
}

/// The snapshot of `org/name` that `refs/main` points to (or the only snapshot there is).
fn find_in_hf_cache(repo_id: &str) -> Result<Option<PathBuf>> {
    if repo_id.split('/').count() > 2 || repo_id.is_empty() {
        return Ok(None);
    }
    let repo = hf_cache_dir().join(format!("models--{}", repo_id.replace('/', "--")));
    if !repo.is_dir() {
        return Ok(None);
    }
    let snapshots = repo.join("snapshots");
    if let Ok(hash) = std::fs::read_to_string(repo.join("refs/main")) {
        let dir = snapshots.join(hash.trim());
        if dir.join("config.json").exists() {
            return Ok(Some(dir));
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .with_context(|| format!("cannot list {}", snapshots.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").exists())
        .collect();
    match found.len() {
        0 => bail!("{}: no snapshot with a config.json", repo.display()),
        1 => Ok(found.pop()),
        _ => bail!(
            "{}: several snapshots and no refs/main; pass the snapshot directory",
            repo.display()
        ),
    }
}

impl Checkpoint {
    /// Loads model (and tokenizer when present). `trainable` makes every weight a variable. A
    /// PEFT adapter directory loads as its base with the adapter merged in.
    pub fn load(spec: &str, trainable: bool) -> Result<Self> {
        let parts = read_parts(spec)?;
        Self::from_parts(parts, trainable)
    }

    /// Loads a model for a LoRA run: the base frozen, and either a fresh adapter (B = 0) on the
    /// projections `lora` targets or, when `spec` is an adapter directory, that adapter, trained
    /// further (PEFT's `is_trainable=True`; its own r, α and targets apply).
    pub fn load_for_lora(spec: &str, lora: &LoraConfig, seed: u64) -> Result<Self> {
        let expanded = crate::io::expand_tilde(spec);
        if let Ok(Source::Adapter(dir)) = resolve(&expanded) {
            let adapter = Adapter::read(&dir)?;
            let mut ck = Self::from_parts(read_parts(&adapter.base_spec()?)?, false)?;
            if !adapter.saved.is_empty() {
                bail!(
                    "{}: continuing a reward model's adapter is not supported; give its base and train a new one",
                    dir.display()
                );
            }
            ck.model.attach_adapter(&adapter, true)?;
            let c = &adapter.config;
            eprintln!(
                "LoRA: continuing the adapter in {} (r {}, alpha {}, {} modules); lora_r, lora_alpha and lora_target_modules are not used",
                dir.display(),
                c.r,
                c.lora_alpha,
                adapter.modules.len()
            );
            if let Some(t) = tokenizer_beside(&dir)? {
                ck.tokenizer = Some(t);
            }
            ck.source = dir;
            return Ok(ck);
        }
        let mut ck = Self::from_parts(read_parts(spec)?, false)?;
        let n = ck.model.add_lora(lora, seed)?;
        ck.fresh_adapters = true;
        let trainable: usize = ck
            .model
            .parameters()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        let total = ck.model.config.num_parameters();
        eprintln!(
            "LoRA: {n} adapters (r {}, alpha {}{}), {trainable} trainable parameters of {total} ({:.2}%)",
            lora.lora_r,
            lora.lora_alpha,
            if lora.use_rslora { ", rsLoRA" } else { "" },
            100.0 * trainable as f64 / total.max(1) as f64
        );
        Ok(ck)
    }

    /// A checkpoint of this one's frozen base (LoRA adapters left out), sharing its weights.
    pub fn sharing_base(&self) -> Result<Self> {
        Ok(Checkpoint {
            model: self.model.sharing_frozen_weights()?,
            tokenizer: None,
            generation_config: self.generation_config.clone(),
            source: self.source.clone(),
            base_name: self.base_name.clone(),
            fresh_adapters: false,
        })
    }

    fn from_parts(p: Parts, trainable: bool) -> Result<Self> {
        let model = CausalLm::from_weights(p.config, p.weights, trainable)
            .with_context(|| format!("{}", p.source.display()))?;
        Ok(Checkpoint {
            model,
            tokenizer: p.tokenizer,
            generation_config: p.generation_config,
            source: p.source,
            base_name: p.base_name,
            fresh_adapters: false,
        })
    }

    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .with_context(|| format!("{}: the model has no tokenizer", self.source.display()))
    }

    /// Token ids that end a generation: generation_config's eos ids, config.json's, and the
    /// tokenizer's eos token.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut ids = self.model.config.eos_token_ids.clone();
        if let Some(g) = &self.generation_config {
            ids.extend(token_id_list(g.get("eos_token_id")));
        }
        if let Some(t) = &self.tokenizer {
            if let Some(id) = t.eos_token.as_deref().and_then(|e| t.token_id(e)) {
                ids.push(id);
            }
        }
        ids.sort();
        ids.dedup();
        ids
    }

    /// Writes an HF directory (config.json, model.safetensors, tokenizer files,
    /// generation_config.json) atomically: `out` appears only once everything is written.
    pub fn save(&self, out: &Path) -> Result<PathBuf> {
        let staged = StagedDir::new(out)?;
        save_model_files(&self.model, staged.path())?;
        if let Some(t) = &self.tokenizer {
            t.save(staged.path())?;
        }
        if let Some(g) = &self.generation_config {
            write_json(&staged.path().join("generation_config.json"), g)?;
        }
        staged.commit()
    }
}

/// Writes the trained model into `out` (which also holds checkpoints/ and metrics): the whole
/// model, or, for a LoRA run, the PEFT adapter.
pub fn save_final(ck: &Checkpoint, out: &Path) -> Result<()> {
    if !crate::dist::world().is_main() {
        return Ok(());
    }
    install_into(out, |dir| {
        if ck.model.has_adapters() {
            peft::write(dir, &adapter_out(ck, "CAUSAL_LM", None))?;
        } else {
            save_model_files(&ck.model, dir)?;
        }
        save_side_files(ck, dir)
    })
}

fn adapter_out<'a>(ck: &Checkpoint, task_type: &'a str, score: Option<Tensor>) -> AdapterOut<'a> {
    let (r, alpha, dropout, rslora) = ck.model.adapter_hparams();
    AdapterOut {
        base_model_name_or_path: ck.base_name.clone(),
        task_type,
        r,
        lora_alpha: alpha,
        lora_dropout: dropout,
        use_rslora: rslora,
        fan_in_fan_out: ck.model.config.family == crate::model::hparams::Family::Gpt2,
        modules: ck.model.adapter_tensors(),
        score,
    }
}

/// Writes a reward (or value) model into `out` as transformers' `*ForSequenceClassification`:
/// the body, `score.weight` [1, D], `num_labels: 1`, a `pad_token_id` (transformers reads the
/// score at the last token that is not padding), and the normalisation bias as `rlhf_score_bias`.
pub fn save_reward_model(ck: &Checkpoint, head: &ScalarHead, out: &Path) -> Result<()> {
    if !crate::dist::world().is_main() {
        return Ok(());
    }
    let cfg = &ck.model.config;
    let mut config = cfg.raw.clone();
    config["architectures"] = json!([cfg.sequence_classifier_architecture()]);
    config["id2label"] = json!({"0": "LABEL_0"});
    config["label2id"] = json!({"LABEL_0": 0});
    config[crate::model::scalar_head::BIAS_KEY] = json!(head.bias);
    let pad = cfg
        .pad_token_id
        .or_else(|| {
            let t = ck.tokenizer.as_ref()?;
            t.pad_token.as_deref().and_then(|p| t.token_id(p))
        })
        .or(cfg.eos_token_ids.first().copied());
    if let Some(p) = pad {
        config["pad_token_id"] = json!(p);
    }
    let score = head.weight.as_tensor().clone();
    if ck.model.has_adapters() {
        // PEFT's SEQ_CLS adapter: the head is a module to save; the normalisation bias, which
        // PEFT has no place for, goes into adapter_config.json under our key.
        return install_into(out, |dir| {
            peft::write(dir, &adapter_out(ck, "SEQ_CLS", Some(score.clone())))?;
            let path = dir.join(peft::CONFIG_FILE);
            let mut cfg = read_json(&path)?;
            cfg[crate::model::scalar_head::BIAS_KEY] = json!(head.bias);
            write_json(&path, &cfg)?;
            save_side_files(ck, dir)
        });
    }
    install_into(out, |dir| {
        write_model_files(
            &ck.model,
            config,
            vec![("score.weight".to_string(), score)],
            dir,
        )?;
        save_side_files(ck, dir)
    })
}

fn save_side_files(ck: &Checkpoint, dir: &Path) -> Result<()> {
    if let Some(t) = &ck.tokenizer {
        t.save(dir)?;
    }
    if let Some(g) = &ck.generation_config {
        write_json(&dir.join("generation_config.json"), g)?;
    }
    Ok(())
}

/// Writes files into a staging directory inside `out`, then renames them in with
/// model.safetensors last, so a complete model.safetensors means a complete model.
fn install_into(out: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let staging = out.join(".final-partial");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).ok();
    }
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    write(&staging)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&staging)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort_by_key(|p| p.file_name().is_some_and(|n| n == "model.safetensors"));
    for f in files {
        let dst = out.join(f.file_name().unwrap());
        std::fs::rename(&f, &dst)
            .with_context(|| format!("cannot move {} into place", dst.display()))?;
    }
    std::fs::remove_dir_all(&staging).ok();
    Ok(())
}

/// config.json (marked float32) and model.safetensors.
pub fn save_model_files(model: &CausalLm, dir: &Path) -> Result<()> {
    write_model_files(model, model.config.raw.clone(), vec![], dir)
}

fn write_model_files(
    model: &CausalLm,
    mut config: Value,
    extra: Vec<(String, Tensor)>,
    dir: &Path,
) -> Result<()> {
    if config.get("dtype").is_some() {
        config["dtype"] = json!("float32");
    } else {
        config["torch_dtype"] = json!("float32");
    }
    write_json(&dir.join("config.json"), &config)?;
    // A reward model's head, unless the caller passes its own (trained) one.
    let head = model
        .score_head
        .clone()
        .filter(|_| !extra.iter().any(|(n, _)| n == "score.weight"))
        .map(|t| ("score.weight".to_string(), t));
    let tensors: Vec<(String, Tensor)> = model
        .state_dict()?
        .into_iter()
        .chain(head)
        .chain(extra)
        .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?.contiguous()?)))
        .collect::<Result<_>>()?;
    write_safetensors(&tensors, &dir.join("model.safetensors"))
}

/// Writes f32 tensors as a safetensors file with PyTorch's metadata (`format: pt`).
pub fn write_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_dtype(DType::F32)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, t)| (n.as_str(), TensorView(t))),
        Some(meta),
        path,
    )
    .with_context(|| format!("cannot write {}", path.display()))
}

/// Adapter from a contiguous f32 candle tensor to safetensors' `View`.
struct TensorView<'a>(&'a Tensor);

impl safetensors::View for TensorView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.0.dims()
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let v: Vec<f32> = self
            .0
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .unwrap_or_default();
        std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.0.elem_count() * 4
    }
}

fn tokenizer_beside(dir: &Path) -> Result<Option<Tokenizer>> {
    Ok(if dir.join("tokenizer.json").exists() {
        Some(Tokenizer::from_hf_dir(dir)?)
    } else {
        None
    })
}

fn generation_config_beside(dir: &Path) -> Result<Option<Value>> {
    let path = dir.join("generation_config.json");
    Ok(if path.exists() {
        Some(read_json(&path)?)
    } else {
        None
    })
}

/// The base name an adapter records: a cached repo id as given, a path made absolute.
fn base_name(spec: &str, source: &Path) -> String {
    if Path::new(spec).exists() {
        std::fs::canonicalize(source)
            .unwrap_or_else(|_| source.to_path_buf())
            .display()
            .to_string()
    } else {
        spec.to_string()
    }
}

fn read_parts(spec: &str) -> Result<Parts> {
    let expanded = crate::io::expand_tilde(spec);
    match resolve(&expanded)? {
        Source::HfDir(dir) => Ok(Parts {
            config: ModelConfig::from_file(&dir.join("config.json"))?,
            weights: read_hf_weights(&dir)?,
            tokenizer: tokenizer_beside(&dir)?,
            generation_config: generation_config_beside(&dir)?,
            base_name: base_name(&expanded, &dir),
            source: dir,
        }),
        Source::Gguf(path) => {
            let g = GgufFile::open(&path)?;
            let config = g.config().with_context(|| format!("{}", path.display()))?;
            let weights = g.weights(&path, &config)?;
            let tokenizer =
                Tokenizer::from_gguf(&g).with_context(|| format!("{}", path.display()))?;
            let mut gen = json!({});
            if let Some(b) = config.bos_token_id {
                gen["bos_token_id"] = json!(b);
            }
            if !config.eos_token_ids.is_empty() {
                gen["eos_token_id"] = json!(config.eos_token_ids[0]);
            }
            Ok(Parts {
                config,
                weights,
                tokenizer: Some(tokenizer),
                generation_config: Some(gen),
                base_name: base_name(&expanded, &path),
                source: path,
            })
        }
        Source::Adapter(dir) => {
            let adapter = Adapter::read(&dir)?;
            let base_spec = adapter.base_spec()?;
            if matches!(resolve(&base_spec)?, Source::Adapter(_)) {
                bail!(
                    "{}: the base model is itself an adapter; merge it first (rlhf merge)",
                    dir.display()
                );
            }
            let mut p = read_parts(&base_spec)?;
            let gpt2 = p.config.family == crate::model::hparams::Family::Gpt2;
            adapter.merge_into(&mut p.weights, |name| {
                gpt2 && crate::model::gpt2::is_conv1d(name)
            })?;
            if let Some(t) = tokenizer_beside(&dir)? {
                p.tokenizer = Some(t);
            }
            if let Some(g) = generation_config_beside(&dir)? {
                p.generation_config = Some(g);
            }
            if adapter.config.task_type.as_deref() == Some("SEQ_CLS") {
                p.config.raw["architectures"] =
                    json!([p.config.sequence_classifier_architecture()]);
            }
            if let Some(bias) = adapter
                .config
                .other
                .get(crate::model::scalar_head::BIAS_KEY)
            {
                p.config.raw[crate::model::scalar_head::BIAS_KEY] = bias.clone();
            }
            p.source = dir;
            Ok(p)
        }
    }
}
