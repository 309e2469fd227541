//! Our own differentiable decoder models on candle. Knows nothing of algorithms, data or the CLI.

pub mod checkpoint;
pub mod gguf;
pub mod gpt2;
pub mod hparams;
pub mod init;
pub mod linear;
pub mod llama;
pub mod lora;
pub mod peft;
pub mod scalar_head;
pub mod weights;

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};

use crate::ops;
use hparams::{Family, ModelConfig};
use weights::WeightMap;

/// The inputs of one forward call: token ids [B, T], their position ids, and the additive attention
/// bias [B, 1, T, S] over all S key positions (cached and current).
pub struct StepInputs {
    pub ids: Tensor,
    pub position_ids: Vec<Vec<u32>>,
    pub attn_bias: Tensor,
    /// The bias of the sliding layers when only some layers slide (Gemma); else `attn_bias`
    /// (with the window when every layer slides) serves all.
    pub local_attn_bias: Option<Tensor>,
    /// Fused kernels or the composed reference (`RLHF_OPS`, default fused).
    pub path: ops::OpsPath,
}

impl StepInputs {
    /// Sequences of different lengths, right-padded into one batch; padding is masked out.
    pub fn right_padded(cfg: &ModelConfig, seqs: &[&[u32]]) -> Result<StepInputs> {
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let pad = cfg.pad_token_id.unwrap_or(0) % cfg.vocab_size as u32;
        let mut ids = Vec::with_capacity(seqs.len());
        let mut mask = Vec::with_capacity(seqs.len());
        for s in seqs {
            let n = t - s.len();
            ids.push(
                s.iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, n))
                    .collect::<Vec<_>>(),
            );
            mask.push(
                std::iter::repeat_n(1u8, s.len())
                    .chain(std::iter::repeat_n(0, n))
                    .collect::<Vec<_>>(),
            );
        }
        Self::from_padded(cfg, &ids, &mask)
    }

    /// A whole padded batch at once (no cache). `mask[b][t]` is 1 for real tokens.
    pub fn from_padded(
        cfg: &ModelConfig,
        ids: &[Vec<u32>],
        mask: &[Vec<u8>],
    ) -> Result<StepInputs> {
        let t = ids.first().map_or(0, |r| r.len());
        check_ids(cfg, ids)?;
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        Ok(StepInputs {
            ids: Tensor::from_vec(flat, (ids.len(), t), &candle_core::Device::Cpu)?,
            position_ids: ops::position_ids_from_mask(mask),
            attn_bias: ops::attention_bias(mask, t, cfg.uniform_window())?,
            local_attn_bias: cfg
                .mixed_window()
                .map(|w| ops::attention_bias(mask, t, Some(w)))
                .transpose()?,
            path: ops::default_path(),
        })
    }
}

impl StepInputs {
    /// Right-padded or packed rows: `segments[b][t]` numbers the example of each token (0: padding);
    /// positions restart and attention stays within each example.
    pub fn from_segments(
        cfg: &ModelConfig,
        ids: &[Vec<u32>],
        segments: &[Vec<u32>],
    ) -> Result<StepInputs> {
        let t = ids.first().map_or(0, |r| r.len());
        check_ids(cfg, ids)?;
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        Ok(StepInputs {
            ids: Tensor::from_vec(flat, (ids.len(), t), &candle_core::Device::Cpu)?,
            position_ids: ops::segment_position_ids(segments),
            attn_bias: ops::segment_attention_bias(segments, cfg.uniform_window())?,
            local_attn_bias: cfg
                .mixed_window()
                .map(|w| ops::segment_attention_bias(segments, Some(w)))
                .transpose()?,
            path: ops::default_path(),
        })
    }
}

/// Sequences left-padded with `pad` to the longest, and their masks (1 on real tokens): how a
/// generation batch and a scoring batch that ends on its last tokens are laid out.
pub fn left_padded(seqs: &[Vec<u32>], pad: u32) -> (Vec<Vec<u32>>, Vec<Vec<u8>>) {
    let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
    seqs.iter()
        .map(|s| {
            let n = t - s.len();
            (
                std::iter::repeat_n(pad, n)
                    .chain(s.iter().copied())
                    .collect(),
                std::iter::repeat_n(0, n)
                    .chain(std::iter::repeat_n(1, s.len()))
                    .collect(),
            )
        })
        .unzip()
}

