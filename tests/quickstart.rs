//! The embedded default runs end to end (in its small smoke-test size): every stage, the report
//! with its table and charts, no network, nothing downloaded.

use crate::common::*;

#[test]
fn quickstart_smoke_runs_every_stage_and_writes_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qs");
    let o = run_rlhf(&["quickstart", "--smoke", "--out", out.to_str().unwrap()]);
    assert_ok(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    for row in ["| sft |", "| ppo |", "| dpo |"] {
        assert!(stdout.contains(row), "{stdout}");
    }
    for f in [
        "report/report.md",
        "report/results.json",
        "report/reward_vs_kl.svg",
        "report/win_rate.svg",
        "report/reward_vs_kl.png",
        "report/win_rate.png",
        "report/reward_vs_perplexity.png",
        "report/samples.jsonl",
        "rm/model.safetensors",
        "ppo/model.safetensors",
        "dpo/model.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report/results.json")).unwrap())
            .unwrap();
    let r = results["results"].as_array().unwrap();
    assert_eq!(r.len(), 3);
    // The baseline against itself: every prompt a tie, and no KL to itself.
    assert_eq!(r[0]["win_rate"].as_f64().unwrap(), 0.5);
    assert!(r[0]["kl"].as_f64().unwrap().abs() < 1e-3);
    assert!(r
        .iter()
        .all(|x| x["perplexity"].as_f64().unwrap().is_finite()));

    // A second run into the same directory is refused before doing anything.
    let again = run_rlhf(&["quickstart", "--smoke", "--out", out.to_str().unwrap()]);
    assert!(!again.status.success());
}
