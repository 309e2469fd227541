//! Data parallelism across processes (DESIGN.md §2): `mpirun -np N rlhf …` runs N ranks that each
//! compute their share of every global batch; the optimizer step sums the gradients with one
//! all-reduce, then clips and runs AdamW identically everywhere. MPI is the engine, behind the
//! `mpi` cargo feature; without it (or outside `mpirun`) the world is one rank and every
//! collective here returns at once.
//!
//! Exactness: gradients are summed across ranks in a fixed binary tree over rank order
//! ([`World::sum_exact`]), the same tree the optimizer uses over a step's micro-batches, so for a
//! power-of-two N, N ranks × k micro-batches give the bits of 1 process × N·k micro-batches.

#[cfg(feature = "mpi")]
mod mpi;

/// A build without MPI: the world has one rank, so no collective ever reaches these.
#[cfg(not(feature = "mpi"))]
mod mpi {
    const NONE: &str = "several ranks in a build without MPI";
    pub struct WorldLink;
    impl super::Link for WorldLink {
        fn exchange(&self, _: usize, _: &[f32], _: &mut [f32]) {
            unreachable!("{NONE}")
        }
        fn send(&self, _: usize, _: &[f32]) {
            unreachable!("{NONE}")
        }
        fn receive(&self, _: usize, _: &mut [f32]) {
            unreachable!("{NONE}")
        }
    }
    pub fn finalize() {}
    pub fn abort(_: i32) {}
    pub fn sum_f64(_: &mut [f64]) {
        unreachable!("{NONE}")
    }
    pub fn all_gather_bytes(_: &[u8], _: usize) -> Vec<Vec<u8>> {
        unreachable!("{NONE}")
    }
    pub fn broadcast_bytes(_: Vec<u8>, _: usize) -> Vec<u8> {
        unreachable!("{NONE}")
    }
    pub fn broadcast_f32(_: &mut [f32]) {
        unreachable!("{NONE}")
    }
}

use anyhow::{bail, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::ops::Range;
use std::sync::OnceLock;

/// This process's place among the ranks of the run.
pub struct World {
    rank: usize,
    size: usize,
}

static WORLD: OnceLock<World> = OnceLock::new();

/// Environment variables that launchers (Open MPI, MPICH/Hydra, PMIx, Slurm) set for a rank.
const LAUNCHER_SIZE_VARS: &[&str] = &["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"];

/// How many ranks a launcher says this process is one of (1 when not launched by one).
fn launched_size() -> usize {
    LAUNCHER_SIZE_VARS
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(1)
}

/// How many ranks of the run share this machine, as the launcher says (1 when it does not).
pub fn local_ranks() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "SLURM_NTASKS_PER_NODE",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(1)
    .max(1)
}

/// Threads for a rank that was not told: the cores it is bound to (`mpirun --bind-to core`), or,
/// unbound, the machine's cores divided among the ranks on it.
pub fn threads_per_rank() -> usize {
    let usable = std::thread::available_parallelism().map_or(1, |n| n.get());
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| count_cpus(s.trim()))
        .unwrap_or(usable);
    if usable < online {
        usable
    } else {
        (usable / local_ranks()).max(1)
    }
}

/// The number of CPUs in a list such as `0-3,6,8-9`.
fn count_cpus(list: &str) -> Option<usize> {
    list.split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => Some(b.parse::<usize>().ok()? + 1 - a.parse::<usize>().ok()?),
            None => part.parse::<usize>().ok().map(|_| 1),
        })
        .sum()
}

/// Joins the run's ranks when a launcher started this process (MPI is initialised only then, so
/// the same binary runs alone without it); call once, first thing in `main`. A build without the
/// `mpi` feature under `mpirun -np N > 1` is refused: its N copies would each train alone into
/// the same output directory.
pub fn init() -> Result<&'static World> {
    let launched = launched_size();
    let world = if launched > 1 {
        #[cfg(feature = "mpi")]
        {
            mpi::init()?
        }
        #[cfg(not(feature = "mpi"))]
        bail!(
            "started as one of {launched} MPI ranks, but this rlhf was built without MPI; build it with `cargo build --release --features mpi` (needs an MPI library, e.g. Debian's libopenmpi-dev, and libclang-dev)"
        )
    } else {
        World::single()
    };
    Ok(WORLD.get_or_init(|| world))
}

