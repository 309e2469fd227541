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

/// On every model family, the fast and reference paths give the same right-padded SFT loss and
/// the same logits of a left-padded batch, and the same gradient for every parameter of each.
#[test]
fn fast_and_reference_paths_agree_on_every_family() {
    use rlhf::algos::sft::target_nll_sum_with;
    use rlhf::data::sft::Example;
    use rlhf::ops::OpsPath;
    for &m in crate::common::MODELS {
        let ck = rlhf::checkpoint::Checkpoint::load(&crate::common::model_path(m), true).unwrap();
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

        // Left padding, as generation and `sequence_logprobs` batch prompts.
        let ids = vec![
            vec![0, 0, 0, 17, 200, 45, 9],
            vec![33, 2, 150, 7, 81, 64, 3],
        ];
        let mask = vec![vec![0, 0, 0, 1, 1, 1, 1], vec![1; 7]];
        let logits = |path: OpsPath| {
            let mut inp =
                rlhf::model::StepInputs::from_padded(&ck.model.config, &ids, &mask).unwrap();
            inp.path = path;
            ck.model.forward(&inp, None).unwrap()
        };
        let (lf, lr) = (logits(OpsPath::Fast), logits(OpsPath::Reference));
        let e = rel_err(&lf, &lr);
        assert!(e < 1e-4, "{m}: left-padded logits differ by {e}");
        let (gf, gr) = (
            probe_loss(&lf, 3).backward().unwrap(),
            probe_loss(&lr, 3).backward().unwrap(),
        );
        for (name, var) in ck.model.parameters() {
            let e = rel_err(
                gf.get(var.as_tensor()).unwrap(),
                gr.get(var.as_tensor()).unwrap(),
            );
            assert!(
                e < 1e-4,
                "{m}: left-padded {name} gradient relative error {e}"
            );
        }
    }
}

