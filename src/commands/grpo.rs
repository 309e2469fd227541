//! `rlhf grpo`: critic-free online RL — GRPO, RLOO or REINFORCE++ advantages (`advantage`) over
//! G responses per prompt, scored by reward functions written as code (or reward models).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{start_training, TrainArgs};
use crate::algos::grpo::{Grpo, GrpoConfig};
use crate::checkpoint::{save_final, Checkpoint};
use crate::generate::SamplingConfig;
use crate::model::lora::LoraConfig;
use crate::rl::{self, LoopConfig, Models, Reference};
use crate::settings::{describe, help, KeyDoc, Section};
use crate::train::fingerprint::resume_fingerprint;
use crate::train::TrainConfig;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoRunConfig {
    pub model: String,
    pub ref_model: String,
    pub reward_funcs: Vec<String>,
    pub reward_weights: Vec<f64>,
    pub reward_timeout: f64,
    pub prompt_file: String,
    pub max_prompt_length: usize,
    pub chat: bool,
}

impl Default for GrpoRunConfig {
    fn default() -> Self {
        GrpoRunConfig {
            model: String::new(),
            ref_model: String::new(),
            reward_funcs: vec![],
            reward_weights: vec![],
            reward_timeout: crate::reward::funcs::DEFAULT_EXEC_TIMEOUT.as_secs_f64(),
            prompt_file: String::new(),
            max_prompt_length: 512,
            chat: false,
        }
    }
}

impl Section for GrpoRunConfig {
    const TITLE: &'static str = "run";
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::required("model", "policy to train: HF dir, .gguf, cached repo id or PEFT adapter dir").path(),
        KeyDoc::new("ref_model", "frozen reference for β > 0; empty: the policy's starting weights").path(),
        KeyDoc::required("reward_funcs", "list of rewards, summed with reward_weights: \"accuracy[:<column>]\" (final answer vs the prompt record's column, default answer), \"think_format\", \"format:<regex>\", \"soft_overlong:<max>:<cache>\", \"exec:<command>\" (JSON lines), \"vader\", \"rule:…\", or a reward-model dir"),
        KeyDoc::new("reward_weights", "one weight per reward function (empty: 1 each)"),
        KeyDoc::new("reward_timeout", "seconds an exec: reward program may take per answer"),
        KeyDoc::required("prompt_file", "prompts {\"prompt\": text or messages} (.jsonl or .parquet)").path(),
        KeyDoc::new("max_prompt_length", "longer prompts keep their last tokens (counted)"),
        KeyDoc::new("chat", "wrap string prompts as a user message in the chat template"),
    ];
}

pub fn help_text() -> String {
    describe(&[
        help::<GrpoRunConfig>(),
        help::<GrpoConfig>(),
        help::<TrainConfig>(),
        help::<LoraConfig>(),
    ]) + "\nIn rlhf grpo a step is one iteration: per_device_train_batch_size × gradient_accumulation_steps\n\
          responses (a multiple of num_generations: that many / G prompts, G responses each), then\n\
          num_iterations updates on them; max_steps and save_steps count iterations.\n"
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let settings = args.settings(&[
        GrpoRunConfig::KEYS,
        GrpoConfig::KEYS,
        TrainConfig::KEYS,
        LoraConfig::KEYS,
    ])?;
    let lora = super::lora_settings(&settings)?;
    let origin = settings.origin().to_string();
    let run: GrpoRunConfig = settings.section()?;
    let grpo: GrpoConfig = settings.section()?;
    grpo.validate().with_context(|| origin.clone())?;
    let inputs = [&run.model, &run.ref_model, &run.prompt_file];
    let (train_cfg, out) = start_training(args, &settings, &inputs.map(String::as_str))?;
    super::refuse_eval_steps(&train_cfg, &origin, "grpo")?;
    let micro_batch = train_cfg.per_device_train_batch_size;
    let episodes = micro_batch * train_cfg.global_accumulation();
    if !episodes.is_multiple_of(grpo.num_generations) {
        anyhow::bail!(
            "{origin}: per_device_train_batch_size × gradient_accumulation_steps ({episodes}) must be a multiple of num_generations ({})",
            grpo.num_generations
        );
    }
    if !(run.reward_timeout.is_finite() && run.reward_timeout > 0.0) {
        anyhow::bail!("{origin}: reward_timeout must be a positive number of seconds");
    }

    let policy = super::load_trainable(&run.model, &lora, train_cfg.seed)?;
    let tok = policy.tokenizer()?;
    let prompts = super::rl_prompts(
        &policy,
        (&run.prompt_file, run.chat, run.max_prompt_length),
        (grpo.max_completion_length, "max_completion_length"),
        &origin,
    )?;
    let mut reward = crate::reward::from_funcs(
        &run.reward_funcs,
        &run.reward_weights,
        tok,
        train_cfg.per_device_eval_batch_size,
        std::time::Duration::from_secs_f64(run.reward_timeout),
    )
    .with_context(|| origin.clone())?;
    eprintln!("reward: {}", reward.describe());
    // β = 0 (the default) loads no reference at all; a fresh LoRA policy's is its base.
    let ref_ck = if grpo.beta > 0.0 && !(run.ref_model.is_empty() && policy.fresh_adapters) {
        let spec = if run.ref_model.is_empty() {
            &run.model
        } else {
            &run.ref_model
        };
        Some(Checkpoint::load(spec, false)?)
    } else {
        None
    };
    let reference = (grpo.beta > 0.0).then(|| {
        ref_ck
            .as_ref()
            .map_or(Reference::PolicyBase, |r| Reference::Model(&r.model))
    });
    let fp = resume_fingerprint(
        &[
            json!([
                "grpo",
                run.model,
                run.ref_model,
                run.reward_funcs,
                run.reward_weights,
                run.chat,
                run.max_prompt_length
            ]),
            serde_json::to_value(&grpo)?,
            train_cfg.resume_relevant(),
            serde_json::to_value(&lora)?,
        ],
        prompts.iter().map(|p| p.ids.as_slice()),
    );
    let iterations = if train_cfg.max_steps > 0 {
        train_cfg.max_steps as u64
    } else {
        let groups = (train_cfg.num_train_epochs * prompts.len() as f64).ceil() as usize;
        groups.div_ceil(episodes / grpo.num_generations).max(1) as u64
    };
    let loop_cfg = LoopConfig {
        iterations,
        episodes,
        group_size: grpo.num_generations,
        epochs: grpo.num_iterations,
        minibatch: episodes,
        micro_batch,
        sampling: SamplingConfig {
            max_new_tokens: grpo.max_completion_length,
            temperature: grpo.temperature,
            top_k: grpo.top_k,
            top_p: grpo.top_p,
            stop_ids: policy.stop_token_ids(),
            seed: 0,
            max_rows: grpo.max_num_seqs,
            ..Default::default()
        },
        sample_every: grpo.sample_every,
        ptx: None,
        ema_decay: 0.0,
    };
    let models = Models {
        policy: &policy.model,
        reference,
        value: None,
    };
    let run_info = rl::Run {
        train: &train_cfg,
        prompts: &prompts,
        tokenizer: tok,
        reward: reward.as_mut(),
        resume: args.resume,
        fingerprint: &fp,
    };
    let outcome = rl::run(&loop_cfg, &models, &mut Grpo { cfg: grpo }, run_info)?;
    save_final(&policy, out.path())?;
    super::report_done(format_args!(
        "done: {} iterations ({} updates skipped); last reward {:.4}; policy written to {}",
        outcome.iterations,
        outcome.skipped_updates,
        outcome.last("reward"),
        out.path().display()
    ));
    Ok(())
}
