//! Stopping and losing nothing: SIGTERM / SIGINT end a run after its step with a checkpoint and
//! 128 + the signal, and `--resume` then ends bit-identical to an uninterrupted run; a damaged
//! newest checkpoint is passed over for the one before it; a disk that fills up during a
//! checkpoint leaves the earlier ones intact and stops with a clear error.

use crate::common::*;
use serde_json::json;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sft_data(dir: &Path) -> String {
    let mut rng = Lcg(41);
    let rows: Vec<serde_json::Value> = (0..16)
        .map(|_| json!({"prompt": phrase(&mut rng, 3), "completion": format!(" {}", phrase(&mut rng, 3))}))
        .collect();
    let path = dir.join("sft.jsonl");
    write_jsonl(&path, &rows);
    path.display().to_string()
}

fn sft_args(data: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = vec!["sft".to_string()];
    let sets = [
        format!("model=\"{}\"", model_path("llama-tied")),
        format!("train_file=\"{data}\""),
        format!("output_dir=\"{}\"", out.display()),
        "per_device_train_batch_size=2".into(),
        "learning_rate=1e-3".into(),
        "logging_steps=1".into(),
    ];
    for s in sets.iter().map(String::as_str).chain(extra.iter().copied()) {
        a.extend(["--set".to_string(), s.to_string()]);
    }
    a
}

fn rlhf(args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlhf"));
    c.args(args).env("RAYON_NUM_THREADS", "1");
    c
}

/// Starts `args`, waits for its first logged step, sends `signal`; returns the exit status and
/// stderr.
fn interrupt(args: &[String], out: &Path, signal: &str) -> (Option<i32>, String) {
    let child = rlhf(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let metrics = out.join("metrics.jsonl");
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the run logged no step"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    let done = child.wait_with_output().unwrap();
    (
        done.status.code(),
        String::from_utf8_lossy(&done.stderr).to_string(),
    )
}

fn no_partial_files(out: &Path) {
    for e in std::fs::read_dir(out.join("checkpoints")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(name.starts_with("step-"), "left behind: {name}");
    }
}

#[test]
fn sigterm_and_sigint_checkpoint_the_step_and_resume_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_data(tmp.path());
    let settings = ["max_steps=300", "save_steps=0"];
    let full = tmp.path().join("full");
    assert_ok(&rlhf(&sft_args(&data, &full, &settings)).output().unwrap());
    for (signal, code) in [("-TERM", 143), ("-INT", 130)] {
        let part = tmp.path().join(format!("part{signal}"));
        let args = sft_args(&data, &part, &settings);
        let (status, err) = interrupt(&args, &part, signal);
        assert_eq!(status, Some(code), "{signal}: {err}");
        assert!(
            err.contains("checkpoint") && err.contains("--resume"),
            "{err}"
        );
        assert!(
            !part.join("model.safetensors").exists(),
            "{signal}: it ran to the end"
        );
        no_partial_files(&part);
        let mut again = args.clone();
        again.insert(1, "--resume".into());
        let resumed = rlhf(&again).output().unwrap();
        assert_ok(&resumed);
        let a = std::fs::read(full.join("model.safetensors")).unwrap();
        let b = std::fs::read(part.join("model.safetensors")).unwrap();
        assert!(
            a == b,
            "{signal}: the resumed run ended with different weights"
        );
    }
}

#[test]
fn a_damaged_newest_checkpoint_is_passed_over_for_the_one_before() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_data(tmp.path());
    let settings = ["max_steps=6", "save_steps=2", "save_total_limit=5"];
    let full = tmp.path().join("full");
    assert_ok(&rlhf(&sft_args(&data, &full, &settings)).output().unwrap());
    let part = tmp.path().join("part");
    copy_checkpoints(&full, &part, &["00000002", "00000004"]);
    // The newest checkpoint lost the end of its weights (a crash before the disk wrote them).
    let weights = part.join("checkpoints/step-00000004/model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let mut args = sft_args(&data, &part, &settings);
    args.insert(1, "--resume".into());
    let out = rlhf(&args).output().unwrap();
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("step-00000004") && err.contains("trying the checkpoint before it"),
        "{err}"
    );
    assert!(
        err.contains("resuming from") && err.contains("step-00000002"),
        "{err}"
    );
    let a = std::fs::read(full.join("model.safetensors")).unwrap();
    let b = std::fs::read(part.join("model.safetensors")).unwrap();
    assert!(
        a == b,
        "resumed from step 2, the run ended with different weights"
    );
}

