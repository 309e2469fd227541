//! `rlhf bench` (hidden): the rlhf half of bench/run.sh. Builds a randomly initialised model, runs
//! one workload `repeats` times after `warmup` untimed runs, and prints one JSON line with the wall
//! times and the peak resident memory. bench/torch_bench.py does the same in PyTorch.
//!
//! Workloads (all f32, random token ids):
//! * `train`: one optimizer step on [B, T]: forward, next-token cross-entropy over all positions
//!   (through `CausalLm::token_logprobs` on the default ops path, as SFT computes it), backward,
//!   global-norm clipping to 1.0, AdamW.
//! * `generate`: B prompts (B·T tokens in all, lengths T ± T/4) sampled at temperature 1 for exactly
//!   N new tokens each (no stop tokens), KV cache.
//! * `dpo`: one DPO step on B chosen + B rejected sequences of length T run as one batch of 2B; the
//!   second half of each sequence is the response; reference log-probs are fixed constants.
//! * `rollout`: a GRPO-shaped rollout of a real checkpoint (`--model`) on real prompts
//!   (`--prompts`, chat-formatted): the first B prompts × G samples at temperature 1 up to N new
//!   tokens, each row stopping at the checkpoint's end-of-turn token; tokens/s counts the tokens
//!   generated (stop tokens included). `--max-rows`, `--no-refill`, `--no-share-prefill` switch
//!   the scheduling for A/B runs.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, D};
use clap::ValueEnum;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::time::Instant;

use crate::generate::{generate, generate_scheduled, SamplingConfig};
use crate::model::hparams::ModelConfig;
use crate::model::init::{gpt2_small_config, random_weights, smollm2_135m_config};
use crate::model::{CausalLm, StepInputs};
use crate::ops;
use crate::train::{Optimizer, Schedule, TrainConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    Train,
    Generate,
    Dpo,
    /// The matmul kernels alone at the training shapes of `--arch` (B·T rows): GFLOP/s of each
    /// path this CPU has, forward and both backward layouts.
    Matmul,
    /// Sampling from a real checkpoint on real prompts until each row's stop token.
    Rollout,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Arch {
    /// SmolLM2-135M (Llama family).
    Smollm2,
    /// GPT-2 small (124M).
    Gpt2,
    /// Qwen2.5-0.5B (494M, tied embeddings, q/k/v biases).
    #[value(name = "qwen2.5-0.5b")]
    Qwen25Half,
    /// Qwen2.5-1.5B (1.54B, tied embeddings).
    #[value(name = "qwen2.5-1.5b")]
    Qwen25OneAndHalf,
}

impl Arch {
    fn config(self) -> ModelConfig {
        match self {
            Arch::Smollm2 => smollm2_135m_config(),
            Arch::Gpt2 => gpt2_small_config(),
            Arch::Qwen25Half => qwen25_config(896, 4864, 24, 14),
            Arch::Qwen25OneAndHalf => qwen25_config(1536, 8960, 28, 12),
        }
    }
}

/// The Qwen2.5 architectures (2 key-value heads, vocabulary 151 936, tied, rope θ = 10⁶).
fn qwen25_config(hidden: usize, inter: usize, layers: usize, heads: usize) -> ModelConfig {
    ModelConfig::from_json(json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": true,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "torch_dtype": "float32"
    }))
    .expect("the built-in Qwen2.5 config is valid")
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[arg(long, value_enum)]
    pub workload: Workload,
    #[arg(long, value_enum, default_value = "smollm2")]
    pub arch: Arch,
    /// Sequences per step (train), prompts (generate) or preference pairs (dpo).
    #[arg(long)]
    pub batch: usize,
    /// Sequence length (train, dpo) or mean prompt length (generate).
    #[arg(long)]
    pub seq: usize,
    /// New tokens per prompt (generate).
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// bf16 mixed precision for train and dpo, as `bf16 = true` gives it on this CPU
    /// (RLHF_BF16_KERNEL=on forces the bf16 kernel where the measurement would not use it);
    /// bf16 decode weights for generate, as `rlhf generate --bf16`.
    #[arg(long)]
    pub bf16: bool,
    /// LoRA of this rank on every projection (α = 2r, no dropout) on a frozen base; 0: full
    /// fine-tuning (train and dpo).
    #[arg(long, default_value_t = 0)]
    pub lora_r: usize,
    /// Recompute block activations in the backward pass (train and dpo).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// generate: samples per prompt (GRPO's G): each of the `batch` prompts repeated G times,
    /// as `rlhf grpo` samples them (one prefill per prompt).
    #[arg(long, default_value_t = 1)]
    pub group: usize,
    /// Store the frozen base of a LoRA run in bf16 (`frozen_dtype = "bf16"`).
    #[arg(long)]
    pub frozen_bf16: bool,
    /// rollout: the checkpoint (HF directory or .gguf).
    #[arg(long)]
    pub model: Option<String>,
    /// rollout: prompt file (`{"prompt": …}` JSONL or Parquet), chat-formatted.
    #[arg(long)]
    pub prompts: Option<String>,
    /// rollout: at most this many rows decode at once (0: all).
    #[arg(long, default_value_t = 0)]
    pub max_rows: usize,
    /// rollout: run rows in waves of --max-rows instead of refilling finished rows' places.
    #[arg(long)]
    pub no_refill: bool,
    /// rollout: every row prefills its own copy of its prompt.
    #[arg(long)]
    pub no_share_prefill: bool,
}

