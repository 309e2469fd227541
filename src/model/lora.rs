//! LoRA (Hu et al. 2021): a frozen projection W plus a trainable low-rank update,
//!     y = x·Wᵀ + s · dropout(x)·Aᵀ·Bᵀ,   A [r, in], B [out, r],   s = α/r (rsLoRA: α/√r),
//! with A ~ U(−1/√in, 1/√in) and B = 0 at the start, so the adapted model starts equal to its base.
//! Settings are TRL's (`use_peft`, `lora_r`, …); the files are PEFT's (see `peft.rs`).

use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::settings::{KeyDoc, Section};

/// Which projections get an adapter: "all-linear" (every projection of the decoder blocks, not
/// the LM head — PEFT's meaning), or module names matched against the end of each projection's
/// name, as PEFT matches them ("q_proj" adapts every `….q_proj`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum TargetModules {
    One(String),
    List(Vec<String>),
}

impl TargetModules {
    pub const ALL_LINEAR: &'static str = "all-linear";

    /// The names to match, or None for all linear layers.
    pub fn names(&self) -> Option<Vec<String>> {
        match self {
            TargetModules::One(s) if s == Self::ALL_LINEAR => None,
            TargetModules::One(s) => Some(vec![s.clone()]),
            TargetModules::List(v) => Some(v.clone()),
        }
    }

    /// Whether the projection `module` (its full transformers name) is adapted.
    pub fn matches(&self, module: &str) -> bool {
        match self.names() {
            None => true,
            Some(names) => names.iter().any(|n| name_matches(module, n)),
        }
    }
}

/// PEFT's rule: a target name matches a module named exactly so, or ending in `.name`.
pub fn name_matches(module: &str, name: &str) -> bool {
    module == name || module.ends_with(&format!(".{name}"))
}

/// The LoRA settings of a training run (TRL's `ModelConfig` keys and defaults).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub use_peft: bool,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub lora_target_modules: TargetModules,
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            use_peft: false,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            lora_target_modules: TargetModules::One(TargetModules::ALL_LINEAR.into()),
            use_rslora: false,
        }
    }
}

impl Section for LoraConfig {
    const TITLE: &'static str = "LoRA (PEFT adapters)";
    const KEYS: &'static [KeyDoc] = &[
        KeyDoc::new(
            "use_peft",
            "train a LoRA adapter on a frozen base instead of every weight; saves a PEFT adapter",
        ),
        KeyDoc::new("lora_r", "adapter rank r"),
        KeyDoc::new(
            "lora_alpha",
            "scaling α: updates are scaled by α/r (α/√r with use_rslora)",
        ),
        KeyDoc::new(
            "lora_dropout",
            "dropout on the adapter's input while training",
        ),
        KeyDoc::new(
            "lora_target_modules",
            "\"all-linear\" or a list of module names, e.g. [\"q_proj\", \"v_proj\"]",
        ),
        KeyDoc::new(
            "use_rslora",
            "rank-stabilised scaling α/√r (Kalajdzievski 2023)",
        ),
    ];
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.lora_r == 0 {
            bail!("lora_r must be at least 1");
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            bail!(
                "lora_alpha must be a positive number, got {}",
                self.lora_alpha
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!("lora_dropout must be in [0, 1), got {}", self.lora_dropout);
        }
        if self
            .lora_target_modules
            .names()
            .is_some_and(|n| n.is_empty())
        {
            bail!("lora_target_modules is an empty list");
        }
        Ok(())
    }

    /// The factor s applied to B·A.
    pub fn scale(&self) -> f64 {
        scale(self.lora_alpha, self.lora_r, self.use_rslora)
    }
}

pub fn scale(alpha: f64, r: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// The adapter of one projection.
#[derive(Clone)]
pub struct LoraAdapter {
    /// [r, in]
    pub a: Tensor,
    /// [out, r]
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f32,
}

impl LoraAdapter {
    /// A fresh adapter for a projection with `inp` inputs and `out` outputs (PEFT's
    /// initialisation: A kaiming-uniform with a = √5, which is U(±1/√in); B zero).
    pub fn fresh(inp: usize, out: usize, cfg: &LoraConfig, rng: &mut SplitMix) -> Result<Self> {
        let bound = 1.0 / (inp as f32).sqrt();
        let a: Vec<f32> = (0..cfg.lora_r * inp)
            .map(|_| (rng.next_unit() * 2.0 - 1.0) * bound)
            .collect();
        Ok(LoraAdapter {
            a: Tensor::from_vec(a, (cfg.lora_r, inp), &Device::Cpu)?,
            b: Tensor::zeros((out, cfg.lora_r), candle_core::DType::F32, &Device::Cpu)?,
            scale: cfg.scale(),
            dropout: cfg.lora_dropout as f32,
        })
    }

    /// The adapter's contribution for inputs x [rows, in] → [rows, out].
    pub fn forward(&self, x: &Tensor, dropout: Option<&Dropout>) -> candle_core::Result<Tensor> {
        let x = match dropout {
            Some(d) if self.dropout > 0.0 => d.apply(x, self.dropout)?,
            _ => x.clone(),
        };
        x.matmul(&self.a.t()?)?.matmul(&self.b.t()?)? * self.scale
    }

    /// s·B·A [out, in]: what merging adds to W.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        self.b.matmul(&self.a)? * self.scale
    }

    /// Makes A and B trainable variables; returns them.
    pub fn make_trainable(&mut self) -> candle_core::Result<(Var, Var)> {
        let (a, b) = (Var::from_tensor(&self.a)?, Var::from_tensor(&self.b)?);
        self.a = a.as_tensor().clone();
        self.b = b.as_tensor().clone();
        Ok((a, b))
    }
}