/// The ranks of this run (one, until [`init`] joined an MPI world).
pub fn world() -> &'static World {
    WORLD.get_or_init(World::single)
}

/// Leaves the MPI world at the end of a successful run (nothing without one).
pub fn finalize() {
    mpi::finalize();
}

/// Ends the whole run after an error on this rank: with MPI, `MPI_Abort`, so the other ranks stop
/// at once instead of waiting in their next collective; alone, exit code 1.
pub fn fail(message: &str) -> ! {
    let w = world();
    if w.size > 1 {
        eprintln!("error: rank {} of {}: {message}", w.rank, w.size);
        mpi::abort(1);
    } else {
        eprintln!("error: {message}");
    }
    std::process::exit(1)
}

/// The pieces of a collective that move data between two ranks; the MPI world implements it, and
/// the tests simulate ranks with threads.
pub(crate) trait Link {
    /// Sends `send` to `partner` while receiving `recv.len()` values from it.
    fn exchange(&self, partner: usize, send: &[f32], recv: &mut [f32]);
    fn send(&self, to: usize, data: &[f32]);
    fn receive(&self, from: usize, into: &mut [f32]);
}

/// Values per message: MPI counts are 32-bit, and the receive scratch stays small.
const MESSAGE: usize = 1 << 24;

/// The sum over ranks of `buf`, in place on every rank, in a fixed tree: pairs of neighbouring
/// ranks first, then pairs of pairs (reduce-scatter by recursive halving, all-gather by recursive
/// doubling — the traffic of a ring all-reduce). With N a power of two the value of element i is
/// ((S₀ + S₁) + (S₂ + S₃)) + …, bit for bit, whoever computes it (addition commutes exactly). For
/// other N the ranks from the largest power of two p up are first added to rank r − p.
pub(crate) fn tree_sum(link: &impl Link, rank: usize, size: usize, buf: &mut [f32]) {
    if size <= 1 {
        return;
    }
    let p = 1 << (usize::BITS - 1 - size.leading_zeros());
    let mut scratch = vec![0f32; buf.len().min(MESSAGE)];
    if rank >= p {
        for piece in buf.chunks(MESSAGE) {
            link.send(rank - p, piece);
        }
        for piece in buf.chunks_mut(MESSAGE) {
            link.receive(rank - p, piece);
        }
        return;
    }
    if rank + p < size {
        for piece in buf.chunks_mut(MESSAGE) {
            let s = &mut scratch[..piece.len()];
            link.receive(rank + p, s);
            add(piece, s);
        }
    }
    // Reduce-scatter: at distance d the pair keeps one half each of the segment they share.
    let (mut lo, mut hi) = (0, buf.len());
    let mut segments = Vec::new();
    let mut d = 1;
    while d < p {
        let partner = rank ^ d;
        let mid = lo + (hi - lo) / 2;
        let (keep, give) = if rank & d == 0 {
            (lo..mid, mid..hi)
        } else {
            (mid..hi, lo..mid)
        };
        exchange_add(link, partner, buf, keep.clone(), give, &mut scratch);
        segments.push((lo, hi, rank & d == 0));
        (lo, hi) = (keep.start, keep.end);
        d <<= 1;
    }
    // All-gather: undo the halving, each pair swapping the halves it finished.
    while let Some((plo, phi, kept_lower)) = segments.pop() {
        d >>= 1;
        let partner = rank ^ d;
        let other = if kept_lower { hi..phi } else { plo..lo };
        exchange_copy(link, partner, buf, lo..hi, other);
        (lo, hi) = (plo, phi);
    }
    if rank + p < size {
        for piece in buf.chunks(MESSAGE) {
            link.send(rank + p, piece);
        }
    }
}

fn add(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}

/// Message j of a segment (empty once the segment is used up), so both partners agree on the
/// number of messages whatever the two lengths.
fn piece(r: &Range<usize>, j: usize) -> Range<usize> {
    let start = (r.start + j * MESSAGE).min(r.end);
    start..(start + MESSAGE).min(r.end)
}

fn messages(a: &Range<usize>, b: &Range<usize>) -> usize {
    a.len().max(b.len()).div_ceil(MESSAGE)
}

