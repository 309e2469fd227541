//! `rlhf logprobs`: exact per-token log-probabilities of a text or id sequence.

use anyhow::{bail, Context, Result};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct LogprobsArgs {
    /// HF model directory, .gguf file, or repo id in the local HF cache.
    #[arg(long)]
    pub model: String,
    /// Text to score (tokenized with the model's tokenizer, special tokens as the tokenizer adds them).
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    pub text: Option<String>,
    /// Comma-separated token ids to score, e.g. 1,2,3.
    #[arg(long)]
    pub ids: Option<String>,
    /// Print one JSON object {"ids": [...], "logprobs": [...]} with logprobs[i-1] = log p(ids[i] | ids[..i]).
    #[arg(long)]
    pub json: bool,
}

pub fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(|x| x.trim())
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse::<u32>()
                .with_context(|| format!("--ids: `{x}` is not a token id"))
        })
        .collect()
}

pub fn run(args: &LogprobsArgs) -> Result<()> {
    let ck = super::load_for_inference(&args.model)?;
    let ids = match (&args.text, &args.ids) {
        (Some(text), _) => {
            if text.is_empty() {
                bail!("--text is empty: nothing to score");
            }
            ck.tokenizer()?.encode(text, true)?
        }
        (None, Some(ids)) => parse_ids(ids)?,
        (None, None) => bail!("give --text or --ids"),
    };
    if ids.len() < 2 {
        bail!("need at least 2 tokens to score, got {}", ids.len());
    }
    ck.model.config.check_context(ids.len(), "the sequence")?;
    let lp = ck
        .model
        .sequence_logprobs(std::slice::from_ref(&ids))?
        .remove(0);
    if args.json {
        println!("{}", json!({"ids": ids, "logprobs": lp}));
        return Ok(());
    }
    let tok = ck.tokenizer.as_ref();
    println!("{:>6}  {:>8}  {:>10}  token", "pos", "id", "logprob");
    for (i, (&id, &l)) in ids.iter().skip(1).zip(&lp).enumerate() {
        let piece = tok
            .and_then(|t| t.decode(&[id], false).ok())
            .unwrap_or_default();
        println!("{:>6}  {:>8}  {:>10.4}  {:?}", i + 1, id, l, piece);
    }
    let loss = -lp.iter().map(|&x| x as f64).sum::<f64>() / lp.len() as f64;
    println!(
        "mean loss {loss:.5} (perplexity {:.3}) over {} predicted tokens",
        loss.exp(),
        lp.len()
    );
    Ok(())
}