/// A tmpfs mounted for the test (needs root); unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, bytes: u64) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk(dir.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_during_a_checkpoint_keeps_the_earlier_one_and_stops_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_data(tmp.path());
    // The size of one checkpoint, from a run on the ordinary disk.
    let probe = tmp.path().join("probe");
    assert_ok(
        &rlhf(&sft_args(&data, &probe, &["max_steps=1", "save_steps=1"]))
            .output()
            .unwrap(),
    );
    let ck = probe.join("checkpoints/step-00000001");
    let size: u64 = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    // Room for one checkpoint and a half: the second one cannot be written.
    let Some(disk) = SmallDisk::mount(&tmp.path().join("disk"), size * 3 / 2 + 64 * 1024) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    // The whole output directory on the small disk.
    let out = disk.0.join("out");
    let args = sft_args(
        &data,
        &out,
        &["max_steps=4", "save_steps=1", "save_total_limit=5"],
    );
    let run = rlhf(&args).output().unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{err}");
    assert!(
        err.contains("checkpoint of step 2 not written") && err.contains("intact"),
        "{err}"
    );
    assert_eq!(error_lines(&err), 1, "{err}");
    no_partial_files(&out);
    // The checkpoint of step 1 is whole: it loads.
    let ck = out.join("checkpoints/step-00000001/model.safetensors");
    candle_core::safetensors::load(&ck, &candle_core::Device::Cpu).unwrap();
    drop(disk);
}

/// The RL loop (GRPO) and DPO take the same path as SFT: interrupted, then resumed, they end
/// with the bits of an uninterrupted run.
#[test]
fn grpo_and_dpo_stop_on_a_signal_and_resume_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Lcg(42);
    let prompts = tmp.path().join("prompts.jsonl");
    write_jsonl(
        &prompts,
        &(0..8)
            .map(|_| json!({"prompt": phrase(&mut rng, 3)}))
            .collect::<Vec<_>>(),
    );
    let pairs = tmp.path().join("pairs.jsonl");
    write_jsonl(
        &pairs,
        &(0..8)
            .map(|_| {
                let c = phrase(&mut rng, 3);
                json!({"prompt": phrase(&mut rng, 3), "chosen": format!(" {c}"), "rejected": format!(" {} {c}", phrase(&mut rng, 2))})
            })
            .collect::<Vec<_>>(),
    );
    let model = format!("model=\"{}\"", model_path("llama-tied"));
    let runs: [(&str, Vec<String>); 2] = [
        (
            "grpo",
            vec![
                model.clone(),
                format!("prompt_file=\"{}\"", prompts.display()),
                "reward_funcs=[\"rule:ids:100-160\"]".into(),
                "max_completion_length=4".into(),
                "num_generations=2".into(),
                "per_device_train_batch_size=4".into(),
                "max_steps=200".into(),
            ],
        ),
        (
            "dpo",
            vec![
                model.clone(),
                format!("train_file=\"{}\"", pairs.display()),
                "ref_cache_dir=\"\"".into(),
                "per_device_train_batch_size=2".into(),
                "max_steps=300".into(),
            ],
        ),
    ];
    for (command, sets) in runs {
        let args = |out: &Path| {
            let mut a = vec![command.to_string()];
            let all = sets.iter().cloned().chain([
                format!("output_dir=\"{}\"", out.display()),
                "logging_steps=1".into(),
                "save_steps=0".into(),
            ]);
            for s in all {
                a.extend(["--set".to_string(), s]);
            }
            a
        };
        let full = tmp.path().join(format!("{command}-full"));
        assert_ok(&rlhf(&args(&full)).output().unwrap());
        let part = tmp.path().join(format!("{command}-part"));
        let (status, err) = interrupt(&args(&part), &part, "-INT");
        assert_eq!(status, Some(130), "{command}: {err}");
        assert!(
            !part.join("model.safetensors").exists(),
            "{command}: it ran to the end"
        );
        no_partial_files(&part);
        let mut again = args(&part);
        again.insert(1, "--resume".into());
        assert_ok(&rlhf(&again).output().unwrap());
        let a = std::fs::read(full.join("model.safetensors")).unwrap();
        let b = std::fs::read(part.join("model.safetensors")).unwrap();
        assert!(
            a == b,
            "{command}: the resumed run ended with different weights"
        );
    }
}

