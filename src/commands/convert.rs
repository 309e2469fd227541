//! `rlhf convert`: any supported checkpoint (GGUF, HF dir, HF cache) → an HF directory.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// HF model directory, .gguf file, or repo id in the local HF cache.
    #[arg(long)]
    pub model: String,
    /// Output directory (must not exist or be empty); written completely or not at all.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: &ConvertArgs) -> Result<()> {
    let ck = super::load_for_inference(&args.model)?;
    let out = ck.save(&args.out)?;
    eprintln!(
        "wrote {} (float32 safetensors, config, tokenizer)",
        out.display()
    );
    Ok(())
}
