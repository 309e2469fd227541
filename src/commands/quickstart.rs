//! `rlhf quickstart`: the whole pipeline on data that ships with the crate, with nothing
//! downloaded — a tiny model trained here on review sentences, then SFT → reward model on K-way
//! rankings judged by VADER → PPO against it, and DPO on the same preferences, then a report.
//! Every stage is one of the ordinary commands run with `--set` options, printed so that users
//! can run them by hand; `--model` starts from a real checkpoint instead of the tiny model.

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::TrainArgs;
use crate::eval::{run_eval, table, EvalConfig};
use crate::reward::VaderReward;

const REVIEWS: &str = include_str!("../../assets/reviews.txt");

#[derive(clap::Args, Debug)]
pub struct QuickstartArgs {
    /// Start from this checkpoint (HF dir, .gguf or cached repo id) instead of training a tiny
    /// model here, e.g. ~/.cache/rlhf-assets/smollm2-135m-instruct/model.gguf.
    #[arg(long)]
    pub model: Option<String>,
    /// Directory for every model, data file and the report.
    #[arg(long, default_value = "quickstart-out")]
    pub out: PathBuf,
    /// Much smaller stages (a smoke test of the pipeline; used by the test suite).
    #[arg(long, hide = true)]
    pub smoke: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Sizes of the stages.
struct Plan {
    pretrain_steps: usize,
    sft_steps: usize,
    ranking_prompts: usize,
    k: usize,
    response_length: usize,
    rm_steps: usize,
    ppo_episodes: usize,
    dpo_steps: usize,
    eval_prompts: usize,
    sft_lr: f64,
    rl_lr: f64,
    dpo_lr: f64,
}

impl Plan {
    fn new(real_model: bool, smoke: bool) -> Plan {
        if smoke {
            return Plan {
                pretrain_steps: 30,
                sft_steps: 5,
                ranking_prompts: 64,
                k: 4,
                response_length: 8,
                rm_steps: 10,
                ppo_episodes: 32,
                dpo_steps: 5,
                eval_prompts: 16,
                sft_lr: 3e-3,
                rl_lr: 1e-3,
                dpo_lr: 1e-3,
            };
        }
        if real_model {
            return Plan {
                pretrain_steps: 0,
                sft_steps: 40,
                ranking_prompts: 96,
                k: 4,
                response_length: 24,
                rm_steps: 60,
                ppo_episodes: 320,
                dpo_steps: 40,
                eval_prompts: 96,
                sft_lr: 5e-5,
                rl_lr: 1e-5,
                dpo_lr: 5e-6,
            };
        }
        Plan {
            pretrain_steps: 1000,
            sft_steps: 100,
            ranking_prompts: 1200,
            k: 4,
            response_length: 16,
            rm_steps: 300,
            ppo_episodes: 1600,
            dpo_steps: 150,
            eval_prompts: 300,
            sft_lr: 1e-3,
            rl_lr: 3e-4,
            dpo_lr: 3e-4,
        }
    }
}

fn write_jsonl(path: &Path, lines: &[Value]) -> Result<()> {
    let text: String = lines.iter().map(|l| l.to_string() + "\n").collect();
    crate::io::write_atomic(path, text.as_bytes())
}

fn quote(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

/// Runs one stage as its command would (`f` gets the `--set` options), printing the equivalent
/// command line.
fn stage(
    name: &str,
    what: &str,
    sets: Vec<String>,
    f: impl FnOnce(Vec<String>) -> Result<()>,
) -> Result<f64> {
    let t = Instant::now();
    let shown: String = sets.iter().map(|s| format!(" --set '{s}'")).collect();
    eprintln!("\n== {what}\n   rlhf {name}{shown}");
    f(sets).with_context(|| format!("quickstart stage `{name}`"))?;
    Ok(t.elapsed().as_secs_f64())
}

fn train_stage(run: fn(&TrainArgs) -> Result<()>) -> impl FnOnce(Vec<String>) -> Result<()> {
    move |sets| {
        run(&TrainArgs {
            sets,
            ..Default::default()
        })
    }
}

/// Sentences split into training and held-out parts, and prompts (their first 2–4 words).
struct Data {
    train: Vec<String>,
    heldout: Vec<String>,
}

fn prompt_of(sentence: &str, rng: &mut rand_chacha::ChaCha8Rng) -> Option<String> {
    use rand::Rng;
    let words: Vec<&str> = sentence.split_whitespace().collect();
    (words.len() >= 5).then(|| words[..rng.random_range(2..=4)].join(" "))
}

fn split_data(seed: u64) -> Data {
    let mut all: Vec<String> = REVIEWS
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect();
    all.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let heldout = all.split_off(all.len() * 9 / 10);
    Data {
        train: all,
        heldout,
    }
}

/// A byte-level BPE tokenizer trained on the sentences, saved as tokenizer.json with a
/// tokenizer_config.json (`<|endoftext|>` is BOS, EOS and padding).
fn train_tokenizer(sentences: &[String], vocab: usize, dir: &Path) -> Result<()> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, TokenizerBuilder};
    let byte_level = ByteLevel::new(false, true, true);
    let mut tok = TokenizerBuilder::<
        BPE,
        tokenizers::NormalizerWrapper,
        ByteLevel,
        ByteLevel,
        ByteLevel,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(byte_level))
    .with_post_processor(Some(byte_level))
    .with_decoder(Some(byte_level))
    .build()
    .map_err(|e| anyhow::anyhow!("cannot build the tokenizer: {e}"))?;
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from("<|endoftext|>", true)])
        .build();
    tok.train(&mut trainer, sentences.iter())
        .map_err(|e| anyhow::anyhow!("tokenizer training failed: {e}"))?;
    let tok: tokenizers::Tokenizer = tok.into();
    tok.save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", dir.display()))?;
    crate::io::write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "model_max_length": 128,
        }),
    )
}