const LR: f64 = 1e-5;
const MAX_GRAD_NORM: f64 = 1.0;
const DPO_BETA: f64 = 0.1;

fn name<T: ValueEnum>(v: T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

fn random_ids(rng: &mut ChaCha8Rng, vocab: usize, rows: usize, len: usize) -> Vec<Vec<u32>> {
    (0..rows)
        .map(|_| {
            (0..len)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect()
        })
        .collect()
}

/// Peak resident set size of this process in MiB (VmHWM).
fn peak_rss_mb() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")
        .context("cannot read /proc/self/status for the peak RSS")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM line in /proc/self/status")?;
    let kb: f64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmHWM line")?
        .parse()
        .context("malformed VmHWM line")?;
    Ok(kb / 1024.0)
}

/// CPU time counters (clock ticks) of the whole machine and of this process, to spot timed runs
/// that shared the CPUs with other processes or lost time to the hypervisor.
struct CpuSnap {
    busy: u64,
    steal: u64,
    own: u64,
    at: Instant,
}

/// Linux reports /proc times in USER_HZ ticks, 100 per second on every common platform.
const TICKS_PER_S: f64 = 100.0;

impl CpuSnap {
    fn now() -> Option<CpuSnap> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // user nice system idle iowait irq softirq steal ...
        let busy = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6];
        let me = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the parenthesised command name start at field 3 (state); utime and stime
        // are fields 14 and 15.
        let rest: Vec<&str> = me.rsplit_once(')')?.1.split_whitespace().collect();
        let own = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
        Some(CpuSnap {
            busy,
            steal: cpu.get(7).copied().unwrap_or(0),
            own,
            at: Instant::now(),
        })
    }

    /// (cores kept busy by other processes, cores taken by the hypervisor) on average since `self`.
    fn other_load(&self, later: &CpuSnap) -> (f64, f64) {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-3) * TICKS_PER_S;
        let other =
            later.busy.saturating_sub(self.busy) as f64 - later.own.saturating_sub(self.own) as f64;
        let steal = later.steal.saturating_sub(self.steal) as f64;
        ((other / wall).max(0.0), steal / wall)
    }

    /// `other_load` from `before` to now; NaNs where /proc could not be read.
    fn load_since(before: Option<CpuSnap>) -> (f64, f64) {
        match (before, CpuSnap::now()) {
            (Some(a), Some(b)) => a.other_load(&b),
            _ => (f64::NAN, f64::NAN),
        }
    }
}

/// Prompt lengths for the generate workload: alternately T − T/4 and T + T/4 (T for a last odd
/// one), so that left padding is exercised and the prompt tokens total exactly B·T.
pub fn prompt_lengths(batch: usize, seq: usize) -> Vec<usize> {
    let d = seq / 4;
    (0..batch)
        .map(|i| {
            if !batch.is_multiple_of(2) && i == batch - 1 {
                seq
            } else if i % 2 == 0 {
                seq - d
            } else {
                seq + d
            }
        })
        .collect()
}