/// Rejects token ids outside the vocabulary before they reach an embedding lookup.
pub fn check_ids(cfg: &ModelConfig, ids: &[Vec<u32>]) -> Result<()> {
    for row in ids {
        if let Some(&bad) = row.iter().find(|&&i| i as usize >= cfg.vocab_size) {
            bail!(
                "token id {bad} is out of the vocabulary (vocab_size {})",
                cfg.vocab_size
            );
        }
    }
    Ok(())
}

/// Keys and values of every layer for the positions seen so far: [B, KV, S, hd] each, in
/// buffers with room to grow, so that a decoding step writes its new position in place instead of
/// copying the whole cache (which made long, wide rollouts quadratic in memory traffic). Rows that
/// leave are compacted in place too: the buffers keep their size and the first `rows` are live.
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// Positions a buffer made from now on holds beyond what it is made with.
    headroom: usize,
}

/// One layer's buffers [B, KV, capacity, hd]: the first `rows` rows and `len` positions are live.
struct LayerCache {
    k: Tensor,
    v: Tensor,
    rows: usize,
    len: usize,
}

/// Positions a fresh buffer holds beyond its first append, unless the caller reserves more.
const KV_HEADROOM: usize = 128;

impl LayerCache {
    fn capacity(&self) -> usize {
        self.k.dim(2).unwrap_or(0)
    }

