//! extendr glue of find_doublets() (mirrors R/doublets.R).

use crate::convert::{counts_from_r, csr_to_r};
use crate::{fail, from_column_major, int_slice, run};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::metrics::Embedding;
use scdistill_core::models::doublets::{neighbor_doublet_fraction, simulate_doublets, thin_counts};

/// `ratio` × n_b doublets per batch (1-based codes `batch` of `n_batches`):
/// list(p, i, x) of their counts (cells as rows), parents (1-based) and batch.
/// @noRd
#[extendr]
fn rs_simulate_doublets(counts: List, batch: Robj, n_batches: i32, ratio: f64, seed: f64) -> Result<List> {
    let m = counts_from_r(&counts)?;
    let b: Vec<u32> = int_slice(&batch, "batch")?.iter().map(|&c| (c - 1).max(0) as u32).collect();
    let d = simulate_doublets(&m.csr, &b, n_batches.max(1) as usize, ratio, seed as u64).map_err(fail)?;
    let first: Vec<i32> = d.parents.iter().map(|p| p.0 as i32 + 1).collect();
    let second: Vec<i32> = d.parents.iter().map(|p| p.1 as i32 + 1).collect();
    let batch: Vec<i32> = d.batch.iter().map(|&c| c as i32 + 1).collect();
    Ok(list!(counts = csr_to_r(d.counts), first = first, second = second, batch = batch))
}

/// Binomial thinning of counts (cells as rows) at `p` (see `thin_counts`).
/// @noRd
#[extendr]
fn rs_thin_counts(counts: List, p: f64, seed: f64) -> Result<List> {
    let m = counts_from_r(&counts)?;
    Ok(csr_to_r(thin_counts(&m.csr, p, seed as u64).map_err(fail)?))
}

/// Scrublet's score of the first `n_observed` rows of `z` (cells × `d`).
/// @noRd
#[extendr]
fn rs_neighbor_doublet_fraction(z: Robj, d: i32, n_observed: i32, k: i32, seed: f64, threads: i32) -> Result<Vec<f64>> {
    let v = z.as_real_slice().ok_or_else(|| fail("internal: the latent space must be a double matrix"))?;
    let d = d.max(1) as usize;
    let n = v.len() / d;
    let rows = from_column_major(v, n, d);
    run(threads, |_| {
        neighbor_doublet_fraction(&Embedding::row_major(&rows, n, d), n_observed as usize, k as usize, seed as u64)
    })
}

extendr_module! {
    mod doublets;
    fn rs_simulate_doublets;
    fn rs_thin_counts;
    fn rs_neighbor_doublet_fraction;
}