/// A seed from the clock, printed, so that a failing kill point can be tried again.
fn clock_seed(what: &str) -> u64 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    eprintln!("{what}: seed {seed}");
    seed
}

/// Each trainer's settings for a short run on the tiny llama (output_dir and saving added later).
fn trainer_runs(dir: &Path) -> Vec<(&'static str, Vec<String>)> {
    let mut rng = Lcg(43);
    let texts = dir.join("sft.jsonl");
    write_jsonl(
        &texts,
        &(0..16)
            .map(|_| json!({"prompt": phrase(&mut rng, 3), "completion": format!(" {}", phrase(&mut rng, 3))}))
            .collect::<Vec<_>>(),
    );
    let rankings = dir.join("rankings.jsonl");
    write_jsonl(
        &rankings,
        &(0..16)
            .map(|_| {
                let c: Vec<String> = (0..3)
                    .map(|_| format!(" {}", phrase(&mut rng, 3)))
                    .collect();
                json!({"prompt": phrase(&mut rng, 2), "completions": c, "ranking": [2, 0, 1]})
            })
            .collect::<Vec<_>>(),
    );
    let pairs = dir.join("pairs.jsonl");
    write_jsonl(
        &pairs,
        &(0..16)
            .map(|_| {
                let c = phrase(&mut rng, 3);
                json!({"prompt": phrase(&mut rng, 3), "chosen": format!(" {c}"), "rejected": format!(" {} {c}", phrase(&mut rng, 2))})
            })
            .collect::<Vec<_>>(),
    );
    let prompts = dir.join("prompts.jsonl");
    write_jsonl(
        &prompts,
        &(0..16)
            .map(|_| json!({"prompt": phrase(&mut rng, 3)}))
            .collect::<Vec<_>>(),
    );
    let model = format!("model=\"{}\"", model_path("llama-tied"));
    let file = |key: &str, p: &Path| format!("{key}=\"{}\"", p.display());
    vec![
        (
            "sft",
            vec![
                model.clone(),
                file("train_file", &texts),
                "per_device_train_batch_size=2".into(),
                "max_steps=10".into(),
            ],
        ),
        (
            "rm",
            vec![
                model.clone(),
                file("train_file", &rankings),
                "per_device_train_batch_size=2".into(),
                "max_steps=10".into(),
            ],
        ),
        (
            "dpo",
            vec![
                model.clone(),
                file("train_file", &pairs),
                "ref_cache_dir=\"\"".into(),
                "per_device_train_batch_size=2".into(),
                "max_steps=10".into(),
            ],
        ),
        (
            // A learned reward and value model: their heads go into extra.safetensors.
            "ppo",
            vec![
                model.clone(),
                file("prompt_file", &prompts),
                format!("reward=\"{}\"", model_path("llama-rm")),
                "response_length=4".into(),
                "per_device_train_batch_size=4".into(),
                "num_mini_batches=2".into(),
                "max_steps=8".into(),
            ],
        ),
        (
            "grpo",
            vec![
                model,
                file("prompt_file", &prompts),
                "reward_funcs=[\"rule:ids:100-160\"]".into(),
                "max_completion_length=4".into(),
                "num_generations=2".into(),
                "per_device_train_batch_size=4".into(),
                "max_steps=8".into(),
            ],
        ),
    ]
}

