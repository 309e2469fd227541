//! `rlhf sft`: supervised fine-tuning from a TOML config and `--set` overrides.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::hash::{Hash, Hasher};
use std::path::Path;

use crate::algos::sft::SftTask;
use crate::checkpoint::Checkpoint;
use crate::config::{describe, extract, KeyDoc};
use crate::data::sft::{prepare, SftDataConfig, SFT_DATA_KEYS};
use crate::train::{train, TrainConfig, TRAIN_KEYS};

/// `--config`, `--set`, `--resume`.
pub type SftArgs = super::RunArgs;

#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct SftRunConfig {
    pub model: String,
    pub train_file: String,
    pub eval_file: String,
    pub eval_split: f64,
}

pub const RUN_KEYS: &[KeyDoc] = &[
    KeyDoc {
        key: "model",
        default: "(required)",
        help: "starting model: HF dir, .gguf, or cached repo id",
    },
    KeyDoc {
        key: "train_file",
        default: "(required)",
        help: "training data, .jsonl or .parquet",
    },
    KeyDoc {
        key: "eval_file",
        default: "\"\"",
        help: "held-out data (same formats)",
    },
    KeyDoc {
        key: "eval_split",
        default: "0.0",
        help: "fraction of train_file held out when no eval_file",
    },
];

pub fn help_text() -> String {
    describe(&[
        ("run", RUN_KEYS),
        ("data", SFT_DATA_KEYS),
        ("training", TRAIN_KEYS),
    ])
}

/// A stable hash of what must not change when a run is resumed.
fn fingerprint(
    run: &SftRunConfig,
    data: &SftDataConfig,
    train: &TrainConfig,
    examples: &[crate::data::sft::Example],
) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    run.model.hash(&mut h);
    serde_json::to_string(data).unwrap_or_default().hash(&mut h);
    super::train_settings_for_fingerprint(train)
        .to_string()
        .hash(&mut h);
    for e in examples {
        e.ids.hash(&mut h);
        e.targets.hash(&mut h);
        e.segments.hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

pub fn run(args: &SftArgs) -> Result<()> {
    let (table, origin) = super::settings_table(args, &[RUN_KEYS, SFT_DATA_KEYS, TRAIN_KEYS])?;
    let mut run: SftRunConfig = extract(&table, RUN_KEYS, &origin)?;
    let mut data_cfg: SftDataConfig = extract(&table, SFT_DATA_KEYS, &origin)?;
    let mut train_cfg: TrainConfig = extract(&table, TRAIN_KEYS, &origin)?;
    for p in [&mut run.model, &mut run.train_file, &mut run.eval_file] {
        *p = crate::io::expand_tilde(p);
    }
    super::check_train_config(&mut train_cfg, &origin)?;
    super::check_model_and_data(&origin, &run.model, &run.train_file, run.eval_split)?;
    // Everything that can fail on bad input is checked before training starts.
    crate::train::trainer::preflight(&train_cfg, args.resume)?;
    let (train_records, eval_records) = super::train_eval_records(
        &run.train_file,
        &run.eval_file,
        run.eval_split,
        train_cfg.seed,
    )?;
    let ck = Checkpoint::load(&run.model, true)?;
    let tok = ck.tokenizer()?;
    let mc = &ck.model.config;
    if mc.family == crate::model::config::Family::Gpt2
        && data_cfg.max_length > mc.max_position_embeddings
    {
        eprintln!(
            "note: max_length {} lowered to the model's {} positions",
            data_cfg.max_length, mc.max_position_embeddings
        );
        data_cfg.max_length = mc.max_position_embeddings;
    }
    let (train_examples, stats) = prepare(&train_records, &run.train_file, tok, &data_cfg)?;
    let eval_origin = if run.eval_file.is_empty() {
        &run.train_file
    } else {
        &run.eval_file
    };
    let eval_examples = if eval_records.is_empty() {
        vec![]
    } else {
        prepare(
            &eval_records,
            eval_origin,
            tok,
            &SftDataConfig {
                packing: false,
                ..data_cfg.clone()
            },
        )?
        .0
    };
    eprintln!(
        "data: {} examples ({} truncated to {} tokens, {} without targets skipped) → {} training rows, {} tokens ({} targets); {} eval examples",
        stats.examples, stats.truncated, data_cfg.max_length, stats.dropped_no_targets, train_examples.len(),
        stats.tokens, stats.target_tokens, eval_examples.len()
    );
    let fp = fingerprint(&run, &data_cfg, &train_cfg, &train_examples);
    let mut task = SftTask {
        train: train_examples,
        eval: eval_examples,
        eval_batch_size: train_cfg.per_device_eval_batch_size,
    };
    let outcome = train(&train_cfg, &ck.model, &mut task, args.resume, &fp)?;
    let out = Path::new(&train_cfg.output_dir);
    crate::checkpoint::save_final(&ck, out)?;
    let loss = outcome
        .last_train_metrics
        .iter()
        .find(|(k, _)| k == "loss")
        .map(|(_, v)| *v);
    eprintln!(
        "done: {} steps ({} skipped), last train loss {}, {}{:.0} tokens/s; model written to {}",
        outcome.steps,
        outcome.skipped_steps,
        loss.map_or("n/a".into(), |l| format!("{l:.4}")),
        super::metrics_summary(&outcome.eval_metrics),
        outcome.tokens_per_second,
        out.display()
    );
    Ok(())
}
