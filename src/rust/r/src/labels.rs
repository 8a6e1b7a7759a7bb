//! extendr glue of fit_labels() and predict_labels() (mirrors R/labels.R).

use crate::convert::{from_r, to_r};
use crate::model::with_epoch_progress;
use crate::{fail, from_column_major, int_slice, r_matrix, strings};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::models::labels::{LabelConfig, LabelModel, UNLABELED};
use scdistill_core::train::TrainConfig;

/// The latent space (an R cells × `d` double matrix) as row-major f32.
pub(crate) fn latent_rows(z: &Robj, d: i32) -> Result<Vec<f32>> {
    let v = z.as_real_slice().ok_or_else(|| fail("internal: the latent space must be a double matrix"))?;
    let d = d.max(1) as usize;
    if v.len() % d != 0 {
        return Err(fail("internal: the latent space is not a cells x d matrix"));
    }
    let n = v.len() / d;
    Ok(from_column_major(v, n, d).into_iter().map(|x| x as f32).collect())
}

/// Trains a label model on `z` (cells × d) with 1-based label codes (NA:
/// unlabelled) of `levels`. Returns list(bytes, info).
/// @noRd
/// R's 1-based label codes as the core's: NA or < 1 is unlabelled.
pub(crate) fn label_codes(codes: &Robj) -> Result<Vec<u32>> {
    Ok(int_slice(codes, "labels")?
        .iter()
        .map(|&c| if c == i32::MIN || c < 1 { UNLABELED } else { c as u32 - 1 })
        .collect())
}

#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_fit_labels(
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
    let codes = label_codes(&codes)?;
    let levels = strings(&levels, "levels")?;
    let config: LabelConfig = from_r(&config, "label model settings")?;
    let train: TrainConfig = from_r(&train, "training settings")?;
    let model = with_epoch_progress(threads, &progress, |interrupted, report| {
        LabelModel::fit(&z, &codes, levels, config, train, interrupted, &|r| report("train", r))
    })?;
    let meta = serde_json::to_value(&model.meta).map_err(|e| fail(e.to_string()))?;
    Ok(list!(bytes = Raw::from_bytes(&model.to_bytes().map_err(fail)?), info = to_r(&meta)).into())
}

/// Label probabilities (cells × labels) and distances of cells at `z`.
/// @noRd
#[extendr]
fn rs_predict_labels(bytes: Raw, z: Robj, d: i32, threads: i32) -> Result<Robj> {
    let model = LabelModel::from_bytes(bytes.as_slice()).map_err(fail)?;
    let z = latent_rows(&z, d)?;
    let k = model.meta.levels.len();
    let lent = crate::worker::Lent(&model);
    let p = crate::run(threads, |_| lent.get().predict(&z))?;
    let n = p.distance.len();
    Ok(list!(
        probabilities = r_matrix(&p.probabilities, n, k),
        distance = p.distance.iter().map(|&v| v as f64).collect::<Vec<f64>>()
    )
    .into())
}

extendr_module! {
    mod labels;
    fn rs_fit_labels;
    fn rs_predict_labels;
}
