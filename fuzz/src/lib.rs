//! What every fuzz target shares: one harness per process, on the repo's test fixtures.

use std::sync::OnceLock;

use rlhf::fuzzing::{Harness, Target};

pub fn run(target: Target, data: &[u8]) {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    let harness = HARNESS.get_or_init(|| {
        // One thread: libFuzzer measures one execution at a time.
        std::env::set_var("RAYON_NUM_THREADS", "1");
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
        let scratch = std::env::temp_dir().join(format!("rlhf-fuzz-{}", std::process::id()));
        Harness::new(fixtures.as_ref(), &scratch).expect("the fixtures load")
    });
    let _ = harness.run(target, data);
}
