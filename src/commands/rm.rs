//! `rlhf rm`: trains a reward model (InstructGPT's K-way ranking loss) and saves it as
//! transformers' `*ForSequenceClassification`.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{start_training, TrainArgs};
use crate::algos::rm::{mean_raw_score, RankingBatching, RmTask};
use crate::checkpoint::save_reward_model;
use crate::data::preference::{
    expand_to_pairs, prepare_train_eval, read_reference_completions, Comparison, ComparisonsFor,
    PreferenceDataConfig,
};
use crate::model::lora::LoraConfig;
use crate::model::scalar_head::ScalarHead;
use crate::settings::{describe, help, KeyDoc, Section};
use crate::train::fingerprint::resume_fingerprint;
use crate::train::{train, TrainConfig};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RmRunConfig {
    pub model: String,
    pub train_file: String,
    pub eval_file: String,
    pub eval_split: f64,
    pub ranking_batching: RankingBatching,
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
            ranking_batching: RankingBatching::PerPrompt,
            normalize_rewards: true,
            normalize_file: String::new(),
        }
    }
}

impl Section for RmRunConfig {
    const TITLE: &'static str = "run";
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::required("model", "starting model (SFT or pretrained): HF dir, .gguf, or cached repo id").path(),
        KeyDoc::required("train_file", "pairs {prompt, chosen, rejected[, margin]} or rankings {prompt, completions, ranking}").path(),
        KeyDoc::new("eval_file", "held-out comparisons (same formats); reports eval/accuracy").path(),
        KeyDoc::new("eval_split", "fraction of train_file held out when no eval_file"),
        KeyDoc::new("ranking_batching", "per_prompt: all C(K,2) pairs of a prompt in one batch element (InstructGPT); shuffled_pairs: every pair its own example"),
        KeyDoc::new("normalize_rewards", "after training, shift scores so the reference completions score mean 0"),
        KeyDoc::new("normalize_file", "reference completions {prompt, completion}; default: the best completion of each training comparison").path(),
    ];
}

pub fn help_text() -> String {
    describe(&[
        help::<RmRunConfig>(),
        help::<PreferenceDataConfig>(),
        help::<TrainConfig>(),
        help::<LoraConfig>(),
    ])
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let settings = args.settings(&[
        RmRunConfig::KEYS,
        PreferenceDataConfig::KEYS,
        TrainConfig::KEYS,
        LoraConfig::KEYS,
    ])?;
    let run: RmRunConfig = settings.section()?;
    let lora = super::lora_settings(&settings)?;
    let mut data_cfg: PreferenceDataConfig = settings.section()?;
    let inputs = [
        &run.model,
        &run.train_file,
        &run.eval_file,
        &run.normalize_file,
    ];
    let (train_cfg, out) = start_training(args, &settings, &inputs.map(String::as_str))?;
    let records = crate::data::read_train_eval(
        &run.train_file,
        &run.eval_file,
        run.eval_split,
        train_cfg.seed,
    )?;
    let mut ck = super::load_trainable(&run.model, &lora, train_cfg.seed)?;
    let tok = ck.tokenizer()?;
    data_cfg.fit_positions(ck.model.config.position_limit());
    // A reward model reads its score at the last token of the text itself: no EOS is appended.
    let (comparisons, eval) =
        prepare_train_eval(&records, tok, &data_cfg, ComparisonsFor::RewardModel)?;
    // The sequences whose mean score becomes 0 after training.
    let reference = match (run.normalize_rewards, run.normalize_file.is_empty()) {
        (false, _) => vec![],
        (true, true) => comparisons.iter().map(|c| c.sequence(0)).collect(),
        (true, false) => read_reference_completions(&run.normalize_file, tok, data_cfg.max_length)?,
    };
    let train_set = match run.ranking_batching {
        RankingBatching::ShuffledPairs => expand_to_pairs(&comparisons),
        RankingBatching::PerPrompt => comparisons,
    };
    ck.model.drop_lm_head();
    let head = ScalarHead::from_model(&mut ck.model, train_cfg.seed)?;
    let fp = resume_fingerprint(
        &[
            json!(["rm", run.model, run.ranking_batching]),
            serde_json::to_value(&data_cfg)?,
            train_cfg.resume_relevant(),
            serde_json::to_value(&lora)?,
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
        let mean = mean_raw_score(
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
    save_reward_model(&ck, &task.head, out.path())?;
    super::report_done(format_args!(
        "done: {} steps ({} skipped), {}{:.0} tokens/s; reward model written to {}",
        outcome.steps,
        outcome.skipped_steps,
        super::metrics_summary(&outcome.eval_metrics),
        outcome.tokens_per_second,
        out.path().display()
    ));
    Ok(())
}
