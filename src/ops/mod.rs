//! The model's tensor operations, on two paths. The fast path is fused CPU kernels, each with its
//! own hand-written backward (`norm`, `rope`, `attention`, `activation`, `lm_head`, `skinny`):
//! one pass over memory where candle would make several, and no `[B, H, T, T]` scores or
//! `[tokens, vocabulary]` logits. The reference path, in this file, composes candle primitives so
//! that autograd differentiates them (candle-nn's fused ops have no backward); it is what the
//! fused kernels are tested against (`RLHF_OPS=reference` selects it). `ops` knows nothing of the
//! model or anything above it.

pub mod activation;
pub mod attention;
pub mod bf16;
pub mod cpu;
pub mod frozen;
pub(crate) mod kernel;
pub mod lm_head;
pub mod norm;
pub mod rope;
pub mod simd;
pub mod skinny;

/// Which implementation of the fused operations to use. The reference path is the composed,
/// obviously-correct one the fast kernels are tested against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpsPath {
    Fast,
    Reference,
}

/// The path chosen by `RLHF_OPS=reference|fast` (default fast).
pub fn default_path() -> OpsPath {
    static PATH: std::sync::OnceLock<OpsPath> = std::sync::OnceLock::new();
    *PATH.get_or_init(|| match std::env::var("RLHF_OPS").as_deref() {
        Ok("reference") => OpsPath::Reference,
        _ => OpsPath::Fast,
    })
}

use candle_core::{DType, Result, Tensor, D};

pub use activation::Activation;

/// The model's operations on the chosen path. The fused kernels take f32 CPU tensors; anything
/// else runs the reference composition.
impl OpsPath {
    fn fused(self, x: &Tensor) -> bool {
        self == OpsPath::Fast && x.dtype() == DType::F32 && x.device().is_cpu()
    }

    pub fn rms_norm(self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        if self.fused(x) {
            norm::rms_norm(x, weight, eps)
        } else {
            rms_norm(x, weight, eps)
        }
    }

    pub fn layer_norm(
        self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        eps: f64,
    ) -> Result<Tensor> {
        if self.fused(x) {
            norm::layer_norm(x, weight, bias, eps)
        } else {
            layer_norm(x, weight, bias, eps)
        }
    }

    /// Rotary embedding of the projection output x [B, T, n, hd]; returns heads first,
    /// [B, n, T, hd] (a transposed view on the fast path).
    pub fn rope(self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.fused(x) {
            rope::rope(x, cos, sin)?.transpose(1, 2)
        } else {
            apply_rope(&x.transpose(1, 2)?, cos, sin)
        }
    }

    /// Attention with scores scale·q·kᵀ, soft-capped to c·tanh(·/c) when `softcap` is given.
    pub fn attention(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        scale: f64,
        softcap: Option<f64>,
    ) -> Result<Tensor> {
        if self.fused(q) {
            attention::attention(q, k, v, bias, scale, softcap)
        } else {
            attention(q, k, v, bias, scale, softcap)
        }
    }

    /// x [m, k] · wᵀ for w [n, k]; a few rows (a decoding step) skip GEMM's packing of w; with
    /// bf16 matmuls on (`bf16::set_enabled`), larger products take bf16 operands.
    pub fn matmul_t(self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let f32_cpu = self.fused(x) && w.dtype() == DType::F32;
        if f32_cpu && skinny::takes(x.dim(0)?) {
            skinny::matmul_t(x, w)
        } else if f32_cpu && bf16::enabled() {
            bf16::matmul_t(x, w)
        } else {
            x.matmul(&w.t()?)
        }
    }

    /// act(x); GELU-tanh is fused.
    pub fn activation(self, x: &Tensor, act: Activation) -> Result<Tensor> {
        match act {
            Activation::GeluTanh if self.fused(x) => activation::gelu_tanh(x),
            _ => activation(x, act),
        }
    }

    /// act(gate)·up; SwiGLU (act = SiLU) is fused.
    pub fn gated(self, gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
        match act {
            Activation::Silu if self.fused(gate) => activation::swiglu(gate, up),
            _ => activation(gate, act)? * up,
        }
    }
}

/// y = x / sqrt(mean(x²) + eps) · w   (Llama's RMSNorm, computed in f32)
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_rms = (mean_sq + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_rms)?.broadcast_mul(weight)
}

