//! Every fuzz target's committed corpus (`fuzz/corpus/<target>/`) and every minimised input that
//! once crashed it (`fuzz/regressions/<target>/`) run through the target's body: each must load or
//! fail with a short one-line error. The fuzzing itself (`fuzz/run.sh`) is not part of `cargo test`.

use rlhf::fuzzing::{Harness, Target};
use std::path::Path;

#[test]
fn every_corpus_and_regression_input_loads_or_fails_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scratch = tempfile::tempdir().unwrap();
    let harness = Harness::new(&root.join("tests/fixtures"), scratch.path()).unwrap();
    let mut total = 0;
    for target in Target::ALL {
        let (mut seen, mut accepted) = (0, 0);
        for kind in ["corpus", "regressions"] {
            let dir = root.join("fuzz").join(kind).join(target.name());
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
            files.sort();
            for file in files {
                let data = std::fs::read(&file).unwrap();
                let outcome = std::panic::catch_unwind(|| harness.run(target, &data));
                let Ok(outcome) = outcome else {
                    panic!("{}: {} crashed it", target.name(), file.display());
                };
                if let Err(line) = &outcome {
                    if kind == "corpus" && std::env::var_os("RLHF_FUZZ_VERBOSE").is_some() {
                        eprintln!("{}: {}", file.display(), line);
                    }
                }
                accepted += outcome.is_ok() as usize;
                seen += 1;
            }
        }
        // Seeds that load prove the target reaches its parser's success path, not only errors.
        assert!(
            accepted > 0,
            "none of the {seen} inputs of fuzz/corpus/{} loads",
            target.name()
        );
        eprintln!("{}: {seen} inputs, {accepted} accepted", target.name());
        total += seen;
    }
    eprintln!("{total} fuzz inputs ran");
}
