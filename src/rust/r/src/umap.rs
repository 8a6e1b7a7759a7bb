//! extendr glue of run_umap() and project_umap() (mirrors R/umap.R).

use crate::convert::{from_r, to_r};
use crate::labels::latent_rows;
use crate::model::with_epoch_progress;
use crate::{fail, r_matrix};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::models::umap::{UmapConfig, UmapModel};
use scdistill_core::train::TrainConfig;

/// Parametric UMAP of `z` (cells × `d`). Returns list(bytes, info, coords).
/// @noRd
#[extendr]
fn rs_fit_umap(z: Robj, d: i32, config: Robj, train: Robj, threads: i32, progress: Robj) -> Result<Robj> {
    let z = latent_rows(&z, d)?;
    let n = z.len() / d.max(1) as usize;
    let config: UmapConfig = from_r(&config, "UMAP settings")?;
    let train: TrainConfig = from_r(&train, "training settings")?;
    let (model, coords) = with_epoch_progress(threads, &progress, |interrupted, report| {
        UmapModel::fit(&z, n, config, train, interrupted, &|r| report("train", r))
    })?;
    let k = model.meta.config.n_components;
    let meta = serde_json::to_value(&model.meta).map_err(|e| fail(e.to_string()))?;
    Ok(list!(
        bytes = Raw::from_bytes(&model.to_bytes().map_err(fail)?),
        info = to_r(&meta),
        coords = r_matrix(&coords, n, k)
    )
    .into())
}

/// Coordinates of cells at `z` under a fitted parametric UMAP.
/// @noRd
#[extendr]
fn rs_project_umap(bytes: Raw, z: Robj, d: i32, threads: i32) -> Result<Robj> {
    let model = UmapModel::from_bytes(bytes.as_slice()).map_err(fail)?;
    let z = latent_rows(&z, d)?;
    let k = model.meta.config.n_components;
    let lent = crate::worker::Lent(&model);
    let y = crate::run(threads, |_| lent.get().project(&z))?;
    Ok(r_matrix(&y, y.len() / k.max(1), k).into())
}

extendr_module! {
    mod umap;
    fn rs_fit_umap;
    fn rs_project_umap;
}