    /// Buffers of `capacity` positions holding the first `len` of `k`, `v`.
    fn with_capacity(
        k: &Tensor,
        v: &Tensor,
        len: usize,
        capacity: usize,
    ) -> candle_core::Result<Self> {
        let (b, kv, _, hd) = k.dims4()?;
        let buf = |x: &Tensor| -> candle_core::Result<Tensor> {
            let t = Tensor::zeros((b, kv, capacity, hd), x.dtype(), x.device())?;
            t.slice_set(&x.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            Ok(t)
        };
        Ok(LayerCache {
            k: buf(k)?,
            v: buf(v)?,
            rows: b,
            len,
        })
    }

    /// The live part of a buffer: its first `rows` rows (a view; rows stay contiguous).
    fn live(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.narrow(0, 0, self.rows)
    }
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            headroom: KV_HEADROOM,
        }
    }

    /// Buffers made from now on (the first append, a growth, a concatenation) hold `positions`
    /// more than they are made with: a sampler that knows how many tokens it may still add
    /// reserves them once instead of growing the buffers.
    pub fn reserve(&mut self, positions: usize) {
        self.headroom = positions.max(1);
    }

    /// Appends this step's keys and values for `layer`; returns all of them (views of the
    /// buffers, rows contiguous).
    pub fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        // Detached: the cache serves sampling only, and a trainable model's (a LoRA policy's)
        // keys would otherwise keep every step's graph — and every earlier cache — alive.
        let (k, v) = (k.detach().contiguous()?, v.detach().contiguous()?);
        let t = k.dim(2)?;
        let c = match self.layers[layer].take() {
            None => LayerCache::with_capacity(&k, &v, t, t + self.headroom)?,
            Some(c) if c.len + t > c.capacity() => {
                let cap = (c.capacity() + self.headroom).max(c.len + t);
                let mut grown =
                    LayerCache::with_capacity(&c.live(&c.k)?, &c.live(&c.v)?, c.len, cap)?;
                grown.k.slice_set(&k, 2, c.len)?;
                grown.v.slice_set(&v, 2, c.len)?;
                grown.len += t;
                grown
            }
            Some(mut c) => {
                c.live(&c.k)?.slice_set(&k, 2, c.len)?;
                c.live(&c.v)?.slice_set(&v, 2, c.len)?;
                c.len += t;
                c
            }
        };
        let out = (
            c.live(&c.k)?.narrow(2, 0, c.len)?,
            c.live(&c.v)?.narrow(2, 0, c.len)?,
        );
        self.layers[layer] = Some(c);
        Ok(out)
    }

    /// Keeps the rows of the batch that `keep` says (old index of each kept row, in its new
    /// place), in place: only rows that change places are copied. Each source must be its own
    /// place or a place past the kept rows, which `swap_remove_order` gives.
    pub fn compact(&mut self, keep: &[usize]) -> candle_core::Result<()> {
        let n = keep.len();
        for c in self.layers.iter_mut().flatten() {
            for (to, &from) in keep.iter().enumerate() {
                if from == to {
                    continue;
                }
                if from < n || from >= c.rows {
                    candle_core::bail!("compact: row {from} cannot move to row {to} of {n}");
                }
                for buf in [&c.k, &c.v] {
                    let row = buf.narrow(0, from, 1)?.narrow(2, 0, c.len)?.contiguous()?;
                    buf.narrow(0, to, 1)?.slice_set(&row, 2, 0)?;
                }
            }
            c.rows = n;
        }
        Ok(())
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Positions filled (0 before the first append).
    pub fn len(&self) -> usize {
        self.layers.iter().flatten().next().map_or(0, |c| c.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows of several caches in one buffer, in order: from each part its `rows`, positions
    /// `from..` of each. Each part's rows are right-aligned (left-padded, as a generation batch
    /// is), so a shorter part gets zero positions in front; callers mask them. This is how rows
    /// that start later join a batch that is already decoding, with one copy of each row. The new
    /// buffers hold `headroom` positions more (and keep reserving that many).
    pub fn gather(parts: &[CacheRows], headroom: usize) -> candle_core::Result<KvCache> {
        let layers = parts.first().map_or(0, |p| p.cache.layers.len());
        let len = parts
            .iter()
            .filter(|p| !p.rows.is_empty())
            .map(|p| p.cache.len().saturating_sub(p.from))
            .max()
            .unwrap_or(0);
        let n: usize = parts.iter().map(|p| p.rows.len()).sum();
        let mut out = KvCache::new(layers);
        out.headroom = headroom;
        for (l, slot) in out.layers.iter_mut().enumerate() {
            let nonempty = parts.iter().filter(|p| !p.rows.is_empty());
            let Some(first) = nonempty
                .into_iter()
                .find_map(|p| p.cache.layers[l].as_ref())
            else {
                continue;
            };
            let (_, kv, _, hd) = first.k.dims4()?;
            let buf = || {
                Tensor::zeros(
                    (n, kv, len + headroom, hd),
                    first.k.dtype(),
                    first.k.device(),
                )
            };
            let (k, v) = (buf()?, buf()?);
            let mut to = 0;
            for p in parts.iter().filter(|p| !p.rows.is_empty()) {
                let Some(c) = &p.cache.layers[l] else {
                    candle_core::bail!("gather: a part has no layer {l}");
                };
                let span = c.len - p.from;
                for &from in p.rows {
                    for (dst, src) in [(&k, &c.k), (&v, &c.v)] {
                        let row = src
                            .narrow(0, from, 1)?
                            .narrow(2, p.from, span)?
                            .contiguous()?;
                        dst.narrow(0, to, 1)?.slice_set(&row, 2, len - span)?;
                    }
                    to += 1;
                }
            }
            *slot = Some(LayerCache { k, v, rows: n, len });
        }
        Ok(out)
    }
}

/// Some rows of a cache, from position `from` on, for `KvCache::gather`.
pub struct CacheRows<'a> {
    pub cache: &'a KvCache,
    pub rows: &'a [usize],
    pub from: usize,
}

/// The order of a batch after rows leave, moving as few rows as possible: each leaving row's place
/// below the new size takes a kept row from past it. Returns the old index of each kept row in
/// its new place (for `KvCache::compact` and the batch's own per-row state).
pub fn swap_remove_order(keep: &[usize]) -> Vec<usize> {
    let n = keep.len();
    let mut order: Vec<usize> = (0..n).collect();
    let kept = |i: usize| keep.binary_search(&i).is_ok();
    let mut movers = keep.iter().copied().filter(|&i| i >= n);
    for (place, slot) in order.iter_mut().enumerate() {
        if !kept(place) {
            *slot = movers
                .next()
                .expect("as many kept rows past n as holes below it");
        }
    }
    order
}

/// How the weight matrices of a model that does not train are stored (`frozen_dtype`): a LoRA
/// run's base, reference and reward models. bf16 halves their memory; products still run in f32
/// on the exactly widened values (`ops::frozen`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FrozenDtype {
    /// bf16 where the checkpoint stores bf16 (lossless), else f32.
    Auto,
    /// bf16 always (rounds the frozen matrices of an f32 checkpoint).
    Bf16,
    /// f32 always.
    F32,
}

static FROZEN_DTYPE: std::sync::Mutex<FrozenDtype> = std::sync::Mutex::new(FrozenDtype::Auto);

/// Sets how models loaded from now on store their frozen matrices.
pub fn set_frozen_dtype(d: FrozenDtype) {
    *FROZEN_DTYPE.lock().unwrap_or_else(|e| e.into_inner()) = d;
}

