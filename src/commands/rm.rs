//! `rlhf rm`: trains a reward model (InstructGPT's K-way ranking loss) and saves it as
//! transformers' `*ForSequenceClassification`.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

use super::{check_train_config, fingerprint, settings_table, train_eval_records, RunArgs};
use crate::algos::rm::RmTask;
use crate::checkpoint::{save_reward_model, Checkpoint};
use crate::config::{describe, extract, KeyDoc};
use crate::data::preference::{
    expand_to_pairs, Comparison, PreferenceDataConfig, PREFERENCE_DATA_KEYS,
};
use crate::data::sft::encode_prompt_completion;
use crate::model::scalar_head::ScalarHead;
use crate::model::CausalLm;
use crate::train::{train, TrainConfig, TRAIN_KEYS};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RmRunConfig {
    pub model: String,
    pub train_file: String,
    pub eval_file: String,
    pub eval_split: f64,
    pub ranking_batching: String,
    pub normalize_rewards: bool,
    pub normalize_file: String,
}

impl Default for RmRunConfig {
    fn default() -> Self {
        RmRunConfig {
            model: String::new(),
            train_file: String::new(),
            eval_file: String::new(),
            eval_split: 0.0,
            ranking_batching: "per_prompt".into(),
            normalize_rewards: true,
            normalize_file: String::new(),
        }
    }
}

pub const RUN_KEYS: &[KeyDoc] = &[
    KeyDoc {
        key: "model",
        default: "(required)",
        help: "starting model (SFT or pretrained): HF dir, .gguf, or cached repo id",
    },
    KeyDoc {
        key: "train_file",
        default: "(required)",
        help: "pairs {prompt, chosen, rejected[, margin]} or rankings {prompt, completions, ranking}",
    },
    KeyDoc {
        key: "eval_file",
        default: "\"\"",
        help: "held-out comparisons (same formats); reports eval/accuracy",
    },
    KeyDoc {
        key: "eval_split",
        default: "0.0",
        help: "fraction of train_file held out when no eval_file",
    },
    KeyDoc {
        key: "ranking_batching",
        default: "\"per_prompt\"",
        help: "per_prompt: all C(K,2) pairs of a prompt in one batch element (InstructGPT); shuffled_pairs: every pair its own example",
    },
    KeyDoc {
        key: "normalize_rewards",
        default: "true",
        help: "after training, shift scores so the reference completions score mean 0",
    },
    KeyDoc {
        key: "normalize_file",
        default: "\"\"",
        help: "reference completions {prompt, completion}; default: the best completion of each training comparison",
    },
];

pub fn help_text() -> String {
    describe(&[
        ("run", RUN_KEYS),
        ("data", PREFERENCE_DATA_KEYS),
        ("training", TRAIN_KEYS),
    ])
}

/// The sequences whose mean score becomes 0.
fn reference_sequences(
    run: &RmRunConfig,
    train: &[Comparison],
    ck: &Checkpoint,
    data: &PreferenceDataConfig,
) -> Result<Vec<Vec<u32>>> {
    if run.normalize_file.is_empty() {
        return Ok(train.iter().map(|c| c.sequence(0)).collect());
    }
    let tok = ck.tokenizer()?;
    let records = crate::data::read_records(Path::new(&run.normalize_file))?;
    let mut out = Vec::with_capacity(records.len());
    for (line, rec) in &records {
        let (Some(p), Some(c)) = (rec.get("prompt"), rec.get("completion")) else {
            bail!(
                "{}:{line}: expected {{\"prompt\", \"completion\"}}",
                run.normalize_file
            );
        };
        let (mut ids, c_ids) = encode_prompt_completion(tok, p, c, false)
            .map_err(|e| anyhow::anyhow!("{}:{line}: {e:#}", run.normalize_file))?;
        ids.extend(c_ids);
        ids.truncate(data.max_length);
        out.push(ids);
    }
    Ok(out)
}

