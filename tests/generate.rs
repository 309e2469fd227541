//! The KV-cache sampler against transformers' greedy `generate` and against our own full forward.

use crate::common::*;
use rlhf::checkpoint::Checkpoint;
use rlhf::generate::{generate, SamplingConfig};

fn greedy(n: usize) -> SamplingConfig {
    SamplingConfig {
        max_new_tokens: n,
        temperature: 0.0,
        ..Default::default()
    }
}

#[test]
fn batched_greedy_equals_transformers_and_each_prompt_alone() {
    for m in MODELS {
        let ck = Checkpoint::load(&model_path(m), false).unwrap();
        let g = golden(m);
        let cases = g["greedy"].as_array().unwrap();
        let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt"])).collect();
        let batched = generate(&ck.model, &prompts, &greedy(8)).unwrap();
        for (i, c) in cases.iter().enumerate() {
            let want = ids(&c["new_ids"]);
            assert_eq!(batched[i].tokens, want, "{m}: batched greedy row {i}");
            let alone = generate(&ck.model, &prompts[i..i + 1], &greedy(8)).unwrap();
            assert_eq!(alone[0].tokens, want, "{m}: greedy alone {i}");
        }
    }
}

#[test]
fn sampler_logprobs_equal_a_fresh_forward_pass() {
    for m in MODELS {
        let ck = Checkpoint::load(&model_path(m), false).unwrap();
        let prompts = vec![vec![5, 9, 77], vec![100, 3, 4, 8, 200, 31, 7], vec![42]];
        let cfg = SamplingConfig {
            max_new_tokens: 10,
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let samples = generate(&ck.model, &prompts, &cfg).unwrap();
        let seqs: Vec<Vec<u32>> = samples
            .iter()
            .map(|s| [s.prompt.clone(), s.tokens.clone()].concat())
            .collect();
        let lp = ck.model.sequence_logprobs(&seqs).unwrap();
        for (s, row) in samples.iter().zip(&lp) {
            let recomputed = &row[s.prompt.len() - 1..];
            let d = max_abs_diff(recomputed, &s.model_logprobs);
            assert!(d < 1e-5, "{m}: cached vs fresh log-probs differ by {d}");
            // Temperature 1 without truncation: the sampling distribution is the model's.
            let d = max_abs_diff(&s.sampling_logprobs, &s.model_logprobs);
            assert!(d < 1e-5, "{m}: sampling vs model log-probs differ by {d}");
        }
    }
}

#[test]
fn sampling_is_reproducible_and_seed_dependent() {
    let ck = Checkpoint::load(&model_path("llama-untied-bf16"), false).unwrap();
    let prompts = vec![vec![11, 12, 13], vec![40, 41]];
    let cfg = SamplingConfig {
        max_new_tokens: 12,
        temperature: 1.0,
        seed: 3,
        ..Default::default()
    };
    let a = generate(&ck.model, &prompts, &cfg).unwrap();
    let b = generate(&ck.model, &prompts, &cfg).unwrap();
    assert_eq!(
        a.iter().map(|s| &s.tokens).collect::<Vec<_>>(),
        b.iter().map(|s| &s.tokens).collect::<Vec<_>>()
    );
    let c = generate(
        &ck.model,
        &prompts,
        &SamplingConfig {
            seed: 4,
            ..cfg.clone()
        },
    )
    .unwrap();
    assert_ne!(
        a[0].tokens, c[0].tokens,
        "different seeds should give different samples"
    );
}

#[test]
fn rows_stop_on_their_own_stop_tokens() {
    let ck = Checkpoint::load(&model_path("llama-untied-bf16"), false).unwrap();
    let g = golden("llama-untied-bf16");
    let cases = g["greedy"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt"])).collect();
    let full: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["new_ids"])).collect();
    // Stop row 0 at its 3rd greedy token; the other rows must continue unchanged.
    let stop = full[0][2];
    let cfg = SamplingConfig {
        stop_ids: vec![stop],
        ..greedy(8)
    };
    let out = generate(&ck.model, &prompts, &cfg).unwrap();
    for (i, want) in full.iter().enumerate() {
        let cut = want
            .iter()
            .position(|&t| t == stop)
            .map_or(want.len(), |p| p + 1);
        assert_eq!(out[i].tokens, want[..cut], "row {i}");
        assert_eq!(
            out[i].stopped,
            cut < want.len() || want.last() == Some(&stop),
            "row {i}"
        );
    }
}

