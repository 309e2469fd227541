//! The command-line subcommands, as library functions that take parsed options.

pub mod bench;
pub mod convert;
pub mod generate;
pub mod logprobs;
pub mod sft;

use anyhow::Result;
use std::time::Instant;

use crate::checkpoint::Checkpoint;

/// Loads a model for inference and says on stderr what was loaded.
pub fn load_for_inference(spec: &str) -> Result<Checkpoint> {
    let t = Instant::now();
    let ck = Checkpoint::load(spec, false)?;
    let c = &ck.model.config;
    eprintln!(
        "loaded {} ({} model, {:.1}M parameters) in {:.1}s",
        ck.source.display(),
        c.model_type,
        c.num_parameters() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    if !ck.model.unused_tensors.is_empty() {
        eprintln!(
            "note: {} checkpoint tensor(s) not used by the causal LM: {}",
            ck.model.unused_tensors.len(),
            ck.model
                .unused_tensors
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(ck)
}
