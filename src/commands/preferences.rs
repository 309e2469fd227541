//! `rlhf preferences`: preference data from a judge — K samples per prompt from a model, ranked by
//! a reward source (a reward model, `vader`, or a rule). Writes rankings (for `rlhf rm` and
//! Plackett–Luce DPO) and best-vs-worst pairs (for DPO).

use anyhow::{bail, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::checkpoint::Checkpoint;
use crate::generate::{generate, SamplingConfig};
use crate::reward::{Episode, RewardSource};

#[derive(clap::Args, Debug)]
pub struct PreferencesArgs {
    /// The model to sample (usually the SFT model).
    #[arg(long)]
    pub model: String,
    /// Prompts {"prompt": text} (.jsonl or .parquet).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Judge: a reward-model directory, "vader", or "rule:…".
    #[arg(long)]
    pub judge: String,
    /// Samples per prompt (K).
    #[arg(long, default_value_t = 4)]
    pub k: usize,
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Rankings output: {"prompt", "completions", "ranking"} per line.
    #[arg(long)]
    pub rankings: PathBuf,
    /// Pairs output: {"prompt", "chosen", "rejected"} (best and worst of each ranking).
    #[arg(long)]
    pub pairs: PathBuf,
}

/// Samples `k` completions per prompt, ranks them with `judge`, writes both files, and returns
/// how many prompts were kept (those whose samples are distinct, non-empty, and not all tied).
#[allow(clippy::too_many_arguments)]
pub fn rank_samples(
    model: &str,
    prompts: &[String],
    judge: &mut dyn RewardSource,
    k: usize,
    max_new_tokens: usize,
    seed: u64,
    rankings_out: &Path,
    pairs_out: &Path,
) -> Result<usize> {
    if k < 2 {
        bail!("--k must be at least 2");
    }
    let t = Instant::now();
    let ck = Checkpoint::load(model, false)?;
    let tok = ck.tokenizer()?;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tok.encode(p, true))
        .collect::<Result<_>>()?;
    let mut draws = vec![];
    for i in 0..k {
        let cfg = SamplingConfig {
            max_new_tokens,
            stop_ids: ck.stop_token_ids(),
            seed: seed.wrapping_mul(1000).wrapping_add(i as u64),
            ..Default::default()
        };
        draws.push(generate(&ck.model, &ids, &cfg)?);
    }
    let (mut rankings, mut pairs) = (String::new(), String::new());
    let mut kept = 0;
    for (n, p) in prompts.iter().enumerate() {
        let bodies: Vec<&[u32]> = draws.iter().map(|d| d[n].response()).collect();
        let texts: Vec<String> = bodies
            .iter()
            .map(|b| tok.decode(b, true))
            .collect::<Result<_>>()?;
        if texts.iter().any(|t| t.trim().is_empty())
            || texts
                .iter()
                .enumerate()
                .any(|(a, x)| texts[..a].contains(x))
        {
            continue;
        }
        let episodes: Vec<Episode> = bodies
            .iter()
            .zip(&texts)
            .map(|(b, t)| Episode {
                columns: None,
                prompt_ids: &ids[n],
                response_ids: b,
                prompt_text: p,
                response_text: t,
            })
            .collect();
        let scores = judge.score(&episodes)?;
        if scores.iter().any(|s| !s.is_finite()) {
            bail!("the judge returned a non-finite score for prompt {p:?}");
        }
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        let (best, worst) = (order[0], order[k - 1]);
        if scores[best] == scores[worst] {
            continue;
        }
        kept += 1;
        rankings.push_str(
            &json!({"prompt": p, "completions": texts, "ranking": order, "scores": scores})
                .to_string(),
        );
        rankings.push('\n');
        pairs.push_str(
            &json!({"prompt": p, "chosen": texts[best], "rejected": texts[worst]}).to_string(),
        );
        pairs.push('\n');
    }
    crate::io::write_atomic(rankings_out, rankings.as_bytes())?;
    crate::io::write_atomic(pairs_out, pairs.as_bytes())?;
    eprintln!(
        "   {} prompts × {k} samples judged by {}: {kept} rankings kept ({:.1}s)",
        prompts.len(),
        judge.describe(),
        t.elapsed().as_secs_f64()
    );
    Ok(kept)
}

pub fn run(args: &PreferencesArgs) -> Result<()> {
    for p in [&args.rankings, &args.pairs] {
        if p.exists() {
            bail!("{} already exists; not overwriting it", p.display());
        }
    }
    let ck = Checkpoint::load(&args.model, false)?;
    let tok = ck.tokenizer()?;
    let (prompts, _) =
        crate::data::prompts::read_prompts(&args.prompts.to_string_lossy(), tok, false, 512)?;
    let texts: Vec<String> = prompts.into_iter().map(|p| p.text).collect();
    let mut judge = crate::reward::from_spec(&args.judge, tok, 16)?;
    drop(ck);
    rank_samples(
        &args.model,
        &texts,
        judge.as_mut(),
        args.k,
        args.max_new_tokens,
        args.seed,
        &args.rankings,
        &args.pairs,
    )?;
    Ok(())
}
