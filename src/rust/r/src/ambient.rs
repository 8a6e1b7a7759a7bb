//! extendr glue of remove_ambient() and the simulator's contamination
//! (mirrors R/ambient.R).

use crate::convert::{categorical_from_r, categorical_from_r_min, counts_from_r, csr_to_r, from_r, to_r};
use crate::model::with_epoch_progress;
use crate::{fail, run};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::models::ambient::{AmbientConfig, AmbientModel, Decontaminated};
use scdistill_core::simulate::{contaminate, AmbientParams};
use scdistill_core::train::TrainConfig;

/// Ambient molecules added to `counts` (simulator truth): list(observed,
/// ambient_counts, fraction, profile, empty), matrices as CSR slots.
/// @noRd
#[extendr]
fn rs_contaminate(counts: List, mean_fraction: f64, n_empty: i32, seed: f64, threads: i32) -> Result<List> {
    let m = counts_from_r(&counts)?;
    let p = AmbientParams { mean_fraction, n_empty: n_empty.max(0) as usize, seed: seed as u64 };
    let c = run(threads, |_| contaminate(&m.csr, &p))?;
    Ok(list!(
        observed = csr_to_r(c.observed),
        ambient_counts = c.ambient_counts,
        fraction = c.fraction,
        profile = c.profile,
        empty = csr_to_r(c.empty)
    ))
}

fn decontaminated_to_r(d: Decontaminated) -> List {
    let share: Vec<f64> = d.ambient_share.iter().map(|&v| v as f64).collect();
    let removed: Vec<f64> = d.removed.iter().map(|&v| v as f64).collect();
    list!(counts = csr_to_r(d.counts), share = share, removed = removed)
}

/// Fits the ambient model on the cells' counts and decontaminates them:
/// list(bytes, info, counts, share, removed).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_fit_ambient(
    counts: List,
    batch: Robj,
    batch_levels: Robj,
    profile: Vec<f64>,
    config: Robj,
    train: Robj,
    threads: i32,
    progress: Robj,
) -> Result<List> {
    let m = counts_from_r(&counts)?;
    let batch = categorical_from_r("batch", &batch, &batch_levels, m.csr.n_rows)?;
    let config: AmbientConfig = from_r(&config, "ambient model settings")?;
    let train: TrainConfig = from_r(&train, "training settings")?;
    let (model, d) = with_epoch_progress(threads, &progress, |interrupted, report| {
        let model =
            AmbientModel::fit(&m.csr, m.genes.clone(), batch.as_ref(), &profile, config, train, interrupted, &|r| {
                report("train", r)
            })?;
        let d = model.decontaminate(&m.csr, batch.as_ref().map(|b| b.codes.as_slice()))?;
        Ok((model, d))
    })?;
    let meta = serde_json::to_value(&model.meta).map_err(|e| fail(e.to_string()))?;
    let mut out = decontaminated_to_r(d);
    out.set_attrib("bytes", Raw::from_bytes(&model.to_bytes().map_err(fail)?))?;
    out.set_attrib("info", to_r(&meta))?;
    Ok(out)
}

/// Decontaminates new cells with a fitted ambient model: list(counts, share, removed).
/// @noRd
#[extendr]
fn rs_apply_ambient(bytes: Raw, counts: List, batch: Robj, batch_levels: Robj, threads: i32) -> Result<List> {
    let model = AmbientModel::from_bytes(bytes.as_slice()).map_err(fail)?;
    let m = counts_from_r(&counts)?;
    let batch = categorical_from_r_min("batch", &batch, &batch_levels, m.csr.n_rows, 0)?;
    let lent = crate::worker::Lent(&model);
    let d = run(threads, |_| lent.get().decontaminate(&m.csr, batch.as_ref().map(|b| b.codes.as_slice())))?;
    Ok(decontaminated_to_r(d))
}

extendr_module! {
    mod ambient;
    fn rs_contaminate;
    fn rs_fit_ambient;
    fn rs_apply_ambient;
}
