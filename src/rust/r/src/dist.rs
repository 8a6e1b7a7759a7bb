//! Data-parallel training: joining and leaving the process group the
//! core's training loop uses (`scdistill_core::dist`).

use crate::{fail, worker};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::dist::{self, Group};
use std::time::Duration;

/// Joins the group of `world` processes at `addr:port` as `rank` and
/// installs it for training; waits up to `timeout` seconds for the others.
/// @noRd
#[extendr]
fn rs_dist_join(addr: &str, port: i32, rank: i32, world: i32, timeout: f64) -> Result<()> {
    if !(1..=65535).contains(&port) || rank < 0 || world < 1 || timeout.is_nan() || timeout <= 0.0 {
        return Err(fail(format!("internal: bad group settings (port {port}, rank {rank}, world {world})")));
    }
    let addr = addr.to_string();
    let group = worker::run(1, move |_| {
        Group::connect(&addr, port as u16, rank as usize, world as usize, Duration::from_secs_f64(timeout))
    })
    .map_err(fail)?
    .map_err(fail)?;
    dist::install(group);
    Ok(())
}

/// Leaves the installed group, if any.
/// @noRd
#[extendr]
fn rs_dist_leave() {
    dist::uninstall();
}

/// Whether this process has joined a group.
/// @noRd
#[extendr]
fn rs_dist_joined() -> bool {
    dist::current().is_some()
}

/// Stops unless every rank of the installed group passes the same `values`.
/// @noRd
#[extendr]
fn rs_dist_agree(names: Vec<String>, values: &[f64]) -> Result<()> {
    let group = dist::current().ok_or_else(|| fail("internal: no process group"))?;
    worker::run(1, move |_| {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        scdistill_core::train::agree(&group, &names, values)
    })
    .map_err(fail)?
    .map_err(fail)
}

/// Rank 0's `values` on every rank (the same length on all).
/// @noRd
#[extendr]
fn rs_dist_broadcast(values: &[f64]) -> Result<Vec<f64>> {
    let group = dist::current().ok_or_else(|| fail("internal: no process group"))?;
    worker::run(1, move |_| group.broadcast_values(values, 0)).map_err(fail)?.map_err(fail)
}

/// A TCP port free on this machine now (for a local group's rendezvous).
/// @noRd
#[extendr]
fn rs_free_port() -> Result<i32> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| fail(format!("no free port: {e}")))?;
    Ok(i32::from(listener.local_addr().map_err(fail)?.port()))
}

extendr_module! {
    mod dist;
    fn rs_dist_join;
    fn rs_dist_leave;
    fn rs_dist_joined;
    fn rs_dist_agree;
    fn rs_dist_broadcast;
    fn rs_free_port;
}
