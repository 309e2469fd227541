//! Fused kernels against their composed reference versions: values and gradients.

use candle_core::{Device, Tensor, Var};
use rlhf::ops;

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let num: f32 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    let den: f32 = b.iter().map(|y| y.abs()).fold(0.0, f32::max).max(1e-12);
    num / den
}

#[test]
fn fused_lm_head_logprobs_match_the_composed_reference() {
    let dev = Device::Cpu;
    // N not a multiple of the chunk size; a vocabulary large enough to matter.
    let (n, d, v) = (300usize, 48usize, 1000usize);
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, d), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (v, d), &dev).unwrap() * 0.3).unwrap())
        .unwrap();
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % v as u32).collect();
    let t = Tensor::from_vec(targets, n, &dev).unwrap();
    let weights = Tensor::randn(0f32, 1.0, n, &dev).unwrap();

    let fused = ops::lm_head::lm_head_logprobs(h.as_tensor(), w.as_tensor(), &t).unwrap();
    let logits = h.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
    let reference = ops::gather_logprobs(&logits.unsqueeze(0).unwrap(), &t.unsqueeze(0).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert!(
        rel_err(&fused, &reference) < 1e-5,
        "values: {}",
        rel_err(&fused, &reference)
    );

    let gf = (fused * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gr = (reference * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in [("hidden", &h), ("weight", &w)] {
        let e = rel_err(
            gf.get(var.as_tensor()).unwrap(),
            gr.get(var.as_tensor()).unwrap(),
        );
        assert!(e < 1e-4, "{name} gradient relative error {e}");
    }
}

/// On every model family, a left-padded SFT loss gives the same value and the same gradient for
/// every parameter on the fast and reference paths.
#[test]
fn fast_and_reference_paths_agree_on_every_family() {
    use rlhf::algos::sft::target_nll_sum_with;
    use rlhf::data::sft::Example;
    use rlhf::ops::OpsPath;
    for m in [
        "llama-tied",
        "llama-untied-bf16",
        "qwen2-f16-sharded",
        "mistral",
        "gpt2",
        "llama-gguf",
    ] {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models")
            .join(m);
        let path = if dir.join("model.gguf").exists() {
            dir.join("model.gguf")
        } else {
            dir
        };
        let ck = rlhf::checkpoint::Checkpoint::load(path.to_str().unwrap(), true).unwrap();
        let ex = |ids: Vec<u32>| Example {
            targets: (0..ids.len()).map(|i| u8::from(i > 1)).collect(),
            segments: vec![1; ids.len()],
            ids,
        };
        let batch = [
            ex(vec![5, 17, 200, 45, 9, 33, 2, 150]),
            ex(vec![81, 64, 3, 7]),
        ];
        let refs: Vec<&Example> = batch.iter().collect();
        let (lf, _) = target_nll_sum_with(&ck.model, &refs, OpsPath::Fast).unwrap();
        let (lr, _) = target_nll_sum_with(&ck.model, &refs, OpsPath::Reference).unwrap();
        assert!(rel_err(&lf, &lr) < 1e-5, "{m}: loss");
        let (gf, gr) = (lf.backward().unwrap(), lr.backward().unwrap());
        for (name, var) in ck.model.parameters() {
            let e = rel_err(
                gf.get(var.as_tensor()).unwrap(),
                gr.get(var.as_tensor()).unwrap(),
            );
            assert!(e < 1e-4, "{m}: {name} gradient relative error {e}");
        }
    }
}
