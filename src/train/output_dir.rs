//! The output directory of a training run, claimed before any work: nothing a user has is lost
//! through it. A run holds an exclusive lock on the directory for its lifetime (a second run into
//! it fails at once, naming the holder); the directory may not be, or contain, one of the run's
//! inputs; and results already there are kept unless the run resumes them (`--resume`) or is told
//! to replace them (`--overwrite`).

use anyhow::{bail, Context, Result};
use std::fs::{File, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::state::{checkpoints_dir, latest_checkpoint};

/// The lock file inside the output directory (it stays behind; the lock is the kernel's, and
/// goes with the process).
pub const LOCK_FILE: &str = ".rlhf.lock";

/// What the run does with results already in the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Refuse to start when the directory holds anything.
    Keep,
    /// Continue from its newest checkpoint (`--resume`).
    Resume,
    /// Remove the results of an earlier run first (`--overwrite`).
    Replace,
}

/// A claimed output directory; the lock is released when this is dropped (or the process ends).
pub struct OutputDir {
    path: PathBuf,
    _lock: Option<File>,
}

/// Files and directories an rlhf run writes into its output directory, besides the model.
const RUN_RECORDS: &[&str] = &[
    "checkpoints",
    "tensorboard",
    "metrics.jsonl",
    "samples.jsonl",
    ".final-partial",
];

impl OutputDir {
    /// Claims `path` for a run that reads `inputs` (paths as the user gave them; entries that do
    /// not name an existing file, such as `vader`, are ignored).
    pub fn claim(path: &str, inputs: &[&str], existing: Existing) -> Result<OutputDir> {
        if path.trim().is_empty() {
            bail!("output_dir is empty; name a directory for the run's results");
        }
        let dir = PathBuf::from(path);
        if dir.exists() && !dir.is_dir() {
            bail!("output_dir {} exists and is not a directory", dir.display());
        }
        refuse_inputs_inside(&dir, inputs)?;
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create output_dir {}", dir.display()))?;
        let lock = lock(&dir)?;
        let claimed = OutputDir {
            path: dir,
            _lock: Some(lock),
        };
        claimed.settle_existing(existing)?;
        Ok(claimed)
    }

    /// The directory of a run whose rank 0 claimed it (the other ranks of a data-parallel run,
    /// which write nothing there).
    pub fn unclaimed(path: &str) -> OutputDir {
        OutputDir {
            path: PathBuf::from(path),
            _lock: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Entries of the directory other than the lock file.
    fn contents(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(&self.path)
            .with_context(|| format!("cannot list {}", self.path.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n != LOCK_FILE)
            .collect();
        names.sort();
        Ok(names)
    }

    fn settle_existing(&self, existing: Existing) -> Result<()> {
        let contents = self.contents()?;
        if contents.is_empty() {
            if existing == Existing::Resume {
                eprintln!(
                    "note: --resume given but {} is empty; starting from the beginning",
                    self.path.display()
                );
            }
            return Ok(());
        }
        let shown = {
            let mut s = contents
                .iter()
                .take(4)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if contents.len() > 4 {
                s.push_str(", …");
            }
            s
        };
        let has_checkpoint = latest_checkpoint(&self.path).is_some();
        match existing {
            Existing::Resume if has_checkpoint => Ok(()),
            Existing::Resume => bail!(
                "--resume: output_dir {} holds results ({shown}) but no checkpoint to resume from; pass --overwrite to replace them, or choose another output_dir",
                self.path.display()
            ),
            Existing::Keep => bail!(
                "output_dir {} already holds {} ({shown}); pass {}--overwrite to replace it, or choose another output_dir",
                self.path.display(),
                if has_checkpoint { "a run with checkpoints" } else { "results" },
                if has_checkpoint { "--resume to continue it, " } else { "" }
            ),
            Existing::Replace => {
                // The earlier run's records go now (they would mix with the new run's); its model
                // files stay until the new run's final model replaces them.
                for name in RUN_RECORDS {
                    let p = self.path.join(name);
                    let removed = if p.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else if p.exists() {
                        std::fs::remove_file(&p)
                    } else {
                        Ok(())
                    };
                    removed.with_context(|| format!("--overwrite: cannot remove {}", p.display()))?;
                }
                debug_assert!(!checkpoints_dir(&self.path).exists());
                Ok(())
            }
        }
    }
}

/// Takes the directory's lock and records who holds it, or names the holder.
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("output_dir {} is not writable", dir.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            bail!(
                "output_dir {} is in use by another rlhf run ({}); wait for it to finish or choose another output_dir",
                dir.display(),
                if holder.is_empty() { "holder unknown" } else { holder }
            );
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
    let args: Vec<String> = std::env::args().collect();
    let holder = format!("pid {}: {}", std::process::id(), args.join(" "));
    file.set_len(0)?;
    file.write_all(holder.as_bytes())
        .with_context(|| format!("output_dir {} is not writable", dir.display()))?;
    file.flush()?;
    Ok(file)
}

/// Refuses an output directory that is one of the inputs or holds one.
fn refuse_inputs_inside(dir: &Path, inputs: &[&str]) -> Result<()> {
    let Some(out) = canonical_or_planned(dir) else {
        return Ok(());
    };
    for input in inputs.iter().filter(|i| !i.is_empty()) {
        let Ok(p) = Path::new(input).canonicalize() else {
            continue;
        };
        if p == out {
            bail!("output_dir {} is the input {input}; writing there would overwrite it — choose another output_dir", dir.display());
        }
        if p.starts_with(&out) {
            bail!("output_dir {} contains the input {input}; writing there could overwrite it — choose another output_dir", dir.display());
        }
    }
    Ok(())
}

/// The absolute path `dir` has or will have once created (its nearest existing ancestor
/// canonicalised, the rest appended).
fn canonical_or_planned(dir: &Path) -> Option<PathBuf> {
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir().ok()?.join(dir)
    };
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return Some(out);
        }
        rest.push(existing.file_name()?.to_os_string());
        existing = existing.parent()?;
    }
}
