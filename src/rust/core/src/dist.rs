//! Data-parallel training on libtorch's distributed backend (c10d): a
//! TCPStore rendezvous and a Gloo process group, reached through the C++
//! shim in `csrc/c10d.cpp`.
//!
//! Every rank holds the same model and computes the same split and the same
//! epoch order, whose cells are dealt to the ranks in turn (cell p of the
//! order to rank p mod world, as PyTorch's `DistributedSampler`); each rank
//! computes on its cells of every global minibatch, and the gradients are
//! summed over ranks before each optimiser step
//! (`train::train`). Data on disk deals whole windows of blocks to the ranks,
//! so that each rank reads only its own cells (`DiskCsr::epoch_order`).
//! Random draws that belong to cells (the reparameterised latents, dropout
//! masks) are drawn for the whole minibatch on every rank and cut to the
//! rank's rows, so the generator streams stay in step across ranks
//! and with a single-process run: with the same seed and minibatches the
//! trained weights are a single-process run's up to the order of floating-point
//! sums (batch normalisation aside, whose statistics are per rank as in
//! PyTorch's DDP).
//!
//! The group in use is installed process-wide (`install`) by the caller that
//! set up the rendezvous (the R glue, from `torchrun`-style variables), and
//! `train::train` picks it up.

use crate::error::{Error, Result};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tch::Tensor;

