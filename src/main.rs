//! The `rlhf` command line: parses arguments and calls the library.

use clap::{Parser, Subcommand};
use rlhf::commands;

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
    /// Convert a checkpoint (GGUF, HF dir, HF cache id) into an HF directory transformers loads.
    Convert(commands::convert::ConvertArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Logprobs(a) => commands::logprobs::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Convert(a) => commands::convert::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {}", rlhf::io::one_line_error(&e));
        std::process::exit(1);
    }
}