/// A tiny Llama-family model with random weights and the trained tokenizer.
fn tiny_base(data: &Data, dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    train_tokenizer(&data.train, 1024, dir)?;
    let tok = crate::text::Tokenizer::from_hf_dir(dir)?;
    let eos = tok
        .token_id("<|endoftext|>")
        .context("tokenizer lacks <|endoftext|>")?;
    let cfg = crate::model::hparams::ModelConfig::from_json(json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": tok.vocab_size(),
        "max_position_embeddings": 128,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": true,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "torch_dtype": "float32"
    }))?;
    let weights = crate::model::init::random_weights(&cfg, seed)?;
    let model = crate::model::CausalLm::from_weights(cfg, weights, false)?;
    crate::checkpoint::save_model_files(&model, dir)
}

/// The data files the stages read, written under `out/data`.
struct Files {
    dir: PathBuf,
    pretrain: PathBuf,
    heldout: PathBuf,
    sft: PathBuf,
    prompts: PathBuf,
    eval_prompts: PathBuf,
    train_prompts: Vec<String>,
}

fn write_files(out: &Path, plan: &Plan, data: &Data, seed: u64) -> Result<Files> {
    let dir = out.join("data");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed + 1);
    let train_prompts: Vec<String> = data
        .train
        .iter()
        .filter_map(|s| prompt_of(s, &mut rng))
        .collect();
    let eval_prompts: Vec<String> = data
        .heldout
        .iter()
        .filter_map(|s| prompt_of(s, &mut rng))
        .collect();
    let file = |name: &str, lines: Vec<Value>| -> Result<PathBuf> {
        let p = dir.join(name);
        write_jsonl(&p, &lines)?;
        Ok(p)
    };
    let texts = |v: &[String]| v.iter().map(|t| json!({"text": t})).collect();
    // SFT: complete a sentence from its first words.
    let sft = data
        .train
        .iter()
        .filter_map(|s| {
            let w: Vec<&str> = s.split_whitespace().collect();
            (w.len() >= 5).then(|| {
                json!({"prompt": w[..3].join(" "), "completion": format!(" {}", w[3..].join(" "))})
            })
        })
        .collect();
    let prompts = |v: &[String]| v.iter().map(|p| json!({"prompt": p})).collect();
    Ok(Files {
        pretrain: file("pretrain.jsonl", texts(&data.train))?,
        heldout: file("heldout.jsonl", texts(&data.heldout))?,
        sft: file("sft.jsonl", sft)?,
        prompts: file("prompts-train.jsonl", prompts(&train_prompts))?,
        eval_prompts: file(
            "prompts-eval.jsonl",
            prompts(&eval_prompts[..plan.eval_prompts.min(eval_prompts.len())]),
        )?,
        train_prompts,
        dir,
    })
}

