//! `rlhf ppo`: RLHF with PPO against a reward model or a built-in scorer, with a per-token KL
//! penalty to the reference (fixed or adaptive β) and optional PPO-ptx.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::Path;

use super::{check_train_config, fingerprint, settings_table, RunArgs};
use crate::algos::ppo_trainer::{run_ppo, PpoConfig, PpoModels};
use crate::checkpoint::{save_final, Checkpoint};
use crate::config::{describe, extract, KeyDoc};
use crate::data::prompts::read_prompts;
use crate::data::sft::{prepare, Example, SftDataConfig};
use crate::model::scalar_head::ScalarHead;
use crate::tokenize::Tokenizer;
use crate::train::{TrainConfig, TRAIN_KEYS};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoRunConfig {
    pub model: String,
    pub ref_model: String,
    pub reward: String,
    pub value_model: String,
    pub prompt_file: String,
    pub max_prompt_length: usize,
    pub chat: bool,
    pub ptx_file: String,
    pub ptx_max_length: usize,
}

impl Default for PpoRunConfig {
    fn default() -> Self {
        PpoRunConfig {
            model: String::new(),
            ref_model: String::new(),
            reward: String::new(),
            value_model: String::new(),
            prompt_file: String::new(),
            max_prompt_length: 128,
            chat: false,
            ptx_file: String::new(),
            ptx_max_length: 256,
        }
    }
}

pub const RUN_KEYS: &[KeyDoc] = &[
    KeyDoc { key: "model", default: "(required)", help: "policy to train (the SFT model): HF dir, .gguf, or cached repo id" },
    KeyDoc { key: "ref_model", default: "\"\"", help: "frozen reference for the KL penalty; empty: the policy's starting weights" },
    KeyDoc { key: "reward", default: "(required)", help: "reward-model dir (rlhf rm / any *ForSequenceClassification), \"vader\", or \"rule:contains:WORD\" / \"rule:ids:LO-HI\"" },
    KeyDoc { key: "value_model", default: "\"\"", help: "value model's starting point; empty: the reward model when it is a model (InstructGPT), else the policy" },
    KeyDoc { key: "prompt_file", default: "(required)", help: "prompts {\"prompt\": text or messages} (.jsonl or .parquet)" },
    KeyDoc { key: "max_prompt_length", default: "128", help: "longer prompts keep their last tokens (counted)" },
    KeyDoc { key: "chat", default: "false", help: "wrap string prompts as a user message in the chat template" },
    KeyDoc { key: "ptx_file", default: "\"\"", help: "PPO-ptx pretraining text: {\"text\"} JSONL/Parquet or a .txt file (paragraphs)" },
    KeyDoc { key: "ptx_max_length", default: "256", help: "pretraining examples are cut to this many tokens" },
];

pub const PPO_KEYS: &[KeyDoc] = &[
    KeyDoc { key: "total_episodes", default: "0", help: "episodes (prompt → response) in the run; 0: num_train_epochs × prompts" },
    KeyDoc { key: "response_length", default: "53", help: "max new tokens per response" },
    KeyDoc { key: "temperature", default: "1.0", help: "sampling temperature of rollouts" },
    KeyDoc { key: "top_k", default: "0", help: "top-k filter of rollouts (0: off)" },
    KeyDoc { key: "top_p", default: "1.0", help: "nucleus filter of rollouts (1: off)" },
    KeyDoc { key: "num_ppo_epochs", default: "4", help: "passes over each rollout batch" },
    KeyDoc { key: "num_mini_batches", default: "1", help: "minibatches per rollout batch (rollout batch = per_device_train_batch_size × gradient_accumulation_steps × num_mini_batches)" },
    KeyDoc { key: "kl_coef", default: "0.05", help: "β of the per-token KL penalty (InstructGPT: 0.02); the start value when adaptive" },
    KeyDoc { key: "adaptive_kl", default: "false", help: "adapt β toward kl_target (Ziegler et al.)" },
    KeyDoc { key: "kl_target", default: "6.0", help: "target KL (nats per episode) of the adaptive controller" },
    KeyDoc { key: "kl_horizon", default: "10000", help: "horizon (episodes) of the adaptive controller" },
    KeyDoc { key: "cliprange", default: "0.2", help: "ε of the clipped surrogate" },
    KeyDoc { key: "cliprange_value", default: "0.2", help: "clip range of the value loss" },
    KeyDoc { key: "vf_coef", default: "0.1", help: "weight of the value loss" },
    KeyDoc { key: "gamma", default: "1.0", help: "discount" },
    KeyDoc { key: "lam", default: "0.95", help: "GAE λ" },
    KeyDoc { key: "whiten_advantages", default: "true", help: "normalise advantages over the batch" },
    KeyDoc { key: "missing_eos_penalty", default: "0.0", help: "subtracted from the score of responses that never emit a stop token" },
    KeyDoc { key: "score_clip", default: "0.0", help: "clip scores to ±this (0: off)" },
    KeyDoc { key: "normalize_scores", default: "false", help: "whiten scores over each rollout batch" },
    KeyDoc { key: "ptx_coef", default: "0.0", help: "γ_ptx of PPO-ptx (InstructGPT: 27.8); 0 is plain PPO" },
    KeyDoc { key: "ptx_batch_size", default: "8", help: "pretraining examples per optimizer step (InstructGPT: 8× the RL episodes)" },
    KeyDoc { key: "ema_decay", default: "0.0", help: "EMA of the policy weights for the saved model (InstructGPT: 0.992); 0: off" },
    KeyDoc { key: "sample_every", default: "10", help: "log prompts, responses and scores to samples.jsonl every N iterations" },
];

