//! `rlhf dpo`: Direct Preference Optimization (and IPO, conservative DPO, hinge, Plackett–Luce)
//! from pairs or rankings, with reference log-probs computed once and cached on disk.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{check_train_config, fingerprint, settings_table, train_eval_records, RunArgs};
use crate::algos::dpo::{reference_logprobs, DpoLoss, DpoParams, DpoTask};
use crate::checkpoint::{save_final, Checkpoint};
use crate::config::{describe, extract, KeyDoc};
use crate::data::preference::{Comparison, PreferenceDataConfig, PREFERENCE_DATA_KEYS};
use crate::model::CausalLm;
use crate::train::{train, TrainConfig, TRAIN_KEYS};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoRunConfig {
    pub model: String,
    pub ref_model: String,
    pub train_file: String,
    pub eval_file: String,
    pub eval_split: f64,
    pub loss_type: String,
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
            loss_type: "sigmoid".into(),
            beta: 0.1,
            label_smoothing: 0.0,
            reference_free: false,
            ref_cache_dir: "~/.cache/rlhf/ref-logps".into(),
        }
    }
}

pub const RUN_KEYS: &[KeyDoc] = &[
    KeyDoc {
        key: "model",
        default: "(required)",
        help: "policy to train (usually the SFT model): HF dir, .gguf, or cached repo id",
    },
    KeyDoc {
        key: "ref_model",
        default: "\"\"",
        help: "reference model; empty: the policy's starting weights",
    },
    KeyDoc {
        key: "train_file",
        default: "(required)",
        help: "pairs {prompt, chosen, rejected} or rankings {prompt, completions, ranking}",
    },
    KeyDoc {
        key: "eval_file",
        default: "\"\"",
        help: "held-out comparisons; reports eval/rewards/accuracies etc.",
    },
    KeyDoc {
        key: "eval_split",
        default: "0.0",
        help: "fraction of train_file held out when no eval_file",
    },
    KeyDoc {
        key: "loss_type",
        default: "\"sigmoid\"",
        help: "sigmoid (DPO), ipo, hinge, or plackett_luce (rankings)",
    },
    KeyDoc {
        key: "beta",
        default: "0.1",
        help: "β: strength of the implicit KL constraint (DPO paper: 0.1; 0.5 for summarisation)",
    },
    KeyDoc {
        key: "label_smoothing",
        default: "0.0",
        help: "ε of conservative DPO: assumed probability that a label is flipped (sigmoid loss)",
    },
    KeyDoc {
        key: "reference_free",
        default: "false",
        help: "no reference model: log π_ref taken as 0",
    },
    KeyDoc {
        key: "ref_cache_dir",
        default: "\"~/.cache/rlhf/ref-logps\"",
        help: "where reference log-probs are cached (keyed by reference weights and token ids); empty: no cache",
    },
];

pub fn help_text() -> String {
    describe(&[
        ("run", RUN_KEYS),
        ("data", PREFERENCE_DATA_KEYS),
        ("training", TRAIN_KEYS),
    ])
}

/// Hash of a model's weights (names, shapes and values).
fn weights_hash(model: &CausalLm) -> Result<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (name, t) in model.state_dict()? {
        name.hash(&mut h);
        t.dims().hash(&mut h);
        let v = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for x in v {
            x.to_bits().hash(&mut h);
        }
    }
    Ok(h.finish())
}

/// Reference log-probs of `comparisons`, from the cache when the same reference weights have seen
/// the same token ids before.
fn cached_reference_logprobs(
    reference: &CausalLm,
    ref_hash: u64,
    comparisons: &[Comparison],
    length_normalized: bool,
    batch: usize,
    cache_dir: &str,
    what: &str,
) -> Result<Vec<Vec<f32>>> {
    let key = fingerprint(
        &[json!([
            "ref-logps-v1",
            format!("{ref_hash:016x}"),
            length_normalized
        ])],
        comparisons.iter().flat_map(Comparison::token_lists),
    );
    let path =
        (!cache_dir.is_empty()).then(|| PathBuf::from(cache_dir).join(format!("{key}.json")));
    if let Some(p) = path.as_ref().filter(|p| p.exists()) {
        let cached: Option<Vec<Vec<f32>>> = crate::io::read_json(p)
            .ok()
            .and_then(|v| serde_json::from_value(v["logps"].clone()).ok());
        if let Some(v) = cached.filter(|v| {
            v.len() == comparisons.len()
                && v.iter()
                    .zip(comparisons)
                    .all(|(l, c)| l.len() == c.completions.len())
        }) {
            eprintln!("{what}: reference log-probs from cache {}", p.display());
            return Ok(v);
        }
    }
    let t = Instant::now();
    let logps = reference_logprobs(reference, comparisons, length_normalized, batch)?;
    eprintln!(
        "{what}: reference log-probs of {} completions computed in {:.1}s",
        logps.iter().map(Vec::len).sum::<usize>(),
        t.elapsed().as_secs_f64()
    );
    if let Some(p) = path {
        std::fs::create_dir_all(p.parent().unwrap())
            .with_context(|| format!("cannot create {cache_dir}"))?;
        let text = serde_json::to_vec(&json!({"key": key, "logps": logps}))?;
        crate::io::write_atomic(&p, &text)?;
    }
    Ok(logps)
}

