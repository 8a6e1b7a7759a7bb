//! extendr glue of log2_cpm(), highly_variable_genes() and run_pca()
//! (mirrors R/log2_cpm.R, R/highly_variable_genes.R, R/run_pca.R).

use crate::convert::{categorical_from_r, counts_from_r, csr_to_r};
use crate::{fail, run};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::data::CellsH5;
use scdistill_core::prep::{self, ScoresOut};

/// log2(CPM + 1) as the slots of a genes × cells dgCMatrix: list(p, i, x).
/// @noRd
#[extendr]
fn rs_log2_cpm(counts: List, threads: i32) -> Result<List> {
    let m = counts_from_r(&counts)?;
    let l = run(threads, |_| Ok(prep::log2_cpm(&m)))?;
    Ok(csr_to_r(l))
}

fn hvg_list(h: &prep::HvgResult) -> List {
    let selected: Vec<i32> = h.selected.iter().map(|&g| g as i32 + 1).collect();
    let n_batches: Vec<i32> = h.n_batches.iter().map(|&n| n as i32).collect();
    list!(
        mean = h.mean.clone(),
        variance = h.variance.clone(),
        variance_norm = h.variance_norm.clone(),
        rank = h.rank.clone(),
        n_batches = n_batches,
        selected = selected
    )
}

/// seurat_v3 highly variable genes on raw counts.
/// @noRd
#[extendr]
fn rs_hvg(counts: List, batch: Robj, levels: Robj, n_hvg: i32, span: f64, threads: i32) -> Result<List> {
    let m = counts_from_r(&counts)?;
    let b = categorical_from_r("batch", &batch, &levels, m.n_cells())?;
    let h = run(threads, |_| prep::highly_variable_genes(&m, n_hvg.max(0) as usize, b.as_ref(), span))?;
    Ok(hvg_list(&h))
}

/// HVG selection, log2(counts per `scale_factor` + 1) of those genes (or
/// their Pearson residuals when `residual_theta` > 0), and truncated PCA.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_run_pca(
    counts: List,
    batch: Robj,
    levels: Robj,
    n_pcs: i32,
    n_hvg: i32,
    scale: bool,
    n_oversamples: i32,
    max_iter: i32,
    tol: f64,
    max_genes_exact: i32,
    seed: f64,
    residual_theta: f64,
    scale_factor: f64,
    threads: i32,
) -> Result<List> {
    let m = counts_from_r(&counts)?;
    let b = categorical_from_r("batch", &batch, &levels, m.n_cells())?;
    let params = prep::PcaParams {
        n_pcs: n_pcs.max(0) as usize,
        scale,
        n_oversamples: n_oversamples.max(0) as usize,
        max_iter: max_iter.max(0) as usize,
        tol,
        seed: seed as u64,
        max_genes_exact: max_genes_exact.max(0) as usize,
    };
    let of = if residual_theta > 0.0 {
        prep::PcaOf::PearsonResiduals(residual_theta)
    } else {
        prep::PcaOf::Log(scale_factor)
    };
    let (h, r) =
        run(threads, |interrupted| prep::hvg_pca(&m, n_hvg.max(0) as usize, b.as_ref(), of, &params, interrupted))?;
    let k = r.sdev.len();
    let scores: Vec<f64> =
        (0..k).flat_map(|j| (0..m.n_cells()).map(move |i| (i, j))).map(|(i, j)| r.scores[(i, j)]).collect();
    let loadings: Vec<f64> =
        (0..k).flat_map(|j| (0..h.selected.len()).map(move |g| (g, j))).map(|(g, j)| r.loadings[(g, j)]).collect();
    Ok(list!(
        scores = scores,
        loadings = loadings,
        sdev = r.sdev,
        variance_ratio = r.variance_ratio,
        n_iter = r.n_iter as i32,
        hvg = hvg_list(&h)
    ))
}

/// HVGs (and, when `n_pcs` > 0, the PCA of their log2 counts per
/// `scale_factor` + 1) of counts on
/// disk (`open_disk`'s description), read in blocks; the result as
/// `rs_run_pca`'s. `progress` as for training, phase "teacher".
/// `scores_file`: NULL, or list(path, name) of a new dataset the scores go
/// to (cells × n_pcs as `rs_h5_cells_write` stores it; `scores` is then NULL).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_disk_hvg_pca(
    spec: List,
    batch: Robj,
    levels: Robj,
    n_hvg: i32,
    span: f64,
    n_pcs: i32,
    scale: bool,
    scale_factor: f64,
    threads: i32,
    scores_file: Robj,
    progress: Robj,
) -> Result<List> {
    let disk = crate::disk::open_disk(&spec)?;
    let b = categorical_from_r("batch", &batch, &levels, disk.n_rows())?;
    let k = (n_pcs > 0).then_some(n_pcs as usize);
    // The last pass writes the scores straight into the R matrix returned
    // (no copy in between: 2 GB at 5·10^6 cells × 50), or to their file.
    let file = if scores_file.is_null() {
        None
    } else {
        let (path, name) = crate::disk::h5_dataset(&scores_file, "`scores_file`")?;
        Some(CellsH5::create(&path, &name, disk.n_rows(), k.unwrap_or(0), false).map_err(fail)?)
    };
    let mut scores = None;
    let out = match &file {
        Some(f) => ScoresOut::File(f),
        None => ScoresOut::Memory(scores.insert(RMatrix::<f64>::new(disk.n_rows(), k.unwrap_or(0))).data_mut()),
    };
    let r = crate::model::with_epoch_progress(threads, &progress, |interrupted, report| {
        let progress = |done, total| report("teacher", &crate::model::pass_record(done, total));
        prep::hvg_pca_on_disk_into(
            &disk,
            n_hvg.max(0) as usize,
            b.as_ref(),
            span,
            k,
            scale,
            scale_factor,
            &progress,
            interrupted,
            out,
        )
    })?;
    let hvg = hvg_list(&r.hvg);
    Ok(match r.pca {
        None => list!(hvg = hvg),
        Some(p) => {
            let (k, g) = (p.sdev.len(), p.loadings.nrows());
            let loadings: Vec<f64> =
                (0..k).flat_map(|j| (0..g).map(move |i| (i, j))).map(|(i, j)| p.loadings[(i, j)]).collect();
            list!(
                scores = scores.map_or_else(|| Robj::from(()), Robj::from),
                loadings = loadings,
                sdev = p.sdev,
                variance_ratio = p.variance_ratio,
                n_iter = 0,
                hvg = hvg,
                library = r.library
            )
        }
    })
}

extendr_module! {
    mod prep;
    fn rs_disk_hvg_pca;
    fn rs_log2_cpm;
    fn rs_hvg;
    fn rs_run_pca;
}
