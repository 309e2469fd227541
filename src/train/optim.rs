//! AdamW (decoupled weight decay, bias correction), updating parameters in place, with the
//! gradients accumulated in plain f32 buffers so that gradient accumulation and global-norm
//! clipping need no extra tensors.

use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

/// The sum of one optimizer step's micro-batch gradients, one buffer per parameter, added in a
/// fixed binary tree over the micro-batches' order: node [a, b) is [a, m) + [m, b) with
/// m = a + (b − a)/2. Pairwise summation is more accurate than a running sum, and it is what makes
/// data parallelism exact: rank r of N holds micro-batches [r·k, (r+1)·k) of N·k, its local sum
/// is a subtree, and the ranks' sums meet in the same tree (`dist::World::sum_exact`). It holds
/// ⌈log₂ k⌉ buffers while k micro-batches arrive (one for k ≤ 2).
pub struct GradBuffers {
    /// The step's sum once every micro-batch is in (what clipping and AdamW read).
    pub bufs: Vec<Vec<f32>>,
    sizes: Vec<usize>,
    leaves: usize,
    arrived: usize,
    /// Partial sums waiting for their sibling: the micro-batches they cover, and the buffers.
    pending: Vec<(Range<usize>, Vec<Vec<f32>>)>,
    spare: Vec<Vec<Vec<f32>>>,
}

impl GradBuffers {
    pub fn new(params: &[(String, Var)]) -> Self {
        let sizes: Vec<usize> = params.iter().map(|(_, v)| v.elem_count()).collect();
        GradBuffers {
            bufs: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            sizes,
            leaves: 0,
            arrived: 0,
            pending: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// Starts a step of `leaves` micro-batches (on this rank).
    pub fn start(&mut self, leaves: usize) {
        self.discard();
        self.leaves = leaves;
    }

    /// Drops the partial sums (their memory is kept for the next step).
    pub fn discard(&mut self) {
        for (_, b) in self.pending.drain(..) {
            self.spare.push(b);
        }
        if !self.bufs.is_empty() {
            self.spare.push(std::mem::take(&mut self.bufs));
        }
        self.arrived = 0;
    }

    fn zeroed(&mut self) -> Vec<Vec<f32>> {
        match self.spare.pop() {
            Some(mut b) => {
                for x in &mut b {
                    x.fill(0.0);
                }
                b
            }
            None => self.sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// Whether [a, b) is a node of the step's tree and splits at m.
    fn splits(&self, a: usize, b: usize, m: usize) -> bool {
        let (mut lo, mut hi) = (0, self.leaves);
        loop {
            let mid = lo + (hi - lo) / 2;
            if (lo, hi) == (a, b) {
                return mid == m;
            }
            if hi - lo < 2 {
                return false;
            }
            if b <= mid {
                hi = mid;
            } else if a >= mid {
                lo = mid;
            } else {
                return false;
            }
        }
    }

    /// Adds the next micro-batch's gradients. A parameter the loss did not reach adds nothing.
    pub fn add(&mut self, params: &[(String, Var)], grads: &GradStore) -> Result<()> {
        let i = self.arrived;
        if i >= self.leaves {
            bail!(
                "more micro-batches than the {} the step was started with",
                self.leaves
            );
        }
        // The right sibling of the newest partial sum is added into it; anything else waits.
        let joins = matches!(self.pending.last(), Some((r, _)) if r.end == i && self.splits(r.start, i + 1, i));
        if !joins {
            let b = self.zeroed();
            self.pending.push((i..i, b));
        }
        let (range, bufs) = self.pending.last_mut().expect("a partial sum");
        for ((_, var), buf) in params.iter().zip(bufs.iter_mut()) {
            if let Some(g) = grads.get(var.as_tensor()) {
                let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
                for (b, x) in buf.iter_mut().zip(g) {
                    *b += x;
                }
            }
        }
        range.end = i + 1;
        while self.pending.len() >= 2 {
            let n = self.pending.len();
            let (a, m, b) = (
                self.pending[n - 2].0.start,
                self.pending[n - 1].0.start,
                self.pending[n - 1].0.end,
            );
            if self.pending[n - 2].0.end != m || !self.splits(a, b, m) {
                break;
            }
            let (_, right) = self.pending.pop().expect("two partial sums");
            let (range, left) = self.pending.last_mut().expect("two partial sums");
            for (l, r) in left.iter_mut().zip(&right) {
                for (x, y) in l.iter_mut().zip(r) {
                    *x += y;
                }
            }
            range.end = b;
            self.spare.push(right);
        }
        self.arrived += 1;
        if self.arrived == self.leaves {
            let (_, root) = self.pending.pop().expect("the whole step's sum");
            self.bufs = root;
        }
        Ok(())
    }

    /// The step's sum in `bufs`: zeros when this rank had no micro-batch (or the step was lost).
    pub fn finish(&mut self) {
        if self.arrived < self.leaves || self.leaves == 0 {
            self.discard();
            self.bufs = self.zeroed();
        }
    }

    /// Global L2 norm over all parameters (f64 accumulation).
    pub fn global_norm(&self) -> f64 {
        self.bufs
            .iter()
            .flat_map(|b| b.iter())
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt()
    }
}

#[derive(Clone, Debug)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Number of updates taken so far (for bias correction).
    pub step: u64,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    decay: Vec<bool>,
}

/// One in-place AdamW update of a parameter tensor given its gradient (the op's second input is
/// only there to satisfy the in-place API; the gradient comes from the buffer).
struct AdamWUpdate<'a> {
    grad: &'a [f32],
    state: Mutex<(&'a mut [f32], &'a mut [f32])>,
    rule: Rule,
    nonfinite: &'a Mutex<bool>,
}

/// The numbers of one AdamW update (f32, as the kernel computes).
#[derive(Clone, Copy)]
struct Rule {
    lr: f32,
    scale: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    decay: f32,
    bc1: f32,
    bc2: f32,
}

crate::widest_fn! {
    /// p ← p − lr·(m̂/(√v̂ + ε) + λ·p) over one chunk, with the moments updated in place.
    fn adamw_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], r: Rule) {
        let (b1, b2) = (r.beta1, r.beta2);
        for i in 0..p.len() {
            let g = g[i] * r.scale;
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let m_hat = m[i] / r.bc1;
            let v_hat = v[i] / r.bc2;
            p[i] -= r.lr * (m_hat / (v_hat.sqrt() + r.eps) + r.decay * p[i]);
        }
    }
}

