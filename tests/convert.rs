//! `rlhf convert` writes an HF directory that loads back with identical log-probs, in transformers'
//! names and layouts (the transformers side is checked by scripts/check_roundtrip.py).

use crate::common::*;
use rlhf::checkpoint::Checkpoint;
use std::process::Command;

#[test]
fn converted_models_reload_with_identical_logprobs() {
    for m in MODELS {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("converted");
        let status = Command::new(env!("CARGO_BIN_EXE_rlhf"))
            .args([
                "convert",
                "--model",
                &model_path(m),
                "--out",
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{m}: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(out.join(f).exists(), "{m}: {f} missing");
        }
        let reloaded = Checkpoint::load(out.to_str().unwrap(), false).unwrap();
        let g = golden(m);
        for case in g["single"].as_array().unwrap() {
            let got = reloaded
                .model
                .sequence_logprobs(&[ids(&case["ids"])])
                .unwrap()
                .remove(0);
            let d = max_abs_diff(&got, &floats(&case["logprobs"]));
            assert!(d < 1e-4, "{m}: reloaded log-probs differ by {d}");
        }
        // Tied models don't store lm_head; GPT-2's Conv1D weights are back in [in, out].
        let st = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st).unwrap();
        let names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
        if reloaded.model.config.tie_word_embeddings {
            assert!(!names.iter().any(|n| n == "lm_head.weight"), "{m}");
        }
        if *m == "gpt2" {
            let c = &reloaded.model.config;
            let w = st.tensor("transformer.h.0.mlp.c_fc.weight").unwrap();
            assert_eq!(w.shape(), &[c.hidden_size, c.intermediate_size]);
        }
        // The chat template travels with the tokenizer.
        let tc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert!(
            tc["chat_template"]
                .as_str()
                .unwrap()
                .contains("<|im_start|>"),
            "{m}"
        );
    }
}