pub fn run(args: &RunArgs) -> Result<()> {
    let (table, origin) = settings_table(args, &[RUN_KEYS, PREFERENCE_DATA_KEYS, TRAIN_KEYS])?;
    let mut run: DpoRunConfig = extract(&table, RUN_KEYS, &origin)?;
    let mut data_cfg: PreferenceDataConfig = extract(&table, PREFERENCE_DATA_KEYS, &origin)?;
    let mut train_cfg: TrainConfig = extract(&table, TRAIN_KEYS, &origin)?;
    for p in [
        &mut run.model,
        &mut run.ref_model,
        &mut run.train_file,
        &mut run.eval_file,
        &mut run.ref_cache_dir,
    ] {
        *p = crate::io::expand_tilde(p);
    }
    check_train_config(&mut train_cfg, &origin)?;
    super::check_model_and_data(&origin, &run.model, &run.train_file, run.eval_split)?;
    let loss = DpoLoss::parse(&run.loss_type).with_context(|| origin.clone())?;
    if !(run.beta > 0.0 && run.beta.is_finite()) {
        bail!("{origin}: beta must be a positive number");
    }
    if !(0.0..0.5).contains(&run.label_smoothing) {
        bail!("{origin}: label_smoothing must be in [0, 0.5)");
    }
    if run.label_smoothing > 0.0 && loss != DpoLoss::Sigmoid {
        bail!("{origin}: label_smoothing applies to loss_type = \"sigmoid\" only");
    }
    if run.reference_free && !run.ref_model.is_empty() {
        bail!("{origin}: reference_free and ref_model exclude each other");
    }
    crate::train::trainer::preflight(&train_cfg, args.resume)?;
    let (train_records, eval_records) = train_eval_records(
        &run.train_file,
        &run.eval_file,
        run.eval_split,
        train_cfg.seed,
    )?;
    let ck = Checkpoint::load(&run.model, true)?;
    let (train_set, eval_set) = super::load_comparisons(
        &ck,
        (&run.train_file, &run.eval_file),
        (&train_records, &eval_records),
        &mut data_cfg,
        true,
    )?;
    let mc = &ck.model.config;
    let norm = loss.length_normalized();
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
        if reference.config.vocab_size != mc.vocab_size {
            bail!(
                "{}: the reference model's vocabulary ({}) differs from the policy's ({})",
                run.ref_model,
                reference.config.vocab_size,
                mc.vocab_size
            );
        }
        let cache = &run.ref_cache_dir;
        // The weights' hash only keys the cache.
        let h = if cache.is_empty() {
            0
        } else {
            weights_hash(reference)?
        };
        (
            cached_reference_logprobs(reference, h, &train_set, norm, batch, cache, "train")?,
            cached_reference_logprobs(reference, h, &eval_set, norm, batch, cache, "eval")?,
        )
    };
    let fp = fingerprint(
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
            super::train_settings_for_fingerprint(&train_cfg),
        ],
        train_set.iter().flat_map(Comparison::token_lists),
    );
    let mut task = DpoTask {
        params: DpoParams {
            loss,
            beta: run.beta,
            label_smoothing: run.label_smoothing,
        },
        train: train_set,
        train_ref,
        eval: eval_set,
        eval_ref,
        eval_batch_size: batch,
    };
    let outcome = train(&train_cfg, &ck.model, &mut task, args.resume, &fp)?;
    let out = Path::new(&train_cfg.output_dir);
    save_final(&ck, out)?;
    eprintln!(
        "done: {} steps ({} skipped), {}{:.0} tokens/s; model written to {}",
        outcome.steps,
        outcome.skipped_steps,
        super::metrics_summary(&outcome.eval_metrics),
        outcome.tokens_per_second,
        out.display()
    );
    Ok(())
}
