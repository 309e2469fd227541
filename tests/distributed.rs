//! Data parallelism over MPI (`--features mpi`; `.ci/run` installs Open MPI and runs these with
//! it). 2 ranks × k accumulated micro-batches must end where 1 process × 2k does, bit for bit, for
//! SFT, the reward model, DPO, PPO and GRPO. A killed
//! rank stops the run naming itself, and the run resumes bit-identically. Without the feature,
//! only the refusal of a build without MPI under a launcher is tested.

/// `rlhf` started as one of two ranks of a launcher, in a build without MPI, refuses to train:
/// its copies would each run the whole job into the same output directory.
#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_to_run_as_one_of_several_ranks() {
    eprintln!("skipped: the multi-rank tests need `--features mpi` (see README)");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["sft", "--set", "model=\"x\""])
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("built without MPI") && err.contains("--features mpi"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[cfg(feature = "mpi")]
mod with_mpi {
    use crate::common::*;
    use serde_json::json;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output, Stdio};
    use std::time::{Duration, Instant};

    /// `mpirun -np <ranks> rlhf <args>` (or the binary alone for one rank), one thread per rank
    /// so that every rank runs the same kernels as the single process it is compared with.
    fn command(ranks: usize, args: &[String]) -> Command {
        let bin = env!("CARGO_BIN_EXE_rlhf");
        let mut c = if ranks == 1 {
            Command::new(bin)
        } else {
            let mut c = Command::new("mpirun");
            // Root in CI containers; shared memory without the single-copy mechanism containers lack.
            c.args(["--allow-run-as-root", "--oversubscribe", "-np"])
                .arg(ranks.to_string())
                .arg(bin)
                .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
            c
        };
        c.args(args).env("RAYON_NUM_THREADS", "1");
        c
    }

    fn run(ranks: usize, args: &[String]) -> Output {
        command(ranks, args).output().expect(
            "cannot start mpirun (install Open MPI: apt-get install openmpi-bin libopenmpi-dev)",
        )
    }

    fn args(command: &str, out: &Path, sets: &[String], accumulation: usize) -> Vec<String> {
        let mut a = vec![command.to_string(), "--overwrite".into()];
        let common = [
            format!("output_dir=\"{}\"", out.display()),
            "per_device_train_batch_size=2".into(),
            format!("gradient_accumulation_steps={accumulation}"),
            "learning_rate=1e-3".into(),
            "save_steps=0".into(),
        ];
        for s in sets.iter().chain(&common) {
            a.extend(["--set".to_string(), s.clone()]);
        }
        a
    }

    fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
        let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
        let mut out: Vec<(String, Vec<f32>)> = t
            .into_iter()
            .map(|(n, t)| {
                let v = t.to_dtype(candle_core::DType::F32).unwrap();
                (n, v.flatten_all().unwrap().to_vec1().unwrap())
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The largest per-tensor max|a − b| / max|a| between two runs' final weights (0: the same
    /// bits), after checking that training moved them.
    fn relative_difference(a: &Path, b: &Path) -> f64 {
        let (wa, wb) = (
            tensors(&a.join("model.safetensors")),
            tensors(&b.join("model.safetensors")),
        );
        let start = tensors(&PathBuf::from(model_path("llama-tied")).join("model.safetensors"));
        assert_eq!(wa.len(), wb.len());
        let mut worst = 0f64;
        let mut moved = 0f32;
        for ((name, x), (_, y)) in wa.iter().zip(&wb) {
            let same_bits = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
            if !same_bits {
                let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
                worst = worst.max((max_abs_diff(x, y) / scale) as f64);
            }
            if let Some((_, s)) = start.iter().find(|(n, _)| n == name) {
                moved = moved.max(max_abs_diff(x, s));
            }
        }
        assert!(moved > 1e-4, "the runs did not train (moved {moved})");
        worst
    }

    /// 1 process × 4 micro-batches vs 2 ranks × 2; returns the relative difference.
    fn one_vs_two_ranks(command: &str, sets: &[String]) -> f64 {
        let tmp = tempfile::tempdir().unwrap();
        let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
        assert_ok(&run(1, &args(command, &one, sets, 4)));
        let out = run(2, &args(command, &two, sets, 2));
        assert_ok(&out);
        // Rank 0 alone writes metrics (one line per logged step, not two).
        let lines = read_jsonl(&two.join("metrics.jsonl"));
        assert_eq!(lines.len(), read_jsonl(&one.join("metrics.jsonl")).len());
        relative_difference(&one, &two)
    }

    fn data(dir: &Path, name: &str, rows: impl Iterator<Item = serde_json::Value>) -> String {
        let path = dir.join(name);
        write_jsonl(&path, &rows.collect::<Vec<_>>());
        path.display().to_string()
    }

    fn base(file_key: &str, file: &str) -> Vec<String> {
        vec![
            format!("model=\"{}\"", model_path("llama-tied")),
            format!("{file_key}=\"{file}\""),
            "max_steps=3".into(),
        ]
    }

    #[test]
    fn sft_on_two_ranks_ends_bit_identical_to_one_process_with_twice_the_accumulation() {
        let tmp = tempfile::tempdir().unwrap();
        let mut rng = Lcg(21);
        let file = data(
            tmp.path(),
            "sft.jsonl",
            (0..16).map(|_| {
                let n = 2 + rng.below(4);
                json!({"prompt": phrase(&mut rng, 3), "completion": format!(" {}", phrase(&mut rng, n))})
            }),
        );
        let sets = base("train_file", &file);
        assert_eq!(one_vs_two_ranks("sft", &sets), 0.0);
        // Any power of two: 4 ranks × 1 (two per core here) against 1 process × 4.
        let (one, four) = (tmp.path().join("one"), tmp.path().join("four"));
        assert_ok(&run(1, &args("sft", &one, &sets, 4)));
        assert_ok(&run(4, &args("sft", &four, &sets, 1)));
        assert_eq!(relative_difference(&one, &four), 0.0, "4 ranks");
    }

    #[test]
    fn dpo_and_the_reward_model_on_two_ranks_end_bit_identical() {
        let tmp = tempfile::tempdir().unwrap();
        let mut rng = Lcg(22);
        let pairs = data(
            tmp.path(),
            "pairs.jsonl",
            (0..16).map(|_| {
                let (nc, nr) = (2 + rng.below(3), 2 + rng.below(3));
                let (c, r) = (phrase(&mut rng, nc), phrase(&mut rng, nr));
                json!({"prompt": phrase(&mut rng, 3), "chosen": format!(" {c}"), "rejected": format!(" {r} {c}")})
            }),
        );
        let mut sets = base("train_file", &pairs);
        sets.push("ref_cache_dir=\"\"".into());
        assert_eq!(one_vs_two_ranks("dpo", &sets), 0.0, "dpo");
        // K-way rankings mixed with pairs.
        let rankings = data(
            tmp.path(),
            "rankings.jsonl",
            (0..16).map(|i| {
                let k = if i % 2 == 0 { 3 } else { 2 };
                let completions: Vec<String> =
                    (0..k).map(|j| format!(" {}", phrase(&mut rng, 2 + j))).collect();
                json!({"prompt": phrase(&mut rng, 3), "completions": completions, "ranking": (0..k).rev().collect::<Vec<_>>()})
            }),
        );
        assert_eq!(
            one_vs_two_ranks("rm", &base("train_file", &rankings)),
            0.0,
            "rm"
        );
    }

    fn prompts(dir: &Path) -> String {
        let mut rng = Lcg(23);
        data(
            dir,
            "prompts.jsonl",
            (0..16).map(|_| json!({"prompt": phrase(&mut rng, 3)})),
        )
    }

    #[test]
    fn ppo_on_two_ranks_ends_bit_identical() {
        let tmp = tempfile::tempdir().unwrap();
        let mut sets = base("prompt_file", &prompts(tmp.path()));
        sets.extend([
            "reward=\"rule:ids:100-160\"".into(),
            "response_length=6".into(),
            "num_ppo_epochs=2".into(),
            "num_mini_batches=2".into(),
        ]);
        assert_eq!(one_vs_two_ranks("ppo", &sets), 0.0);
    }

    /// Bit-identical too: each rank decodes its share of the rows, and the decode kernels give
    /// a row the same bits whatever rows are beside it (`ops::skinny`).
    #[test]
    fn grpo_on_two_ranks_ends_bit_identical() {
        let tmp = tempfile::tempdir().unwrap();
        let mut sets = base("prompt_file", &prompts(tmp.path()));
        sets.extend([
            "reward_funcs=[\"rule:ids:100-160\"]".into(),
            "max_completion_length=6".into(),
            "num_generations=4".into(),
            "beta=0.1".into(),
        ]);
        assert_eq!(one_vs_two_ranks("grpo", &sets), 0.0);
    }

    #[test]
    fn ranks_with_different_data_are_refused_before_training() {
        let tmp = tempfile::tempdir().unwrap();
        // Each rank reads the file named by its own rank (Open MPI's environment): same
        // settings, different data.
        for r in 0..2 {
            let mut rng = Lcg(30 + r);
            data(
                tmp.path(),
                &format!("sft-{r}.jsonl"),
                (0..8).map(|_| json!({"prompt": phrase(&mut rng, 3), "completion": " a b"})),
            );
        }
        let script = tmp.path().join("rank.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec {} \"$@\" --set train_file=\"{}/sft-$OMPI_COMM_WORLD_RANK.jsonl\"\n",
                env!("CARGO_BIN_EXE_rlhf"),
                tmp.path().display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = Command::new("mpirun")
            .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
            .arg(&script)
            .args(args(
                "sft",
                &tmp.path().join("out"),
                &base("train_file", "unused"),
                1,
            ))
            .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("rank(s) 1 have a different run fingerprint"),
            "{err}"
        );
        assert!(!tmp.path().join("out/model.safetensors").exists());
    }

    /// The pids of `rank`'s processes among those running with `marker` in their command line.
    fn pid_of_rank(marker: &str, rank: usize) -> Option<u32> {
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
            if has(&cmdline, marker.as_bytes())
                && has(&cmdline, b"rlhf")
                && !has(&cmdline, b"mpirun")
                && has(
                    &environ,
                    format!("OMPI_COMM_WORLD_RANK={rank}\0").as_bytes(),
                )
            {
                return Some(pid);
            }
        }
        None
    }

    #[test]
    fn a_killed_rank_stops_the_run_naming_it_and_the_run_resumes_bit_identical() {
        let tmp = tempfile::tempdir().unwrap();
        let mut rng = Lcg(24);
        let file = data(
            tmp.path(),
            "sft.jsonl",
            (0..16).map(|_| json!({"prompt": phrase(&mut rng, 3), "completion": format!(" {}", phrase(&mut rng, 4))})),
        );
        let mut sets = base("train_file", &file);
        sets.retain(|s| !s.starts_with("max_steps"));
        sets.extend(["max_steps=400".into(), "save_total_limit=2".into()]);
        let with_saves = |out: &Path| {
            let mut a = args("sft", out, &sets, 2);
            a.extend(["--set".into(), "save_steps=10".into()]);
            a
        };
        let (full, killed) = (tmp.path().join("full"), tmp.path().join("killed"));
        assert_ok(&run(2, &with_saves(&full)));

        let child = command(2, &with_saves(&killed))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for a checkpoint, then kill rank 1.
        let t0 = Instant::now();
        let marker = killed.display().to_string();
        let pid = loop {
            let saved = killed
                .join("checkpoints")
                .read_dir()
                .map(|d| d.count() > 0)
                .unwrap_or(false);
            if saved {
                if let Some(pid) = pid_of_rank(&marker, 1) {
                    break pid;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "no checkpoint appeared"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        let killed_at = Instant::now();
        let out = child.wait_with_output().unwrap();
        let stopped_in = killed_at.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "the run went on after its rank 1 was killed"
        );
        assert!(
            stopped_in < Duration::from_secs(20),
            "mpirun took {stopped_in:?} to stop"
        );
        eprintln!("mpirun stopped {stopped_in:?} after rank 1 was killed");
        assert!(err.contains("rank 1") && err.contains("signal 9"), "{err}");
        if killed.join("model.safetensors").exists() {
            panic!("the run finished before the kill; make it longer");
        }
        // Resume on the same number of ranks: the same final bits as the uninterrupted run.
        let mut again = with_saves(&killed);
        again.retain(|a| a != "--overwrite");
        again.insert(1, "--resume".into());
        let resumed = run(2, &again);
        assert_ok(&resumed);
        assert!(String::from_utf8_lossy(&resumed.stderr).contains("resuming from"));
        let a = std::fs::read(full.join("model.safetensors")).unwrap();
        let b = std::fs::read(killed.join("model.safetensors")).unwrap();
        assert!(a == b, "the resumed run ended with different weights");
    }

    /// A run can move between 1 process × 4 and 2 ranks × 2 (the same global batch) and end
    /// where it would have; a different global batch is refused, saying what to run.
    #[test]
    fn a_checkpoint_resumes_on_other_ranks_with_the_same_global_batch_only() {
        let tmp = tempfile::tempdir().unwrap();
        let mut rng = Lcg(25);
        let file = data(
            tmp.path(),
            "sft.jsonl",
            (0..16).map(|_| json!({"prompt": phrase(&mut rng, 3), "completion": format!(" {}", phrase(&mut rng, 3))})),
        );
        let mut sets = base("train_file", &file);
        sets.retain(|s| !s.starts_with("max_steps"));
        sets.extend(["max_steps=4".into(), "save_total_limit=10".into()]);
        let with = |out: &Path, acc: usize, resume: bool| {
            let mut a = args("sft", out, &sets, acc);
            a.extend(["--set".into(), "save_steps=2".into()]);
            if resume {
                a.retain(|x| x != "--overwrite");
                a.insert(1, "--resume".into());
            }
            a
        };
        let full = tmp.path().join("full");
        assert_ok(&run(1, &with(&full, 4, false)));
        let part = tmp.path().join("part");
        copy_checkpoints(&full, &part, &["00000002"]);
        // 2 ranks × 1 is a global batch of 2 micro-batches, not 4: refused.
        let refused = run(2, &with(&part, 1, true));
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success());
        assert!(
            err.contains("1 rank(s) × gradient_accumulation_steps 4")
                && err.contains("mpirun -np 1"),
            "{err}"
        );
        // 2 ranks × 2: resumed, and the same bits as the single process's whole run.
        let resumed = run(2, &with(&part, 2, true));
        assert_ok(&resumed);
        assert!(String::from_utf8_lossy(&resumed.stderr).contains("resuming from"));
        let a = std::fs::read(full.join("model.safetensors")).unwrap();
        let b = std::fs::read(part.join("model.safetensors")).unwrap();
        assert!(
            a == b,
            "resumed on 2 ranks, the run ended with different weights"
        );
    }

    #[test]
    fn commands_that_do_not_train_refuse_to_run_on_several_ranks() {
        let model = model_path("llama-tied");
        let out = run(
            2,
            &["logprobs", "--model", &model, "--text", "a b"].map(String::from),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("only the training commands"), "{err}");
    }
}
