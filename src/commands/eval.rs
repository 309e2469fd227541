//! `rlhf eval`: sample from policies, judge, and report (see `crate::eval`).

use anyhow::Result;

use super::{settings_table, RunArgs};
use crate::config::{describe, extract};
use crate::eval::{run_eval, table, EvalConfig, EVAL_KEYS};

pub fn help_text() -> String {
    describe(&[("eval", EVAL_KEYS)])
}

pub fn run(args: &RunArgs) -> Result<()> {
    let (table_, origin) = settings_table(args, &[EVAL_KEYS])?;
    let mut cfg: EvalConfig = extract(&table_, EVAL_KEYS, &origin)?;
    let mut paths = vec![
        &mut cfg.prompt_file,
        &mut cfg.output_dir,
        &mut cfg.reference,
    ];
    paths.extend(cfg.text_file.paths_mut());
    for p in paths {
        *p = crate::io::expand_tilde(p);
    }
    let out = std::path::Path::new(&cfg.output_dir);
    if out.join("report.md").exists() {
        anyhow::bail!(
            "{} already holds a report; choose another output_dir",
            out.display()
        );
    }
    let report = run_eval(&cfg).map_err(|e| e.context(origin.clone()))?;
    println!("{}", table(&report));
    eprintln!("report written to {}", out.join("report.md").display());
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