/// The tiny model: a byte-level BPE and a random Llama-family model, pretrained on the bundled
/// sentences. Returns its directory.
fn pretrain(
    out: &Path,
    files: &Files,
    data: &Data,
    plan: &Plan,
    seed: u64,
    times: &mut Times,
) -> Result<String> {
    let t = Instant::now();
    let base = out.join("base");
    eprintln!("== tiny model: byte-level BPE (1024 tokens) trained on {} sentences, Llama-family 4 layers × 128 (random init)", data.train.len());
    tiny_base(data, &base, seed)?;
    times.push(("tokenizer + init", t.elapsed().as_secs_f64()));
    let dir = out.join("pretrain");
    let secs = stage(
        "sft",
        "pretraining: language modelling on the bundled review sentences",
        vec![
            format!("model={}", quote(&base)),
            format!("train_file={}", quote(&files.pretrain)),
            format!("eval_file={}", quote(&files.heldout)),
            format!("output_dir={}", quote(&dir)),
            format!("max_steps={}", plan.pretrain_steps),
            "per_device_train_batch_size=32".into(),
            "per_device_eval_batch_size=64".into(),
            "learning_rate=3e-3".into(),
            "lr_scheduler_type=\"cosine\"".into(),
            "warmup_steps=30".into(),
            "max_length=64".into(),
            "weight_decay=0.01".into(),
            format!("eval_steps={}", plan.pretrain_steps),
            "logging_steps=50".into(),
            "save_steps=0".into(),
            format!("seed={seed}"),
        ],
        train_stage(super::sft::run),
    )?;
    times.push(("pretraining", secs));
    Ok(dir.to_string_lossy().to_string())
}

/// K samples of the SFT model per prompt ranked by VADER: rankings and best/worst pairs.
fn preferences(sft: &Path, files: &Files, plan: &Plan, seed: u64) -> Result<(PathBuf, PathBuf)> {
    eprintln!(
        "\n== preferences: sample the SFT model, rank with the judge (VADER compound sentiment)"
    );
    let prompts: Vec<String> = files
        .train_prompts
        .iter()
        .take(plan.ranking_prompts)
        .cloned()
        .collect();
    let (rankings, pairs) = (
        files.dir.join("rankings.jsonl"),
        files.dir.join("pairs.jsonl"),
    );
    let made = super::preferences::rank_samples(
        &sft.to_string_lossy(),
        &prompts,
        &mut VaderReward::new(),
        plan.k,
        plan.response_length,
        seed,
        &rankings,
        &pairs,
    )?;
    if made < 8 {
        bail!("only {made} prompts had samples the judge could rank");
    }
    Ok((rankings, pairs))
}

