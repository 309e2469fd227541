//! `rlhf ppo`: RLHF with PPO against a reward model or a built-in scorer, with a per-token KL
//! penalty to the reference (fixed or adaptive β) and optional PPO-ptx.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{start_training, TrainArgs};
use crate::algos::ppo::{Ppo, PpoConfig};
use crate::checkpoint::{save_final, Checkpoint};
use crate::data::sft::read_pretraining_text;
use crate::model::lora::LoraConfig;
use crate::model::scalar_head::ScalarHead;
use crate::rl::{self, Models, Reference, ValueModel};
use crate::settings::{describe, help, KeyDoc, Section};
use crate::train::fingerprint::resume_fingerprint;
use crate::train::TrainConfig;

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

impl Section for PpoRunConfig {
    const TITLE: &'static str = "run";
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::required("model", "policy to train (the SFT model): HF dir, .gguf, or cached repo id").path(),
        KeyDoc::new("ref_model", "frozen reference for the KL penalty; empty: the policy's starting weights").path(),
        KeyDoc::required("reward", "reward-model dir (rlhf rm / any *ForSequenceClassification), \"vader\", \"rule:contains:WORD\" / \"rule:ids:LO-HI\", or any of rlhf grpo's reward_funcs (e.g. \"accuracy\")").path(),
        KeyDoc::new("value_model", "value model's starting point; empty: the reward model when it is a model (InstructGPT), else the policy").path(),
        KeyDoc::required("prompt_file", "prompts {\"prompt\": text or messages} (.jsonl or .parquet)").path(),
        KeyDoc::new("max_prompt_length", "longer prompts keep their last tokens (counted)"),
        KeyDoc::new("chat", "wrap string prompts as a user message in the chat template"),
        KeyDoc::new("ptx_file", "PPO-ptx pretraining text: {\"text\"} JSONL/Parquet or a .txt file (paragraphs)").path(),
        KeyDoc::new("ptx_max_length", "pretraining examples are cut to this many tokens"),
    ];
}

pub fn help_text() -> String {
    describe(&[
        help::<PpoRunConfig>(),
        help::<PpoConfig>(),
        help::<TrainConfig>(),
        help::<LoraConfig>(),
    ]) + "\nIn rlhf ppo a step is one iteration (a rollout batch and its updates): max_steps,\n\
          logging_steps and save_steps count iterations; eval_steps is refused (use rlhf eval).\n"
}

