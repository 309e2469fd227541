//! `rlhf dpo`: Direct Preference Optimization (and IPO, conservative DPO, hinge, Plackett–Luce)
//! from pairs or rankings, with reference log-probs computed once and cached on disk.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{start_training, TrainArgs};
use crate::algos::dpo::{DpoLoss, DpoParams, DpoTask, ReferenceCache};
use crate::checkpoint::{save_final, Checkpoint};
use crate::data::preference::{
    prepare_train_eval, Comparison, ComparisonsFor, PreferenceDataConfig,
};
use crate::model::lora::LoraConfig;
use crate::settings::{describe, help, KeyDoc, Section};
use crate::train::fingerprint::resume_fingerprint;
use crate::train::{train, TrainConfig};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoRunConfig {
    pub model: String,
    pub ref_model: String,
    pub train_file: String,
    pub eval_file: String,
    pub eval_split: f64,
    pub loss_type: DpoLoss,
    pub beta: f64,
    pub label_smoothing: f64,
    pub reference_free: bool,
    pub ref_cache_dir: String,
}

impl Default for DpoRunConfig {
    fn default() -> Self {
        DpoRunConfig {
            model: String::new(),
            ref_model: String::new(),
            train_file: String::new(),
            eval_file: String::new(),
            eval_split: 0.0,
            loss_type: DpoLoss::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            reference_free: false,
            ref_cache_dir: "~/.cache/rlhf/ref-logps".into(),
        }
    }
}

impl Section for DpoRunConfig {
    const TITLE: &'static str = "run";
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::required("model", "policy to train (usually the SFT model): HF dir, .gguf, or cached repo id").path(),
        KeyDoc::new("ref_model", "reference model; empty: the policy's starting weights").path(),
        KeyDoc::required("train_file", "pairs {prompt, chosen, rejected} or rankings {prompt, completions, ranking}").path(),
        KeyDoc::new("eval_file", "held-out comparisons; reports eval/rewards/accuracies etc.").path(),
        KeyDoc::new("eval_split", "fraction of train_file held out when no eval_file"),
        KeyDoc::new("loss_type", "sigmoid (DPO), ipo, hinge, or plackett_luce (rankings)"),
        KeyDoc::new("beta", "β: strength of the implicit KL constraint (DPO paper: 0.1; 0.5 for summarisation)"),
        KeyDoc::new("label_smoothing", "ε of conservative DPO: assumed probability that a label is flipped (sigmoid loss)"),
        KeyDoc::new("reference_free", "no reference model: log π_ref taken as 0"),
        KeyDoc::new("ref_cache_dir", "where reference log-probs are cached (keyed by reference weights and token ids); empty: no cache").path(),
    ];
}

pub fn help_text() -> String {
    describe(&[
        help::<DpoRunConfig>(),
        help::<PreferenceDataConfig>(),
        help::<TrainConfig>(),
        help::<LoraConfig>(),
    ])
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let settings = args.settings(&[
        DpoRunConfig::KEYS,
        PreferenceDataConfig::KEYS,
        TrainConfig::KEYS,
        LoraConfig::KEYS,
    ])?;
    let run: DpoRunConfig = settings.section()?;
    let lora = super::lora_settings(&settings)?;
    let mut data_cfg: PreferenceDataConfig = settings.section()?;
    let params = DpoParams {
        loss: run.loss_type,
        beta: run.beta,
        label_smoothing: run.label_smoothing,
    };
    params
        .validate()
        .with_context(|| settings.origin().to_string())?;
    if run.reference_free && !run.ref_model.is_empty() {
        bail!(
            "{}: reference_free and ref_model exclude each other",
            settings.origin()
        );
    }
    let inputs = [&run.model, &run.ref_model, &run.train_file, &run.eval_file];
    let (train_cfg, out) = start_training(args, &settings, &inputs.map(String::as_str))?;
    let records = crate::data::read_train_eval(
        &run.train_file,
        &run.eval_file,
        run.eval_split,
        train_cfg.seed,
    )?;
    let ck = super::load_trainable(&run.model, &lora, train_cfg.seed)?;
    data_cfg.fit_positions(ck.model.config.position_limit());
    let (train_set, eval_set) =
        prepare_train_eval(&records, ck.tokenizer()?, &data_cfg, ComparisonsFor::Dpo)?;
    let norm = params.loss.length_normalized();
    let batch = train_cfg.per_device_eval_batch_size;
    let (train_ref, eval_ref) = if run.reference_free {
        let zeros = |s: &[Comparison]| -> Vec<Vec<f32>> {
            s.iter().map(|c| vec![0.0; c.completions.len()]).collect()
        };
        (zeros(&train_set), zeros(&eval_set))
    } else {
        // The reference is only in memory while its log-probs are computed.
        let separate = if run.ref_model.is_empty() {
            None
        } else {
            Some(Checkpoint::load(&run.ref_model, false)?)
        };
        let reference = separate.as_ref().map_or(&ck.model, |r| &r.model);
        let (ref_vocab, vocab) = (reference.config.vocab_size, ck.model.config.vocab_size);
        if ref_vocab != vocab {
            bail!(
                "{}: the reference model's vocabulary ({ref_vocab}) differs from the policy's ({vocab})",
                run.ref_model
            );
        }
        let cache = ReferenceCache::new(&run.ref_cache_dir, reference)?;
        (
            cache.logprobs(reference, &train_set, norm, batch, "train")?,
            cache.logprobs(reference, &eval_set, norm, batch, "eval")?,
        )
    };
    let fp = resume_fingerprint(
        &[
            json!([
                "dpo",
                run.model,
                run.ref_model,
                run.loss_type,
                run.beta,
                run.label_smoothing,
                run.reference_free
            ]),
            serde_json::to_value(&data_cfg)?,
            train_cfg.resume_relevant(),
            serde_json::to_value(&lora)?,
        ],
        train_set.iter().flat_map(Comparison::token_lists),
    );
    let mut task = DpoTask {
        params,
        train: train_set,
        train_ref,
        eval: eval_set,
        eval_ref,
        eval_batch_size: batch,
    };
    let outcome = train(&train_cfg, &ck.model, &mut task, args.resume, &fp)?;
    save_final(&ck, out.path())?;
    super::report_done(format_args!(
        "done: {} steps ({} skipped), {}{:.0} tokens/s; model written to {}",
        outcome.steps,
        outcome.skipped_steps,
        super::metrics_summary(&outcome.eval_metrics),
        outcome.tokens_per_second,
        out.path().display()
    ));
    Ok(())
}