type Times = Vec<(&'static str, f64)>;

pub fn run(args: &QuickstartArgs) -> Result<()> {
    let start = Instant::now();
    let out = PathBuf::from(crate::io::expand_tilde(&args.out.to_string_lossy()));
    if out.join("report").join("report.md").exists() {
        bail!(
            "{} already holds a finished quickstart; choose another --out",
            out.display()
        );
    }
    if out.exists() && std::fs::read_dir(&out)?.next().is_some() {
        bail!(
            "{} is not empty; choose another --out or remove it",
            out.display()
        );
    }
    let (plan, seed) = (Plan::new(args.model.is_some(), args.smoke), args.seed);
    let data = split_data(seed);
    let files = write_files(&out, &plan, &data, seed)?;
    let mut times: Times = vec![];
    let sft_start = match &args.model {
        Some(m) => m.clone(),
        None => pretrain(&out, &files, &data, &plan, seed, &mut times)?,
    };
    let [sft, rm, ppo, dpo] = ["sft", "rm", "ppo", "dpo"].map(|d| out.join(d));
    let common = |steps: usize, batch: usize, lr: f64, logging: usize| -> Vec<String> {
        vec![
            format!("max_steps={steps}"),
            format!("per_device_train_batch_size={batch}"),
            format!("learning_rate={lr}"),
            format!("logging_steps={logging}"),
            "save_steps=0".into(),
            format!("seed={seed}"),
        ]
    };

    let mut sets = vec![
        format!("model=\"{sft_start}\""),
        format!("train_file={}", quote(&files.sft)),
        format!("output_dir={}", quote(&sft)),
        "max_length=64".into(),
    ];
    sets.extend(common(plan.sft_steps, 16, plan.sft_lr, 20));
    let what = "SFT: complete a review from its first three words";
    times.push((
        "SFT",
        stage("sft", what, sets, train_stage(super::sft::run))?,
    ));

    let t = Instant::now();
    let (rankings, pairs) = preferences(&sft, &files, &plan, seed)?;
    times.push(("sampling + judging", t.elapsed().as_secs_f64()));

    let mut sets = vec![
        format!("model={}", quote(&sft)),
        format!("train_file={}", quote(&rankings)),
        "eval_split=0.1".into(),
        format!("output_dir={}", quote(&rm)),
        format!("eval_steps={}", plan.rm_steps),
    ];
    sets.extend(common(plan.rm_steps, 8, plan.sft_lr, 25));
    let what = format!(
        "reward model: K={} rankings, all C(K,2) pairs of a prompt in one batch element",
        plan.k
    );
    times.push((
        "reward model",
        stage("rm", &what, sets, train_stage(super::rm::run))?,
    ));

    // A PPO step is an iteration: max_steps = 0 lets total_episodes set their number.
    let mut sets = vec![
        format!("model={}", quote(&sft)),
        format!("reward={}", quote(&rm)),
        format!("prompt_file={}", quote(&files.prompts)),
        format!("output_dir={}", quote(&ppo)),
        format!("total_episodes={}", plan.ppo_episodes),
        format!("response_length={}", plan.response_length),
        "kl_coef=0.1".into(),
        "num_ppo_epochs=2".into(),
        "lr_scheduler_type=\"constant\"".into(),
        "sample_every=20".into(),
    ];
    sets.extend(common(0, 16, plan.rl_lr, 1));
    let what = "PPO against the reward model, per-token KL penalty to the SFT model";
    times.push((
        "PPO",
        stage("ppo", what, sets, train_stage(super::ppo::run))?,
    ));

    let mut sets = vec![
        format!("model={}", quote(&sft)),
        format!("train_file={}", quote(&pairs)),
        format!("output_dir={}", quote(&dpo)),
        format!("ref_cache_dir={}", quote(&out.join("ref-cache"))),
        "beta=0.1".into(),
    ];
    sets.extend(common(plan.dpo_steps, 8, plan.dpo_lr, 25));
    let what = "DPO on the same preferences (best vs worst of each ranking)";
    times.push((
        "DPO",
        stage("dpo", what, sets, train_stage(super::dpo::run))?,
    ));

    eprintln!("\n== evaluation on held-out prompts, judged by VADER");
    let t = Instant::now();
    let report = run_eval(&EvalConfig {
        policies: vec![
            format!("sft={}", sft.display()),
            format!("ppo={}", ppo.display()),
            format!("dpo={}", dpo.display()),
        ],
        judge: "vader".into(),
        prompt_file: files.eval_prompts.to_string_lossy().to_string(),
        response_length: plan.response_length,
        text_file: files.heldout.to_string_lossy().to_string().into(),
        output_dir: out.join("report").to_string_lossy().to_string(),
        seed: seed + 7,
        ..Default::default()
    })?;
    times.push(("evaluation", t.elapsed().as_secs_f64()));
    println!("\n{}", table(&report));
    let timing: Vec<String> = times.iter().map(|(n, s)| format!("{n} {s:.0}s")).collect();
    println!(
        "time: {} — total {:.1} min",
        timing.join(", "),
        start.elapsed().as_secs_f64() / 60.0
    );
    println!("report: {}", out.join("report").join("report.md").display());
    Ok(())
}
