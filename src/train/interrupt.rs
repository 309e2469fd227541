//! SIGINT and SIGTERM during training: the loop finishes the step it is in, writes a checkpoint
//! and stops with the conventional status (128 + the signal: 130, 143), so `--resume` loses
//! nothing. A second signal ends the process at once, as if no handler were installed.

use anyhow::Result;
use signal_hook::consts::{SIGINT, SIGTERM};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// The signal that asked the run to stop (0: none).
static SIGNAL: OnceLock<Arc<AtomicUsize>> = OnceLock::new();

/// Installs the handlers (once; later calls do nothing).
pub fn watch() -> Result<()> {
    if SIGNAL.get().is_some() {
        return Ok(());
    }
    let which = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        // Registered first, so it sees `seen` as the previous signal left it.
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, seen.clone())?;
        signal_hook::flag::register(sig, seen.clone())?;
        signal_hook::flag::register_usize(sig, which.clone(), sig as usize)?;
    }
    let _ = SIGNAL.set(which);
    Ok(())
}

/// The signal received since [`watch`], if any.
pub fn pending() -> Option<i32> {
    let s = SIGNAL.get()?.load(Ordering::SeqCst);
    (s != 0).then_some(s as i32)
}

/// Whether any rank of the run received a signal (every rank must stop after the same step).
pub fn pending_anywhere() -> Option<i32> {
    let world = crate::dist::world();
    let mine = pending().unwrap_or(0);
    if world.size() == 1 {
        return (mine != 0).then_some(mine);
    }
    let mut x = [mine as f64];
    world.sum_f64(&mut x);
    // Several ranks may have the signal; SIGINT + SIGTERM sums are not signals, so prefer ours.
    (x[0] > 0.0).then_some(if mine != 0 { mine } else { SIGTERM })
}

/// The run stopped on a signal after writing its checkpoint.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
    pub step: u64,
    pub checkpoint: Option<PathBuf>,
}

impl Interrupted {
    /// A run stopped by `signal` after `step` steps. Rank 0 keeps a checkpoint of that step: the
    /// one written at it (`saved_at`), else a new one from `save`; the other ranks, and a run
    /// that did no step, keep none.
    pub fn after(
        signal: i32,
        step: u64,
        saved_at: Option<u64>,
        out: &Path,
        save: impl FnOnce() -> Result<PathBuf>,
    ) -> Result<Interrupted> {
        let checkpoint = if step == 0 || !crate::dist::world().is_main() {
            None
        } else if saved_at == Some(step) {
            crate::train::state::latest_checkpoint(out)
        } else {
            Some(save()?)
        };
        Ok(Interrupted {
            signal,
            step,
            checkpoint,
        })
    }

    /// The process's exit status: 128 + the signal.
    pub fn exit_code(&self) -> i32 {
        128 + self.signal
    }
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.signal {
            SIGINT => "SIGINT",
            SIGTERM => "SIGTERM",
            _ => "a signal",
        };
        match &self.checkpoint {
            Some(ck) => write!(
                f,
                "stopped by {name} after step {}; checkpoint {} written (continue with --resume)",
                self.step,
                ck.display()
            ),
            None => write!(
                f,
                "stopped by {name} before the first step; nothing to save"
            ),
        }
    }
}

impl std::error::Error for Interrupted {}