/// y = (x − mean) / sqrt(var + eps) · w + b   (biased variance, as torch.nn.LayerNorm)
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_std = (var + eps)?.sqrt()?.recip()?;
    centered
        .broadcast_mul(&inv_std)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// Numerically stable softmax over the last dimension. The max is detached: it cancels
/// mathematically, so it needs no gradient.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// log softmax over the last dimension.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// x_i − x_j for every pair i < j of a vector [K], in the order (0,1), (0,2), …, (K−2,K−1):
/// [K(K−1)/2]. With x in rank order (best first) these are the "winner minus loser" terms.
pub fn pairwise_differences(x: &Tensor) -> Result<Tensor> {
    let k = x.dim(0)?;
    let (mut first, mut second) = (vec![], vec![]);
    for i in 0..k {
        for j in i + 1..k {
            first.push(i as u32);
            second.push(j as u32);
        }
    }
    let n = first.len();
    let first = Tensor::from_vec(first, n, x.device())?;
    let second = Tensor::from_vec(second, n, x.device())?;
    x.index_select(&first, 0)? - x.index_select(&second, 0)?
}

/// log σ(x), finite for any x, with the exact gradient σ(−x) everywhere. The stable value
/// −relu(−x) − log(1 + e^{−|x|}) composes kinked primitives whose autograd derivatives at x = 0
/// add up to 1.5 instead of σ(0) = 0.5 — and x = 0 is exactly where DPO starts (policy = the
/// reference). So the value is computed without gradient and the derivative attached to it as
/// (x − x̄)·σ(−x̄), which is 0 in value and σ(−x) in slope.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let stable = |x: &Tensor| -> Result<Tensor> {
        let soft = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
        x.neg()?.relu()?.neg()? - soft
    };
    let value = stable(&x.detach())?;
    let slope = stable(&x.detach().neg()?)?.exp()?;
    value + (x - x.detach())?.mul(&slope)?
}

pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Silu => x.silu(),
        Activation::GeluTanh => x.gelu(),
        Activation::GeluErf => x.gelu_erf(),
        Activation::Relu => x.relu(),
    }
}

/// Rotary position embedding in the "rotate half" layout of transformers:
/// x·cos + rotate_half(x)·sin with rotate_half([a, b]) = [−b, a].
/// `x`: [B, H, T, hd]; `cos`, `sin`: [B, 1, T, hd].
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let a = x.narrow(D::Minus1, 0, half)?;
    let b = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&b.neg()?, &a], D::Minus1)?;
    x.broadcast_mul(cos)?.add(&rotated.broadcast_mul(sin)?)
}

