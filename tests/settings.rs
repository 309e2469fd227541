//! Settings: every section documents exactly its fields, `--help` shows the defaults the
//! structs hold, closed sets of values are typed (a bad one is refused naming the key and the
//! choices), and keys a command does not take are refused.

use crate::common::*;
use rlhf::settings::{undocumented_keys, Section};

fn check<T: Section>() {
    let (no_docs, no_field) = undocumented_keys::<T>();
    assert!(
        no_docs.is_empty() && no_field.is_empty(),
        "section `{}`: fields without docs {no_docs:?}, docs without a field {no_field:?}",
        T::TITLE
    );
}

#[test]
fn every_section_documents_exactly_its_fields() {
    check::<rlhf::train::TrainConfig>();
    check::<rlhf::data::sft::SftDataConfig>();
    check::<rlhf::data::preference::PreferenceDataConfig>();
    check::<rlhf::commands::sft::SftRunConfig>();
    check::<rlhf::commands::rm::RmRunConfig>();
    check::<rlhf::commands::dpo::DpoRunConfig>();
    check::<rlhf::commands::ppo::PpoRunConfig>();
    check::<rlhf::algos::ppo::PpoConfig>();
    check::<rlhf::eval::EvalConfig>();
    check::<rlhf::model::lora::LoraConfig>();
}

fn help(command: &str) -> String {
    let o = run_rlhf(&[command, "--help"]);
    assert_ok(&o);
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn line_of<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(key))
        .unwrap_or_else(|| panic!("--help lacks {key}:\n{text}"))
}

#[test]
fn help_shows_the_struct_defaults() {
    let dpo = help("dpo");
    assert!(line_of(&dpo, "loss_type").contains("\"sigmoid\""));
    assert!(line_of(&dpo, "beta").contains("0.1"));
    assert!(line_of(&dpo, "model").contains("(required)"));
    assert!(line_of(&dpo, "learning_rate").contains("2e-5"));
    assert!(line_of(&dpo, "lr_scheduler_type").contains("\"linear\""));
    let ppo = help("ppo");
    assert!(line_of(&ppo, "lam").contains("0.95"));
    assert!(line_of(&ppo, "on_nonfinite").contains("\"stop\""));
    let rm = help("rm");
    assert!(line_of(&rm, "ranking_batching").contains("\"per_prompt\""));
    // rlhf eval takes no --resume, and its example is an eval key.
    let eval = help("eval");
    assert!(!eval.contains("--resume"), "{eval}");
    assert!(!eval.contains("learning_rate"), "{eval}");
    assert!(eval.contains("--set judge=vader"), "{eval}");
}

#[test]
fn closed_sets_of_values_are_refused_naming_the_key_and_the_choices() {
    let tmp = tempfile::tempdir().unwrap();
    let out = format!("output_dir=\"{}\"", tmp.path().join("o").display());
    let model = format!("model=\"{}\"", model_path("llama-tied"));
    for (command, set, choices) in [
        (
            "sft",
            "lr_scheduler_type=\"cosine_with_restarts\"",
            "cosine",
        ),
        ("sft", "on_nonfinite=\"ignore\"", "skip"),
        ("dpo", "loss_type=\"kto\"", "plackett_luce"),
        ("rm", "ranking_batching=\"pairs\"", "shuffled_pairs"),
    ] {
        let o = run_with_sets(
            &[command],
            &[model.as_str(), "train_file=\"x.jsonl\"", &out, set],
        );
        assert!(!o.status.success(), "{set} accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        let key = set.split('=').next().unwrap();
        assert!(
            err.contains(&format!("`{key} =")) && err.contains(choices),
            "{set}: {err}"
        );
        assert!(
            !tmp.path().join("o").exists(),
            "{set}: output created before the refusal"
        );
    }
    // A key of another command is unknown here, with a suggestion for a near miss.
    let o = run_with_sets(&["sft"], &[model.as_str(), "beta=0.1"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown configuration key `beta`"));
    let o = run_with_sets(&["sft"], &[model.as_str(), "learning_rat=0.1"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("did you mean `learning_rate`"));
}

#[test]
fn a_default_path_under_home_is_expanded_like_a_given_one() {
    use rlhf::commands::dpo::DpoRunConfig;
    let sets = vec!["model=m".to_string(), "train_file=t.jsonl".to_string()];
    let s = rlhf::settings::Settings::load(None, &sets, &[DpoRunConfig::KEYS]).unwrap();
    let run: DpoRunConfig = s.section().unwrap();
    let home = std::env::var("HOME").unwrap();
    assert!(
        run.ref_cache_dir.starts_with(&home) && !run.ref_cache_dir.starts_with('~'),
        "{}",
        run.ref_cache_dir
    );
}