impl InplaceOp2 for AdamWUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s: &mut CpuStorage,
        l: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("AdamW expects f32 parameters");
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("AdamW expects contiguous parameters");
        };
        let p = &mut data[start..end];
        let mut state = self.state.lock().unwrap();
        let (m, v) = &mut *state;
        // Element-wise and independent: split into chunks across threads.
        const CHUNK: usize = 1 << 16;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(self.grad.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| adamw_chunk(p, m, v, g, self.rule));
        if p.iter().any(|x| !x.is_finite()) {
            *self.nonfinite.lock().unwrap() = true;
        }
        Ok(())
    }
}

impl AdamW {
    /// Weight decay applies to matrices (embeddings and projections), not to norms and biases.
    pub fn new(params: &[(String, Var)], cfg: AdamWConfig) -> Self {
        AdamW {
            cfg,
            step: 0,
            m: params
                .iter()
                .map(|(_, v)| vec![0.0; v.elem_count()])
                .collect(),
            v: params
                .iter()
                .map(|(_, v)| vec![0.0; v.elem_count()])
                .collect(),
            decay: params.iter().map(|(_, v)| v.rank() >= 2).collect(),
        }
    }

    /// Applies one update with learning rate `lr`; gradients are multiplied by `grad_scale`
    /// (the clipping factor). Returns the names of parameters that became non-finite.
    pub fn update(
        &mut self,
        params: &[(String, Var)],
        grads: &GradBuffers,
        lr: f64,
        grad_scale: f64,
    ) -> Result<Vec<String>> {
        let mut poisoned = Vec::new();
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.cfg.beta1.powi(t);
        let bc2 = 1.0 - self.cfg.beta2.powi(t);
        let dummy = Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu)?;
        for (i, (name, var)) in params.iter().enumerate() {
            let nonfinite = Mutex::new(false);
            let op = AdamWUpdate {
                grad: &grads.bufs[i],
                state: Mutex::new((&mut self.m[i][..], &mut self.v[i][..])),
                rule: Rule {
                    lr: lr as f32,
                    scale: grad_scale as f32,
                    beta1: self.cfg.beta1 as f32,
                    beta2: self.cfg.beta2 as f32,
                    eps: self.cfg.eps as f32,
                    decay: if self.decay[i] {
                        self.cfg.weight_decay as f32
                    } else {
                        0.0
                    },
                    bc1: bc1 as f32,
                    bc2: bc2 as f32,
                },
                nonfinite: &nonfinite,
            };
            var.as_tensor().inplace_op2(&dummy, &op)?;
            if *nonfinite.lock().unwrap() {
                poisoned.push(name.clone());
            }
        }
        Ok(poisoned)
    }

    /// Every moment buffer (m then v of each parameter), for the ranks to share.
    pub fn moments_mut(&mut self) -> impl Iterator<Item = &mut Vec<f32>> {
        self.m.iter_mut().chain(self.v.iter_mut())
    }

    /// Moment tensors by parameter name, for checkpoints.
    pub fn state_tensors(&self, params: &[(String, Var)]) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * params.len());
        for (i, (name, var)) in params.iter().enumerate() {
            let shape = var.shape().clone();
            out.push((
                format!("m.{name}"),
                Tensor::from_slice(&self.m[i], shape.clone(), &candle_core::Device::Cpu)?,
            ));
            out.push((
                format!("v.{name}"),
                Tensor::from_slice(&self.v[i], shape, &candle_core::Device::Cpu)?,
            ));
        }
        Ok(out)
    }

    pub fn load_state(
        &mut self,
        params: &[(String, Var)],
        tensors: &HashMap<String, Tensor>,
        step: u64,
    ) -> Result<()> {
        for (i, (name, _)) in params.iter().enumerate() {
            for (prefix, dst) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{prefix}.{name}");
                let Some(t) = tensors.get(&key) else {
                    bail!("optimizer state lacks `{key}`")
                };
                let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
                if data.len() != dst.len() {
                    bail!(
                        "optimizer state `{key}` has {} values, expected {}",
                        data.len(),
                        dst.len()
                    );
                }
                dst.copy_from_slice(&data);
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Six micro-batches are summed as (g0 + (g1 + g2)) + (g3 + (g4 + g5)): each half is what a
    /// rank holding three of them sums, so two ranks meet in the same tree.
    #[test]
    fn micro_batch_gradients_add_up_in_the_midpoint_tree() {
        let dev = Device::Cpu;
        let params = vec![(
            "w".to_string(),
            Var::from_vec(vec![0f32; 2], 2, &dev).unwrap(),
        )];
        let big = [1e8, 1.0, 1.0, -1e8, 1.0, 1.0];
        let g: Vec<[f32; 2]> = (0..6).map(|i| [big[i], 3.3e-3 * i as f32 - 7.0]).collect();
        let mut grads = GradBuffers::new(&params);
        grads.start(6);
        for gi in &g {
            let c = Tensor::from_slice(gi, 2, &dev).unwrap();
            let loss = (params[0].1.as_tensor() * c).unwrap().sum_all().unwrap();
            grads.add(&params, &loss.backward().unwrap()).unwrap();
        }
        grads.finish();
        let sum3 = |a: usize, e: usize| g[a][e] + (g[a + 1][e] + g[a + 2][e]);
        for e in 0..2 {
            let want = sum3(0, e) + sum3(3, e);
            assert_eq!(grads.bufs[0][e].to_bits(), want.to_bits(), "element {e}");
        }
        let running: f32 = (0..6).map(|i| g[i][0]).sum();
        assert_ne!(
            running,
            sum3(0, 0) + sum3(3, 0),
            "the order should matter for these values"
        );
        // A seventh micro-batch is refused.
        let loss = params[0].1.as_tensor().sum_all().unwrap();
        assert!(grads.add(&params, &loss.backward().unwrap()).is_err());
    }

    /// Two AdamW updates against values computed by hand (Python floats, torch.optim.AdamW's
    /// rule: p ← p·(1 − lr·λ) − lr·m̂/(√v̂ + ε)), the second with a clipping factor of 0.5.
    #[test]
    fn adamw_matches_hand_computed_updates() {
        let dev = Device::Cpu;
        let params = vec![
            (
                "matrix".to_string(),
                Var::from_vec(vec![0.5f32, -1.0, 2.0], (1, 3), &dev).unwrap(),
            ),
            (
                "bias".to_string(),
                Var::from_vec(vec![0.5f32, -1.0, 2.0], 3, &dev).unwrap(),
            ),
        ];
        let mut opt = AdamW::new(
            &params,
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
            },
        );
        let mut grads = GradBuffers::new(&params);
        let steps = [([0.1f32, -0.2, 0.3], 1.0), ([-0.4, 0.05, 0.0], 0.5)];
        let want_matrix = [
            [0.4895000009999999, -0.9890000004999999, 1.9880000003333334],
            [0.49267153603784886, -0.9822856551440283, 1.9793114181075822],
        ];
        for (t, (g, scale)) in steps.iter().enumerate() {
            for b in &mut grads.bufs {
                b.copy_from_slice(g);
            }
            assert!(opt
                .update(&params, &grads, 0.01, *scale)
                .unwrap()
                .is_empty());
            let got: Vec<f32> = params[0].1.flatten_all().unwrap().to_vec1().unwrap();
            for (a, w) in got.iter().zip(want_matrix[t]) {
                assert!((*a as f64 - w).abs() < 2e-6, "step {}: {got:?}", t + 1);
            }
        }
        assert_eq!(opt.step, 2);
        // Vectors (norms, biases) are not decayed: the same rule with λ = 0.
        let bias: Vec<f32> = params[1].1.to_vec1().unwrap();
        let want_bias = [0.49366103603884887, -0.9842746551445283, 1.9832994181079155];
        for (a, w) in bias.iter().zip(want_bias) {
            assert!((*a as f64 - w).abs() < 2e-6, "{bias:?}");
        }
    }
}
