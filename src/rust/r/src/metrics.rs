//! extendr glue of integration_metrics() (mirrors R/integration_metrics.R).

use crate::convert::counts_from_r;
use crate::{fail, from_column_major, int_slice, run};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::metrics;

/// Row-major copy of an R (column-major) numeric matrix.
fn row_major(values: &Robj, n: usize, d: usize, what: &str) -> Result<Vec<f64>> {
    let v = values.as_real_slice().ok_or_else(|| fail(format!("internal: `{what}` must be a double matrix")))?;
    if v.len() != n * d {
        return Err(fail(format!("internal: `{what}` has {} values for {n} x {d}", v.len())));
    }
    Ok(from_column_major(v, n, d))
}

fn zero_based(codes: &Robj, what: &str) -> Result<Vec<u32>> {
    Ok(int_slice(codes, what)?.iter().map(|&c| (c - 1).max(0) as u32).collect())
}

/// scIB-family integration metrics of one embedding (cells x dims).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_integration_metrics(
    x: Robj,
    n: i32,
    d: i32,
    batch: Robj,
    label: Robj,
    pre: Robj,
    pre_d: i32,
    seed: f64,
    threads: i32,
) -> Result<List> {
    let (n, d) = (n as usize, d as usize);
    let values = row_major(&x, n, d, "embedding")?;
    let pre_values = if pre.is_null() { None } else { Some(row_major(&pre, n, pre_d as usize, "pre")?) };
    let (batch, label) = (zero_based(&batch, "batch")?, zero_based(&label, "label")?);
    let m = run(threads, |_| {
        let pre = pre_values.as_ref().map(|v| metrics::Embedding::row_major(v, n, pre_d as usize));
        metrics::integration_metrics(
            &metrics::Embedding::row_major(&values, n, d),
            &batch,
            &label,
            pre.as_ref(),
            seed as u64,
        )
    })?;
    Ok(list!(
        ilisi = m.ilisi,
        clisi = m.clisi,
        kbet = m.kbet,
        silhouette_label = m.silhouette_label,
        silhouette_batch = m.silhouette_batch,
        isolated_labels = m.isolated_labels,
        nmi_kmeans = m.nmi_kmeans,
        ari_kmeans = m.ari_kmeans,
        nmi_leiden = m.nmi_leiden,
        ari_leiden = m.ari_leiden,
        graph_connectivity = m.graph_connectivity,
        pcr_comparison = m.pcr_comparison,
        bio_conservation = m.bio_conservation,
        batch_correction = m.batch_correction,
        total = m.total
    ))
}

/// Fraction of each cell's `k` nearest neighbours in `x` kept in `y`, averaged.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_neighbor_preservation(x: Robj, dx: i32, y: Robj, dy: i32, n: i32, k: i32, seed: f64, threads: i32) -> Result<f64> {
    let n = n as usize;
    let (xv, yv) = (row_major(&x, n, dx as usize, "x")?, row_major(&y, n, dy as usize, "y")?);
    run(threads, |_| {
        metrics::neighbor_preservation(
            &metrics::Embedding::row_major(&xv, n, dx as usize),
            &metrics::Embedding::row_major(&yv, n, dy as usize),
            k as usize,
            seed as u64,
        )
    })
}

/// Cells `rows` (1-based) densified through a libtorch tensor, genes × cells, column-major.
/// @noRd
#[extendr]
fn rs_dense_cells(counts: List, rows: Robj) -> Result<Vec<f64>> {
    let m = counts_from_r(&counts)?;
    let rows: Vec<usize> = int_slice(&rows, "rows")?
        .iter()
        .map(|&r| {
            if r >= 1 && r as usize <= m.n_cells() {
                Ok(r as usize - 1)
            } else {
                Err(fail(format!("cell index {r} out of range")))
            }
        })
        .collect::<Result<_>>()?;
    let t = scdistill_core::data::rows_to_tensor(&m.csr, &rows, tch_device_cpu());
    Vec::<f32>::try_from(t.flatten(0, -1)).map(|v| v.into_iter().map(f64::from).collect()).map_err(fail)
}

fn tch_device_cpu() -> scdistill_core::device::Device {
    scdistill_core::device::Device::Cpu
}

extendr_module! {
    mod metrics;
    fn rs_integration_metrics;
    fn rs_dense_cells;
    fn rs_neighbor_preservation;
}
