#![allow(dead_code)]
use std::path::PathBuf;

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

pub fn golden(model: &str) -> serde_json::Value {
    let p = fixture(&format!("models/{model}/golden.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

pub fn model_path(model: &str) -> String {
    let dir = fixture(&format!("models/{model}"));
    let gguf = dir.join("model.gguf");
    if gguf.exists() { gguf } else { dir }
        .to_string_lossy()
        .to_string()
}

pub const MODELS: &[&str] = &[
    "llama-tied",
    "llama-untied-bf16",
    "qwen2-f16-sharded",
    "mistral",
    "gpt2",
    "llama-gguf",
];

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