/// The optimizer step of the bench workloads: the library's, with clipping to 1.0 and weight
/// decay 0.01 at a constant learning rate.
fn bench_optimizer(model: &CausalLm) -> Optimizer {
    let cfg = TrainConfig {
        learning_rate: LR,
        lr_scheduler_type: Schedule::Constant,
        weight_decay: 0.01,
        max_grad_norm: MAX_GRAD_NORM,
        ..Default::default()
    };
    Optimizer::new(&cfg, model.parameters().to_vec(), 1)
}

fn step(optimizer: &mut Optimizer, loss: &Tensor) -> Result<()> {
    optimizer.start_step(1);
    optimizer.accumulate(loss)?;
    optimizer.step(0)?;
    Ok(())
}

/// log p(ids[t+1] | ids[..=t]) for every row and t < T − 1: [rows, T − 1], through the library's
/// default LM-head path (`RLHF_OPS=reference` selects the composed full-logits one).
fn next_token_logprobs(model: &CausalLm, ids: &[Vec<u32>]) -> Result<Tensor> {
    let t = ids[0].len();
    let mask = vec![vec![1u8; t]; ids.len()];
    let inp = StepInputs::from_padded(&model.config, ids, &mask)?;
    let hidden = model.forward_hidden(&inp, None)?;
    Ok(model.token_logprobs(
        &hidden.narrow(1, 0, t - 1)?,
        &inp.ids.narrow(1, 1, t - 1)?,
        ops::default_path(),
    )?)
}

fn train_step(model: &CausalLm, optimizer: &mut Optimizer, ids: &[Vec<u32>]) -> Result<()> {
    let lp = next_token_logprobs(model, ids)?;
    let loss = lp.mean_all()?.neg()?;
    step(optimizer, &loss)
}

/// One DPO step: rows 0..B of `ids` are chosen, B..2B rejected; `ref_lp` holds the reference
/// log-prob sums in the same order.
fn dpo_step(
    model: &CausalLm,
    optimizer: &mut Optimizer,
    ids: &[Vec<u32>],
    ref_lp: &Tensor,
) -> Result<()> {
    let (rows, t) = (ids.len(), ids[0].len());
    let pairs = rows / 2;
    let lp = next_token_logprobs(model, ids)?;
    // Column j predicts token j + 1; the response is tokens T/2 .. T.
    let resp: Vec<f32> = (0..t - 1)
        .map(|j| if j + 1 >= t / 2 { 1.0 } else { 0.0 })
        .collect();
    let resp = Tensor::from_vec(resp, (1, t - 1), &Device::Cpu)?;
    let seq_lp = lp.broadcast_mul(&resp)?.sum(D::Minus1)?;
    let logratio = (seq_lp - ref_lp)?;
    let margin = (logratio.narrow(0, 0, pairs)? - logratio.narrow(0, pairs, pairs)?)?;
    let loss = ops::log_sigmoid(&(margin * DPO_BETA)?)?.mean_all()?.neg()?;
    step(optimizer, &loss)
}