/// cos and sin tables [B, 1, T, hd] for per-row position ids [B, T].
pub fn rope_tables(inv_freq: &[f32], position_ids: &[Vec<u32>]) -> Result<(Tensor, Tensor)> {
    let b = position_ids.len();
    let t = position_ids.first().map_or(0, |r| r.len());
    let half = inv_freq.len();
    let hd = 2 * half;
    let mut cos = Vec::with_capacity(b * t * hd);
    let mut sin = Vec::with_capacity(b * t * hd);
    for row in position_ids {
        for &p in row {
            // transformers multiplies in f32; do the same so long positions round alike.
            let angles: Vec<f32> = inv_freq.iter().map(|&f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
    }
    let dev = &candle_core::Device::Cpu;
    Ok((
        Tensor::from_vec(cos, (b, 1, t, hd), dev)?,
        Tensor::from_vec(sin, (b, 1, t, hd), dev)?,
    ))
}

/// Causal self-attention with an additive bias (padding, causality, windows) for grouped-query heads.
/// `q`: [B, H, T, hd], `k`, `v`: [B, KV, S, hd], `bias`: [B, 1, T, S]. Returns [B, T, H·hd].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let (_, kv, s, _) = k.dims4()?;
    let group = h / kv;
    // Heads that share a kv head are stacked along the query axis: no copy of k or v.
    let q = q.contiguous()?.reshape((b, kv, group * t, hd))?;
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let mut scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    if let Some(c) = softcap {
        scores = ((scores / c)?.tanh()? * c)?;
    }
    let scores = scores.reshape((b, h, t, s))?.broadcast_add(bias)?;
    let probs = softmax_last(&scores)?.reshape((b, kv, group * t, s))?;
    let out = probs.matmul(&v)?.reshape((b, h, t, hd))?;
    out.transpose(1, 2)?.reshape((b, t, h * hd))
}

/// Additive attention bias [B, 1, T, S] from a key mask over all S positions (past and current) of
/// each row; the T queries are the last T positions. A query sees a key when the key is real, not in
/// its future, and (with a window) fewer than `window` positions back.
pub fn attention_bias(key_mask: &[Vec<u8>], q_len: usize, window: Option<usize>) -> Result<Tensor> {
    const MASKED: f32 = -1e30;
    let b = key_mask.len();
    let s = key_mask.first().map_or(0, |r| r.len());
    let mut bias = vec![0f32; b * q_len * s];
    for (row, keys) in key_mask.iter().enumerate() {
        for i in 0..q_len {
            let abs_q = s - q_len + i;
            let out = &mut bias[(row * q_len + i) * s..(row * q_len + i + 1) * s];
            for (j, (o, &k)) in out.iter_mut().zip(keys.iter()).enumerate() {
                // A padding query sees at least itself, so no row is fully masked: its (unused)
                // output stays well defined and its gradient exact.
                let visible =
                    (k != 0 && j <= abs_q && window.is_none_or(|w| abs_q - j < w)) || j == abs_q;
                if !visible {
                    *o = MASKED;
                }
            }
        }
    }
    Tensor::from_vec(bias, (b, 1, q_len, s), &candle_core::Device::Cpu)
}

/// Position ids as transformers' `generate` derives them from a left-padded mask: the running count
/// of real tokens minus one, and 1 on padding.
pub fn position_ids_from_mask(mask: &[Vec<u8>]) -> Vec<Vec<u32>> {
    mask.iter()
        .map(|row| {
            let mut seen = 0u32;
            row.iter()
                .map(|&m| {
                    if m != 0 {
                        seen += 1;
                        seen - 1
                    } else {
                        1
                    }
                })
                .collect()
        })
        .collect()
}

/// log p(target) per position: logits [B, T, V], targets [B, T] (u32) → [B, T].
pub fn gather_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last(&logits.to_dtype(DType::F32)?)?;
    logp.contiguous()?
        .gather(&targets.contiguous()?.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)
}

/// Attention bias [B, 1, T, T] for packed rows: `segments[b][t]` numbers the example token t belongs
/// to (0 for padding). A query sees earlier keys of its own example only (and itself).
pub fn segment_attention_bias(segments: &[Vec<u32>], window: Option<usize>) -> Result<Tensor> {
    const MASKED: f32 = -1e30;
    let b = segments.len();
    let t = segments.first().map_or(0, |r| r.len());
    let mut bias = vec![MASKED; b * t * t];
    for (row, seg) in segments.iter().enumerate() {
        for i in 0..t {
            let out = &mut bias[(row * t + i) * t..(row * t + i + 1) * t];
            out[i] = 0.0;
            if seg[i] == 0 {
                continue;
            }
            let lo = window.map_or(0, |w| (i + 1).saturating_sub(w));
            for j in lo..i {
                if seg[j] == seg[i] {
                    out[j] = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(bias, (b, 1, t, t), &candle_core::Device::Cpu)
}

/// Position ids that restart at 0 for every packed example (padding gets 0).
pub fn segment_position_ids(segments: &[Vec<u32>]) -> Vec<Vec<u32>> {
    segments
        .iter()
        .map(|seg| {
            let mut pos = 0u32;
            let mut prev = 0u32;
            seg.iter()
                .map(|&s| {
                    if s != prev {
                        pos = 0;
                        prev = s;
                    }
                    let p = if s == 0 { 0 } else { pos };
                    pos += 1;
                    p
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and gradients against torch.nn.functional.logsigmoid's (hand values: log σ(x) and
    /// σ(−x)), at 0 too, where a composition of relu and abs gets the slope wrong.
    #[test]
    fn log_sigmoid_is_stable_with_the_exact_slope_at_zero() {
        let x = Var::from_vec(vec![-100f32, -1.0, 0.0, 1.0, 100.0], 5, &Device::Cpu).unwrap();
        let y = log_sigmoid(x.as_tensor()).unwrap();
        let values = y.to_vec1::<f32>().unwrap();
        let want = [
            -100.0f32,
            -1.3132617,
            -std::f32::consts::LN_2,
            -0.3132617,
            0.0,
        ];
        for (a, b) in values.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{values:?}");
        }
        let g = y.sum_all().unwrap().backward().unwrap();
        let slope = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let want = [1.0f32, 0.7310586, 0.5, 0.26894143, 0.0];
        for (a, b) in slope.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{slope:?}");
        }
    }
}
