//! Checks on the real SmolLM2-135M-Instruct GGUF (93 MB, fetched by scripts/fetch-assets.sh).
//! Ignored by default; run with
//!   RLHF_ASSETS=~/.cache/rlhf-assets cargo test --release --test integration smollm2 -- --ignored

use rlhf::checkpoint::Checkpoint;
use rlhf::generate::{generate, SamplingConfig};

fn smollm2() -> Checkpoint {
    let root = std::env::var("RLHF_ASSETS")
        .unwrap_or_else(|_| format!("{}/.cache/rlhf-assets", std::env::var("HOME").unwrap()));
    let path = format!("{root}/smollm2-135m-instruct/model.gguf");
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} missing: run scripts/fetch-assets.sh"
    );
    Checkpoint::load(&path, false).unwrap()
}

#[test]
#[ignore = "needs the SmolLM2 asset"]
fn smollm2_tokens_loss_and_greedy_answer() {
    let ck = smollm2();
    let tok = ck.tokenizer().unwrap();
    let ids = tok.encode("Hello world, this is GPT-2.", true).unwrap();
    assert_eq!(ids, vec![19556, 905, 28, 451, 314, 452, 9848, 29, 34, 30]);
    let lp = ck.model.sequence_logprobs(&[ids]).unwrap().remove(0);
    let loss = -lp.iter().map(|&x| x as f64).sum::<f64>() / lp.len() as f64;
    assert!((loss - 4.46098).abs() < 1e-3, "mean loss {loss}");

    let messages =
        serde_json::json!([{"role": "user", "content": "What is the capital of France?"}]);
    let (_, prompt) = rlhf::text::apply_chat_template(tok, &messages, true).unwrap();
    let cfg = SamplingConfig {
        max_new_tokens: 24,
        temperature: 0.0,
        stop_ids: ck.stop_token_ids(),
        ..Default::default()
    };
    let out = generate(&ck.model, &[prompt], &cfg).unwrap();
    let text = tok.decode(&out[0].tokens, true).unwrap();
    assert!(text.contains("Paris"), "answer: {text}");
}
