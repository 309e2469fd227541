//! The command-line subcommands, as library functions that take parsed options.

pub mod bench;
pub mod convert;
pub mod dpo;
pub mod eval;
pub mod generate;
pub mod logprobs;
pub mod ppo;
pub mod preferences;
pub mod quickstart;
pub mod rm;
pub mod score;
pub mod sft;

use anyhow::Result;
use std::time::Instant;

use crate::checkpoint::Checkpoint;

/// Loads a model for inference and says on stderr what was loaded.
pub fn load_for_inference(spec: &str) -> Result<Checkpoint> {
    let t = Instant::now();
    let ck = Checkpoint::load(spec, false)?;
    let c = &ck.model.config;
    eprintln!(
        "loaded {} ({} model, {:.1}M parameters) in {:.1}s",
        ck.source.display(),
        c.model_type,
        c.num_parameters() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    if !ck.model.unused_tensors.is_empty() {
        eprintln!(
            "note: {} checkpoint tensor(s) not used by the causal LM: {}",
            ck.model.unused_tensors.len(),
            ck.model
                .unused_tensors
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(ck)
}

/// Records with their line numbers.
pub type Records = Vec<(usize, serde_json::Value)>;

/// Holds out a seeded `fraction` of the records for evaluation.
pub fn split_eval(records: Records, fraction: f64, seed: u64) -> (Records, Records) {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let n_eval = ((records.len() as f64) * fraction).round() as usize;
    let mut idx: Vec<usize> = (0..records.len()).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed));
    let eval_set: std::collections::HashSet<usize> = idx[..n_eval].iter().copied().collect();
    let (mut train, mut eval) = (vec![], vec![]);
    for (i, r) in records.into_iter().enumerate() {
        if eval_set.contains(&i) {
            eval.push(r)
        } else {
            train.push(r)
        }
    }
    (train, eval)
}

/// Training and evaluation records: `train_file`, and `eval_file` or a held-out split of it.
pub fn train_eval_records(
    train_file: &str,
    eval_file: &str,
    eval_split: f64,
    seed: u64,
) -> Result<(Records, Records)> {
    let records = crate::data::read_records(std::path::Path::new(train_file))?;
    if !eval_file.is_empty() {
        return Ok((
            records,
            crate::data::read_records(std::path::Path::new(eval_file))?,
        ));
    }
    if eval_split > 0.0 {
        return Ok(split_eval(records, eval_split, seed));
    }
    Ok((records, vec![]))
}

/// A stable hash of what must not change when a run is resumed: settings (as JSON) and the
/// token ids trained on.
pub fn fingerprint<'a>(
    settings: &[serde_json::Value],
    token_lists: impl Iterator<Item = &'a [u32]>,
) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for s in settings {
        s.to_string().hash(&mut h);
    }
    for ids in token_lists {
        ids.hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

/// The training settings that a resumed run must share (paths and logging cadence excluded).
pub fn train_settings_for_fingerprint(t: &crate::train::TrainConfig) -> serde_json::Value {
    let t = crate::train::TrainConfig {
        output_dir: String::new(),
        logging_steps: 0,
        eval_steps: 0,
        save_steps: 0,
        save_total_limit: 0,
        threads: 0,
        ..t.clone()
    };
    serde_json::to_value(t).unwrap_or_default()
}

/// `--config`, `--set`, `--resume`: what every training command takes.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// TOML file with the run's settings (keys below).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Override or add a setting: --set learning_rate=1e-5 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Continue from the newest checkpoint in output_dir.
    #[arg(long)]
    pub resume: bool,
}

/// The settings table of a run, with unknown keys refused, and where it came from (for messages).
pub fn settings_table(
    args: &RunArgs,
    known: &[&[crate::config::KeyDoc]],
) -> Result<(toml::Table, String)> {
    let origin = args
        .config
        .as_ref()
        .map_or("--set".to_string(), |p| p.display().to_string());
    let table = crate::config::load_table(args.config.as_deref(), &args.sets)?;
    crate::config::check_keys(&table, known, &origin)?;
    Ok((table, origin))
}

/// Checks shared by the training commands, and the thread setting applied.
pub fn check_train_config(train: &mut crate::train::TrainConfig, origin: &str) -> Result<()> {
    use anyhow::Context;
    train.output_dir = crate::io::expand_tilde(&train.output_dir);
    train.validate().with_context(|| origin.to_string())?;
    if train.threads > 0 {
        std::env::set_var("RAYON_NUM_THREADS", train.threads.to_string());
    }
    Ok(())
}

/// What every training command needs: a model, training data, and an eval_split in [0, 1).
pub fn check_model_and_data(
    origin: &str,
    model: &str,
    train_file: &str,
    eval_split: f64,
) -> Result<()> {
    if model.is_empty() || train_file.is_empty() {
        anyhow::bail!("{origin}: `model` and `train_file` are required");
    }
    if !(0.0..1.0).contains(&eval_split) {
        anyhow::bail!("{origin}: eval_split must be in [0, 1)");
    }
    Ok(())
}

/// Evaluation metrics as "name value, " pairs, for a run's closing line.
pub fn metrics_summary(metrics: &[(String, f64)]) -> String {
    metrics
        .iter()
        .map(|(k, v)| format!("{k} {v:.4}, "))
        .collect()
}

/// Training and held-out comparisons of a preference run, tokenised with `ck`'s tokenizer
/// (GPT-2's position limit lowers `max_length`). `append_eos` as in `prepare_comparisons`.
pub fn load_comparisons(
    ck: &crate::checkpoint::Checkpoint,
    (train_file, eval_file): (&str, &str),
    (train_records, eval_records): (&Records, &Records),
    data_cfg: &mut crate::data::preference::PreferenceDataConfig,
    append_eos: bool,
) -> Result<(
    Vec<crate::data::preference::Comparison>,
    Vec<crate::data::preference::Comparison>,
)> {
    use crate::data::preference::prepare_comparisons;
    let mc = &ck.model.config;
    if mc.family == crate::model::config::Family::Gpt2
        && data_cfg.max_length > mc.max_position_embeddings
    {
        data_cfg.max_length = mc.max_position_embeddings;
        data_cfg.max_prompt_length = data_cfg.max_prompt_length.min(data_cfg.max_length / 2);
    }
    let tok = ck.tokenizer()?;
    let (train, stats) = prepare_comparisons(train_records, train_file, tok, data_cfg, append_eos)?;
    eprintln!("train data: {}", stats.summary());
    if eval_records.is_empty() {
        return Ok((train, vec![]));
    }
    let origin = if eval_file.is_empty() {
        train_file
    } else {
        eval_file
    };
    let (eval, s) = prepare_comparisons(eval_records, origin, tok, data_cfg, append_eos)?;
    eprintln!("eval data: {}", s.summary());
    Ok((train, eval))
}
