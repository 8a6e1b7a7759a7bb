//! extendr glue of soft_clusters() and its predict() method (mirrors R/clusters.R).

use crate::convert::{from_r, to_r};
use crate::labels::latent_rows;
use crate::model::{cells_from_r, matrix_to_r, model_as, model_ptr, with_epoch_progress};
use crate::{fail, r_matrix, strings};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::models::clusters::{ClusterConfig, ClusterModel};
use scdistill_core::models::joint::fine_tune;
use scdistill_core::models::vae::VaeModel;
use scdistill_core::train::TrainConfig;

/// Soft k-means of `z` (cells × `d`); with 1-based label codes of `levels`
/// (NA: unlabelled) supervised. Returns list(bytes, info, probabilities, centroids).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_fit_clusters(
    z: Robj,
    d: i32,
    codes: Robj,
    levels: Robj,
    config: Robj,
    train: Robj,
    threads: i32,
    progress: Robj,
) -> Result<Robj> {
    let z = latent_rows(&z, d)?;
    let n = z.len() / d.max(1) as usize;
    let labels = if codes.is_null() {
        None
    } else {
        Some((crate::labels::label_codes(&codes)?, strings(&levels, "levels")?))
    };
    let config: ClusterConfig = from_r(&config, "clustering settings")?;
    let train: TrainConfig = from_r(&train, "training settings")?;
    let model = with_epoch_progress(threads, &progress, |interrupted, report| {
        let labels = labels.as_ref().map(|(c, l)| (c.as_slice(), l.clone()));
        ClusterModel::fit(&z, n, labels, config, train, interrupted, &|r| report("train", r))
    })?;
    clusters_to_r(&model, &z, threads)
}

/// A fitted clustering as R keeps it, with the assignments of the cells at
/// `z`: list(bytes, info, probabilities, centroids).
fn clusters_to_r(model: &ClusterModel, z: &[f32], threads: i32) -> Result<Robj> {
    let (k, d) = (model.meta.levels.len(), model.meta.config.n_latent);
    let lent = crate::worker::Lent(model);
    let p = crate::run(threads, |_| lent.get().assign(z))?;
    let centroids = model.centroids().map_err(fail)?;
    let meta = serde_json::to_value(&model.meta).map_err(|e| fail(e.to_string()))?;
    Ok(list!(
        bytes = Raw::from_bytes(&model.to_bytes().map_err(fail)?),
        info = to_r(&meta),
        probabilities = r_matrix(&p, p.len() / k.max(1), k),
        centroids = r_matrix(&centroids, k, d.max(1))
    )
    .into())
}

/// Fine-tunes the VAE behind `ptr` and the clustering `bytes` of its latent
/// space jointly on `cells` (`models::joint`): list(ptr, latent, clusters),
/// the clusters as `rs_fit_clusters` returns them, assigned at the new latent.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_fine_tune_clusters(
    ptr: Robj,
    bytes: Raw,
    cells: List,
    weight: f64,
    train: Robj,
    threads: i32,
    progress: Robj,
) -> Result<Robj> {
    let vae = model_as::<VaeModel>(&ptr, "joint fine-tuning with a clustering")?;
    let clusters = ClusterModel::from_bytes(bytes.as_slice()).map_err(fail)?;
    let train: TrainConfig = from_r(&train, "training settings")?;
    let cells = cells_from_r(&cells)?;
    let (lv, lc) = (crate::worker::Lent(vae), crate::worker::Lent(&clusters));
    let fit = with_epoch_progress(threads, &progress, |interrupted, report| {
        fine_tune(lv.get(), lc.get(), cells, weight, train, interrupted, &|r| report("train", r))
    })?;
    let clusters = clusters_to_r(&fit.clusters, &fit.latent.values, threads)?;
    let latent = matrix_to_r(&fit.latent);
    Ok(list!(ptr = model_ptr(Box::new(fit.vae)), latent = latent, clusters = clusters).into())
}

/// Soft assignments (cells × K) of cells at `z` to a fitted clustering's centroids.
/// @noRd
#[extendr]
fn rs_assign_clusters(bytes: Raw, z: Robj, d: i32, threads: i32) -> Result<Robj> {
    let model = ClusterModel::from_bytes(bytes.as_slice()).map_err(fail)?;
    let z = latent_rows(&z, d)?;
    let k = model.meta.levels.len();
    let lent = crate::worker::Lent(&model);
    let p = crate::run(threads, |_| lent.get().assign(&z))?;
    Ok(r_matrix(&p, p.len() / k.max(1), k).into())
}

extendr_module! {
    mod clusters;
    fn rs_fit_clusters;
    fn rs_assign_clusters;
    fn rs_fine_tune_clusters;
}