fn with_output(command: &str, sets: &[String], out: &Path) -> Vec<String> {
    let mut a = vec![command.to_string()];
    let all = sets.iter().cloned().chain([
        format!("output_dir=\"{}\"", out.display()),
        "learning_rate=1e-3".into(),
        "logging_steps=1".into(),
        "save_steps=1".into(),
        "save_total_limit=3".into(),
    ]);
    for s in all {
        a.extend(["--set".to_string(), s]);
    }
    a
}

fn resume_and_compare(command: &str, args: &[String], out: &Path, full: &Path, how: &str) {
    let mut again = args.to_vec();
    again.insert(1, "--resume".into());
    let o = rlhf(&again).output().unwrap();
    assert_ok(&o);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("resuming from"),
        "{command} ({how}): did not resume"
    );
    no_partial_files(out);
    let a = std::fs::read(full.join("model.safetensors")).unwrap();
    let b = std::fs::read(out.join("model.safetensors")).unwrap();
    assert!(
        a == b,
        "{command}: resumed after {how}, it ended with different weights"
    );
}

/// Every trainer, stopped without warning — by SIGKILL at a random moment after its first
/// checkpoint, and by an abort half-way through writing a checkpoint (model written, optimizer
/// and trainer state not) — resumes to the bits of an uninterrupted run.
#[test]
fn every_trainer_killed_at_random_or_mid_checkpoint_resumes_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Lcg(clock_seed("kill points"));
    for (command, sets) in trainer_runs(tmp.path()) {
        let full = tmp.path().join(format!("{command}-full"));
        let t0 = Instant::now();
        assert_ok(&rlhf(&with_output(command, &sets, &full)).output().unwrap());
        let whole_run = t0.elapsed();
        let steps = read_jsonl(&full.join("metrics.jsonl"))
            .iter()
            .filter_map(|m| m.get("step").and_then(|s| s.as_u64()))
            .max()
            .unwrap_or(0);
        assert!(steps >= 8, "{command}: only {steps} steps");

        // SIGKILL somewhere in the first half of the run after its first checkpoint; a run that
        // got there first is tried again with a shorter delay.
        let killed = tmp.path().join(format!("{command}-killed"));
        let args = with_output(command, &sets, &killed);
        let mut delay = whole_run.mul_f64(rng.below(1000) as f64 / 2000.0);
        loop {
            std::fs::remove_dir_all(&killed).ok();
            let mut child = rlhf(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let first = killed.join("checkpoints/step-00000001");
            let t0 = Instant::now();
            while !first.exists() {
                assert!(
                    t0.elapsed() < Duration::from_secs(120),
                    "{command}: no checkpoint"
                );
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::sleep(delay);
            child.kill().unwrap();
            child.wait().unwrap();
            if !killed.join("model.safetensors").exists() {
                break;
            }
            assert!(
                delay > Duration::from_millis(1),
                "{command}: ran to the end before the kill"
            );
            delay /= 4;
        }
        eprintln!("{command}: killed {delay:?} after its first checkpoint");
        resume_and_compare(command, &args, &killed, &full, "SIGKILL");

        // Cut off inside a checkpoint: the half-written one is passed over and cleared away.
        let cut = tmp.path().join(format!("{command}-cut"));
        let args = with_output(command, &sets, &cut);
        let step = 2 + rng.below(4);
        let o = rlhf(&args)
            .env("RLHF_CRASH_AT", format!("checkpoint@{step}"))
            .output()
            .unwrap();
        assert!(
            !o.status.success(),
            "{command}: the crash point was not reached"
        );
        let partial = cut.join(format!("checkpoints/.partial-step-{step:08}"));
        assert!(
            partial.join("model.safetensors").exists()
                && !partial.join("trainer_state.json").exists(),
            "{command}: no half-written checkpoint of step {step}"
        );
        resume_and_compare(
            command,
            &args,
            &cut,
            &full,
            &format!("a crash inside checkpoint {step}"),
        );
    }
}
