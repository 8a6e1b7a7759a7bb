//! extendr glue of fit_vae() (mirrors R/vae.R).

use crate::convert::from_r;
use crate::disk::LatentTarget;
use crate::model::{fitted_to_r, with_epoch_progress};
use crate::{fail, int_slice, strings};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::data::{Categorical, Covariates};
use scdistill_core::device::parse_device;
use scdistill_core::models::vae::VaeConfig;
use scdistill_core::train::TrainConfig;

/// A categorical covariate of `n` cells from list(name, codes (1-based), levels).
pub(crate) fn categorical_list(l: &List, n: usize) -> Result<Categorical> {
    let get = |k: &str| l.iter().find(|(name, _)| *name == k).map(|(_, v)| v);
    let name = get("name").and_then(|v| v.as_str().map(String::from)).unwrap_or_else(|| "batch".into());
    let codes = get("codes").ok_or_else(|| fail("internal: covariate without codes"))?;
    let codes: Vec<u32> = int_slice(&codes, &name)?.iter().map(|&c| (c - 1).max(0) as u32).collect();
    let levels = strings(&get("levels").ok_or_else(|| fail("internal: covariate without levels"))?, "levels")?;
    Categorical::new(&name, codes, levels, n, 1).map_err(fail)
}

/// Covariates of training cells: `batch` = list(name, codes (1-based), levels);
/// `categorical` = list of such lists; `continuous` = named list of doubles.
pub(crate) fn covariates_from_r(batch: &List, categorical: &List, continuous: &List, n: usize) -> Result<Covariates> {
    let cat = |l: &List| categorical_list(l, n);
    let batch = cat(batch)?;
    let cats = categorical
        .values()
        .map(|v| cat(&List::try_from(v).map_err(|_| fail("internal: categorical covariate must be a list"))?))
        .collect::<Result<Vec<_>>>()?;
    let conts = continuous
        .iter()
        .map(|(name, v)| {
            let x = v.as_real_vector().ok_or_else(|| fail(format!("`{name}` must be numeric")))?;
            Ok((name.to_string(), x.into_iter().map(|x| x as f32).collect()))
        })
        .collect::<Result<Vec<_>>>()?;
    Covariates::new(batch, cats, conts).map_err(fail)
}

/// Trains a VAE on `counts` (count slots, or a description of counts on
/// disk: see `disk::Input`); `config` and `train` are named lists of the core's
/// `VaeConfig` and `TrainConfig` fields. `progress` (an R function of the
/// phase, epoch, training loss and validation -ELBO, or NULL) is called on
/// the R thread as epochs finish, and on disk as the pass before training
/// reads the cells (phase "scan": cells read, all cells). The training
/// cells' latent space is written into the R matrix returned, or with
/// `latent_file` = list(path, name) into that new HDF5 dataset (cells × d,
/// f32, created before training). Returns list(ptr, latent) (latent NULL
/// with a file).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_fit_vae(
    counts: List,
    batch: List,
    categorical: List,
    continuous: List,
    config: Robj,
    train: Robj,
    device: &str,
    threads: i32,
    latent_file: Robj,
    progress: Robj,
) -> Result<Robj> {
    let input = crate::disk::Input::from_r(&counts)?;
    let n = input.n_cells();
    let cov = covariates_from_r(&batch, &categorical, &continuous, n)?;
    let config: VaeConfig = from_r(&config, "VAE settings")?;
    let train: TrainConfig = from_r(&train, "training settings")?;
    let device = parse_device(device).map_err(fail)?;
    let mut latent = LatentTarget::from_r(&latent_file, n, config.n_latent)?;
    let mut out = latent.out();
    let model = with_epoch_progress(threads, &progress, |interrupted, report| {
        input.fit_vae(&cov, config, train, device, interrupted, report, &mut out)
    })?;
    Ok(fitted_to_r(Box::new(model), latent.into_r()))
}

extendr_module! {
    mod vae;
    fn rs_fit_vae;
}