#[test]
fn top_k_one_is_greedy_and_top_p_truncates() {
    let ck = Checkpoint::load(&model_path("mistral"), false).unwrap();
    let prompts = vec![vec![11, 12, 13]];
    let g = generate(&ck.model, &prompts, &greedy(6)).unwrap();
    let k1 = SamplingConfig {
        max_new_tokens: 6,
        temperature: 1.0,
        top_k: 1,
        seed: 9,
        ..Default::default()
    };
    let s = generate(&ck.model, &prompts, &k1).unwrap();
    assert_eq!(s[0].tokens, g[0].tokens);
    assert!(
        s[0].sampling_logprobs.iter().all(|&l| l.abs() < 1e-6),
        "top-1 sampling is certain"
    );
    // With top-p the sampling distribution is narrower: its log-probs are ≥ the model's.
    let p = SamplingConfig {
        max_new_tokens: 6,
        temperature: 1.0,
        top_p: 0.5,
        seed: 9,
        ..Default::default()
    };
    let s = generate(&ck.model, &prompts, &p).unwrap();
    for (a, b) in s[0].sampling_logprobs.iter().zip(&s[0].model_logprobs) {
        assert!(a >= b, "top-p log-prob {a} below model log-prob {b}");
    }
}

#[test]
fn sampling_distribution_rules() {
    use rlhf::generate::sampling_logprobs;
    let logits = [2.0f32, 1.0, 0.5, 0.0, -1.0];
    let cfg = SamplingConfig {
        temperature: 1.0,
        top_k: 2,
        ..Default::default()
    };
    let lp = sampling_logprobs(&logits, &cfg);
    assert!(lp[2..].iter().all(|x| *x == f32::NEG_INFINITY));
    let z = (2.0f32.exp() + 1.0f32.exp()).ln();
    assert!((lp[0] - (2.0 - z)).abs() < 1e-6);
    // top-p 0.6 keeps the smallest prefix reaching 0.6: probs ≈ .53, .20, .12, .07, .03 → 2 tokens.
    let cfg = SamplingConfig {
        temperature: 1.0,
        top_p: 0.6,
        ..Default::default()
    };
    let lp = sampling_logprobs(&logits, &cfg);
    assert_eq!(lp.iter().filter(|x| x.is_finite()).count(), 2);
    // Temperature 0.5 doubles the logits.
    let cfg = SamplingConfig {
        temperature: 0.5,
        ..Default::default()
    };
    let lp = sampling_logprobs(&logits, &cfg);
    assert!(((lp[0] - lp[1]) - 2.0).abs() < 1e-5);
}

#[test]
fn bad_generation_inputs_are_errors() {
    let ck = Checkpoint::load(&model_path("gpt2"), false).unwrap();
    let e = generate(&ck.model, &[vec![]], &greedy(4)).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    let e = generate(&ck.model, &[vec![1, 99999]], &greedy(4)).unwrap_err();
    assert!(e.to_string().contains("99999"), "{e}");
    let e = generate(&ck.model, &[vec![1, 2]], &greedy(100)).unwrap_err();
    assert!(e.to_string().contains("positions"), "{e}");
}

/// Greedy decoding that crosses Phi-3's original context (32 tokens) mid-way: the step that
/// crosses re-encodes the sequence with the long RoPE factors, as transformers does.
#[test]
fn phi3_greedy_generation_across_its_original_context_matches_transformers() {
    let ck = Checkpoint::load(&model_path("phi3"), false).unwrap();
    let g = golden("phi3");
    let case = &g["long_greedy"][0];
    let (prompt, want) = (ids(&case["prompt"]), ids(&case["new_ids"]));
    assert!(prompt.len() < 32 && prompt.len() + want.len() > 33);
    let got = generate(&ck.model, &[prompt], &greedy(want.len())).unwrap();
    assert_eq!(got[0].tokens, want);
}

