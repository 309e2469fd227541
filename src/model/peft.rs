//! PEFT's LoRA adapter directory: `adapter_config.json` + `adapter_model.safetensors`, tensors named
//! `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (and `base_model.model.score.weight`
//! for a reward model's head, a "module to save"). `peft.PeftModel.from_pretrained` loads what we
//! write; we load what it writes, or refuse, naming the file, what we do not support.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::lora::{scale, LoraAdapter, TargetModules};
use super::weights::{read_safetensors, WeightMap};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// The keys of adapter_config.json that change what the adapter computes. Others (PEFT writes
/// ~30) are ignored when they hold their no-op defaults and refused otherwise (`check`).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Everything else, checked by `check`.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl AdapterConfig {
    pub fn scale(&self) -> f64 {
        scale(self.lora_alpha, self.r, self.use_rslora)
    }

    /// Refuses adapter features that would change the outputs and that we do not implement.
    fn check(&self, path: &Path) -> Result<()> {
        let at = || path.display().to_string();
        if self.peft_type != "LORA" {
            bail!(
                "{}: peft_type `{}`: only LORA adapters are supported",
                at(),
                self.peft_type
            );
        }
        if self.r == 0 {
            bail!("{}: r is 0", at());
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            bail!("{}: lora_alpha must be a positive number", at());
        }
        let no_op = |k: &str, v: &Value| match k {
            "bias" => v == "none",
            "use_dora" | "lora_bias" | "use_qalora" => v == false,
            "rank_pattern" | "alpha_pattern" => v.as_object().is_none_or(|m| m.is_empty()),
            "layers_to_transform"
            | "layer_replication"
            | "target_parameters"
            | "trainable_token_indices"
            | "exclude_modules" => v.is_null() || v.as_array().is_some_and(|a| a.is_empty()),
            _ => true,
        };
        for (k, v) in &self.other {
            if !no_op(k, v) {
                bail!(
                    "{}: `{k}` = {v} is not supported (rlhf reads plain LoRA adapters)",
                    at()
                );
            }
        }
        if let Some(m) = &self.modules_to_save {
            // PEFT's SEQ_CLS default lists both names a classification head may have.
            if let Some(bad) = m.iter().find(|m| *m != "score" && *m != "classifier") {
                bail!("{}: modules_to_save `{bad}` is not supported (only a reward model's `score` head)", at());
            }
        }
        Ok(())
    }
}

/// An adapter read from disk.
pub struct Adapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    /// By the adapted projection's full transformers name (`model.layers.0.self_attn.q_proj`).
    pub modules: BTreeMap<String, LoraAdapter>,
    /// Whole tensors that replace the base's (`score.weight`).
    pub saved: Vec<(String, Tensor)>,
}

pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
}

impl Adapter {
    pub fn read(dir: &Path) -> Result<Adapter> {
        let cfg_path = dir.join(CONFIG_FILE);
        let config: AdapterConfig = serde_json::from_value(crate::io::read_json(&cfg_path)?)
            .with_context(|| format!("{}: not a PEFT adapter config", cfg_path.display()))?;
        config.check(&cfg_path)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.is_file() {
            bail!(
                "{}: missing (rlhf reads safetensors adapters only, never adapter_model.bin)",
                weights_path.display()
            );
        }
        let mut tensors = WeightMap::default();
        read_safetensors(&weights_path, &mut tensors)?;
        let mut parts: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        let mut saved = vec![];
        let at = weights_path.display();
        for name in tensors.leftover() {
            let t = tensors.remove(&name).expect("listed");
            // PEFT leaves the adapter name out when saving; old files may still carry it.
            let plain = name.replace(".default.", ".");
            let Some(rest) = plain.strip_prefix(PREFIX) else {
                bail!("{at}: tensor `{name}` is not a PEFT adapter tensor (no `{PREFIX}` prefix)");
            };
            if let Some(module) = rest.strip_suffix(".lora_A.weight") {
                parts.entry(module.to_string()).or_default().0 = Some(t);
            } else if let Some(module) = rest.strip_suffix(".lora_B.weight") {
                parts.entry(module.to_string()).or_default().1 = Some(t);
            } else if rest == "score.weight" || rest == "score.modules_to_save.weight" {
                saved.push(("score.weight".to_string(), t));
            } else {
                bail!("{at}: tensor `{name}` is not supported (only lora_A/lora_B weights and a `score` head)");
            }
        }
        let mut modules = BTreeMap::new();
        for (module, (a, b)) in parts {
            let (Some(a), Some(b)) = (a, b) else {
                bail!("{at}: `{module}` has only one of lora_A and lora_B");
            };
            let (r, _) = a.dims2()?;
            let (_, rb) = b.dims2()?;
            if r != config.r || rb != config.r {
                bail!(
                    "{at}: `{module}` has rank {r}/{rb} (lora_A/lora_B), adapter_config.json says r = {}",
                    config.r
                );
            }
            modules.insert(
                module,
                LoraAdapter {
                    a,
                    b,
                    scale: config.scale(),
                    dropout: config.lora_dropout as f32,
                },
            );
        }
        if modules.is_empty() {
            bail!("{at}: no lora_A/lora_B tensors");
        }
        Ok(Adapter {
            dir: dir.to_path_buf(),
            config,
            modules,
            saved,
        })
    }

