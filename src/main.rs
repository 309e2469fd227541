//! The `rlhf` command line: parses arguments and calls the library.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use rlhf::commands;

// Large fresh tensors page-fault less with mimalloc's reuse than with the system allocator
// (measured on the LM head: 162 → ~205 GFLOP/s; bench/RESULTS.md has the current figures).
/// `mi_option_purge_delay` and `mi_option_arena_eager_commit` in mimalloc.h (v2);
/// libmimalloc-sys has no constants for them.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

extern "C" {
    /// mimalloc.h; libmimalloc-sys binds only the `_ex` form, behind a feature.
    fn mi_reserve_os_memory(size: usize, commit: bool, allow_large: bool) -> std::ffi::c_int;
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "rlhf",
    version,
    about = "Align language models with feedback: SFT, reward models, PPO, DPO — on CPU, no Python."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-token log-probabilities (and mean loss) of a text or id sequence.
    Logprobs(commands::logprobs::LogprobsArgs),
    /// Sample completions (batched, KV cache) for prompts.
    Generate(commands::generate::GenerateArgs),
    /// Supervised fine-tuning (SFT) from a TOML config; `rlhf sft --help` lists every key.
    Sft(commands::TrainArgs),
    /// Train a reward model on pairs or K-way rankings (InstructGPT); `rlhf rm --help` lists every key.
    Rm(commands::TrainArgs),
    /// Scores of a reward model for a file of texts, as JSONL.
    Score(commands::score::ScoreArgs),
    /// Direct Preference Optimization and variants (IPO, cDPO, hinge, Plackett-Luce); `rlhf dpo --help` lists every key.
    Dpo(commands::TrainArgs),
    /// RLHF with PPO (per-token KL to the reference, PPO-ptx); `rlhf ppo --help` lists every key.
    Ppo(commands::TrainArgs),
    /// Critic-free online RL: GRPO, RLOO or REINFORCE++ over groups of responses scored by reward
    /// functions; `rlhf grpo --help` lists every key.
    Grpo(commands::TrainArgs),
    /// Sample from policies, judge them, report reward, win rate, KL, perplexity and cloze accuracy; `rlhf eval --help` lists every key.
    Eval(commands::eval::EvalArgs),
    /// Redraw the charts of an `rlhf eval` report from its results.json (nothing is sampled again).
    Plot(commands::eval::PlotArgs),
    /// Preference data from a judge: K samples per prompt, ranked (rankings + best/worst pairs).
    Preferences(commands::preferences::PreferencesArgs),
    /// The whole pipeline with nothing downloaded: tiny model → SFT → RM → PPO and DPO → report (5–11 minutes on 2 cores).
    Quickstart(commands::quickstart::QuickstartArgs),
    /// Convert a checkpoint (GGUF, HF dir, HF cache id) into an HF directory transformers loads.
    Convert(commands::convert::ConvertArgs),
    /// Merge a PEFT LoRA adapter into its base model and write the merged HF directory.
    Merge(commands::convert::MergeArgs),
    /// Benchmark workloads (for bench/run.sh)
    #[command(hide = true)]
    Bench(commands::bench::BenchArgs),
}

fn main() {
    // Keep freed pages instead of returning them to the OS at once: training frees and reallocates
    // the same large buffers every step, and re-faulting zeroed pages cost ~20% of an SFT step.
    // Arenas committed when reserved: with purging off, a large buffer freed and allocated again
    // (candle's gradients, every step) reuses committed memory instead of faulting in zeroed
    // pages again (GPT-2 4x256 step: 7.1-7.6 s -> 6.9-7.1 s on the Intel Xeon of
    // bench/RESULTS.md; page clearing was 11% of the step).
    // SAFETY: sets process-wide allocator options; called before any other thread exists.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 1);
        // The arena of the allocations made before main was reserved with the defaults: reserve
        // one that follows the options above (address space only until touched; failure is
        // harmless, allocations then come from new arenas as before).
        mi_reserve_os_memory(16 << 30, true, false);
    }
    // candle runs element-wise ops on its own spinning thread pool beside rayon's GEMM threads; on
    // few cores the two pools fight (an SmolLM2 SFT step measured 2.5-3x slower). Element-wise
    // work stays on the calling thread unless the user asks otherwise.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // Config keys are listed under each training command's --help.
    let matches = Cli::command()
        .mut_subcommand("sft", |c| c.after_help(commands::sft::help_text()))
        .mut_subcommand("rm", |c| c.after_help(commands::rm::help_text()))
        .mut_subcommand("dpo", |c| c.after_help(commands::dpo::help_text()))
        .mut_subcommand("ppo", |c| c.after_help(commands::ppo::help_text()))
        .mut_subcommand("grpo", |c| c.after_help(commands::grpo::help_text()))
        .mut_subcommand("eval", |c| c.after_help(commands::eval::help_text()))
        .get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Under mpirun: join the other ranks (an error here, or later on any rank, ends them all).
    if let Err(e) = rlhf::dist::init() {
        rlhf::dist::fail(&rlhf::io::one_line_error(&e));
    }
    let trains = matches!(
        cli.command,
        Command::Sft(_) | Command::Rm(_) | Command::Dpo(_) | Command::Ppo(_) | Command::Grpo(_)
    );
    if rlhf::dist::world().size() > 1 && !trains {
        rlhf::dist::fail(
            "only the training commands (sft, rm, dpo, ppo, grpo) run on several MPI ranks; run this one without mpirun",
        );
    }
    let result = match &cli.command {
        Command::Logprobs(a) => commands::logprobs::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::Merge(a) => commands::convert::merge(a),
        Command::Sft(a) => commands::sft::run(a),
        Command::Rm(a) => commands::rm::run(a),
        Command::Score(a) => commands::score::run(a),
        Command::Dpo(a) => commands::dpo::run(a),
        Command::Ppo(a) => commands::ppo::run(a),
        Command::Grpo(a) => commands::grpo::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Plot(a) => commands::eval::plot(a),
        Command::Preferences(a) => commands::preferences::run(a),
        Command::Quickstart(a) => commands::quickstart::run(a),
        Command::Bench(a) => commands::bench::run(a),
    };
    if let Err(e) = result {
        if let Some(stop) = e.downcast_ref::<rlhf::train::interrupt::Interrupted>() {
            if rlhf::dist::world().is_main() {
                eprintln!("{stop}");
            }
            rlhf::dist::finalize();
            std::process::exit(stop.exit_code());
        }
        rlhf::dist::fail(&rlhf::io::one_line_error(&e));
    }
    rlhf::dist::finalize();
}