pub fn frozen_dtype() -> FrozenDtype {
    *FROZEN_DTYPE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Wraps weights as trainable variables (or leaves them as constants for inference, so that no
/// autograd graph is kept) and remembers them by their transformers name.
pub struct ParamCollector {
    trainable: bool,
    frozen: FrozenDtype,
    params: Vec<(String, Var)>,
}

impl ParamCollector {
    /// Takes a checkpoint tensor as stored (bf16 or f32): trainable weights and every vector
    /// (norms, biases) become f32, frozen matrices are stored as `frozen_dtype` says.
    pub fn add(&mut self, name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        use candle_core::DType;
        if !self.trainable {
            return match (t.rank(), self.frozen) {
                (2, FrozenDtype::Auto) => Ok(t),
                (2, FrozenDtype::Bf16) => t.to_dtype(DType::BF16),
                _ => t.to_dtype(DType::F32),
            };
        }
        let var = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
        let out = var.as_tensor().clone();
        self.params.push((name.to_string(), var));
        Ok(out)
    }
}

#[derive(Clone)]
enum Body {
    Llama(llama::Llama),
    Gpt2(gpt2::Gpt2),
}

/// A causal language model of any supported family.
pub struct CausalLm {
    pub config: ModelConfig,
    body: Body,
    params: Vec<(String, Var)>,
    /// Checkpoint tensors that no part of the model used.
    pub unused_tensors: Vec<String>,
    /// `score.weight` [1, D] of a `*ForSequenceClassification` checkpoint (reward/value head).
    pub score_head: Option<Tensor>,
    /// The bf16 decode copy of the unembedding (with the projections' own copies).
    lm_head_decode: Option<std::sync::Arc<ops::skinny::Bf16Weights>>,
    /// Whether LoRA adapters apply, and their training dropout.
    adapters: lora::AdapterSwitch,
    /// (r, α, dropout, rsLoRA) of the adapters, when there are any.
    adapter_hparams: Option<(usize, f64, f64, bool)>,
    /// Recompute block activations in the backward pass (`gradient_checkpointing`).
    checkpointing: std::sync::atomic::AtomicBool,
}

impl CausalLm {
    /// Builds the model from checkpoint tensors. With `trainable`, every weight becomes a `Var`;
    /// without, the matrices are stored as `set_frozen_dtype` last said.
    pub fn from_weights(config: ModelConfig, weights: WeightMap, trainable: bool) -> Result<Self> {
        Self::from_weights_as(config, weights, trainable, frozen_dtype())
    }

    /// `from_weights` with the frozen matrices' storage given.
    pub fn from_weights_as(
        config: ModelConfig,
        mut weights: WeightMap,
        trainable: bool,
        frozen: FrozenDtype,
    ) -> Result<Self> {
        let mut pc = ParamCollector {
            trainable,
            frozen,
            params: vec![],
        };
        let score_head = weights.remove("score.weight");
        let body = match config.family {
            Family::Llama => Body::Llama(llama::Llama::load(&config, &mut weights, &mut pc)?),
            Family::Gpt2 => Body::Gpt2(gpt2::Gpt2::load(&config, &mut weights, &mut pc)?),
        };
        Ok(CausalLm {
            config,
            body,
            params: pc.params,
            unused_tensors: weights.leftover(),
            score_head,
            lm_head_decode: None,
            adapters: lora::AdapterSwitch::default(),
            adapter_hparams: None,
            checkpointing: Default::default(),
        })
    }

    fn linears(&self) -> Vec<&linear::Linear> {
        match &self.body {
            Body::Llama(m) => m.linears(),
            Body::Gpt2(m) => m.linears(),
        }
    }

    fn linears_mut(&mut self) -> Vec<&mut linear::Linear> {
        match &mut self.body {
            Body::Llama(m) => m.linears_mut(),
            Body::Gpt2(m) => m.linears_mut(),
        }
    }

    /// Puts a fresh LoRA adapter (B = 0: the model's outputs do not change) on every projection
    /// that `cfg` targets; its A and B become the model's only trainable parameters, under
    /// PEFT's names. The model must have been loaded frozen. Returns the number of adapters.
    pub fn add_lora(&mut self, cfg: &lora::LoraConfig, seed: u64) -> Result<usize> {
        cfg.validate()?;
        if !self.params.is_empty() {
            bail!("add_lora: the base model must be loaded frozen (not trainable)");
        }
        let mut rng = lora::SplitMix::new(seed ^ 0x4c6f_5241);
        let mut made = vec![];
        for l in self.linears_mut() {
            if cfg.lora_target_modules.matches(&l.name) {
                let (inp, out) = l.features()?;
                l.lora = Some(lora::LoraAdapter::fresh(inp, out, cfg, &mut rng)?);
                made.push(l.name.clone());
            }
        }
        if let Some(names) = cfg.lora_target_modules.names() {
            for n in names {
                if !made.iter().any(|m| lora::name_matches(m, &n)) {
                    let example = self
                        .linears()
                        .first()
                        .map_or(String::new(), |l| l.name.clone());
                    bail!(
                        "lora_target_modules: `{n}` matches no projection of this {} model (they are named like `{example}`)",
                        self.config.model_type
                    );
                }
            }
        }
        self.adapter_hparams = Some((cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora));
        self.make_adapters_trainable()?;
        Ok(made.len())
    }

    /// Puts a saved adapter on the model without merging it (PEFT's `PeftModel.from_pretrained`);
    /// with `trainable`, its A and B become the model's trainable parameters.
    pub fn attach_adapter(&mut self, adapter: &peft::Adapter, trainable: bool) -> Result<()> {
        let mut left: std::collections::BTreeSet<&String> = adapter.modules.keys().collect();
        for l in self.linears_mut() {
            if let Some(a) = adapter.modules.get(&l.name) {
                let (inp, out) = l.features()?;
                if a.a.dims() != [a.a.dim(0)?, inp] || a.b.dims() != [out, a.b.dim(1)?] {
                    bail!(
                        "{}: `{}` adapter shapes {:?} / {:?} do not fit the base's [{out}, {inp}] projection",
                        adapter.dir.display(), l.name, a.a.dims(), a.b.dims()
                    );
                }
                l.lora = Some(a.clone());
                left.remove(&l.name);
            }
        }
        if let Some(m) = left.first() {
            bail!(
                "{}: adapts `{m}`, which this model does not have",
                adapter.dir.display()
            );
        }
        let c = &adapter.config;
        self.adapter_hparams = Some((c.r, c.lora_alpha, c.lora_dropout, c.use_rslora));
        if trainable {
            self.make_adapters_trainable()?;
        }
        Ok(())
    }

    fn make_adapters_trainable(&mut self) -> Result<()> {
        let mut params = vec![];
        for l in self.linears_mut() {
            let name = l.name.clone();
            if let Some(a) = l.lora.as_mut() {
                let (va, vb) = a.make_trainable()?;
                params.push((format!("base_model.model.{name}.lora_A.weight"), va));
                params.push((format!("base_model.model.{name}.lora_B.weight"), vb));
            }
        }
        self.params = params;
        Ok(())
    }

    /// (r, α, dropout, rsLoRA) of the adapters; panics without adapters.
    pub fn adapter_hparams(&self) -> (usize, f64, f64, bool) {
        self.adapter_hparams.expect("a model with adapters")
    }

    /// Whether any projection carries a LoRA adapter.
    pub fn has_adapters(&self) -> bool {
        self.linears().iter().any(|l| l.lora.is_some())
    }

    /// (module name, A, B) of every adapter, for saving.
    pub fn adapter_tensors(&self) -> Vec<(String, Tensor, Tensor)> {
        self.linears()
            .into_iter()
            .filter_map(|l| {
                Some((
                    l.name.clone(),
                    l.lora.as_ref()?.a.clone(),
                    l.lora.as_ref()?.b.clone(),
                ))
            })
            .collect()
    }

    /// Training passes keep only each block's input and recompute the rest in the backward
    /// pass (same gradients, less memory; see `checkpoint.rs`).
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.checkpointing
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs `f` with the adapters off: the LoRA run's base model, e.g. as its reference.
    pub fn without_adapters<R>(&self, f: impl FnOnce(&CausalLm) -> R) -> R {
        struct On<'a>(&'a lora::AdapterSwitch);
        impl Drop for On<'_> {
            fn drop(&mut self) {
                self.0.set_enabled(true);
            }
        }
        self.adapters.set_enabled(false);
        let _on = On(&self.adapters);
        f(self)
    }

    /// Runs `f` (a training forward pass) with the adapters' dropout on, its masks drawn from
    /// `seed`: callers derive it from their position in the run, so a resumed run draws the same.
    pub fn with_adapter_dropout<R>(&self, seed: u64, f: impl FnOnce() -> R) -> R {
        struct Off<'a>(&'a lora::AdapterSwitch);
        impl Drop for Off<'_> {
            fn drop(&mut self) {
                self.0.set_dropout_seed(None);
            }
        }
        self.adapters.set_dropout_seed(Some(seed));
        let _off = Off(&self.adapters);
        f()
    }

    /// A second model on this one's frozen weights, without its adapters: the tensors share their
    /// storage, so it costs no weight memory (PPO's value model on a LoRA policy's base).
    pub fn sharing_frozen_weights(&self) -> Result<CausalLm> {
        if self
            .params
            .iter()
            .any(|(n, _)| !n.starts_with("base_model.model."))
        {
            bail!("only a frozen base (a LoRA model's) can be shared");
        }
        let mut body = self.body.clone();
        let linears = match &mut body {
            Body::Llama(m) => m.linears_mut(),
            Body::Gpt2(m) => m.linears_mut(),
        };
        for l in linears {
            l.lora = None;
            l.decode = None;
        }
        Ok(CausalLm {
            config: self.config.clone(),
            body,
            params: vec![],
            unused_tensors: vec![],
            score_head: self.score_head.clone(),
            lm_head_decode: None,
            adapters: lora::AdapterSwitch::default(),
            adapter_hparams: None,
            checkpointing: Default::default(),
        })
    }

    /// Drops an untied LM head (and its parameter): a reward or value model never uses it.
    pub fn drop_lm_head(&mut self) {
        match &mut self.body {
            Body::Llama(m) => m.lm_head = None,
            Body::Gpt2(m) => m.lm_head = None,
        }
        self.params.retain(|(n, _)| n != "lm_head.weight");
    }

    /// Final-norm hidden states [B, T, D].
    pub fn forward_hidden(
        &self,
        inp: &StepInputs,
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let pass = linear::Pass {
            path: inp.path,
            adapters: self.adapters.enabled(),
            dropout: self.adapters.dropout(),
            checkpoint: self
                .checkpointing
                .load(std::sync::atomic::Ordering::Relaxed),
        };
        match &self.body {
            Body::Llama(m) => m.forward_hidden(&self.config, inp, &pass, cache),
            Body::Gpt2(m) => m.forward_hidden(&self.config, inp, &pass, cache),
        }
    }

    /// Whether a forward call reaching position `now` rotates with other frequencies than one that
    /// reached `before` (LongRoPE crossing its original context).
    pub fn rope_frequencies_change(&self, before: u32, now: u32) -> bool {
        match &self.body {
            Body::Llama(m) => m.rope_frequencies_change(before, now),
            Body::Gpt2(_) => false,
        }
    }

    /// The unembedding matrix [V, D] (the input embedding when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        match &self.body {
            Body::Llama(m) => m.lm_head_weight(),
            Body::Gpt2(m) => m.lm_head_weight(),
        }
    }

    /// Logits [.., V] from hidden states [.., D].
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.lm_head_weight();
        let dims = hidden.dims().to_vec();
        let d = *dims.last().unwrap();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let mut out = dims;
        *out.last_mut().unwrap() = w.dim(0)?;
        let h = hidden.reshape((rows, d))?;
        let logits = match &self.lm_head_decode {
            Some(w16) if ops::skinny::takes(rows) && ops::skinny::decoding() => {
                ops::skinny::matmul_t_bf16(&h, w16)?
            }
            _ if w.dtype() == candle_core::DType::BF16 => {
                ops::frozen::matmul_t(&h, w, ops::default_path())?
            }
            _ => ops::default_path().matmul_t(&h, w)?,
        };
        let logits = match self.config.final_softcap {
            Some(c) => ((logits / c)?.tanh()? * c)?,
            None => logits,
        };
        logits.reshape(out)
    }

    /// Makes (or drops) frozen bf16 copies of every projection and of the unembedding, which the
    /// sampler's few-row decoding steps stream instead of the f32 weights: half the bytes per
    /// generated token. For models that do not train while they sample (the copies are not
    /// updated). Returns whether the copies are in use: they are made only where they have a
    /// fast kernel (AVX-512).
    pub fn use_bf16_decode_weights(&mut self, on: bool) -> Result<bool> {
        let on = on && ops::skinny::bf16_decode_available();
        // A weight stored in bf16 is its own decode copy (`ops::frozen`).
        let make = |w: &Tensor| -> Result<Option<std::sync::Arc<ops::skinny::Bf16Weights>>> {
            Ok(if on && w.dtype() == candle_core::DType::F32 {
                Some(std::sync::Arc::new(ops::skinny::Bf16Weights::from_tensor(
                    w,
                )?))
            } else {
                None
            })
        };
        self.lm_head_decode = make(self.lm_head_weight())?;
        for l in self.linears_mut() {
            l.decode = make(&l.weight)?;
        }
        Ok(on)
    }

    /// log π(targets[b, t] | hidden[b, t]) for hidden states [B, T, D] and targets [B, T] → [B, T].
    /// The fast path never builds the [B, T, V] logits.
    pub fn token_logprobs(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        path: ops::OpsPath,
    ) -> candle_core::Result<Tensor> {
        let (b, t, d) = hidden.dims3()?;
        match path {
            ops::OpsPath::Fast => ops::lm_head::lm_head_logprobs_capped(
                &hidden.reshape((b * t, d))?,
                self.lm_head_weight(),
                &targets.flatten_all()?,
                self.config.final_softcap,
            )?
            .reshape((b, t)),
            ops::OpsPath::Reference => ops::gather_logprobs(&self.logits(hidden)?, targets),
        }
    }

    pub fn forward(
        &self,
        inp: &StepInputs,
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        self.logits(&self.forward_hidden(inp, cache)?)
    }

    /// Trainable parameters by transformers name (empty for an inference-only model).
    pub fn parameters(&self) -> &[(String, Var)] {
        &self.params
    }

    /// All weights under their transformers names and layouts.
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(match &self.body {
            Body::Llama(m) => m.state_dict(&self.config),
            Body::Gpt2(m) => m.state_dict(&self.config)?,
        })
    }

    /// log p(ids[i] | ids[..i]) for i ≥ 1 of each sequence, computed in one left-padded batch.
    pub fn sequence_logprobs(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        if seqs.iter().any(|s| s.len() < 2) {
            bail!("log-probabilities need at least 2 tokens per sequence");
        }
        let pad = self
            .config
            .pad_token_id
            .unwrap_or(0)
            .min(self.config.vocab_size as u32 - 1);
        let (ids, mask) = left_padded(seqs, pad);
        let inp = StepInputs::from_padded(&self.config, &ids, &mask)?;
        let hidden = self.forward_hidden(&inp, None)?;
        // Predict token t+1 from position t.
        let pred = hidden.narrow(1, 0, t - 1)?;
        let targets = inp.ids.narrow(1, 1, t - 1)?;
        let lp = self
            .token_logprobs(&pred, &targets, ops::default_path())?
            .to_vec2::<f32>()?;
        Ok(lp
            .into_iter()
            .zip(seqs)
            .map(|(row, s)| row[t - s.len()..].to_vec())
            .collect())
    }

    /// Per-token log-probs of each sequence's completion: sequences are right-padded into one
    /// batch; entry [n, t] is log π(seq[t+1] | seq[..=t]) and `mask[n, t]` is 1 when token t+1
    /// belongs to the completion (index ≥ `starts[n]`). Returns (log-probs [N, T−1], mask
    /// [N, T−1], hidden states [N, T−1, D] that predict those tokens).
    pub fn completion_logprobs(
        &self,
        seqs: &[&[u32]],
        starts: &[usize],
        path: ops::OpsPath,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        if t < 2
            || seqs
                .iter()
                .zip(starts)
                .any(|(s, &st)| st == 0 || st >= s.len())
        {
            bail!("each sequence needs a non-empty prompt and a non-empty completion");
        }
        let mut mask = Vec::with_capacity(seqs.len() * (t - 1));
        for (s, &st) in seqs.iter().zip(starts) {
            mask.extend((1..t).map(|i| f32::from(u8::from(i >= st && i < s.len()))));
        }
        let mut inp = StepInputs::right_padded(&self.config, seqs)?;
        inp.path = path;
        let hidden = self.forward_hidden(&inp, None)?.narrow(1, 0, t - 1)?;
        let lp = self.token_logprobs(&hidden, &inp.ids.narrow(1, 1, t - 1)?, path)?;
        let mask = Tensor::from_vec(mask, (seqs.len(), t - 1), &candle_core::Device::Cpu)?;
        Ok(((lp * &mask)?, mask, hidden))
    }
}
