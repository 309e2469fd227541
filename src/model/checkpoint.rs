//! Activation (gradient) checkpointing per transformer block: the forward pass keeps only each
//! block's input; the backward pass runs the block again, with a graph, and backpropagates
//! through that. Exact: the recomputation repeats the same operations on the same values (and
//! draws the same LoRA dropout masks), so the gradients are those of the plain graph.
//!
//! A block is one custom op on its input, so the outer graph sees x → y only. Its backward
//! returns ∂L/∂x to autograd; the gradients of the block's own parameters, which autograd cannot
//! see, are kept on the side and merged into the gradient store by [`backward`].

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, Var};
use std::cell::RefCell;
use std::sync::Arc;

use super::linear::Pass;
use crate::ops::kernel::{contiguous, with_contiguous};

/// One block's forward pass: input [B, T, D] → output [B, T, D].
pub type BlockFn = Arc<dyn Fn(&Tensor, &Pass) -> Result<Tensor> + Send + Sync>;

thread_local! {
    /// Parameter gradients found by the backward passes of checkpointed blocks on this thread
    /// (candle runs a backward pass on the calling thread).
    static SIDE: RefCell<Vec<(Tensor, Tensor)>> = const { RefCell::new(Vec::new()) };
}

thread_local! {
    static RECOMPUTED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Blocks recomputed by backward passes on this thread so far (for tests and logs).
pub fn recomputed_blocks() -> usize {
    RECOMPUTED.with(|n| n.get())
}

struct Checkpointed {
    block: BlockFn,
    /// The pass of the forward run; its dropout is a replica of the model's counter, started
    /// where the block starts.
    pass: Pass,
    /// That starting position, for the recomputation to draw the same masks.
    dropout_start: u64,
    /// The block's trainable tensors.
    params: Vec<Tensor>,
}

impl CustomOp1 for Checkpointed {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout, self.name())?;
        let x = Tensor::from_slice(x, layout.shape(), &candle_core::Device::Cpu)?;
        // The graph this builds (through the parameters) is dropped with `y`: only the output
        // values are kept.
        let y = (self.block)(&x, &self.pass)?;
        let out = with_contiguous(&y, self.name(), |v| Ok(v.to_vec()))?;
        Ok((CpuStorage::F32(out), y.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let xv = Var::from_tensor(&x.detach())?;
        let mut pass = self.pass.clone();
        pass.dropout = pass.dropout.map(|d| d.replica_at(self.dropout_start));
        let y = (self.block)(xv.as_tensor(), &pass)?;
        let grads = (y * dy.detach())?.sum_all()?.backward()?;
        RECOMPUTED.with(|n| n.set(n.get() + 1));
        SIDE.with(|side| {
            let mut side = side.borrow_mut();
            for p in &self.params {
                if let Some(g) = grads.get(p) {
                    side.push((p.clone(), g.clone()));
                }
            }
        });
        Ok(grads.get(xv.as_tensor()).cloned())
    }
}

/// Runs `block` on x as one checkpointed op; `params` are the block's tensors (those that are
/// variables get gradients). Advances the pass's dropout counter as running the block would.
pub fn run(x: &Tensor, block: BlockFn, pass: &Pass, params: Vec<Tensor>) -> Result<Tensor> {
    let params: Vec<Tensor> = params.into_iter().filter(|t| t.is_variable()).collect();
    let dropout_start = pass.dropout.as_ref().map_or(0, |d| d.position());
    let mut inner = pass.clone();
    inner.checkpoint = false;
    inner.dropout = pass.dropout.as_ref().map(|d| d.replica_at(dropout_start));
    let forward_dropout = inner.dropout.clone();
    let op = Checkpointed {
        block,
        pass: inner,
        dropout_start,
        params,
    };
    // An input that takes no gradient (a LoRA run's frozen embedding) would leave the op out
    // of the graph: give it one (its own gradient is computed and dropped).
    let x = if x.track_op() {
        x.contiguous()?
    } else {
        Var::from_tensor(&x.contiguous()?)?.as_tensor().clone()
    };
    let y = x.apply_op1(op)?;
    // The shared counter moves on as if the block had run on it.
    if let (Some(d), Some(f)) = (&pass.dropout, forward_dropout) {
        d.set_position(f.position());
    }
    Ok(y)
}

/// `loss.backward()` plus the parameter gradients that checkpointed blocks found on the side.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    SIDE.with(|s| s.borrow_mut().clear());
    let mut grads = loss.backward()?;
    let side = SIDE.with(|s| std::mem::take(&mut *s.borrow_mut()));
    for (p, g) in side {
        let sum = match grads.get(&p) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        grads.insert(&p, sum);
    }
    Ok(grads)
}