    /// The base model's spec: `base_model_name_or_path` as a model path or cached repo id, else
    /// as a path relative to the adapter directory.
    pub fn base_spec(&self) -> Result<String> {
        let Some(name) = self
            .config
            .base_model_name_or_path
            .as_deref()
            .filter(|s| !s.is_empty())
        else {
            bail!(
                "{}: base_model_name_or_path is not set, so the base model is unknown",
                self.dir.join(CONFIG_FILE).display()
            );
        };
        match crate::checkpoint::resolve(name) {
            Ok(_) => Ok(name.to_string()),
            Err(_) if self.dir.join(name).exists() => Ok(self.dir.join(name).display().to_string()),
            // The resolver's own message says why.
            Err(e) => Err(e.context(format!(
                "{}: base model (base_model_name_or_path)",
                self.dir.join(CONFIG_FILE).display()
            ))),
        }
    }

    /// Adds every adapter's s·B·A into the base weights it adapts (PEFT's `merge_and_unload`),
    /// and puts the saved modules in place. `transposed(name)` says whether a weight is stored
    /// [in, out] (GPT-2's Conv1D).
    pub fn merge_into(&self, w: &mut WeightMap, transposed: impl Fn(&str) -> bool) -> Result<()> {
        for (module, adapter) in &self.modules {
            let full = format!("{module}.weight");
            // A bare-body checkpoint (no "model." / "transformer." prefix) names it without one.
            let key = if w.contains(&full) {
                full
            } else {
                match full.split_once('.') {
                    Some((_, rest)) if w.contains(rest) => rest.to_string(),
                    _ => bail!(
                        "{}: adapts `{module}`, which the base model has no weight for",
                        self.dir.display()
                    ),
                }
            };
            let base = w.remove(&key).expect("checked");
            let mut delta = adapter.delta()?;
            if transposed(&key) {
                delta = delta.t()?;
            }
            if delta.dims() != base.dims() {
                bail!(
                    "{}: `{module}` adapter is {:?} (out × in), the base weight is {:?}",
                    self.dir.display(),
                    adapter.delta()?.dims(),
                    base.dims()
                );
            }
            w.insert(key, (base + delta)?, self.dir.join(WEIGHTS_FILE));
        }
        for (name, t) in &self.saved {
            w.remove(name);
            w.insert(name.clone(), t.clone(), self.dir.join(WEIGHTS_FILE));
        }
        Ok(())
    }
}

/// What is written for an adapter we trained.
pub struct AdapterOut<'a> {
    pub base_model_name_or_path: String,
    /// "CAUSAL_LM" or "SEQ_CLS".
    pub task_type: &'a str,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub use_rslora: bool,
    pub fan_in_fan_out: bool,
    /// (full module name, A, B)
    pub modules: Vec<(String, Tensor, Tensor)>,
    /// A reward model's score head [1, D].
    pub score: Option<Tensor>,
}

/// Writes adapter_config.json and adapter_model.safetensors into `dir`.
pub fn write(dir: &Path, out: &AdapterOut) -> Result<()> {
    // PEFT's target_modules: the short names of the adapted projections.
    let mut targets: Vec<String> = out
        .modules
        .iter()
        .map(|(m, _, _)| m.rsplit('.').next().unwrap_or(m).to_string())
        .collect();
    targets.sort();
    targets.dedup();
    let config = json!({
        "peft_type": "LORA",
        "task_type": out.task_type,
        "base_model_name_or_path": out.base_model_name_or_path,
        "r": out.r,
        "lora_alpha": out.lora_alpha,
        "lora_dropout": out.lora_dropout,
        "use_rslora": out.use_rslora,
        "fan_in_fan_out": out.fan_in_fan_out,
        "target_modules": targets,
        "modules_to_save": if out.score.is_some() { json!(["score"]) } else { Value::Null },
        "bias": "none",
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    crate::io::write_json(&dir.join(CONFIG_FILE), &config)?;
    let mut tensors: Vec<(String, Tensor)> = vec![];
    for (m, a, b) in &out.modules {
        tensors.push((format!("{PREFIX}{m}.lora_A.weight"), a.clone()));
        tensors.push((format!("{PREFIX}{m}.lora_B.weight"), b.clone()));
    }
    if let Some(s) = &out.score {
        tensors.push((format!("{PREFIX}score.weight"), s.clone()));
    }
    crate::checkpoint::write_safetensors(&tensors, &dir.join(WEIGHTS_FILE))
}