/// Mean raw score of `seqs` (the bias to subtract).
fn mean_score(head: &ScalarHead, model: &CausalLm, seqs: &[Vec<u32>], batch: usize) -> Result<f64> {
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let raw = ScalarHead {
        weight: head.weight.clone(),
        bias: 0.0,
    }
    .scores(model, &refs, batch)?;
    Ok(raw.iter().map(|&x| x as f64).sum::<f64>() / raw.len().max(1) as f64)
}

pub fn run(args: &RunArgs) -> Result<()> {
    let (table, origin) = settings_table(args, &[RUN_KEYS, PREFERENCE_DATA_KEYS, TRAIN_KEYS])?;
    let mut run: RmRunConfig = extract(&table, RUN_KEYS, &origin)?;
    let mut data_cfg: PreferenceDataConfig = extract(&table, PREFERENCE_DATA_KEYS, &origin)?;
    let mut train_cfg: TrainConfig = extract(&table, TRAIN_KEYS, &origin)?;
    for p in [
        &mut run.model,
        &mut run.train_file,
        &mut run.eval_file,
        &mut run.normalize_file,
    ] {
        *p = crate::io::expand_tilde(p);
    }
    check_train_config(&mut train_cfg, &origin)?;
    super::check_model_and_data(&origin, &run.model, &run.train_file, run.eval_split)?;
    if !["per_prompt", "shuffled_pairs"].contains(&run.ranking_batching.as_str()) {
        bail!(
            "{origin}: ranking_batching must be \"per_prompt\" or \"shuffled_pairs\", not {:?}",
            run.ranking_batching
        );
    }
    crate::train::trainer::preflight(&train_cfg, args.resume)?;
    let (train_records, eval_records) = train_eval_records(
        &run.train_file,
        &run.eval_file,
        run.eval_split,
        train_cfg.seed,
    )?;
    let mut ck = Checkpoint::load(&run.model, true)?;
    // A reward model reads its score at the last token of the text itself: no EOS is appended.
    let (comparisons, eval) = super::load_comparisons(
        &ck,
        (&run.train_file, &run.eval_file),
        (&train_records, &eval_records),
        &mut data_cfg,
        false,
    )?;
    let reference = if run.normalize_rewards {
        reference_sequences(&run, &comparisons, &ck, &data_cfg)?
    } else {
        vec![]
    };
    let train_set = if run.ranking_batching == "shuffled_pairs" {
        expand_to_pairs(&comparisons)
    } else {
        comparisons
    };
    ck.model.drop_lm_head();
    let head = ScalarHead::from_model(&mut ck.model, train_cfg.seed)?;
    let fp = fingerprint(
        &[
            serde_json::json!(["rm", run.model, run.ranking_batching]),
            serde_json::to_value(&data_cfg)?,
            super::train_settings_for_fingerprint(&train_cfg),
        ],
        train_set.iter().flat_map(Comparison::token_lists),
    );
    let mut task = RmTask {
        head,
        train: train_set,
        eval,
        eval_batch_size: train_cfg.per_device_eval_batch_size,
    };
    let outcome = train(&train_cfg, &ck.model, &mut task, args.resume, &fp)?;
    if run.normalize_rewards {
        let mean = mean_score(
            &task.head,
            &ck.model,
            &reference,
            train_cfg.per_device_eval_batch_size,
        )?;
        task.head.bias = -mean;
        eprintln!(
            "normalised: the {} reference completions scored mean {mean:.4}; bias {:.4} added to every score",
            reference.len(),
            -mean
        );
    }
    let out = Path::new(&train_cfg.output_dir);
    save_reward_model(&ck, &task.head, out)?;
    eprintln!(
        "done: {} steps ({} skipped), {}{:.0} tokens/s; reward model written to {}",
        outcome.steps,
        outcome.skipped_steps,
        super::metrics_summary(&outcome.eval_metrics),
        outcome.tokens_per_second,
        out.display()
    );
    Ok(())
}