pub fn help_text() -> String {
    describe(&[
        ("run", RUN_KEYS),
        ("ppo", PPO_KEYS),
        ("training", TRAIN_KEYS),
    ])
}

/// Pretraining examples for PPO-ptx: `{"text"}` records, or paragraphs of a .txt file.
fn read_ptx(path: &str, tok: &Tokenizer, max_len: usize) -> Result<Vec<Example>> {
    let records: Vec<(usize, Value)> = if path.ends_with(".txt") {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
        text.split("\n\n")
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .enumerate()
            .map(|(i, p)| (i + 1, json!({ "text": p })))
            .collect()
    } else {
        crate::data::read_records(Path::new(path))?
    };
    let cfg = SftDataConfig {
        max_length: max_len,
        ..Default::default()
    };
    let (examples, stats) = prepare(&records, path, tok, &cfg)?;
    eprintln!(
        "ptx data: {} examples ({} truncated to {max_len} tokens), {} tokens",
        stats.examples, stats.truncated, stats.tokens
    );
    Ok(examples)
}

pub fn run(args: &RunArgs) -> Result<()> {
    let (table, origin) = settings_table(args, &[RUN_KEYS, PPO_KEYS, TRAIN_KEYS])?;
    let mut run: PpoRunConfig = extract(&table, RUN_KEYS, &origin)?;
    let ppo: PpoConfig = extract(&table, PPO_KEYS, &origin)?;
    let mut train_cfg: TrainConfig = extract(&table, TRAIN_KEYS, &origin)?;
    for p in [
        &mut run.model,
        &mut run.ref_model,
        &mut run.value_model,
        &mut run.prompt_file,
        &mut run.ptx_file,
    ] {
        *p = crate::io::expand_tilde(p);
    }
    if !run.reward.starts_with("rule:") && run.reward != "vader" {
        run.reward = crate::io::expand_tilde(&run.reward);
    }
    check_train_config(&mut train_cfg, &origin)?;
    ppo.validate().with_context(|| origin.clone())?;
    if run.model.is_empty() || run.prompt_file.is_empty() || run.reward.is_empty() {
        bail!("{origin}: `model`, `reward` and `prompt_file` are required");
    }
    if ppo.ptx_coef > 0.0 && run.ptx_file.is_empty() {
        bail!("{origin}: ptx_coef > 0 needs a ptx_file");
    }
    crate::train::trainer::preflight(&train_cfg, args.resume)?;

    let policy = Checkpoint::load(&run.model, true)?;
    let tok = policy.tokenizer()?;
    let (prompts, cut) = read_prompts(&run.prompt_file, tok, run.chat, run.max_prompt_length)?;
    let mc = &policy.model.config;
    if mc.family == crate::model::config::Family::Gpt2
        && run.max_prompt_length + ppo.response_length > mc.max_position_embeddings
    {
        bail!(
            "{origin}: max_prompt_length + response_length exceeds the model's {} positions",
            mc.max_position_embeddings
        );
    }
    eprintln!(
        "prompts: {} ({} truncated to their last {} tokens)",
        prompts.len(),
        cut,
        run.max_prompt_length
    );
    let ptx = if run.ptx_file.is_empty() {
        vec![]
    } else {
        read_ptx(&run.ptx_file, tok, run.ptx_max_length)?
    };
    let batch_for_scoring = train_cfg.per_device_eval_batch_size;
    let mut reward = crate::reward::from_spec(&run.reward, tok, batch_for_scoring)?;
    eprintln!("reward: {}", reward.describe());
    let reference = Checkpoint::load(
        if run.ref_model.is_empty() {
            &run.model
        } else {
            &run.ref_model
        },
        false,
    )?;
    if reference.model.config.vocab_size != mc.vocab_size {
        bail!(
            "{}: the reference model's vocabulary differs from the policy's",
            run.ref_model
        );
    }
    // InstructGPT initialises the value function from the reward model.
    let reward_is_model = !run.reward.starts_with("rule:") && run.reward != "vader";
    let value_source = if !run.value_model.is_empty() {
        run.value_model.clone()
    } else if reward_is_model {
        run.reward.clone()
    } else {
        run.model.clone()
    };
    let mut value = Checkpoint::load(&value_source, true)?;
    value.model.drop_lm_head();
    let mut value_head = ScalarHead::from_model(&mut value.model, train_cfg.seed)?;
    value_head.bias = 0.0;
    eprintln!("value model: from {value_source}");
    let stop_ids = policy.stop_token_ids();

    let fp = fingerprint(
        &[
            json!([
                "ppo",
                run.model,
                run.ref_model,
                run.reward,
                value_source,
                run.ptx_file,
                run.chat,
                run.max_prompt_length,
                run.ptx_max_length
            ]),
            serde_json::to_value(&ppo)?,
            super::train_settings_for_fingerprint(&train_cfg),
        ],
        prompts.iter().map(|p| p.ids.as_slice()),
    );
    let models = PpoModels {
        policy: &policy.model,
        reference: &reference.model,
        value: &value.model,
        value_head: &value_head,
    };
    let outcome = run_ppo(
        &ppo,
        &train_cfg,
        &models,
        tok,
        &stop_ids,
        &prompts,
        reward.as_mut(),
        &ptx,
        args.resume,
        &fp,
    )?;
    let out = Path::new(&train_cfg.output_dir);
    save_final(&policy, out)?;
    let get = |k: &str| {
        outcome
            .last_metrics
            .iter()
            .find(|(n, _)| n == k)
            .map_or(f64::NAN, |(_, v)| *v)
    };
    eprintln!(
        "done: {} iterations; last score {:.4}, KL {:.3}; policy written to {}",
        outcome.iterations,
        get("objective/scores"),
        get("objective/kl"),
        out.display()
    );
    Ok(())
}
