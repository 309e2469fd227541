//! `rlhf sft`: supervised fine-tuning from a TOML config and `--set` overrides.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{start_training, TrainArgs};
use crate::algos::sft::SftTask;
use crate::checkpoint::save_final;
use crate::data::sft::{prepare_train_eval, SftDataConfig};
use crate::model::lora::LoraConfig;
use crate::settings::{describe, help, KeyDoc, Section};
use crate::train::fingerprint::Fingerprint;
use crate::train::{train, TrainConfig};

#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct SftRunConfig {
    pub model: String,
    pub train_file: String,
    pub eval_file: String,
    pub eval_split: f64,
}

impl Section for SftRunConfig {
    const TITLE: &'static str = "run";
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::required("model", "starting model: HF dir, .gguf, or cached repo id").path(),
        KeyDoc::required("train_file", "training data, .jsonl or .parquet").path(),
        KeyDoc::new("eval_file", "held-out data (same formats)").path(),
        KeyDoc::new(
            "eval_split",
            "fraction of train_file held out when no eval_file",
        ),
    ];
}

pub fn help_text() -> String {
    describe(&[
        help::<SftRunConfig>(),
        help::<SftDataConfig>(),
        help::<TrainConfig>(),
        help::<LoraConfig>(),
    ])
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let settings = args.settings(&[
        SftRunConfig::KEYS,
        SftDataConfig::KEYS,
        TrainConfig::KEYS,
        LoraConfig::KEYS,
    ])?;
    let run: SftRunConfig = settings.section()?;
    let lora = super::lora_settings(&settings)?;
    let mut data_cfg: SftDataConfig = settings.section()?;
    let (train_cfg, out) = start_training(
        args,
        &settings,
        &[&run.model, &run.train_file, &run.eval_file],
    )?;
    // Everything that can fail on bad input is checked before training starts.
    let records = crate::data::read_train_eval(
        &run.train_file,
        &run.eval_file,
        run.eval_split,
        train_cfg.seed,
    )?;
    let ck = super::load_trainable(&run.model, &lora, train_cfg.seed)?;
    let fitted = ck.model.config.fit_length(data_cfg.max_length);
    if fitted < data_cfg.max_length {
        eprintln!(
            "note: max_length {} lowered to the model's {fitted} positions",
            data_cfg.max_length
        );
        data_cfg.max_length = fitted;
    }
    let data = prepare_train_eval(&records, ck.tokenizer()?, &data_cfg)?;
    eprintln!("data: {}", data.summary);
    let mut fp = Fingerprint::new("resume");
    fp.json(&json!(["sft", run.model]))
        .json(&serde_json::to_value(&data_cfg)?)
        .json(&train_cfg.resume_relevant())
        .json(&serde_json::to_value(&lora)?);
    for e in &data.train {
        fp.ids(&e.ids).bytes(&e.targets).ids(&e.segments);
    }
    let mut task = SftTask {
        train: data.train,
        eval: data.eval,
        eval_batch_size: train_cfg.per_device_eval_batch_size,
    };
    let outcome = train(&train_cfg, &ck.model, &mut task, args.resume, &fp.finish())?;
    save_final(&ck, out.path())?;
    let loss = outcome
        .last_train_metrics
        .iter()
        .find(|(k, _)| k == "loss")
        .map(|(_, v)| *v);
    super::report_done(format_args!(
        "done: {} steps ({} skipped), last train loss {}, {}{:.0} tokens/s; model written to {}",
        outcome.steps,
        outcome.skipped_steps,
        loss.map_or("n/a".into(), |l| format!("{l:.4}")),
        super::metrics_summary(&outcome.eval_metrics),
        outcome.tokens_per_second,
        out.path().display()
    ));
    Ok(())
}
