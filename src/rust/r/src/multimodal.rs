//! extendr glue of the multimodal model: fitting, description, files, and
//! inference on (new) paired cells.

use crate::models::{categorical_list, train_config, transpose, with_epoch_progress, with_training, Settings};
use crate::worker::Lent;
use crate::{counts_from_r, fail, strings};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::data::CountMatrix;
use scdistill_core::device::parse_device;
use scdistill_core::models::multimodal::{
    infer, Combine, Key, ModalitySpec, MultimodalConfig, MultimodalCovariates, MultimodalData, MultimodalModel,
    MultimodalTask,
};
use scdistill_core::nn::Norm;

type Ptr = ExternalPtr<MultimodalModel>;

fn model_ref(ptr: &Robj) -> Result<&MultimodalModel> {
    let p: &Ptr = ptr.try_into().map_err(|_| fail("internal: not a multimodal model pointer"))?;
    p.try_addr().map_err(|_| fail("internal: the model pointer is empty"))
}

/// The modalities' count matrices from a list of count slot lists.
fn modality_counts(counts: &List) -> Result<Vec<CountMatrix>> {
    counts
        .values()
        .map(|v| counts_from_r(&List::try_from(v).map_err(|_| fail("internal: modality counts must be a list"))?))
        .collect()
}