/// The frozen reference (`ref_model`, else the policy's start) and the value model: a body with
/// a fresh scalar head, from `value_model`, else the reward model when it is one (InstructGPT),
/// else the policy. Returns them and where the value model came from.
fn load_reference_and_value(
    run: &PpoRunConfig,
    train: &TrainConfig,
    lora: &LoraConfig,
    policy: &Checkpoint,
) -> Result<(Option<Checkpoint>, Checkpoint, ScalarHead, String)> {
    let reference = if run.ref_model.is_empty() && policy.fresh_adapters {
        eprintln!("reference: the policy's base (LoRA adapters off)");
        None
    } else if run.ref_model.is_empty() {
        Some(Checkpoint::load(&run.model, false)?)
    } else {
        Some(Checkpoint::load(&run.ref_model, false)?)
    };
    let value_source = match (
        run.value_model.is_empty(),
        crate::reward::is_builtin(&run.reward),
    ) {
        (false, _) => run.value_model.clone(),
        (true, false) => run.reward.clone(),
        (true, true) => run.model.clone(),
    };
    let mut value = if lora.use_peft {
        // A fresh adapter on a frozen body: the policy's own base when it is the same model (no
        // second copy of the weights), else its own frozen copy.
        let mut v = if value_source == run.model && policy.fresh_adapters {
            eprintln!("value model: shares the policy's frozen base");
            policy.sharing_base()?
        } else {
            Checkpoint::load(&value_source, false)?
        };
        v.model.add_lora(lora, train.seed ^ 0x7661_6c75)?;
        v
    } else {
        Checkpoint::load(&value_source, true)?
    };
    value.model.drop_lm_head();
    let mut head = ScalarHead::from_model(&mut value.model, train.seed)?;
    head.bias = 0.0;
    eprintln!("value model: from {value_source}");
    Ok((reference, value, head, value_source))
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let settings = args.settings(&[
        PpoRunConfig::KEYS,
        PpoConfig::KEYS,
        TrainConfig::KEYS,
        LoraConfig::KEYS,
    ])?;
    let lora = super::lora_settings(&settings)?;
    let origin = settings.origin().to_string();
    let run: PpoRunConfig = settings.section()?;
    let ppo: PpoConfig = settings.section()?;
    ppo.validate().with_context(|| origin.clone())?;
    if ppo.ptx_coef > 0.0 && run.ptx_file.is_empty() {
        bail!("{origin}: ptx_coef > 0 needs a ptx_file");
    }
    let inputs = [
        &run.model,
        &run.ref_model,
        &run.reward,
        &run.value_model,
        &run.prompt_file,
        &run.ptx_file,
    ];
    let (train_cfg, out) = start_training(args, &settings, &inputs.map(String::as_str))?;
    super::refuse_eval_steps(&train_cfg, &origin, "ppo")?;

    let policy = super::load_trainable(&run.model, &lora, train_cfg.seed)?;
    let tok = policy.tokenizer()?;
    let prompts = super::rl_prompts(
        &policy,
        (&run.prompt_file, run.chat, run.max_prompt_length),
        (ppo.response_length, "response_length"),
        &origin,
    )?;
    let mc = &policy.model.config;
    let ptx = if run.ptx_file.is_empty() {
        vec![]
    } else {
        let (examples, summary) = read_pretraining_text(&run.ptx_file, tok, run.ptx_max_length)?;
        eprintln!("ptx data: {summary}");
        examples
    };
    let mut reward = crate::reward::from_funcs(
        std::slice::from_ref(&run.reward),
        &[],
        tok,
        train_cfg.per_device_eval_batch_size,
        crate::reward::funcs::DEFAULT_EXEC_TIMEOUT,
    )?;
    eprintln!("reward: {}", reward.describe());
    let (reference, value, value_head, value_source) =
        load_reference_and_value(&run, &train_cfg, &lora, &policy)?;
    if reference
        .as_ref()
        .is_some_and(|r| r.model.config.vocab_size != mc.vocab_size)
    {
        bail!(
            "{}: the reference model's vocabulary differs from the policy's",
            run.ref_model
        );
    }
    let fp = resume_fingerprint(
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
            train_cfg.resume_relevant(),
            serde_json::to_value(&lora)?,
        ],
        prompts.iter().map(|p| p.ids.as_slice()),
    );
    let loop_cfg = ppo.loop_config(&train_cfg, prompts.len(), policy.stop_token_ids(), &ptx)?;
    let models = Models {
        policy: &policy.model,
        reference: Some(
            reference
                .as_ref()
                .map_or(Reference::PolicyBase, |r| Reference::Model(&r.model)),
        ),
        value: Some(ValueModel {
            body: &value.model,
            head: &value_head,
        }),
    };
    let run_info = rl::Run {
        train: &train_cfg,
        prompts: &prompts,
        tokenizer: tok,
        reward: reward.as_mut(),
        resume: args.resume,
        fingerprint: &fp,
    };
    let outcome = rl::run(&loop_cfg, &models, &mut Ppo::new(ppo), run_info)?;
    save_final(&policy, out.path())?;
    super::report_done(format_args!(
        "done: {} iterations ({} updates skipped); last score {:.4}, KL {:.3}; policy written to {}",
        outcome.iterations,
        outcome.skipped_updates,
        outcome.last("objective/scores"),
        outcome.last("objective/kl"),
        out.path().display()
    ));
    Ok(())
}
