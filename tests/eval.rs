//! `rlhf eval` with several held-out corpora: each gets its own perplexity and cloze columns, and
//! a corpus's numbers do not depend on which other corpora are listed beside it.

use crate::common::*;
use serde_json::{json, Value};
use std::path::Path;

fn texts(path: &Path, sentences: &[&str]) {
    let lines: Vec<Value> = sentences.iter().map(|s| json!({ "text": s })).collect();
    write_jsonl(path, &lines);
}

/// `rlhf eval` of the tiny llama (twice, as policies a and b) with a rule judge.
fn run_eval(dir: &Path, prompts: &Path, text_file: &str) -> std::process::Output {
    let model = model_path("llama-tied");
    run_with_sets(
        &["eval"],
        &[
            format!("policies=[\"a={model}\", \"b={model}\"]"),
            "judge=\"rule:ids:100-160\"".into(),
            format!("prompt_file=\"{}\"", prompts.display()),
            "response_length=6".into(),
            format!("text_file={text_file}"),
            format!("output_dir=\"{}\"", dir.display()),
        ],
    )
}

fn eval(dir: &Path, prompts: &Path, text_file: &str) -> Value {
    assert_ok(&run_eval(dir, prompts, text_file));
    serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap()
}

#[test]
fn every_listed_corpus_gets_its_own_perplexity_and_cloze() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    write_jsonl(
        &prompts,
        &[
            json!({"prompt": "the cat sat"}),
            json!({"prompt": "a dog ran"}),
        ],
    );
    let (novel, news) = (
        tmp.path().join("novel.jsonl"),
        tmp.path().join("news.jsonl"),
    );
    texts(
        &novel,
        &["Call me a sailor who went to sea in a very old ship. The whale was white and huge beyond words."],
    );
    texts(
        &news,
        &["The council voted on the budget for the coming year today. Prices of bread rose again in the city markets."],
    );

    let one = eval(
        &tmp.path().join("one"),
        &prompts,
        &format!("\"{}\"", novel.display()),
    );
    let two = eval(
        &tmp.path().join("two"),
        &prompts,
        &format!("[\"{}\", \"{}\"]", novel.display(), news.display()),
    );

    for r in two["results"].as_array().unwrap() {
        let t = r["text"].as_array().unwrap();
        assert_eq!(t.len(), 2);
        assert!(t[0]["file"].as_str().unwrap().ends_with("novel.jsonl"));
        assert!(t[1]["file"].as_str().unwrap().ends_with("news.jsonl"));
        let (p0, p1) = (
            t[0]["perplexity"].as_f64().unwrap(),
            t[1]["perplexity"].as_f64().unwrap(),
        );
        assert!(p0.is_finite() && p1.is_finite() && p0 > 1.0 && p1 > 1.0);
        assert_ne!(p0, p1, "two different texts gave the same perplexity");
        // The first corpus is also reported in the one-corpus fields.
        assert_eq!(r["perplexity"].as_f64().unwrap(), p0);
    }
    // The novel's perplexity is the same whether or not the news corpus is listed beside it.
    let alone = one["results"][0]["perplexity"].as_f64().unwrap();
    let listed = two["results"][0]["text"][0]["perplexity"].as_f64().unwrap();
    assert!((alone - listed).abs() < 1e-9 * alone, "{alone} vs {listed}");

    let report = std::fs::read_to_string(tmp.path().join("two/report.md")).unwrap();
    for header in [
        "perplexity novel",
        "cloze novel",
        "perplexity news",
        "cloze news",
    ] {
        assert!(report.contains(header), "{header} missing from\n{report}");
    }
    for chart in [
        "reward_vs_perplexity.svg",
        "reward_vs_perplexity.png",
        "reward_vs_perplexity_news.svg",
        "reward_vs_perplexity_news.png",
    ] {
        assert!(
            tmp.path().join("two").join(chart).exists(),
            "{chart} missing"
        );
    }
    assert!(
        report.contains("](reward_vs_perplexity_news.svg)"),
        "{report}"
    );
    assert!(!tmp
        .path()
        .join("one/reward_vs_perplexity_novel.svg")
        .exists());
    let report_one = std::fs::read_to_string(tmp.path().join("one/report.md")).unwrap();
    assert!(
        report_one.contains("| perplexity | cloze acc. |"),
        "{report_one}"
    );
}

#[test]
fn a_missing_corpus_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    write_jsonl(&prompts, &[json!({"prompt": "the cat sat"})]);
    let good = tmp.path().join("good.jsonl");
    texts(
        &good,
        &["The council voted on the budget for the coming year today."],
    );
    let o = run_eval(
        &tmp.path().join("e"),
        &prompts,
        &format!("[\"{}\", \"nowhere.jsonl\"]", good.display()),
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nowhere.jsonl"), "{err}");
    assert!(!tmp.path().join("e/report.md").exists());
}

#[test]
fn plot_redraws_the_charts_from_results_json() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    write_jsonl(&prompts, &[json!({"prompt": "the cat sat"})]);
    let novel = tmp.path().join("novel.jsonl");
    texts(
        &novel,
        &["Call me a sailor who went to sea in a very old ship."],
    );
    let dir = tmp.path().join("e");
    let mut results = eval(&dir, &prompts, &format!("\"{}\"", novel.display()));
    // One prompt: the reward's standard error is NaN, written as null.
    assert!(results["results"][0]["reward_sem"].is_null());
    results["results"][1]["name"] = json!("renamed-policy");
    std::fs::write(dir.join("results.json"), results.to_string()).unwrap();
    for chart in ["reward_vs_kl", "win_rate", "reward_vs_perplexity"] {
        std::fs::remove_file(dir.join(format!("{chart}.svg"))).unwrap();
        std::fs::remove_file(dir.join(format!("{chart}.png"))).unwrap();
    }
    assert_ok(&run_rlhf(&["plot", dir.to_str().unwrap()]));
    for chart in ["reward_vs_kl", "win_rate", "reward_vs_perplexity"] {
        let svg = std::fs::read_to_string(dir.join(format!("{chart}.svg"))).unwrap();
        assert!(
            svg.contains("renamed-policy"),
            "{chart}.svg lacks the new name"
        );
        assert!(dir.join(format!("{chart}.png")).exists());
    }

    let o = run_rlhf(&["plot", tmp.path().to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("results.json") && err.lines().count() == 1,
        "{err}"
    );
}

/// The judge takes every reward function, and the prompt records' other columns reach it: a
/// program judge that scores 1 exactly when it is given `"answer":"7"` averages to the share of
/// prompts whose record says 7.
#[test]
fn a_reward_function_judge_sees_the_prompt_records_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    write_jsonl(
        &prompts,
        &[
            json!({"prompt": "the cat sat", "answer": "7"}),
            json!({"prompt": "a dog ran", "answer": "3"}),
            json!({"prompt": "one more", "answer": "7"}),
            json!({"prompt": "and the last", "answer": "5"}),
        ],
    );
    let script = answer_is_7_program(tmp.path());
    let model = model_path("llama-tied");
    let dir = tmp.path().join("out");
    let o = run_with_sets(
        &["eval"],
        &[
            format!("policies=[\"a={model}\"]"),
            format!("judge=\"exec:sh {}\"", script.display()),
            format!("prompt_file=\"{}\"", prompts.display()),
            "response_length=4".into(),
            format!("output_dir=\"{}\"", dir.display()),
        ],
    );
    assert_ok(&o);
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(r["results"][0]["mean_reward"].as_f64().unwrap(), 0.5);
}