extern "C" {
    fn scd_group_new(
        addr: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
    fn scd_group_free(group: *mut c_void);
    fn scd_all_reduce(
        group: *mut c_void,
        tensor: *mut c_void,
        op: c_int,
        pieces: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn scd_broadcast(group: *mut c_void, tensor: *mut c_void, root: c_int, err: *mut c_char, err_len: usize) -> c_int;
}

/// How `all_reduce` combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Sum,
    Min,
    Max,
}

/// A connected process group: this process is `rank` of `world`.
pub struct Group {
    raw: *mut c_void,
    rank: usize,
    world: usize,
}

// SAFETY: c10d process groups are thread-safe; the handle is only read.
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

const ERR_LEN: usize = 2048;

fn message(buf: &[u8]) -> String {
    CStr::from_bytes_until_nul(buf).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The first line of a c10d message, without the source location prefix.
fn tidy(msg: &str) -> String {
    let line = msg.lines().next().unwrap_or("").trim();
    match line.strip_prefix('[').and_then(|rest| rest.split_once("] ")) {
        Some((_, text)) => text.to_string(),
        None => line.to_string(),
    }
}

impl Group {
    /// Meets the other ranks at `addr:port` (rank 0 serves the rendezvous
    /// store there) and connects to all of them; fails when they have not
    /// all arrived within `timeout`, which also bounds every collective.
    pub fn connect(addr: &str, port: u16, rank: usize, world: usize, timeout: Duration) -> Result<Group> {
        if world == 0 || rank >= world {
            return Err(Error::Distributed(format!("rank {rank} is not below the world size {world}")));
        }
        let c_addr = CString::new(addr).map_err(|_| Error::Distributed("the address holds a NUL byte".into()))?;
        let mut err = vec![0u8; ERR_LEN];
        // SAFETY: valid C string and error buffer of ERR_LEN bytes.
        let raw = unsafe {
            scd_group_new(
                c_addr.as_ptr(),
                c_int::from(port),
                rank as c_int,
                world as c_int,
                timeout.as_millis() as i64,
                err.as_mut_ptr() as *mut c_char,
                ERR_LEN,
            )
        };
        if raw.is_null() {
            return Err(Error::Distributed(format!(
                "rank {rank} of {world} could not join the group at {addr}:{port} within {} s: {}",
                timeout.as_secs(),
                tidy(&message(&err))
            )));
        }
        Ok(Group { raw, rank, world })
    }

    /// The group `torchrun` and its kin describe: `MASTER_ADDR`,
    /// `MASTER_PORT`, `RANK` and `WORLD_SIZE`; `None` when `WORLD_SIZE` is unset.
    pub fn from_env(timeout: Duration) -> Result<Option<Group>> {
        let Ok(world) = std::env::var("WORLD_SIZE") else { return Ok(None) };
        let number = |name: &str, value: &str| -> Result<usize> {
            value.trim().parse().map_err(|_| Error::Distributed(format!("{name} is '{value}', not a whole number")))
        };
        let world = number("WORLD_SIZE", &world)?;
        let get = |name: &str| {
            std::env::var(name).map_err(|_| Error::Distributed(format!("WORLD_SIZE is set but {name} is not")))
        };
        let rank = number("RANK", &get("RANK")?)?;
        let addr = get("MASTER_ADDR")?;
        let port = number("MASTER_PORT", &get("MASTER_PORT")?)?;
        let port = u16::try_from(port).map_err(|_| Error::Distributed(format!("MASTER_PORT {port} is not a port")))?;
        Group::connect(&addr, port, rank, world, timeout).map(Some)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// This rank's positions in `len` items that start at position `start`
    /// of a sequence dealt to the ranks in turn (item p to rank p mod world):
    /// a minibatch of an epoch's order.
    pub fn dealt(&self, start: usize, len: usize) -> Vec<usize> {
        let first = (self.rank + self.world - start % self.world) % self.world;
        (first..len).step_by(self.world).collect()
    }

    fn call(&self, what: &str, f: impl FnOnce(*mut c_char) -> c_int) -> Result<()> {
        let mut err = vec![0u8; ERR_LEN];
        if f(err.as_mut_ptr() as *mut c_char) == 0 {
            return Ok(());
        }
        Err(Error::Distributed(format!(
            "{what} failed on rank {} of {} (another rank stopped or timed out): {}",
            self.rank,
            self.world,
            tidy(&message(&err))
        )))
    }

    /// Combines `t` (contiguous) in place over every rank.
    pub fn all_reduce(&self, t: &mut Tensor, op: Op) -> Result<()> {
        self.reduce(t, op, 1)
    }

    /// As `all_reduce` on a 1-D tensor, in `pieces` parts reduced concurrently.
    pub fn all_reduce_pieces(&self, t: &mut Tensor, op: Op, pieces: usize) -> Result<()> {
        assert!(t.dim() == 1, "all_reduce_pieces needs a 1-D tensor");
        self.reduce(t, op, pieces)
    }

    fn reduce(&self, t: &mut Tensor, op: Op, pieces: usize) -> Result<()> {
        assert!(t.is_contiguous(), "all_reduce needs a contiguous tensor");
        let code = match op {
            Op::Sum => 0,
            Op::Min => 1,
            Op::Max => 2,
        };
        // SAFETY: a live group and tch's tensor handle (an at::Tensor*).
        self.call("all_reduce", |err| unsafe {
            scd_all_reduce(self.raw, t.as_mut_ptr() as *mut c_void, code, pieces.max(1) as c_int, err, ERR_LEN)
        })
    }

    /// Overwrites `t` (contiguous) with rank `root`'s values.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        assert!(t.is_contiguous(), "broadcast needs a contiguous tensor");
        // SAFETY: as in `all_reduce`.
        self.call("broadcast", |err| unsafe {
            scd_broadcast(self.raw, t.as_mut_ptr() as *mut c_void, root as c_int, err, ERR_LEN)
        })
    }

    /// Rank `root`'s `values` (of the same length on every rank).
    pub fn broadcast_values(&self, values: &[f64], root: usize) -> Result<Vec<f64>> {
        let mut t = Tensor::from_slice(values);
        self.broadcast(&mut t, root)?;
        Ok(Vec::<f64>::try_from(&t)?)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: created by scd_group_new, freed once.
        unsafe { scd_group_free(self.raw) }
    }
}

static CURRENT: Mutex<Option<Arc<Group>>> = Mutex::new(None);

/// Makes `group` the one training uses, until `uninstall`.
pub fn install(group: Group) {
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(group));
}

/// Leaves the group (closing it once nothing else holds it).
pub fn uninstall() {
    CURRENT.lock().unwrap_or_else(|e| e.into_inner()).take();
}

/// The installed group, if any.
pub fn current() -> Option<Arc<Group>> {
    CURRENT.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

#[derive(Debug, Clone)]
struct Shard {
    global: usize,
    /// The positions of this rank's cells in the minibatch.
    rows: Vec<i64>,
}

thread_local! {
    static SHARD: RefCell<Option<Shard>> = const { RefCell::new(None) };
}

/// While alive, the cells being computed on are the rows `rows` of a
/// minibatch of `global` cells (see `rows_of_minibatch`).
pub struct ShardGuard(Option<Shard>);

/// Marks the cells in flight as the rows `rows` (positions) of a larger minibatch.
pub fn shard(global: usize, rows: Vec<usize>) -> ShardGuard {
    let rows = rows.into_iter().map(|r| r as i64).collect();
    ShardGuard(SHARD.with(|s| s.replace(Some(Shard { global, rows }))))
}

impl Drop for ShardGuard {
    fn drop(&mut self) {
        SHARD.with(|s| *s.borrow_mut() = self.0.take());
    }
}

/// For a per-cell random draw of shape `size`: the shape to draw (the whole
/// minibatch's) and the rows to keep, when the cells are a rank's share.
pub(crate) fn rows_of_minibatch(size: &[i64]) -> Option<(Vec<i64>, Tensor)> {
    SHARD.with(|s| {
        let s = s.borrow();
        let s = s.as_ref()?;
        if size.is_empty() || size[0] != s.rows.len() as i64 || s.rows.len() == s.global {
            return None;
        }
        let mut whole = size.to_vec();
        whole[0] = s.global as i64;
        Some((whole, Tensor::from_slice(&s.rows)))
    })
}

/// Standard normal noise shaped like `t`, whose rows are cells: the same
/// values a single process would draw for these cells.
pub fn randn_rows(t: &Tensor) -> Tensor {
    match rows_of_minibatch(&t.size()) {
        Some((whole, rows)) => {
            Tensor::randn(whole, (t.kind(), t.device())).index_select(0, &rows.to_device(t.device()))
        }
        None => t.randn_like(),
    }
}

#[cfg(test)]
#[path = "dist_tests.rs"]
mod tests;