/// GFLOP/s of the matmul paths at the shapes of one transformer layer and the LM head.
fn matmul_workload(cfg: &ModelConfig, rows: usize, repeats: usize) -> Result<()> {
    use crate::ops::bf16;
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let kv = cfg.num_kv_heads * cfg.head_dim;
    let dev = &Device::Cpu;
    let mut out = vec![];
    for (what, k, n) in [("qo", d, d), ("kv", d, kv), ("up", d, f), ("down", f, d)] {
        let x = Tensor::randn(0f32, 1.0, (rows, k), dev)?;
        let w = Tensor::randn(0f32, 0.02, (n, k), dev)?;
        let dy = Tensor::randn(0f32, 1.0, (rows, n), dev)?;
        let flop = 2.0 * (rows * k * n) as f64;
        let time = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
            f()?;
            let t = Instant::now();
            for _ in 0..repeats {
                f()?;
            }
            Ok(t.elapsed().as_secs_f64() / repeats as f64)
        };
        let mut line = json!({"shape": what, "m": rows, "k": k, "n": n});
        for (layout, secs) in [
            ("f32 x·wT", time(&|| Ok(x.matmul(&w.t()?)?))?),
            ("f32 dy·w", time(&|| Ok(dy.matmul(&w)?))?),
            ("f32 dyT·x", time(&|| Ok(dy.t()?.matmul(&x)?))?),
        ] {
            line[layout] = json!((flop / secs / 1e9 * 10.0).round() / 10.0);
        }
        if bf16::available() {
            let (xv, wv, dyv) = (
                x.to_vec2::<f32>()?,
                w.to_vec2::<f32>()?,
                dy.to_vec2::<f32>()?,
            );
            let flat = |v: &[Vec<f32>]| v.concat();
            let (xf, wf, dyf) = (flat(&xv), flat(&wv), flat(&dyv));
            let view = |data: &[f32], rows: usize, cols: usize| bf16::View {
                data: unsafe { std::slice::from_raw_parts(data.as_ptr(), data.len()) },
                offset: 0,
                rows,
                cols,
                rs: cols,
                cs: 1,
            };
            let t = |f: &dyn Fn() -> Vec<f32>| {
                f();
                let s = Instant::now();
                for _ in 0..repeats {
                    f();
                }
                s.elapsed().as_secs_f64() / repeats as f64
            };
            for (layout, secs) in [
                (
                    "bf16 x·wT",
                    t(&|| bf16::gemm(view(&xf, rows, k), view(&wf, n, k).t())),
                ),
                (
                    "bf16 dy·w",
                    t(&|| bf16::gemm(view(&dyf, rows, n), view(&wf, n, k))),
                ),
                (
                    "bf16 dyT·x",
                    t(&|| bf16::gemm(view(&dyf, rows, n).t(), view(&xf, rows, k))),
                ),
            ] {
                line[layout] = json!((flop / secs / 1e9 * 10.0).round() / 10.0);
            }
        }
        eprintln!("{line}");
        out.push(line);
    }
    println!(
        "{}",
        json!({"workload": "matmul", "cpu": crate::ops::cpu::cpu().model, "gflops": out})
    );
    Ok(())
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.workload == Workload::Rollout {
        return rollout_workload(args);
    }
    if args.batch == 0 || args.seq < 2 || args.repeats == 0 {
        bail!("--batch and --repeats must be at least 1 and --seq at least 2");
    }
    if args.workload == Workload::Matmul {
        let cfg = args.arch.config();
        return matmul_workload(&cfg, args.batch * args.seq, args.repeats);
    }
    let cfg: ModelConfig = args.arch.config();
    let trainable = args.workload != Workload::Generate;
    let lora = trainable && args.lora_r > 0;
    let bf16 = super::bf16_pays(args.bf16 && trainable);
    crate::ops::bf16::set_enabled(bf16)?;
    crate::model::set_frozen_dtype(if args.frozen_bf16 {
        crate::model::FrozenDtype::Bf16
    } else {
        crate::model::FrozenDtype::F32
    });
    let t_build = Instant::now();
    let weights = random_weights(&cfg, args.seed)?;
    let mut model = CausalLm::from_weights(cfg.clone(), weights, trainable && !lora)?;
    if lora {
        model.add_lora(
            &crate::model::lora::LoraConfig {
                use_peft: true,
                lora_r: args.lora_r,
                lora_alpha: 2.0 * args.lora_r as f64,
                lora_dropout: 0.0,
                ..Default::default()
            },
            args.seed,
        )?;
    }
    model.set_gradient_checkpointing(args.gradient_checkpointing);
    let decode16 =
        args.bf16 && args.workload == Workload::Generate && model.use_bf16_decode_weights(true)?;
    let label = format!(
        "rlhf {} {}{}",
        name(args.workload),
        name(args.arch),
        if bf16 || decode16 { " bf16" } else { "" }
    ) + &if lora {
        format!(" lora-r{}", args.lora_r)
    } else {
        String::new()
    } + if args.gradient_checkpointing {
        " ckpt"
    } else {
        ""
    } + if args.frozen_bf16 && lora {
        " frozen-bf16"
    } else {
        ""
    };
    eprintln!(
        "{label}: random {:.1}M-parameter model built in {:.1}s",
        cfg.num_parameters() as f64 / 1e6,
        t_build.elapsed().as_secs_f64()
    );
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed.wrapping_add(1));
    let mut optimizer = trainable.then(|| bench_optimizer(&model));
    let mut times = Vec::with_capacity(args.repeats);
    let (mut other_cpu, mut steal_cpu) = (vec![], vec![]);
    for i in 0..args.warmup + args.repeats {
        let before = CpuSnap::now();
        // Inputs are drawn outside the timed region.
        let (elapsed, what) = match args.workload {
            Workload::Train => {
                let ids = random_ids(&mut rng, cfg.vocab_size, args.batch, args.seq);
                let t = Instant::now();
                train_step(&model, optimizer.as_mut().unwrap(), &ids)?;
                (t.elapsed(), "step")
            }
            Workload::Dpo => {
                let ids = random_ids(&mut rng, cfg.vocab_size, 2 * args.batch, args.seq);
                let half = (args.seq - args.seq / 2) as f32;
                let ref_lp: Vec<f32> = (0..2 * args.batch)
                    .map(|_| -(cfg.vocab_size as f32).ln() * half + rng.random_range(-5.0..5.0))
                    .collect();
                let ref_lp = Tensor::from_vec(ref_lp, 2 * args.batch, &Device::Cpu)?;
                let t = Instant::now();
                dpo_step(&model, optimizer.as_mut().unwrap(), &ids, &ref_lp)?;
                (t.elapsed(), "step")
            }
            Workload::Matmul | Workload::Rollout => unreachable!("handled above"),
            Workload::Generate => {
                let g = args.group.max(1);
                let prompts: Vec<Vec<u32>> = prompt_lengths(args.batch, args.seq)
                    .into_iter()
                    .map(|len| random_ids(&mut rng, cfg.vocab_size, 1, len).remove(0))
                    .flat_map(|p| std::iter::repeat_n(p, g))
                    .collect();
                let sc = SamplingConfig {
                    max_new_tokens: args.new_tokens,
                    temperature: 1.0,
                    top_k: 0,
                    top_p: 1.0,
                    stop_ids: vec![],
                    seed: args.seed.wrapping_add(i as u64),
                    ..Default::default()
                };
                let t = Instant::now();
                let samples = generate(&model, &prompts, &sc)?;
                let elapsed = t.elapsed();
                let n: usize = samples.iter().map(|s| s.tokens.len()).sum();
                if n != prompts.len() * args.new_tokens {
                    bail!(
                        "generated {n} tokens, expected {}",
                        prompts.len() * args.new_tokens
                    );
                }
                (elapsed, "generate")
            }
        };
        let secs = elapsed.as_secs_f64();
        let (other, steal) = CpuSnap::load_since(before);
        let warm = i < args.warmup;
        eprintln!(
            "{label}: {what} {}/{} {secs:.2}s{} (other processes {other:.2} cores, steal {steal:.2})",
            i + 1,
            args.warmup + args.repeats,
            if warm { " (warm-up)" } else { "" }
        );
        if !warm {
            times.push(secs);
            other_cpu.push((other * 100.0).round() / 100.0);
            steal_cpu.push((steal * 100.0).round() / 100.0);
        }
    }
    println!(
        "{}",
        json!({
            "workload": name(args.workload),
            "arch": name(args.arch),
            "times_s": times,
            "peak_rss_mb": (peak_rss_mb()? * 10.0).round() / 10.0,
            "batch": args.batch,
            "seq": args.seq,
            "new_tokens": if args.workload == Workload::Generate { Some(args.new_tokens) } else { None },
            "group": args.group,
            "params": cfg.num_parameters(),
            "ops_path": format!("{:?}", ops::default_path()).to_lowercase(),
            "bf16_requested": args.bf16,
            "bf16_matmuls": bf16,
            "bf16_decode_weights": decode16,
            "lora_r": if lora { args.lora_r } else { 0 },
            "gradient_checkpointing": args.gradient_checkpointing,
            "frozen_bf16": args.frozen_bf16 && lora,
            "cpu": ops::cpu::cpu().model,
            "cpu_flags": ops::cpu::cpu().flags(),
            "kernels": ops::cpu::kernel_paths().into_iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            // Average cores used by other processes / taken by the hypervisor during each timed run.
            "other_cpu": other_cpu,
            "steal_cpu": steal_cpu,
        })
    );
    Ok(())
}