fn config_from_r(config: &List, modalities: &List) -> Result<MultimodalConfig> {
    let s = Settings(config);
    let d = MultimodalConfig::default();
    let specs = modalities
        .iter()
        .map(|(name, v)| {
            let l = List::try_from(v).map_err(|_| fail("internal: modality settings must be a list"))?;
            let m = Settings(&l);
            Ok(ModalitySpec {
                name: name.to_string(),
                n_features: 0,
                n_latent: m.count("n_latent", 10)?,
                n_hidden: m.count("n_hidden", 128)?,
                ambient: m.flag("ambient", false)?,
                feature_scaling: m.flag("feature_scaling", false)?,
                weight: m.num("weight", 1.0)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(MultimodalConfig {
        modalities: specs,
        combine: s.choice("combine", d.combine, Combine::parse)?,
        n_layers: s.count("n_layers", d.n_layers)?,
        dropout: s.num("dropout", d.dropout)?,
        norm: s.choice("norm", d.norm, Norm::parse)?,
        learn_library: s.flag("learn_library", d.learn_library)?,
        library_prior_scale: s.num("library_prior_scale", d.library_prior_scale)?,
        ambient_prior: s.flag("ambient_prior", d.ambient_prior)?,
        decoder_l2: s.num("decoder_l2", d.decoder_l2)?,
        ..d
    })
}

/// Training covariates: list(ambient, scaling, dispersion, library, decoder, encoder),
/// the first four list(name, codes, levels), the last two lists of them.
fn covariates_from_r(cov: &List, n: usize) -> Result<MultimodalCovariates> {
    let s = Settings(cov);
    let one = |key: &str| -> Result<scdistill_core::data::Categorical> {
        let v = s.get(key).ok_or_else(|| fail(format!("internal: no `{key}` covariate")))?;
        categorical_list(&List::try_from(v).map_err(|_| fail("internal: covariate must be a list"))?, n)
    };
    let many = |key: &str| -> Result<Vec<scdistill_core::data::Categorical>> {
        match s.get(key) {
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

fn latents_to_r(model: &MultimodalModel, joint: &[f32], per: &[Vec<f32>], n: usize) -> List {
    let c = &model.meta.config;
    let per_r: Vec<(&str, Robj)> =
        c.modalities.iter().zip(per).map(|(m, z)| (m.name.as_str(), Robj::from(transpose(z, n, m.n_latent)))).collect();
    list!(joint = transpose(joint, n, c.n_latent()), modalities = List::from_pairs(per_r))
}

/// Trains a multimodal model on paired modalities (a named list of count
/// slot lists, same cells). Returns list(ptr, latent (joint and per modality)).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_fit_multimodal(
    counts: List,
    covariates: List,
    config: List,
    modalities: List,
    train: List,
    device: &str,
    threads: i32,
    progress: Robj,
) -> Result<Robj> {
    let mats = modality_counts(&counts)?;
    let n = mats.first().map(|m| m.n_cells()).unwrap_or(0);
    let cov = covariates_from_r(&covariates, n)?;
    let (config, train) = (config_from_r(&config, &modalities)?, train_config(&train)?);
    let device = parse_device(device).map_err(fail)?;
    let refs: Vec<&CountMatrix> = mats.iter().collect();
    let (model, joint, per) = with_epoch_progress(threads, &progress, |interrupted, report| {
        let model = MultimodalModel::fit(&refs, &cov, config, train, device, interrupted, report)?;
        let data = MultimodalData::new(mats.iter().map(|m| &m.csr).collect(), &cov)?;
        let (joint, per) = infer::latent(&model.model, &data, true);
        Ok((model, joint, per))
    })?;
    let latent = latents_to_r(&model, &joint, &per, n);
    Ok(list!(ptr = ExternalPtr::new(model), latent = latent).into())
}

fn key_to_r(k: &Key) -> List {
    list!(name = k.name.clone(), levels = k.levels.clone())
}

/// The description of a multimodal model as an R list.
/// @noRd
#[extendr]
fn rs_multimodal_info(ptr: Robj) -> Result<List> {
    let m = model_ref(&ptr)?;
    let c = &m.meta.config;
    let modalities: Vec<(&str, Robj)> = c
        .modalities
        .iter()
        .zip(&m.meta.features)
        .map(|(s, f)| {
            let l = list!(
                features = f.clone(),
                n_latent = s.n_latent as i32,
                n_hidden = s.n_hidden as i32,
                ambient = s.ambient,
                feature_scaling = s.feature_scaling,
                weight = s.weight
            );
            (s.name.as_str(), Robj::from(l))
        })
        .collect();
    Ok(with_training(
        list!(
            kind = "multimodal",
            device = scdistill_core::device::device_name(m.model.device()),
            modalities = List::from_pairs(modalities),
            covariates = list!(
                ambient = key_to_r(&m.meta.ambient),
                scaling = key_to_r(&m.meta.scaling),
                dispersion = key_to_r(&m.meta.dispersion),
                library = key_to_r(&m.meta.library),
                decoder = List::from_values(m.meta.decoder.iter().map(key_to_r)),
                encoder = List::from_values(m.meta.encoder.iter().map(key_to_r))
            ),
            config = list!(
                n_latent = c.n_latent() as i32,
                combine = format!("{:?}", c.combine).to_lowercase(),
                n_layers = c.n_layers as i32,
                dropout = c.dropout,
                norm = format!("{:?}", c.norm).to_lowercase(),
                library = if c.learn_library { "learned" } else { "observed" },
                library_prior_scale = c.library_prior_scale,
                ambient_prior = c.ambient_prior,
                decoder_l2 = c.decoder_l2
            ),
        ),
        &m.meta.training,
    ))
}

/// The model file's bytes.
/// @noRd
#[extendr]
fn rs_multimodal_bytes(ptr: Robj) -> Result<Raw> {
    Ok(Raw::from_bytes(&model_ref(&ptr)?.to_bytes().map_err(fail)?))
}

/// A model pointer from a model file's bytes, on `device`.
/// @noRd
#[extendr]
fn rs_multimodal_from_bytes(bytes: Raw, device: &str) -> Result<Robj> {
    let device = parse_device(device).map_err(fail)?;
    Ok(ExternalPtr::new(MultimodalModel::from_bytes(bytes.as_slice(), device).map_err(fail)?).into())
}

/// Runs `f(model, data)` on a worker with libtorch seeded: the cells of
/// `counts` (one count list per modality) aligned to the model's features,
/// with covariates from `labels` (NULL or character per key, in the order
/// ambient, scaling, dispersion, library, decoder keys, encoder keys).
fn on_cells<T: Send>(
    ptr: &Robj,
    counts: &List,
    labels: &List,
    strict: bool,
    seed: f64,
    threads: i32,
    f: impl FnOnce(&MultimodalModel, &MultimodalData, &dyn Fn() -> bool) -> scdistill_core::Result<T> + Send,
) -> Result<T> {
    let model = model_ref(ptr)?;
    let aligned = model.align(modality_counts(counts)?).map_err(fail)?;
    let n = aligned.first().map(|c| c.n_rows).unwrap_or(0);
    let labs = labels
        .values()
        .map(|v| if v.is_null() { Ok(None) } else { strings(&v, "covariate").map(Some) })
        .collect::<Result<Vec<_>>>()?;
    let cov = model.covariates_for(n, &labs, strict).map_err(fail)?;
    let lent = Lent(model);
    crate::run(threads, |interrupted| {
        scdistill_core::device::seed_torch(seed as u64);
        let data = MultimodalData::new(aligned.iter().collect(), &cov)?;
        f(lent.get(), &data, interrupted)
    })
}

/// Joint and per-modality latent spaces, column-major cells × dimensions.
/// @noRd
#[extendr]
fn rs_multimodal_latent(
    ptr: Robj,
    counts: List,
    labels: List,
    give_mean: bool,
    seed: f64,
    threads: i32,
) -> Result<List> {
    let (joint, per, n) = on_cells(&ptr, &counts, &labels, false, seed, threads, |m, data, _| {
        let (j, p) = infer::latent(&m.model, data, give_mean);
        Ok((j, p, data.n_cells()))
    })?;
    Ok(latents_to_r(model_ref(&ptr)?, &joint, &per, n))
}

/// Decoded mean per unit library of modality `modality` (1-based) × library_size:
/// features × cells column-major.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_multimodal_normalized(
    ptr: Robj,
    counts: List,
    labels: List,
    modality: i32,
    library_size: f64,
    ambient: bool,
    threads: i32,
) -> Result<Vec<f64>> {
    let m = (modality - 1).max(0) as usize;
    let v = on_cells(&ptr, &counts, &labels, true, 0.0, threads, |model, data, _| {
        Ok(infer::normalized(&model.model, data, m, library_size, ambient))
    })?;
    Ok(v.into_iter().map(f64::from).collect())
}

/// Modality attribution, row-major [cells, modalities, n_latent] as a flat vector.
/// @noRd
#[extendr]
fn rs_multimodal_attribution(ptr: Robj, counts: List, labels: List, threads: i32) -> Result<Vec<f64>> {
    let v = on_cells(&ptr, &counts, &labels, true, 0.0, threads, |model, data, interrupted| {
        let a = infer::attribution(&model.model, data, interrupted);
        if interrupted() {
            return Err(scdistill_core::Error::Interrupted);
        }
        Ok(a)
    })?;
    Ok(v.into_iter().map(f64::from).collect())
}

/// c(-ELBO, reconstruction, KL) per cell on the cells given.
/// @noRd
#[extendr]
fn rs_multimodal_elbo(ptr: Robj, counts: List, labels: List, seed: f64, threads: i32) -> Result<Vec<f64>> {
    let (e, r, k) = on_cells(&ptr, &counts, &labels, true, seed, threads, |model, data, _| {
        let task = MultimodalTask { model: &model.model, data };
        let rows: Vec<usize> = (0..data.n_cells()).collect();
        Ok(scdistill_core::train::evaluate(&task, &rows, 1024))
    })?;
    Ok(vec![e, r, k])
}

extendr_module! {
    mod multimodal;
    fn rs_fit_multimodal;
    fn rs_multimodal_info;
    fn rs_multimodal_bytes;
    fn rs_multimodal_from_bytes;
    fn rs_multimodal_latent;
    fn rs_multimodal_normalized;
    fn rs_multimodal_attribution;
    fn rs_multimodal_elbo;
}
