//! extendr glue of fit_multimodal() and modality_attribution() (mirrors R/multimodal.R).

use crate::convert::from_r;
use crate::model::{cells_from_r, fitted_to_r, matrix_to_r, model_as, with_epoch_progress};
use crate::vae::categorical_list;
use crate::{counts_from_r, fail};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::data::CountMatrix;
use scdistill_core::device::parse_device;
use scdistill_core::models::multimodal::{MultimodalConfig, MultimodalCovariates, MultimodalModel};
use scdistill_core::train::TrainConfig;

/// The modalities' count matrices from a list of count slot lists.
fn modality_counts(counts: &List) -> Result<Vec<CountMatrix>> {
    counts
        .values()
        .map(|v| counts_from_r(&List::try_from(v).map_err(|_| fail("internal: modality counts must be a list"))?))
        .collect()
}

/// Training covariates: list(ambient, scaling, dispersion, library, decoder, encoder),
/// the first four list(name, codes, levels), the last two lists of them.
fn covariates_from_r(cov: &List, n: usize) -> Result<MultimodalCovariates> {
    let get = |k: &str| cov.iter().find(|(n, _)| *n == k).map(|(_, v)| v);
    let one = |key: &str| -> Result<scdistill_core::data::Categorical> {
        let v = get(key).ok_or_else(|| fail(format!("internal: no `{key}` covariate")))?;
        categorical_list(&List::try_from(v).map_err(|_| fail("internal: covariate must be a list"))?, n)
    };
    let many = |key: &str| -> Result<Vec<scdistill_core::data::Categorical>> {
        match get(key) {
            None => Ok(vec![]),
            Some(v) => List::try_from(v)
                .map_err(|_| fail("internal: covariates must be a list"))?
                .values()
                .map(|c| categorical_list(&List::try_from(c).map_err(|_| fail("internal: covariate list"))?, n))
                .collect(),
        }
    };
    Ok(MultimodalCovariates {
        ambient: one("ambient")?,
        scaling: one("scaling")?,
        dispersion: one("dispersion")?,
        library: one("library")?,
        decoder: many("decoder")?,
        encoder: many("encoder")?,
    })
}

/// Trains a multimodal model on paired modalities (a list of count slot
/// lists, same cells); `config` holds the core's `MultimodalConfig` fields
/// (with `modalities`, a list of each modality's settings). Returns
/// list(ptr, latent = list(joint, parts)).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_fit_multimodal(
    counts: List,
    covariates: List,
    config: Robj,
    train: Robj,
    device: &str,
    threads: i32,
    progress: Robj,
) -> Result<Robj> {
    let mats = modality_counts(&counts)?;
    let n = mats.first().map(|m| m.n_cells()).unwrap_or(0);
    let cov = covariates_from_r(&covariates, n)?;
    let config: MultimodalConfig = from_r(&config, "multimodal settings")?;
    let train: TrainConfig = from_r(&train, "training settings")?;
    let device = parse_device(device).map_err(fail)?;
    let refs: Vec<&CountMatrix> = mats.iter().collect();
    let (model, z) = with_epoch_progress(threads, &progress, |interrupted, report| {
        let model = MultimodalModel::fit(&refs, &cov, config, train, device, interrupted, &|r| report("train", r))?;
        let z = model.training_latent(&refs, &cov)?;
        Ok((model, z))
    })?;
    let parts = List::from_pairs(z.parts.iter().map(|(n, m)| (n.as_str(), matrix_to_r(m))));
    Ok(fitted_to_r(Box::new(model), list!(joint = matrix_to_r(&z.joint), parts = parts).into()))
}

/// Modality attribution, row-major [cells, modalities, n_latent] as a flat vector.
/// @noRd
#[extendr]
fn rs_multimodal_attribution(ptr: Robj, cells: List, threads: i32) -> Result<Vec<f64>> {
    let model = crate::worker::Lent(model_as::<MultimodalModel>(&ptr, "modality_attribution()")?);
    let cells = cells_from_r(&cells)?;
    let v = crate::run(threads, |interrupted| model.get().attribution(cells, interrupted))?;
    Ok(v.into_iter().map(f64::from).collect())
}

extendr_module! {
    mod multimodal;
    fn rs_fit_multimodal;
    fn rs_multimodal_attribution;
}