/// Σ (out ⊙ probe) for a fixed random probe: a scalar whose gradient reaches every input.
fn probe_loss(out: &Tensor, seed: u64) -> Tensor {
    let n = out.elem_count();
    let mut lcg = seed;
    let probe: Vec<f32> = (0..n)
        .map(|_| {
            lcg = lcg
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((lcg >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    let probe = Tensor::from_vec(probe, out.shape(), out.device()).unwrap();
    (out * probe).unwrap().sum_all().unwrap()
}

fn var(shape: &[usize], scale: f64) -> Var {
    let t = (Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap() * scale).unwrap();
    Var::from_tensor(&t).unwrap()
}

/// Values and gradients of every input of `fast` and `reference` agree within 1e-4 relative.
fn assert_same(name: &str, inputs: &[&Var], fast: Tensor, reference: Tensor) {
    let e = rel_err(&fast, &reference);
    assert!(e < 1e-5, "{name}: values differ by {e}");
    let gf = probe_loss(&fast, 7).backward().unwrap();
    let gr = probe_loss(&reference, 7).backward().unwrap();
    for (i, v) in inputs.iter().enumerate() {
        let (a, b) = (gf.get(v.as_tensor()), gr.get(v.as_tensor()));
        let (a, b) = (a.expect("fast gradient"), b.expect("reference gradient"));
        let e = rel_err(a, b);
        assert!(e < 1e-4, "{name}: gradient of input {i} differs by {e}");
    }
}

#[test]
fn fused_norms_match_the_reference() {
    let (x, w, b) = (var(&[3, 5, 40], 2.0), var(&[40], 1.0), var(&[40], 1.0));
    let x_shifted = Var::from_tensor(&(x.as_tensor() + 3.0).unwrap()).unwrap();
    assert_same(
        "rms_norm",
        &[&x, &w],
        ops::norm::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(),
        ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(),
    );
    // A large mean, where a one-pass variance would lose precision.
    assert_same(
        "layer_norm",
        &[&x_shifted, &w, &b],
        ops::norm::layer_norm(x_shifted.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap(),
        ops::layer_norm(x_shifted.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap(),
    );
}

#[test]
fn fused_activations_match_the_reference() {
    use rlhf::ops::Activation;
    // Values out to ±12, where σ and tanh saturate.
    let (g, u) = (var(&[4, 7, 33], 4.0), var(&[4, 7, 33], 1.0));
    assert_same(
        "swiglu",
        &[&g, &u],
        ops::activation::swiglu(g.as_tensor(), u.as_tensor()).unwrap(),
        (ops::activation(g.as_tensor(), Activation::Silu).unwrap() * u.as_tensor()).unwrap(),
    );
    assert_same(
        "gelu_tanh",
        &[&g],
        ops::activation::gelu_tanh(g.as_tensor()).unwrap(),
        ops::activation(g.as_tensor(), Activation::GeluTanh).unwrap(),
    );
}

#[test]
fn fused_rope_matches_the_reference() {
    let (b, t, n, hd) = (2, 9, 3, 16);
    let x = var(&[b, t, n, hd], 1.0);
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
        .collect();
    // Left padding in row 1: positions as generate derives them.
    let mask = vec![vec![1u8; t], [vec![0u8; 3], vec![1u8; t - 3]].concat()];
    let (cos, sin) = ops::rope_tables(&inv_freq, &ops::position_ids_from_mask(&mask)).unwrap();
    assert_same(
        "rope",
        &[&x],
        ops::OpsPath::Fast.rope(x.as_tensor(), &cos, &sin).unwrap(),
        ops::OpsPath::Reference
            .rope(x.as_tensor(), &cos, &sin)
            .unwrap(),
    );
}

/// Attention on strided views (as the projections produce them), grouped heads, left padding,
/// more queries than one block, a window, queries that see cached keys (S > T), and Gemma 2's
/// soft-capped scores.
#[test]
fn fused_attention_matches_the_reference() {
    type Case = (
        usize,
        usize,
        usize,
        usize,
        usize,
        Option<usize>,
        Option<f64>,
    );
    let cases: [Case; 6] = [
        // (B, H, KV, T, S, window, softcap)
        (2, 4, 2, 70, 70, None, None),
        (3, 3, 1, 150, 150, Some(20), None),
        (2, 2, 2, 5, 12, None, None),
        (2, 6, 3, 1, 9, None, None),
        (2, 4, 2, 70, 70, Some(9), Some(0.5)),
        (2, 2, 1, 5, 12, None, Some(2.0)),
    ];
    for (case, &(b, h, kv, t, s, window, cap)) in cases.iter().enumerate() {
        let hd = 8;
        // Projections' layout [B, T, heads, hd], seen as [B, heads, T, hd].
        let q = var(&[b, t, h, hd], 1.0);
        let k = var(&[b, s, kv, hd], 1.0);
        let v = var(&[b, s, kv, hd], 1.0);
        let mask: Vec<Vec<u8>> = (0..b)
            .map(|row| (0..s).map(|j| u8::from(j >= 2 * row)).collect())
            .collect();
        let bias = ops::attention_bias(&mask, t, window).unwrap();
        let view = |x: &Var| x.as_tensor().transpose(1, 2).unwrap();
        let (qv, kv_, vv) = (view(&q), view(&k), view(&v));
        assert_same(
            &format!("attention case {case}"),
            &[&q, &k, &v],
            ops::attention::attention(&qv, &kv_, &vv, &bias, 0.3, cap).unwrap(),
            ops::attention(&qv, &kv_, &vv, &bias, 0.3, cap).unwrap(),
        );
    }
}

/// The few-rows product on every tile remainder (rows and columns not multiples of 4, K not a
/// multiple of 8), values and both gradients; and which products go to it.
#[test]
fn skinny_matmul_matches_matmul() {
    // 131 and 256 rows: the sizes a sampler's decoding steps give it (`skinny::takes`).
    for (m, k, n) in [
        (16, 64, 256),
        (5, 37, 131),
        (1, 8, 3),
        (32, 100, 70),
        (131, 72, 37),
        (256, 576, 64),
    ] {
        let (x, w) = (var(&[m, k], 1.0), var(&[n, k], 1.0));
        assert_same(
            &format!("skinny {m}x{k}x{n}"),
            &[&x, &w],
            ops::skinny::matmul_t(x.as_tensor(), w.as_tensor()).unwrap(),
            x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap(),
        );
    }
    use ops::skinny::{takes, DecodeScope, MAX_DECODE_ROWS, MAX_ROWS};
    assert!(
        takes(MAX_ROWS) && !takes(MAX_ROWS + 1),
        "outside a decoding step"
    );
    let _decoding = DecodeScope::open();
    assert!(
        takes(MAX_DECODE_ROWS) && !takes(MAX_DECODE_ROWS + 1),
        "in a decoding step"
    );
}

/// A deterministic f32 matrix with entries in [-1, 1).
fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut r = crate::common::Lcg(seed);
    (0..rows * cols)
        .map(|_| r.below(20001) as f32 / 10000.0 - 1.0)
        .collect()
}

#[test]
fn bf16_gemm_matches_the_rounded_reference_on_every_layout_and_edge() {
    use rlhf::ops::bf16::{available, gemm, reference, View};
    if !available() {
        println!(
            "skipped: bf16 GEMM parity — this CPU ({}) lacks AVX512-BF16",
            rlhf::ops::cpu::cpu().model
        );
        return;
    }
    // Shapes around the tile (12 × 32), the k block (384) and odd k; both operand layouts.
    for &(m, k, n) in &[
        (1, 1, 1),
        (12, 32, 32),
        (13, 7, 33),
        (97, 385, 65),
        (200, 800, 70),
    ] {
        let a = matrix(m, k, 1);
        let b = matrix(k, n, 2);
        let (at, bt) = (matrix(k, m, 3), matrix(n, k, 4));
        fn row(d: &[f32], r: usize, c: usize) -> View<'_> {
            View {
                data: d,
                offset: 0,
                rows: r,
                cols: c,
                rs: c,
                cs: 1,
            }
        }
        for (av, bv) in [
            (row(&a, m, k), row(&b, k, n)),
            (row(&at, k, m).t(), row(&bt, n, k).t()),
        ] {
            let (got, want) = (gemm(av, bv), reference(av, bv));
            let worst = got
                .iter()
                .zip(&want)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            // f32 accumulation of k products of magnitude ≤ 1 in another order.
            assert!(worst <= 1e-6 * k as f32 + 1e-6, "{m}x{k}x{n}: {worst}");
        }
    }
}

#[test]
fn every_decode_matmul_path_of_this_cpu_matches_the_reference() {
    use rlhf::ops::cpu::Isa;
    for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
        if !Isa::available().contains(&isa) {
            println!(
                "skipped: decode matmul path {} — this CPU ({}) lacks it",
                isa.name(),
                rlhf::ops::cpu::cpu().model
            );
            continue;
        }
        // Every tile remainder of each path: rows of w by 3 and 4, rows of x by 4, k by 8 and 16.
        for (m, k, n) in [
            (16, 64, 256),
            (5, 37, 131),
            (1, 8, 3),
            (32, 100, 70),
            (7, 17, 9),
        ] {
            let (x, w) = (matrix(m, k, 5), matrix(n, k, 6));
            let got = rlhf::ops::skinny::product_on(isa, &x, &w, m, k, n);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|o| x[i * k + o] as f64 * w[j * k + o] as f64)
                        .sum();
                    let d = (got[i * n + j] as f64 - want).abs();
                    assert!(
                        d <= 1e-5 * (1.0 + want.abs()),
                        "{} {m}x{k}x{n} [{i},{j}]: {d}",
                        isa.name()
                    );
                }
            }
        }
    }
}
