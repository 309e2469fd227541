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
