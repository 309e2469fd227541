//! `rlhf generate`: batched sampling from prompts given on the command line or in a JSONL file.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

use crate::checkpoint::Checkpoint;
use crate::generate::{generate, SamplingConfig};

/// Samples one command makes at most: its (prompt, sample) rows are counted before any is made.
const MAX_ROWS: usize = 10_000_000;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// HF model directory, .gguf file, or repo id in the local HF cache.
    #[arg(long)]
    pub model: String,
    /// A prompt (repeat the flag for several).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// JSONL file of prompts: {"prompt": "..."} or {"messages": [...]} per line.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Wrap each text prompt as a user message and apply the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message to put first when --chat is used.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens with probability ≥ P.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Samples per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_samples: usize,
    /// Prompts run together in one batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Extra stop token (by text, e.g. "\n\n" tokenizing to one id, or "<|endoftext|>"); repeatable.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Never stop early (for benchmarks): always produce max_new_tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object per sample with ids and log-probs instead of text.
    #[arg(long)]
    pub json: bool,
    /// Decode with bf16 copies of the weights: half the bytes streamed per token (products in
    /// f32; log-probs within bf16 rounding of the f32 model's). Used where AVX-512 is available.
    #[arg(long)]
    pub bf16: bool,
}

/// A prompt as the user gave it, and the token ids the model sees.
struct Prompt {
    shown: Value,
    ids: Vec<u32>,
}

fn build_prompts(args: &GenerateArgs, ck: &Checkpoint) -> Result<Vec<Prompt>> {
    let tok = ck.tokenizer()?;
    let mut raw: Vec<(String, Value)> = args
        .prompt
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("--prompt #{}", i + 1), json!(p)))
        .collect();
    if let Some(path) = &args.prompts {
        for (line, v) in crate::data::read_jsonl(path)? {
            let at = format!("{}:{line}", path.display());
            if let Some(m) = v.get("messages") {
                raw.push((at, json!({"messages": m})));
            } else if let Some(p) = v.get("prompt") {
                raw.push((at, p.clone()));
            } else {
                bail!("{at}: expected a \"prompt\" or \"messages\" field");
            }
        }
    }
    if raw.is_empty() {
        bail!("no prompts: give --prompt TEXT or --prompts FILE.jsonl");
    }
    let mut out = Vec::with_capacity(raw.len());
    for (at, v) in raw {
        let messages = match (&v, args.chat) {
            (Value::Object(o), _) => Some(o["messages"].clone()),
            (Value::Array(_), _) => Some(v.clone()),
            (Value::String(s), true) => {
                let mut m = vec![];
                if let Some(sys) = &args.system {
                    m.push(json!({"role": "system", "content": sys}));
                }
                m.push(json!({"role": "user", "content": s}));
                Some(Value::Array(m))
            }
            (Value::String(_), false) => None,
            _ => bail!("{at}: prompt must be a string or a list of messages"),
        };
        let ids = match (&messages, &v) {
            (Some(m), _) => {
                crate::text::apply_chat_template(tok, m, true)
                    .with_context(|| at.clone())?
                    .1
            }
            (None, Value::String(s)) => {
                if s.is_empty() {
                    bail!("{at}: empty prompt");
                }
                tok.encode(s, true)?
            }
            _ => unreachable!(),
        };
        if ids.is_empty() {
            bail!("{at}: prompt tokenizes to nothing");
        }
        out.push(Prompt {
            shown: messages.unwrap_or(v),
            ids,
        });
    }
    Ok(out)
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    if args.batch_size == 0 || args.num_samples == 0 {
        bail!("--batch-size and --num-samples must be at least 1");
    }
    let mut ck = super::load_for_inference(&args.model)?;
    if args.bf16 && !ck.model.use_bf16_decode_weights(true)? {
        eprintln!(
            "note: --bf16: no fast bf16 decode kernel on this CPU (needs AVX-512); decoding in f32"
        );
    }
    let tok = ck.tokenizer()?;
    let prompts = build_prompts(args, &ck)?;
    let mut stop_ids = if args.ignore_eos {
        vec![]
    } else {
        ck.stop_token_ids()
    };
    for s in &args.stop {
        let ids = tok.encode(s, false)?;
        match ids.as_slice() {
            [id] => stop_ids.push(*id),
            _ => bail!(
                "--stop {s:?} is {} tokens; stop strings must be a single token",
                ids.len()
            ),
        }
    }
    let mut cfg = SamplingConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        stop_ids,
        seed: args.seed,
        ..Default::default()
    };
    // Each (prompt, sample) pair is one row; rows go through in batches, made as they are needed.
    let rows = prompts
        .len()
        .checked_mul(args.num_samples)
        .filter(|&n| n <= MAX_ROWS)
        .with_context(|| {
            format!(
                "{} prompts × --num-samples {} is more than {MAX_ROWS} samples",
                prompts.len(),
                args.num_samples
            )
        })?;
    let row = |i: usize| (i / args.num_samples, i % args.num_samples);
    let start = Instant::now();
    let mut new_tokens = 0usize;
    for (b, first) in (0..rows).step_by(args.batch_size).enumerate() {
        let chunk: Vec<(usize, usize)> = (first..rows.min(first.saturating_add(args.batch_size)))
            .map(row)
            .collect();
        let ids: Vec<Vec<u32>> = chunk.iter().map(|&(p, _)| prompts[p].ids.clone()).collect();
        cfg.seed = args.seed.wrapping_add(b as u64);
        let samples = generate(&ck.model, &ids, &cfg)?;
        for (&(p, s), sample) in chunk.iter().zip(&samples) {
            new_tokens += sample.tokens.len();
            let text = tok.decode(&sample.tokens, true)?;
            if args.json {
                println!(
                    "{}",
                    json!({
                        "prompt": prompts[p].shown,
                        "sample": s,
                        "completion": text,
                        "prompt_ids": sample.prompt,
                        "completion_ids": sample.tokens,
                        "logprobs": sample.model_logprobs,
                        "sampling_logprobs": sample.sampling_logprobs,
                        "stopped": sample.stopped,
                    })
                );
            } else {
                if rows > 1 {
                    println!("### prompt {} sample {}", p + 1, s + 1);
                }
                println!("{text}");
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "generated {new_tokens} tokens for {} rows in {secs:.2}s ({:.1} tokens/s)",
        rows,
        new_tokens as f64 / secs
    );
    Ok(())
}
