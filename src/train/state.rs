//! Resumable checkpoints: model weights, optimizer moments and the trainer's position, written into
//! a staging directory and renamed into place, so a kill at any moment leaves the last complete
//! checkpoint intact.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::step::Optimizer;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Non-finite steps skipped so far.
    pub skipped_steps: u64,
    /// Fingerprint of the settings that must not change across a resume.
    pub fingerprint: String,
    /// Algorithm-specific state (e.g. a KL controller), opaque to the trainer.
    #[serde(default)]
    pub extra: serde_json::Value,
    /// How the run was spread over processes (absent in checkpoints of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<Layout>,
}

/// Ranks × micro-batches per rank of a run: what its global batch is made of.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Layout {
    pub ranks: usize,
    pub gradient_accumulation_steps: usize,
}

impl Layout {
    pub fn global_accumulation(&self) -> usize {
        self.ranks * self.gradient_accumulation_steps
    }
}

impl TrainerState {
    /// The state of a run at step 0.
    pub fn fresh(fingerprint: &str) -> Self {
        TrainerState {
            step: 0,
            skipped_steps: 0,
            fingerprint: fingerprint.to_string(),
            extra: serde_json::Value::Null,
            layout: None,
        }
    }
}

pub fn checkpoints_dir(output_dir: &Path) -> PathBuf {
    output_dir.join("checkpoints")
}

fn step_of(p: &Path) -> Option<u64> {
    p.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok()
}

/// Complete checkpoints, oldest first.
pub fn list_checkpoints(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(checkpoints_dir(output_dir))
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter_map(|p| step_of(&p).map(|s| (s, p)))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    list_checkpoints(output_dir).pop().map(|(_, p)| p)
}

fn save_tensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, path)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `checkpoints/step-N` atomically and prunes all but the newest `keep`: the files are
/// written into a staging directory, flushed to the disk, and renamed into place; on any error
/// (a full disk) the staging directory is removed and the previous checkpoints stay as they were.
pub fn save_checkpoint(
    output_dir: &Path,
    optimizer: &Optimizer,
    state: &TrainerState,
    keep: usize,
    extra: &[(String, Tensor)],
) -> Result<PathBuf> {
    let dir = checkpoints_dir(output_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let final_path = dir.join(format!("step-{:08}", state.step));
    let staging = dir.join(format!(".partial-step-{:08}", state.step));
    // Left by a run that was killed while writing (one process writes here, so none is live).
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(".partial-step-")
        {
            std::fs::remove_dir_all(entry.path()).ok();
        }
    }
    let written = write_checkpoint_files(&staging, optimizer, state, extra);
    if let Err(e) = written {
        std::fs::remove_dir_all(&staging).ok();
        return Err(e.context(format!(
            "checkpoint of step {} not written; the earlier checkpoints in {} are intact",
            state.step,
            dir.display()
        )));
    }
    if final_path.exists() {
        std::fs::remove_dir_all(&final_path).ok();
    }
    std::fs::rename(&staging, &final_path)
        .with_context(|| format!("cannot move checkpoint into {}", final_path.display()))?;
    sync_dir(&dir)?;
    let all = list_checkpoints(output_dir);
    if keep > 0 && all.len() > keep {
        for (_, old) in &all[..all.len() - keep] {
            std::fs::remove_dir_all(old).ok();
        }
    }
    Ok(final_path)
}

/// Fault injection for the tests: with `RLHF_CRASH_AT=<point>@<step>` in the environment the
/// process aborts there (no destructors, no flushing: as `kill -9` would stop it), so that
/// `--resume` can be tested from a checkpoint cut off half-way through its files.
fn crash_here_if_asked(point: &str, step: u64) {
    if let Ok(at) = std::env::var("RLHF_CRASH_AT") {
        if at == format!("{point}@{step}") {
            eprintln!("RLHF_CRASH_AT={at}: aborting");
            std::process::abort();
        }
    }
}

/// The checkpoint's files in `staging`, each flushed to the disk (and the directory itself).
fn write_checkpoint_files(
    staging: &Path,
    optimizer: &Optimizer,
    state: &TrainerState,
    extra: &[(String, Tensor)],
) -> Result<()> {
    std::fs::create_dir(staging).with_context(|| format!("cannot create {}", staging.display()))?;
    let params = optimizer.params();
    let weights: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    save_tensors(&weights, &staging.join("model.safetensors"))?;
    crash_here_if_asked("checkpoint", state.step);
    save_tensors(
        &optimizer.adamw().state_tensors(params)?,
        &staging.join("optimizer.safetensors"),
    )?;
    if !extra.is_empty() {
        save_tensors(extra, &staging.join("extra.safetensors"))?;
    }
    crate::io::write_json(
        &staging.join("trainer_state.json"),
        &serde_json::to_value(state)?,
    )?;
    for entry in std::fs::read_dir(staging)? {
        let path = entry?.path();
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot flush {} to the disk", path.display()))?;
    }
    sync_dir(staging)
}

/// Flushes a directory's entries (a rename into it) to the disk.
fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot flush {} to the disk", dir.display()))
}

/// Restores weights and optimizer moments in place; returns the trainer state.
pub fn load_checkpoint(path: &Path, optimizer: &mut Optimizer) -> Result<TrainerState> {
    let state_path = path.join("trainer_state.json");
    let state: TrainerState = serde_json::from_value(crate::io::read_json(&state_path)?)
        .with_context(|| format!("{}: not a trainer state", state_path.display()))?;
    let dev = candle_core::Device::Cpu;
    let wpath = path.join("model.safetensors");
    let weights = candle_core::safetensors::load(&wpath, &dev)
        .with_context(|| format!("cannot read {}", wpath.display()))?;
    let params = optimizer.params().to_vec();
    for (name, var) in &params {
        let Some(t) = weights.get(name) else {
            bail!("{}: lacks tensor `{name}`", wpath.display())
        };
        if t.dims() != var.dims() {
            bail!(
                "{}: tensor `{name}` has shape {:?}, the model has {:?}",
                wpath.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(t)?;
    }
    let opath = path.join("optimizer.safetensors");
    let opt = candle_core::safetensors::load(&opath, &dev)
        .with_context(|| format!("cannot read {}", opath.display()))?;
    // Algorithms whose steps are not optimizer updates (PPO) record the update count.
    let updates = state
        .extra
        .get("optimizer_steps")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(state.step - state.skipped_steps);
    optimizer.adamw_mut().load_state(&params, &opt, updates)?;
    Ok(state)
}

/// Tensors an algorithm saved beside the weights (e.g. PPO's EMA of the policy); empty if none.
pub fn load_extra_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let p = path.join("extra.safetensors");
    if !p.exists() {
        return Ok(HashMap::new());
    }
    candle_core::safetensors::load(&p, &candle_core::Device::Cpu)
        .with_context(|| format!("cannot read {}", p.display()))
}
