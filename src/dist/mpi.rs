//! The MPI side of [`super::World`] (rsmpi). Calls come from the main thread only (rayon's
//! threads never communicate), so MPI is initialised with `Threading::Funneled`.

use anyhow::{bail, Result};
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;
use std::sync::Mutex;

use super::World;

/// Kept until [`finalize`]: dropping it calls `MPI_Finalize`.
static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);

fn comm() -> SimpleCommunicator {
    SimpleCommunicator::world()
}

pub fn init() -> Result<World> {
    let Some((universe, _threading)) = mpi::initialize_with_threading(mpi::Threading::Funneled)
    else {
        bail!("MPI was initialised twice");
    };
    let w = universe.world();
    let world = World {
        rank: w.rank() as usize,
        size: w.size() as usize,
    };
    *UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()) = Some(universe);
    Ok(world)
}

pub fn finalize() {
    drop(UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()).take());
}

pub fn abort(code: i32) -> ! {
    comm().abort(code)
}

/// Point-to-point messages between ranks of the world communicator.
pub struct WorldLink;

impl super::Link for WorldLink {
    fn exchange(&self, partner: usize, send: &[f32], recv: &mut [f32]) {
        let c = comm();
        let p = c.process_at_rank(partner as i32);
        mpi::point_to_point::send_receive_into(send, &p, recv, &p);
    }

    fn send(&self, to: usize, data: &[f32]) {
        let c = comm();
        c.process_at_rank(to as i32).send(data);
    }

    fn receive(&self, from: usize, into: &mut [f32]) {
        let c = comm();
        c.process_at_rank(from as i32).receive_into(into);
    }
}

pub fn sum_f64(xs: &mut [f64]) {
    let send = xs.to_vec();
    comm().all_reduce_into(&send[..], xs, mpi::collective::SystemOperation::sum());
}

pub fn all_gather_bytes(mine: &[u8], size: usize) -> Vec<Vec<u8>> {
    let c = comm();
    let mut counts = vec![0 as Count; size];
    c.all_gather_into(&(mine.len() as Count), &mut counts[..]);
    let displs: Vec<Count> = counts
        .iter()
        .scan(0, |acc, &n| {
            let d = *acc;
            *acc += n;
            Some(d)
        })
        .collect();
    let total: usize = counts.iter().map(|&n| n as usize).sum();
    let mut all = vec![0u8; total];
    {
        let mut partition = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
        c.all_gather_varcount_into(mine, &mut partition);
    }
    displs
        .iter()
        .zip(&counts)
        .map(|(&d, &n)| all[d as usize..(d + n) as usize].to_vec())
        .collect()
}

pub fn broadcast_bytes(mut data: Vec<u8>, rank: usize) -> Vec<u8> {
    let c = comm();
    let root = c.process_at_rank(0);
    let mut len = [data.len() as u64];
    root.broadcast_into(&mut len[..]);
    if rank != 0 {
        data = vec![0u8; len[0] as usize];
    }
    for piece in data.chunks_mut(super::MESSAGE) {
        root.broadcast_into(piece);
    }
    data
}

pub fn broadcast_f32(buf: &mut [f32]) {
    let c = comm();
    c.process_at_rank(0).broadcast_into(buf);
}
