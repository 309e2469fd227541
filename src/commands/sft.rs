//! `rlhf sft`: supervised fine-tuning from a TOML config and `--set` overrides.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::hash::{Hash, Hasher};
use std::path::Path;

use crate::algos::sft::SftTask;
use crate::checkpoint::Checkpoint;
use crate::config::{check_keys, describe, extract, load_table, KeyDoc};
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
    let t = TrainConfig {
        output_dir: String::new(),
        logging_steps: 0,
        eval_steps: 0,
        save_steps: 0,
        save_total_limit: 0,
        threads: 0,
        ..train.clone()
    };
    serde_json::to_string(&t).unwrap_or_default().hash(&mut h);
    for e in examples {
        e.ids.hash(&mut h);
        e.targets.hash(&mut h);
        e.segments.hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

use super::split_eval;

pub fn run(args: &SftArgs) -> Result<()> {
    let origin = args
        .config
        .as_ref()
        .map_or("--set".to_string(), |p| p.display().to_string());
    let table = load_table(args.config.as_deref(), &args.sets)?;
    check_keys(&table, &[RUN_KEYS, SFT_DATA_KEYS, TRAIN_KEYS], &origin)?;
    let run: SftRunConfig = extract(&table, RUN_KEYS, &origin)?;
    let data_cfg: SftDataConfig = extract(&table, SFT_DATA_KEYS, &origin)?;
    let mut train_cfg: TrainConfig = extract(&table, TRAIN_KEYS, &origin)?;
    let mut run = run;
    for p in [
        &mut run.model,
        &mut run.train_file,
        &mut run.eval_file,
        &mut train_cfg.output_dir,
    ] {
        *p = crate::io::expand_tilde(p);
    }
    train_cfg.validate().with_context(|| origin.clone())?;
    if run.model.is_empty() || run.train_file.is_empty() {
        bail!("{origin}: `model` and `train_file` are required");
    }
    if !(0.0..1.0).contains(&run.eval_split) {
        bail!("{origin}: eval_split must be in [0, 1)");
    }
    if train_cfg.threads > 0 {
        std::env::set_var("RAYON_NUM_THREADS", train_cfg.threads.to_string());
    }
    // Everything that can fail on bad input is checked before training starts.
    crate::train::trainer::preflight(&train_cfg, args.resume)?;
    let records = crate::data::read_records(Path::new(&run.train_file))?;
    let (train_records, mut eval_records) = if run.eval_file.is_empty() && run.eval_split > 0.0 {
        split_eval(records, run.eval_split, train_cfg.seed)
    } else {
        (records, vec![])
    };
    let ck = Checkpoint::load(&run.model, true)?;
    let tok = ck.tokenizer()?;
    let mut data_cfg = data_cfg;
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
        run.train_file.clone()
    } else {
        run.eval_file.clone()
    };
    if !run.eval_file.is_empty() {
        eval_records = crate::data::read_records(Path::new(&run.eval_file))?;
    }
    let eval_examples = if eval_records.is_empty() {
        vec![]
    } else {
        prepare(
            &eval_records,
            &eval_origin,
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
        outcome
            .eval_metrics
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}, "))
            .collect::<String>(),
        outcome.tokens_per_second,
        out.display()
    );
    Ok(())
}
