//! `rlhf convert`: any supported checkpoint (GGUF, HF dir, HF cache, PEFT adapter) → an HF
//! directory; `rlhf merge`: a LoRA adapter merged into its base (W + s·B·A), the same way.

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

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// PEFT LoRA adapter directory (adapter_config.json names the base).
    #[arg(long)]
    pub adapter: String,
    /// Output directory (must not exist or be empty); written completely or not at all.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn merge(args: &MergeArgs) -> Result<()> {
    let dir = std::path::Path::new(&args.adapter);
    if !crate::model::peft::is_adapter_dir(dir) {
        anyhow::bail!(
            "{}: not a PEFT adapter directory (no {})",
            dir.display(),
            crate::model::peft::CONFIG_FILE
        );
    }
    let ck = super::load_for_inference(&args.adapter)?;
    let out = ck.save(&args.out)?;
    eprintln!(
        "wrote {}: the adapter merged into its base (float32 safetensors, config, tokenizer)",
        out.display()
    );
    Ok(())
}