/// The KV cache keeps no autograd graph: a LoRA policy's keys (computed from trainable adapters)
/// would otherwise hold every decoding step's activations and every earlier cache alive (a PPO
/// iteration at the Qwen2.5-0.5B shape peaked at 8.9 GB instead of 5.1 GB).
#[test]
fn the_kv_cache_holds_no_graph() {
    use candle_core::{Device, Tensor, Var};
    let w = Var::from_vec(vec![0.5f32; 8], (1, 1, 2, 4), &Device::Cpu).unwrap();
    let ones = Tensor::ones((1, 1, 2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let k = (ones * w.as_tensor()).unwrap();
    assert!(k.track_op());
    let mut cache = rlhf::model::KvCache::new(1);
    for _ in 0..2 {
        let (ck, cv) = cache.append(0, &k, &k).unwrap();
        assert!(!ck.track_op() && !cv.track_op());
    }
}

/// A prompt repeated in the batch (GRPO's group) is prefilled once and its cache copied to each
/// row: every row's log-probs still equal a fresh forward pass, and the rows sample
/// independently.
#[test]
fn repeated_prompts_share_one_prefill_and_sample_independently() {
    for m in ["llama-tied", "gemma3", "gpt2"] {
        let ck = Checkpoint::load(&model_path(m), false).unwrap();
        let (a, b) = (vec![5u32, 9, 77, 12], vec![100u32, 3]);
        let prompts = vec![a.clone(), a.clone(), b.clone(), a.clone(), b.clone()];
        let cfg = SamplingConfig {
            max_new_tokens: 10,
            temperature: 1.0,
            seed: 3,
            ..Default::default()
        };
        let samples = generate(&ck.model, &prompts, &cfg).unwrap();
        let worst = sampler_vs_forward_logprobs(&ck.model, &samples);
        assert!(worst < 1e-5, "{m}: |Δ log π| = {worst}");
        assert!(
            samples[0].tokens != samples[1].tokens || samples[1].tokens != samples[3].tokens,
            "{m}: a group's rows drew the same tokens"
        );
        // Greedy: every row of a prompt is that prompt's greedy continuation alone.
        let greedy_all = generate(&ck.model, &prompts, &greedy(6)).unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let alone = generate(&ck.model, std::slice::from_ref(p), &greedy(6)).unwrap();
            assert_eq!(greedy_all[i].tokens, alone[0].tokens, "{m}: row {i}");
        }
    }
}

/// Continuous refill: with at most 3 rows decoding at once, a finished row's place goes to the
/// next waiting prompt. Every row still draws the sample it draws when all rows decode together
/// (its own random stream), in waves or without prefill sharing too; refill needs fewer decoding
/// steps than waves, and sharing encodes each distinct prompt once.
#[test]
fn refill_waves_and_unshared_prefill_draw_the_same_samples() {
    use rlhf::generate::generate_scheduled;
    let mut saved = 0;
    for m in ["llama-tied", "gemma3", "gpt2"] {
        let ck = Checkpoint::load(&model_path(m), false).unwrap();
        let (a, b) = (vec![5u32, 9, 77, 12, 40, 41], vec![100u32, 3]);
        let prompts = vec![
            a.clone(),
            a.clone(),
            b.clone(),
            vec![7, 8, 9],
            a.clone(),
            b.clone(),
            vec![60, 61, 62, 63, 64, 65, 66, 67, 68],
            b.clone(),
        ];
        let vocab = ck.model.config.vocab_size as u32;
        let all = SamplingConfig {
            max_new_tokens: 12,
            temperature: 1.0,
            seed: 11,
            // About one token in five ends a row, so rows finish at different steps.
            stop_ids: (0..vocab).filter(|t| t % 5 == 0).collect(),
            ..Default::default()
        };
        let refill = SamplingConfig {
            max_rows: 3,
            ..all.clone()
        };
        let waves = SamplingConfig {
            refill: false,
            ..refill.clone()
        };
        let unshared = SamplingConfig {
            share_prefill: false,
            ..refill.clone()
        };
        let (want, s_all) = generate_scheduled(&ck.model, &prompts, &all).unwrap();
        let lengths: Vec<usize> = want.iter().map(|s| s.tokens.len()).collect();
        assert!(
            lengths.iter().min() < lengths.iter().max(),
            "{m}: rows should end at different steps: {lengths:?}"
        );
        let fed: usize = lengths.iter().map(|n| n - 1).sum();
        let mut steps = vec![];
        for (name, cfg) in [
            ("all", &all),
            ("refill", &refill),
            ("waves", &waves),
            ("unshared", &unshared),
        ] {
            let (got, s) = generate_scheduled(&ck.model, &prompts, cfg).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.tokens, w.tokens, "{m} {name}: row {i}'s tokens");
                let d = max_abs_diff(&g.model_logprobs, &w.model_logprobs);
                assert!(d < 1e-5, "{m} {name}: row {i}'s log-probs differ by {d}");
            }
            assert_eq!(s.row_steps, fed, "{m} {name}: every fed token decoded once");
            assert!(s.peak_rows <= cfg.max_rows.max(prompts.len()), "{m} {name}");
            if cfg.max_rows > 0 {
                assert_eq!(s.peak_rows, 3, "{m} {name}: peak rows");
            }
            let distinct = if cfg.share_prefill { 4 } else { prompts.len() };
            assert_eq!(s.prefill_prompts, distinct, "{m} {name}: prompts encoded");
            steps.push(s.decode_steps);
        }
        assert_eq!(s_all.peak_rows, prompts.len());
        assert!(
            steps[1] <= steps[2],
            "{m}: refill took {} decoding steps, waves {}",
            steps[1],
            steps[2]
        );
        saved += steps[2] - steps[1];
        // Sampled rows and log-probs still match a fresh forward pass after admissions.
        let (got, _) = generate_scheduled(&ck.model, &prompts, &refill).unwrap();
        let worst = sampler_vs_forward_logprobs(&ck.model, &got);
        // Two computations with different summation orders (few-row decode kernels vs the
        // full forward), through every layer: float32 noise of some 1e-5 (gemma3: 1.2e-5).
        assert!(worst < 3e-5, "{m}: |Δ log π| = {worst}");
    }
    // Waves wait for each wave's longest row; refill does not (a late long row can still set
    // the critical path, so this is over all three models).
    assert!(saved > 0, "refill saved no decoding steps over waves");
}
