//! `rlhf eval`: sample from policies, judge, and report (see `crate::eval`).

use anyhow::Result;
use std::path::PathBuf;

use crate::eval::{run_eval, table, EvalConfig};
use crate::settings::{describe, help, Section, Settings};
use crate::train::output_dir::{Existing, OutputDir};

/// `--config`, `--set`, `--overwrite`.
#[derive(clap::Args, Debug, Default)]
pub struct EvalArgs {
    /// TOML file with the evaluation's settings (keys below).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override or add a setting: --set judge=vader (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Replace an earlier report in output_dir.
    #[arg(long)]
    pub overwrite: bool,
}

impl EvalArgs {
    pub fn with_sets(sets: Vec<String>) -> Self {
        EvalArgs {
            sets,
            ..Default::default()
        }
    }
}

pub fn help_text() -> String {
    describe(&[help::<EvalConfig>()])
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let settings = Settings::load(args.config.as_deref(), &args.sets, &[EvalConfig::KEYS])?;
    let cfg: EvalConfig = settings.section()?;
    let inputs = cfg.input_paths();
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let existing = if args.overwrite {
        Existing::Replace
    } else {
        Existing::Keep
    };
    let out = OutputDir::claim(&cfg.output_dir, &inputs, existing)?;
    let report = run_eval(&cfg).map_err(|e| e.context(settings.origin().to_string()))?;
    println!("{}", table(&report));
    eprintln!(
        "report written to {}",
        out.path().join("report.md").display()
    );
    Ok(())
}

/// `rlhf plot DIR`: redraw an eval report's charts from its results.json.
#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// An `rlhf eval` output directory (holding results.json).
    pub dir: std::path::PathBuf,
}

pub fn plot(args: &PlotArgs) -> Result<()> {
    crate::eval::replot(&args.dir)?;
    eprintln!("charts redrawn in {}", args.dir.display());
    Ok(())
}
