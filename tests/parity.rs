//! Log-prob and logit parity with transformers (golden files made by scripts/make_fixtures.py).

use crate::common::*;
use rlhf::checkpoint::Checkpoint;
use rlhf::model::StepInputs;

const TOL: f32 = 1e-4;

#[test]
fn single_sequence_logprobs_match_transformers() {
    for m in MODELS {
        let ck = Checkpoint::load(&model_path(m), false).unwrap();
        let g = golden(m);
        for case in g["single"].as_array().unwrap() {
            let seq = ids(&case["ids"]);
            let got = ck.model.sequence_logprobs(&[seq]).unwrap().remove(0);
            let want = floats(&case["logprobs"]);
            let d = max_abs_diff(&got, &want);
            assert!(d < TOL, "{m}: max |Δ logprob| = {d}");
        }
    }
}

#[test]
fn full_logits_match_transformers() {
    for m in MODELS {
        let ck = Checkpoint::load(&model_path(m), false).unwrap();
        let g = golden(m);
        let seq = ids(&g["single"][0]["ids"]);
        let n = seq.len();
        let inp = StepInputs::from_padded(&ck.model.config, &[seq], &[vec![1; n]]).unwrap();
        let logits = ck.model.forward(&inp, None).unwrap().squeeze(0).unwrap();
        let got: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = g["logits_first"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(floats)
            .collect();
        let d = max_abs_diff(&got, &want);
        assert!(d < TOL, "{m}: max |Δ logit| = {d}");
    }
}

#[test]
fn left_padded_batch_matches_transformers_and_single_rows() {
    for m in MODELS {
        let ck = Checkpoint::load(&model_path(m), false).unwrap();
        let g = golden(m);
        let b = &g["batch"];
        let input: Vec<Vec<u32>> = b["input_ids"].as_array().unwrap().iter().map(ids).collect();
        let mask: Vec<Vec<u8>> = b["attention_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| ids(r).into_iter().map(|x| x as u8).collect())
            .collect();
        // Our own derivation of position ids agrees with the one the golden used.
        let want_pos: Vec<Vec<u32>> = b["position_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        assert_eq!(rlhf::ops::position_ids_from_mask(&mask), want_pos, "{m}");
        let inp = StepInputs::from_padded(&ck.model.config, &input, &mask).unwrap();
        let logits = ck.model.forward(&inp, None).unwrap();
        let t = input[0].len();
        let lp = rlhf::ops::gather_logprobs(
            &logits.narrow(1, 0, t - 1).unwrap(),
            &inp.ids.narrow(1, 1, t - 1).unwrap(),
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
        for (row, want) in b["logprobs"].as_array().unwrap().iter().enumerate() {
            let want = floats(want);
            let got = &lp[row][t - 1 - want.len()..];
            let d = max_abs_diff(got, &want);
            assert!(d < TOL, "{m} row {row}: max |Δ logprob| = {d}");
        }
        // The library's own batching (sequence_logprobs pads internally) gives the same numbers.
        let singles: Vec<Vec<u32>> = g["single"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| ids(&c["ids"]))
            .collect();
        let batched = ck.model.sequence_logprobs(&singles).unwrap();
        for (row, case) in g["single"].as_array().unwrap().iter().enumerate() {
            let d = max_abs_diff(&batched[row], &floats(&case["logprobs"]));
            assert!(d < TOL, "{m} batched row {row}: {d}");
        }
    }
}

/// Phi-3's LongRoPE switches to its long factors for a forward call that reaches past
/// `original_max_position_embeddings` (32 in the fixture): a 40-token sequence's log-probs.
#[test]
fn phi3_uses_its_long_rope_factors_past_the_original_context() {
    let ck = Checkpoint::load(&model_path("phi3"), false).unwrap();
    let g = golden("phi3");
    let case = &g["long"][0];
    let seq = ids(&case["ids"]);
    assert!(seq.len() > 32);
    let got = ck
        .model
        .sequence_logprobs(std::slice::from_ref(&seq))
        .unwrap()
        .remove(0);
    let d = max_abs_diff(&got, &floats(&case["logprobs"]));
    assert!(d < TOL, "phi3 long: max |Δ logprob| = {d}");
    // The first 31 predictions of the same prefix alone use the short factors and differ.
    let short = ck
        .model
        .sequence_logprobs(&[seq[..32].to_vec()])
        .unwrap()
        .remove(0);
    let moved = max_abs_diff(&short, &got[..31]);
    assert!(
        moved > 1e-2,
        "long and short factors give the same log-probs ({moved})"
    );
}
