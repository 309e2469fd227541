//! What the fused CPU kernels share: borrowing a tensor's f32 storage, a strided single-threaded
//! GEMM (the kernels parallelise over rows or heads themselves), and a pointer that rayon tasks
//! may share when each writes its own disjoint part of one output.

use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor};

/// The f32 elements of a contiguous layout.
pub(crate) fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{op}: expects f32 tensors")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: expects contiguous tensors")
    };
    Ok(&v[a..b])
}

/// Runs `f` on a CPU f32 tensor's whole storage and its layout (offset and strides), without a copy.
pub(crate) fn with_storage<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32], &Layout) -> Result<R>,
) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(v)) = &*s else {
        bail!("{op}: expects f32 tensors on the CPU")
    };
    f(v, l)
}

/// Runs `f` on the elements of a contiguous CPU f32 tensor.
pub(crate) fn with_contiguous<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32]) -> Result<R>,
) -> Result<R> {
    let t = t.contiguous()?;
    with_storage(&t, op, |v, l| f(contiguous_slice(v, l)))
}

fn contiguous_slice<'a>(v: &'a [f32], l: &Layout) -> &'a [f32] {
    let (a, b) = l.contiguous_offsets().expect("made contiguous");
    &v[a..b]
}

/// A matrix inside a buffer: element (i, j) is at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

/// dst[m, n] = (dst if `accumulate` else 0) + alpha · a[m, k] · b[k, n], on the calling thread.
///
/// # Safety
/// Every matrix must lie inside a live allocation for the given extents and strides, and `dst`
/// must not be written by anyone else during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    alpha: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n).fill(0.0);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.ptr,
        a.cs as isize,
        a.rs as isize,
        b.ptr,
        b.cs as isize,
        b.rs as isize,
        1.0,
        alpha,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// A raw pointer that rayon tasks share; each task writes a region no other task touches.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub *mut f32);
// SAFETY: only used for disjoint writes, as documented at each use.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The element `i` places past the pointer (a method, so closures capture the whole wrapper).
    ///
    /// # Safety
    /// `i` must be inside the allocation.
    pub unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

/// Read-only pointers into tensors that outlive the parallel section.
#[derive(Clone, Copy)]
pub(crate) struct SharedConst(pub *const f32);
// SAFETY: read-only.
unsafe impl Send for SharedConst {}
unsafe impl Sync for SharedConst {}

impl SharedConst {
    /// See [`SharedMut::at`].
    ///
    /// # Safety
    /// `i` must be inside the allocation.
    pub unsafe fn at(self, i: usize) -> *const f32 {
        self.0.add(i)
    }
}

/// Row-parallel loop over `rows` rows of width `width`: `f(first_row, chunk_of_out)` on chunks
/// of whole rows, sized to give each thread a few chunks.
pub(crate) fn rows_chunk(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    rows.div_ceil(threads * 4).max(1)
}