/// What the adapters of a model do in its next forward passes: whether they are on (a LoRA run's
/// reference is its base with them off) and the dropout seed while training.
#[derive(Default)]
pub struct AdapterSwitch {
    off: AtomicBool,
    /// Some while a training forward pass runs: dropout masks come from (seed, call number).
    dropout_seed: std::sync::Mutex<Option<u64>>,
    calls: Arc<AtomicU64>,
}

impl AdapterSwitch {
    pub fn enabled(&self) -> bool {
        !self.off.load(Ordering::Relaxed)
    }

    pub fn set_enabled(&self, on: bool) {
        self.off.store(!on, Ordering::Relaxed);
    }

    /// Dropout for this forward pass, if training dropout is on.
    pub fn dropout(&self) -> Option<Dropout> {
        let seed = (*self.dropout_seed.lock().unwrap())?;
        Some(Dropout {
            seed,
            calls: self.calls.clone(),
        })
    }

    /// Turns training dropout on (with a seed that the caller derives from its position in the
    /// run, so that a resumed run draws the same masks) or off.
    pub fn set_dropout_seed(&self, seed: Option<u64>) {
        *self.dropout_seed.lock().unwrap() = seed;
        self.calls.store(0, Ordering::Relaxed);
    }
}

/// Inverted dropout with masks drawn from a counter-based generator: the n-th adapter call after
/// `set_dropout_seed(s)` uses the stream (s, n), whatever ran before.
#[derive(Clone)]
pub struct Dropout {
    seed: u64,
    calls: Arc<AtomicU64>,
}

impl Dropout {
    /// The number of the next call.
    pub fn position(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Moves the shared counter to `n` (after a block ran on a replica of it).
    pub fn set_position(&self, n: u64) {
        self.calls.store(n, Ordering::Relaxed)
    }

    /// An independent copy whose next call is number `n`: what a recomputed block uses to draw
    /// the masks it drew the first time.
    pub fn replica_at(&self, n: u64) -> Dropout {
        Dropout {
            seed: self.seed,
            calls: Arc::new(AtomicU64::new(n)),
        }
    }

    fn apply(&self, x: &Tensor, p: f32) -> candle_core::Result<Tensor> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let mut rng = SplitMix::new(self.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let keep = 1.0 / (1.0 - p);
        let threshold = (p as f64 * u32::MAX as f64) as u32;
        let count = x.elem_count();
        let mut mask = Vec::with_capacity(count);
        while mask.len() < count {
            let bits = rng.next_u64();
            for half in [bits as u32, (bits >> 32) as u32] {
                if mask.len() < count {
                    mask.push(if half < threshold { 0.0 } else { keep });
                }
            }
        }
        x * Tensor::from_vec(mask, x.shape(), x.device())?
    }
}

/// SplitMix64 (Steele, Lea & Flood 2014): small, fast, and the same on every platform.
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_module_name_suffixes() {
        let all = TargetModules::One("all-linear".into());
        assert!(all.matches("model.layers.0.mlp.up_proj"));
        let qv = TargetModules::List(vec!["q_proj".into(), "v_proj".into()]);
        assert!(qv.matches("model.layers.3.self_attn.q_proj"));
        assert!(!qv.matches("model.layers.3.self_attn.k_proj"));
        assert!(!qv.matches("model.layers.3.self_attn.xq_proj"));
        let c = TargetModules::One("c_proj".into());
        assert!(c.matches("transformer.h.0.attn.c_proj"));
        assert!(c.matches("transformer.h.0.mlp.c_proj"));
    }

    #[test]
    fn scaling_is_alpha_over_r_or_over_root_r() {
        assert_eq!(scale(32.0, 16, false), 2.0);
        assert_eq!(scale(32.0, 16, true), 8.0);
    }

    #[test]
    fn dropout_keeps_the_expected_fraction_and_rescales() -> candle_core::Result<()> {
        let switch = AdapterSwitch::default();
        switch.set_dropout_seed(Some(7));
        let x = Tensor::ones((100, 100), candle_core::DType::F32, &Device::Cpu)?;
        let y: Vec<f32> = switch
            .dropout()
            .unwrap()
            .apply(&x, 0.25)?
            .flatten_all()?
            .to_vec1()?;
        let zeros = y.iter().filter(|&&v| v == 0.0).count();
        assert!((2300..2700).contains(&zeros), "{zeros} of 10000 dropped");
        assert!(y.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        // The same seed and call number give the same mask; the next call a different one.
        switch.set_dropout_seed(Some(7));
        let again: Vec<f32> = switch
            .dropout()
            .unwrap()
            .apply(&x, 0.25)?
            .flatten_all()?
            .to_vec1()?;
        assert_eq!(y, again);
        let next: Vec<f32> = switch
            .dropout()
            .unwrap()
            .apply(&x, 0.25)?
            .flatten_all()?
            .to_vec1()?;
        assert_ne!(y, next);
        Ok(())
    }
}
