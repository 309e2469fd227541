//! Model sources: a repo id found in the local Hugging Face cache layout
//! (`models--org--name/{refs/main, snapshots/<hash>/}`), via HF_HUB_CACHE or HF_HOME.

use crate::common::*;
use std::process::Command;

fn make_cache(root: &std::path::Path, with_ref: bool) {
    let repo = root.join("models--tiny-org--tiny-gpt2");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    for e in std::fs::read_dir(fixture("models/gpt2")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
    }
    if with_ref {
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    }
}

fn logprobs_json(envs: &[(&str, &std::path::Path)], model: &str) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rlhf"));
    cmd.env_remove("HF_HUB_CACHE").env_remove("HF_HOME");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.args([
        "logprobs",
        "--model",
        model,
        "--ids",
        "288,318,139,205,145",
        "--json",
    ])
    .output()
    .unwrap()
}

#[test]
fn repo_id_resolves_through_hf_hub_cache_and_hf_home() {
    let want = floats(&golden("gpt2")["single"][0]["logprobs"]);
    let tmp = tempfile::tempdir().unwrap();
    make_cache(tmp.path(), true);
    let out = logprobs_json(&[("HF_HUB_CACHE", tmp.path())], "tiny-org/tiny-gpt2");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(max_abs_diff(&floats(&v["logprobs"]), &want) < 1e-4);

    // HF_HOME/hub, and a cache without refs/main but a single snapshot.
    let home = tempfile::tempdir().unwrap();
    make_cache(&home.path().join("hub"), false);
    let out = logprobs_json(&[("HF_HOME", home.path())], "tiny-org/tiny-gpt2");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An id that is not cached names the cache it looked in.
    let out = logprobs_json(&[("HF_HUB_CACHE", tmp.path())], "tiny-org/absent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tiny-org/absent") && err.contains(&*tmp.path().to_string_lossy()),
        "{err}"
    );
}