/// The `rollout` workload: tokens/s of sampling a real model on real prompts, G rows per prompt.
fn rollout_workload(args: &BenchArgs) -> Result<()> {
    let (Some(model_path), Some(prompt_path)) = (&args.model, &args.prompts) else {
        bail!("--workload rollout needs --model and --prompts");
    };
    if args.batch == 0 || args.repeats == 0 {
        bail!("--batch and --repeats must be at least 1");
    }
    let t_build = Instant::now();
    let mut ck = crate::checkpoint::Checkpoint::load(model_path, false)?;
    let (prompts, _) =
        crate::data::prompts::read_prompts(prompt_path, ck.tokenizer()?, true, usize::MAX)?;
    if prompts.len() < args.batch {
        bail!(
            "{prompt_path}: {} prompts, --batch asks for {}",
            prompts.len(),
            args.batch
        );
    }
    let g = args.group.max(1);
    let rows: Vec<Vec<u32>> = prompts[..args.batch]
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.ids.clone(), g))
        .collect();
    let decode16 = args.bf16 && ck.model.use_bf16_decode_weights(true)?;
    let label = format!(
        "rlhf rollout {} rows{}{}{}",
        rows.len(),
        if args.max_rows > 0 {
            format!(
                ", at most {} at once ({})",
                args.max_rows,
                if args.no_refill { "waves" } else { "refill" }
            )
        } else {
            String::new()
        },
        if args.no_share_prefill {
            ", unshared prefill"
        } else {
            ""
        },
        if decode16 {
            ", bf16 decode weights"
        } else {
            ""
        },
    );
    eprintln!(
        "{label}: {model_path} loaded in {:.1}s",
        t_build.elapsed().as_secs_f64()
    );
    let (mut times, mut tokens, mut schedules) = (vec![], vec![], vec![]);
    let (mut other_cpu, mut steal_cpu) = (vec![], vec![]);
    for i in 0..args.warmup + args.repeats {
        let sc = SamplingConfig {
            max_new_tokens: args.new_tokens,
            stop_ids: ck.stop_token_ids(),
            seed: args.seed.wrapping_add(i as u64),
            max_rows: args.max_rows,
            refill: !args.no_refill,
            share_prefill: !args.no_share_prefill,
            ..Default::default()
        };
        let before = CpuSnap::now();
        let t = Instant::now();
        let (samples, schedule) = generate_scheduled(&ck.model, &rows, &sc)?;
        let secs = t.elapsed().as_secs_f64();
        let (other, steal) = CpuSnap::load_since(before);
        let n: usize = samples.iter().map(|s| s.tokens.len()).sum();
        let warm = i < args.warmup;
        eprintln!(
            "{label}: rollout {}/{} {secs:.2}s, {n} tokens ({:.1} tokens/s), {} decoding steps{} (other processes {other:.2} cores, steal {steal:.2})",
            i + 1,
            args.warmup + args.repeats,
            n as f64 / secs,
            schedule.decode_steps,
            if warm { " (warm-up)" } else { "" }
        );
        if !warm {
            times.push(secs);
            tokens.push(n);
            schedules.push(json!({
                "decode_steps": schedule.decode_steps,
                "row_steps": schedule.row_steps,
                "prefill_prompts": schedule.prefill_prompts,
                "prefill_tokens": schedule.prefill_tokens,
                "admissions": schedule.admissions,
                "peak_rows": schedule.peak_rows,
            }));
            other_cpu.push((other * 100.0).round() / 100.0);
            steal_cpu.push((steal * 100.0).round() / 100.0);
        }
    }
    println!(
        "{}",
        json!({
            "workload": "rollout",
            "model": model_path,
            "times_s": times,
            "tokens": tokens,
            "peak_rss_mb": (peak_rss_mb()? * 10.0).round() / 10.0,
            "batch": args.batch,
            "group": g,
            "new_tokens": args.new_tokens,
            "max_rows": args.max_rows,
            "refill": !args.no_refill,
            "share_prefill": !args.no_share_prefill,
            "bf16_decode_weights": decode16,
            "schedules": schedules,
            "cpu": ops::cpu::cpu().model,
            "cpu_flags": ops::cpu::cpu().flags(),
            "other_cpu": other_cpu,
            "steal_cpu": steal_cpu,
        })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_lengths_keep_the_token_count() {
        for (b, t) in [(16, 32), (3, 8), (1, 5)] {
            let l = prompt_lengths(b, t);
            assert_eq!(l.len(), b);
            assert_eq!(l.iter().sum::<usize>(), b * t);
        }
    }
}