fn exchange_add(
    link: &impl Link,
    partner: usize,
    buf: &mut [f32],
    keep: Range<usize>,
    give: Range<usize>,
    scratch: &mut [f32],
) {
    for j in 0..messages(&keep, &give) {
        let (k, g) = (piece(&keep, j), piece(&give, j));
        let s = &mut scratch[..k.len()];
        link.exchange(partner, &buf[g], s);
        add(&mut buf[k], s);
    }
}

fn exchange_copy(
    link: &impl Link,
    partner: usize,
    buf: &mut [f32],
    mine: Range<usize>,
    theirs: Range<usize>,
) {
    for j in 0..messages(&mine, &theirs) {
        let (m, t) = (piece(&mine, j), piece(&theirs, j));
        // The two ranges do not overlap: split the buffer between them.
        let (send, recv) = if m.end <= t.start {
            let (a, b) = buf.split_at_mut(t.start);
            (&a[m.clone()], &mut b[..t.len()])
        } else {
            let (a, b) = buf.split_at_mut(m.start);
            (&b[..m.len()], &mut a[t.clone()])
        };
        link.exchange(partner, send, recv);
    }
}

impl World {
    fn single() -> World {
        World { rank: 0, size: 1 }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Rank 0: the one that writes metrics, checkpoints and the final model.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// This rank's contiguous share of `n` items (the first `n mod N` ranks get one more).
    pub fn share(&self, n: usize) -> Range<usize> {
        n * self.rank / self.size..n * (self.rank + 1) / self.size
    }

    /// The sum over ranks of `buf`, in place, bit-identical on every rank (see [`tree_sum`]).
    pub fn sum_exact(&self, buf: &mut [f32]) {
        tree_sum(&mpi::WorldLink, self.rank, self.size, buf);
    }

    /// Sums of small values (metrics, counts) over ranks, in place.
    pub fn sum_f64(&self, xs: &mut [f64]) {
        if self.size > 1 {
            mpi::sum_f64(xs);
        }
    }

    /// Whether any rank says `flag`.
    pub fn any(&self, flag: bool) -> bool {
        let mut x = [f64::from(u8::from(flag))];
        self.sum_f64(&mut x);
        x[0] > 0.0
    }

    /// Every rank's `mine`, in rank order.
    pub fn all_gather_bytes(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        if self.size == 1 {
            return vec![mine.to_vec()];
        }
        mpi::all_gather_bytes(mine, self.size)
    }

    /// Rank 0's `data` on every rank (the others' argument is ignored).
    pub fn broadcast_bytes(&self, data: Vec<u8>) -> Vec<u8> {
        if self.size == 1 {
            return data;
        }
        mpi::broadcast_bytes(data, self.rank)
    }

    /// Every rank's `mine` concatenated in rank order: with `mine` computed from this rank's
    /// [`share`](Self::share) of some items, the result for all of them.
    pub fn concat_shares<T: Serialize + DeserializeOwned>(&self, mine: Vec<T>) -> Result<Vec<T>> {
        if self.size == 1 {
            return Ok(mine);
        }
        let mut all = Vec::new();
        for bytes in self.all_gather_bytes(&serde_json::to_vec(&mine)?) {
            all.extend(serde_json::from_slice::<Vec<T>>(&bytes)?);
        }
        Ok(all)
    }

    /// Rank 0's `value` on every rank.
    pub fn broadcast_json<T: Serialize + DeserializeOwned>(&self, value: T) -> Result<T> {
        if self.size == 1 {
            return Ok(value);
        }
        let bytes = self.broadcast_bytes(serde_json::to_vec(&value)?);
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Rank 0's values of `buf` on every rank.
    pub fn broadcast_f32(&self, buf: &mut [f32]) {
        if self.size > 1 {
            for piece in buf.chunks_mut(MESSAGE) {
                mpi::broadcast_f32(piece);
            }
        }
    }

    /// Rank 0's values of an f32 tensor on every rank (weights, moments, an EMA).
    pub fn broadcast_tensor(&self, t: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        if self.size == 1 {
            return Ok(t.clone());
        }
        let mut values: Vec<f32> = t.flatten_all()?.to_vec1()?;
        self.broadcast_f32(&mut values);
        Ok(candle_core::Tensor::from_vec(
            values,
            t.shape(),
            t.device(),
        )?)
    }

    /// Refuses to go on unless every rank has the same `value` of `what` (e.g. the digest of its
    /// settings and data), naming the ranks that differ from rank 0.
    pub fn agree(&self, what: &str, value: &str) -> Result<()> {
        let all = self.all_gather_bytes(value.as_bytes());
        let differ: Vec<String> = all
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != all[0])
            .map(|(r, _)| r.to_string())
            .collect();
        if !differ.is_empty() {
            bail!(
                "rank(s) {} have a different {what} from rank 0 (different data, model or settings on that machine?); refusing to train",
                differ.join(", ")
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::sync::Mutex;

    /// Ranks as threads: one channel per ordered pair of ranks.
    struct Threads {
        rank: usize,
        to: Vec<Sender<Vec<f32>>>,
        from: Vec<Mutex<Receiver<Vec<f32>>>>,
    }

    impl Link for Threads {
        fn exchange(&self, partner: usize, send: &[f32], recv: &mut [f32]) {
            self.send(partner, send);
            self.receive(partner, recv);
        }
        fn send(&self, to: usize, data: &[f32]) {
            self.to[to].send(data.to_vec()).unwrap();
        }
        fn receive(&self, from: usize, into: &mut [f32]) {
            let got = self.from[from].lock().unwrap().recv().unwrap();
            assert_eq!(got.len(), into.len(), "rank {} from {from}", self.rank);
            into.copy_from_slice(&got);
        }
    }

    fn run(inputs: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
        let n = inputs.len();
        let mut senders: Vec<Vec<Option<Sender<Vec<f32>>>>> = (0..n).map(|_| vec![]).collect();
        let mut receivers: Vec<Vec<Option<Receiver<Vec<f32>>>>> = (0..n).map(|_| vec![]).collect();
        for row in senders.iter_mut() {
            for to in receivers.iter_mut() {
                let (s, r) = channel();
                row.push(Some(s));
                to.push(Some(r));
            }
        }
        // senders[a][b] sends a → b; receivers[b][a] receives it.
        let links: Vec<Threads> = (0..n)
            .map(|r| Threads {
                rank: r,
                to: (0..n).map(|b| senders[r][b].take().unwrap()).collect(),
                from: (0..n)
                    .map(|a| Mutex::new(receivers[r][a].take().unwrap()))
                    .collect(),
            })
            .collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = links
                .into_iter()
                .zip(inputs)
                .map(|(link, mut buf)| {
                    s.spawn(move || {
                        tree_sum(&link, link.rank, n, &mut buf);
                        buf
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Values whose sums round differently in different orders.
    fn inputs(n: usize, len: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|r| {
                (0..len)
                    .map(|i| ((r * 7919 + i * 104729) % 1000) as f32 * 1.1e-3 + (r as f32) * 1e4)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn the_tree_sum_is_pairs_of_neighbours_bit_for_bit_on_every_rank() {
        for len in [1, 2, 5, 33] {
            let x = inputs(4, len);
            let want: Vec<f32> = (0..len)
                .map(|i| (x[0][i] + x[1][i]) + (x[2][i] + x[3][i]))
                .collect();
            let sequential: Vec<f32> = (0..len)
                .map(|i| ((x[0][i] + x[1][i]) + x[2][i]) + x[3][i])
                .collect();
            for out in run(x.clone()) {
                assert_eq!(
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "len {len}"
                );
            }
            // The order matters for these values, so the test could fail.
            if len == 33 {
                assert_ne!(want, sequential);
            }
        }
        // Three ranks: rank 2 folds into rank 0 first.
        let x = inputs(3, 9);
        let want: Vec<f32> = (0..9).map(|i| (x[0][i] + x[2][i]) + x[1][i]).collect();
        for out in run(x) {
            assert_eq!(out, want);
        }
    }

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(count_cpus("0-3,6,8-9"), Some(7));
        assert_eq!(count_cpus("0"), Some(1));
        assert_eq!(count_cpus("x"), None);
    }

    #[test]
    fn shares_cover_the_items_in_order() {
        for n in [0, 1, 5, 8] {
            let mut next = 0;
            for rank in 0..3 {
                let r = World { rank, size: 3 }.share(n);
                assert_eq!(r.start, next);
                next = r.end;
            }
            assert_eq!(next, n);
        }
    }
}
