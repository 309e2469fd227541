//! Tokenizers against transformers' goldens (tests/fixtures/tokenizer*/golden.json), and the GGUF
//! fixture's rebuilt tokenizer against the Hugging Face one it was made from.

use rlhf::model::gguf::GgufFile;
use rlhf::text::Tokenizer;
use serde_json::Value;

use crate::common::fixture;

fn load(name: &str) -> (Tokenizer, Value) {
    let dir = fixture(name);
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    let golden =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    (tok, golden)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check_encode_decode(name: &str, expect_with_special: bool) {
    let (tok, golden) = load(name);
    let encode = golden["encode"].as_array().unwrap();
    assert!(!encode.is_empty());
    let mut with_special = 0;
    for case in encode {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&case["ids"]),
            "{name}: encode {text:?}"
        );
        if let Some(want) = case.get("ids_with_special") {
            assert_eq!(
                tok.encode(text, true).unwrap(),
                ids(want),
                "{name}: encode+special {text:?}"
            );
            with_special += 1;
        }
    }
    assert_eq!(
        with_special > 0,
        expect_with_special,
        "{name}: ids_with_special cases"
    );
    let decode = golden["decode"].as_array().unwrap();
    assert!(!decode.is_empty());
    for case in decode {
        let want = case["text"].as_str().unwrap();
        assert_eq!(
            tok.decode(&ids(&case["ids"]), false).unwrap(),
            want,
            "{name}: decode"
        );
    }
}

#[test]
fn chatml_tokenizer_matches_golden() {
    check_encode_decode("tokenizer", false);
}

#[test]
fn llama3_tokenizer_matches_golden() {
    check_encode_decode("tokenizer-llama3", true);
    // The post-processor adds BOS only when asked.
    let (tok, _) = load("tokenizer-llama3");
    let bos = tok.token_id("<|begin_of_text|>").unwrap();
    assert_eq!(tok.encode("hi", true).unwrap()[0], bos);
    assert_ne!(tok.encode("hi", false).unwrap()[0], bos);
}

#[test]
fn gguf_tokenizer_matches_hf_tokenizer() {
    let gguf = GgufFile::open(&fixture("models/llama-gguf/model.gguf")).unwrap();
    let from_gguf = Tokenizer::from_gguf(&gguf).unwrap();
    let (hf, golden) = load("tokenizer");
    for case in golden["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(
            from_gguf.encode(text, false).unwrap(),
            want,
            "gguf encode {text:?}"
        );
        // add_bos_token is false in the GGUF, so special tokens add nothing.
        assert_eq!(
            from_gguf.encode(text, true).unwrap(),
            want,
            "gguf encode+special {text:?}"
        );
    }
    for case in golden["decode"].as_array().unwrap() {
        let want = case["text"].as_str().unwrap();
        assert_eq!(
            from_gguf.decode(&ids(&case["ids"]), false).unwrap(),
            want,
            "gguf decode"
        );
    }
    assert!(from_gguf.chat_template.is_some());
    assert_eq!(from_gguf.chat_template, hf.chat_template);
    assert_eq!(from_gguf.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(from_gguf.eos_token.as_deref(), Some("<|im_end|>"));
}
