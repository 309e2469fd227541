//! The command-line subcommands: each parses its options, calls the library, and reports.

pub mod bench;
pub mod convert;
pub mod dpo;
pub mod eval;
pub mod generate;
pub mod grpo;
pub mod logprobs;
pub mod ppo;
pub mod preferences;
pub mod quickstart;
pub mod rm;
pub mod score;
pub mod sft;

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Instant;

use crate::checkpoint::Checkpoint;
use crate::model::lora::LoraConfig;
use crate::settings::{KeyDoc, Section, Settings};
use crate::train::output_dir::{Existing, OutputDir};
use crate::train::TrainConfig;

/// `--config`, `--set`, `--resume`, `--overwrite`: what every training command takes.
#[derive(clap::Args, Debug, Default)]
pub struct TrainArgs {
    /// TOML file with the run's settings (keys below).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override or add a setting: --set learning_rate=1e-5 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Continue from the newest checkpoint in output_dir.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Replace the results of an earlier run in output_dir: its checkpoints and metrics are
    /// removed at the start, its model files replaced when this run finishes.
    #[arg(long)]
    pub overwrite: bool,
}

impl TrainArgs {
    /// The run's settings, with keys that none of `known` declares refused.
    pub fn settings(&self, known: &[&[KeyDoc]]) -> Result<Settings> {
        Settings::load(self.config.as_deref(), &self.sets, known)
    }
}

/// What every training command does before loading anything: the training section read and
/// checked, the thread count applied, and the output directory claimed (locked; not one of the
/// `inputs`; earlier results kept unless `--resume` or `--overwrite`).
pub fn start_training(
    args: &TrainArgs,
    settings: &Settings,
    inputs: &[&str],
) -> Result<(TrainConfig, OutputDir)> {
    let train: TrainConfig = settings.section()?;
    // Ctrl-C and SIGTERM from here on end the run after a step, with a checkpoint.
    crate::train::interrupt::watch()?;
    train
        .validate()
        .with_context(|| settings.origin().to_string())?;
    let world = crate::dist::world();
    if train.threads > 0 {
        std::env::set_var("RAYON_NUM_THREADS", train.threads.to_string());
    } else if world.size() > 1 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Ranks sharing a machine share its cores (torchrun does the same with OMP_NUM_THREADS):
        // the cores this rank is bound to, else its part of the machine's.
        let threads = crate::dist::threads_per_rank();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        if world.is_main() {
            eprintln!("note: {threads} thread(s) per rank; set threads to change it");
        }
    }
    crate::ops::bf16::set_enabled(bf16_pays(train.bf16))?;
    crate::model::set_frozen_dtype(train.frozen_dtype);
    let existing = match (args.resume, args.overwrite) {
        (true, _) => Existing::Resume,
        (false, true) => Existing::Replace,
        (false, false) => Existing::Keep,
    };
    // Rank 0 owns the output directory; the other ranks write nothing into it.
    let out = if crate::dist::world().is_main() {
        OutputDir::claim(&train.output_dir, inputs, existing)?
    } else {
        OutputDir::unclaimed(&train.output_dir)
    };
    Ok((train, out))
}

/// The closing line of a training command, printed by rank 0 alone (the other ranks of a
/// data-parallel run wrote nothing).
pub fn report_done(line: std::fmt::Arguments) {
    if crate::dist::world().is_main() {
        eprintln!("{line}");
    }
}

/// Whether a run that asks for bf16 gets bf16 matmuls on this CPU; says which on stderr.
pub fn bf16_pays(requested: bool) -> bool {
    if !requested {
        return false;
    }
    let d = crate::ops::bf16::decision();
    if d.use_kernel {
        eprintln!(
            "bf16: matmul operands in bf16, f32 accumulation ({})",
            d.reason
        );
    } else {
        eprintln!(
            "note: bf16 = true, but bf16 matmuls do not pay on this CPU ({}); training in f32",
            d.reason
        );
    }
    d.use_kernel
}

/// The online-RL commands have no held-out evaluation during training: `eval_steps` is refused.
pub fn refuse_eval_steps(train: &TrainConfig, origin: &str, command: &str) -> Result<()> {
    if train.eval_steps > 0 {
        anyhow::bail!("{origin}: eval_steps: rlhf {command} has no held-out evaluation during training; evaluate the saved policy with rlhf eval");
    }
    Ok(())
}

/// An online-RL run's prompts, read with the policy's tokenizer (long ones keep their end), after
/// checking that prompt + response fit the model; `response` is (its length, its key's name).
pub fn rl_prompts(
    policy: &Checkpoint,
    (path, chat, max_prompt_length): (&str, bool, usize),
    (response_length, key): (usize, &str),
    origin: &str,
) -> Result<Vec<crate::data::prompts::Prompt>> {
    policy
        .model
        .config
        .check_length(
            max_prompt_length + response_length,
            &format!("max_prompt_length + {key}"),
        )
        .with_context(|| origin.to_string())?;
    let (prompts, cut) =
        crate::data::prompts::read_prompts(path, policy.tokenizer()?, chat, max_prompt_length)?;
    eprintln!(
        "prompts: {} ({cut} truncated to their last {max_prompt_length} tokens)",
        prompts.len()
    );
    Ok(prompts)
}

/// The run's LoRA section, checked (naming where the settings came from) when LoRA is on.
pub fn lora_settings(settings: &Settings) -> Result<LoraConfig> {
    let lora: LoraConfig = settings.section()?;
    if lora.use_peft {
        lora.validate()
            .with_context(|| settings.origin().to_string())?;
    } else if let Some(k) = LoraConfig::KEYS
        .iter()
        .map(|d| d.key)
        .find(|&k| k != "use_peft" && settings.is_given(k))
    {
        // TRL ignores LoRA keys without use_peft; say so rather than train every weight quietly.
        eprintln!(
            "note: {}: `{k}` is set but use_peft = false, so no adapter is used and every weight trains",
            settings.origin()
        );
    }
    Ok(lora)
}

/// The model a training command trains: every weight, or with `use_peft` a LoRA adapter on the
/// frozen base (a fresh one, or the adapter `spec` names, trained further).
pub fn load_trainable(spec: &str, lora: &LoraConfig, seed: u64) -> Result<Checkpoint> {
    if lora.use_peft {
        Checkpoint::load_for_lora(spec, lora, seed)
    } else {
        Checkpoint::load(spec, true)
    }
}

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

/// Metrics as "name value, " pairs, for a run's closing line.
pub fn metrics_summary(metrics: &[(String, f64)]) -> String {
    metrics
        .iter()
        .map(|(k, v)| format!("{k} {v:.4}, "))
        .collect()
}
