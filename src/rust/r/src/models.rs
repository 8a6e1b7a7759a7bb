//! extendr glue of the trained models: fitting with progress reported to
//! R, model bytes and descriptions, inference on (new) cells.

use crate::worker::{self, Lent};
use crate::{counts_from_r, fail, int_slice, strings, threads_from_r};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::data::{Categorical, CountMatrix, Covariates};
use scdistill_core::device::parse_device;
use scdistill_core::infer;
use scdistill_core::models::vae::{Dispersion, Likelihood, VaeConfig, VaeData, VaeModel};
use scdistill_core::nn::Norm;
use scdistill_core::train::{EpochRecord, TrainConfig, TrainingRecord};
use std::sync::Mutex;

type ModelPtr = ExternalPtr<VaeModel>;

pub(crate) fn model_ref(ptr: &Robj) -> Result<&VaeModel> {
    let p: &ModelPtr = ptr.try_into().map_err(|_| fail("internal: not a scdistill model pointer"))?;
    p.try_addr().map_err(|_| fail("internal: the model pointer is empty"))
}

/// Named scalar settings from an R list.
pub(crate) struct Settings<'a>(pub(crate) &'a List);

impl Settings<'_> {
    pub(crate) fn get(&self, name: &str) -> Option<Robj> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
    pub(crate) fn num(&self, name: &str, default: f64) -> Result<f64> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .as_real()
                .or_else(|| v.as_integer().map(f64::from))
                .ok_or_else(|| fail(format!("`{name}` must be a single number"))),
        }
    }
    pub(crate) fn count(&self, name: &str, default: usize) -> Result<usize> {
        let v = self.num(name, default as f64)?;
        if v < 0.0 || v.fract() != 0.0 || !v.is_finite() {
            return Err(fail(format!("`{name}` must be a whole number, not {v}")));
        }
        Ok(v as usize)
    }
    pub(crate) fn flag(&self, name: &str, default: bool) -> Result<bool> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| fail(format!("`{name}` must be TRUE or FALSE"))),
        }
    }
    pub(crate) fn choice<T>(&self, name: &str, default: T, parse: fn(&str) -> Option<T>) -> Result<T> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => {
                let s = v.as_str().ok_or_else(|| fail(format!("`{name}` must be a string")))?;
                parse(s).ok_or_else(|| fail(format!("unknown `{name}`: \"{s}\"")))
            }
        }
    }
}

fn vae_config(s: &List) -> Result<VaeConfig> {
    let s = Settings(s);
    let d = VaeConfig::default();
    Ok(VaeConfig {
        n_latent: s.count("n_latent", d.n_latent)?,
        n_hidden: s.count("n_hidden", d.n_hidden)?,
        n_layers: s.count("n_layers", d.n_layers)?,
        dropout: s.num("dropout", d.dropout)?,
        norm: s.choice("norm", d.norm, Norm::parse)?,
        likelihood: s.choice("likelihood", d.likelihood, Likelihood::parse)?,
        dispersion: s.choice("dispersion", d.dispersion, Dispersion::parse)?,
        learn_library: s.flag("learn_library", d.learn_library)?,
        encode_covariates: s.flag("encode_covariates", d.encode_covariates)?,
        deeply_inject_covariates: s.flag("deeply_inject_covariates", d.deeply_inject_covariates)?,
        ..d
    })
}

pub(crate) fn train_config(s: &List) -> Result<TrainConfig> {
    let s = Settings(s);
    let d = TrainConfig::default();
    Ok(TrainConfig {
        max_epochs: s.count("max_epochs", 0)?,
        batch_size: s.count("batch_size", d.batch_size)?,
        lr: s.num("lr", d.lr)?,
        weight_decay: s.num("weight_decay", d.weight_decay)?,
        adam_eps: s.num("adam_eps", d.adam_eps)?,
        kl_warmup: s.num("kl_warmup", d.kl_warmup)?,
        early_stopping: s.flag("early_stopping", d.early_stopping)?,
        patience: s.count("patience", d.patience)?,
        min_delta: s.num("min_delta", d.min_delta)?,
        validation_fraction: s.num("validation_fraction", d.validation_fraction)?,
        seed: s.count("seed", 0)? as u64,
    })
}

/// A categorical covariate of `n` cells from list(name, codes (1-based), levels).
pub(crate) fn categorical_list(l: &List, n: usize) -> Result<Categorical> {
    let s = Settings(l);
    let name = s.get("name").and_then(|v| v.as_str().map(String::from)).unwrap_or_else(|| "batch".into());
    let codes = s.get("codes").ok_or_else(|| fail("internal: covariate without codes"))?;
    let codes: Vec<u32> = int_slice(&codes, &name)?.iter().map(|&c| (c - 1).max(0) as u32).collect();
    let levels = strings(&s.get("levels").ok_or_else(|| fail("internal: covariate without levels"))?, "levels")?;
    Categorical::new(&name, codes, levels, n, 1).map_err(fail)
}

/// Covariates of training cells: `batch` = list(name, codes (1-based), levels);
/// `categorical` = list of such lists; `continuous` = named list of doubles.
fn covariates_from_r(batch: &List, categorical: &List, continuous: &List, n: usize) -> Result<Covariates> {
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

/// Covariates of new cells from labels: `batch` NULL or character;
/// `categorical` list of character vectors; `continuous` list of doubles.
fn new_covariates(
    m: &VaeModel,
    n: usize,
    batch: &Robj,
    categorical: &List,
    continuous: &List,
    needed: bool,
) -> Result<Covariates> {
    let b = if batch.is_null() { None } else { Some(strings(batch, "batch")?) };
    let cats = categorical.values().map(|v| strings(&v, "categorical covariate")).collect::<Result<Vec<_>>>()?;
    let conts = continuous
        .values()
        .map(|v| {
            v.as_real_vector()
                .map(|x| x.into_iter().map(|x| x as f32).collect())
                .ok_or_else(|| fail("continuous covariates must be numeric"))
        })
        .collect::<Result<Vec<_>>>()?;
    m.covariates_for(n, b.as_deref(), &cats, conts, needed).map_err(fail)
}

/// Codes of batch labels among the model's `levels`; an unknown label is an
/// error naming it (`what` and `problem` phrase the message).
pub(crate) fn batch_codes(labels: &Robj, levels: &[String], what: &str, problem: &str) -> Result<Vec<u32>> {
    strings(labels, what)?
        .iter()
        .map(|b| {
            levels
                .iter()
                .position(|l| l == b)
                .map(|p| p as u32)
                .ok_or_else(|| fail(format!("{what} \"{b}\" {problem} (batches: {})", levels.join(", "))))
        })
        .collect()
}

/// Training settings as an R list.
pub(crate) fn train_to_r(t: &TrainConfig) -> List {
    list!(
        max_epochs = t.max_epochs as i32,
        batch_size = t.batch_size as i32,
        lr = t.lr,
        weight_decay = t.weight_decay,
        kl_warmup = t.kl_warmup,
        early_stopping = t.early_stopping,
        patience = t.patience as i32,
        min_delta = t.min_delta,
        validation_fraction = t.validation_fraction,
        seed = t.seed as f64
    )
}

pub(crate) fn history_to_r(h: &[EpochRecord]) -> List {
    let col = |f: fn(&EpochRecord) -> f64| h.iter().map(f).collect::<Vec<f64>>();
    list!(
        epoch = h.iter().map(|r| r.epoch as i32).collect::<Vec<i32>>(),
        kl_weight = col(|r| r.kl_weight),
        train_loss = col(|r| r.train_loss),
        train_elbo = col(|r| r.train_elbo),
        train_reconstruction = col(|r| r.train_reconstruction),
        train_kl = col(|r| r.train_kl),
        validation_elbo = col(|r| r.validation_elbo),
        validation_reconstruction = col(|r| r.validation_reconstruction),
        validation_kl = col(|r| r.validation_kl),
        seconds = col(|r| r.seconds)
    )
}

/// The description of a model as an R list.
/// @noRd
#[extendr]
fn rs_model_info(ptr: Robj) -> Result<List> {
    let m = model_ref(&ptr)?;
    let c = &m.meta.config;
    Ok(with_training(
        list!(
            kind = "vae",
            device = scdistill_core::device::device_name(m.vae.device()),
            genes = m.meta.genes.clone(),
            batch_name = m.meta.batch_name.clone(),
            batch_levels = m.meta.batch_levels.clone(),
            categorical = List::from_pairs(m.meta.categorical.iter().map(|(n, l)| (n.as_str(), Robj::from(l.clone())))),
            continuous = m.meta.continuous.clone(),
            config = list!(
                n_latent = c.n_latent as i32,
                n_hidden = c.n_hidden as i32,
                n_layers = c.n_layers as i32,
                dropout = c.dropout,
                norm = format!("{:?}", c.norm).to_lowercase(),
                likelihood = format!("{:?}", c.likelihood).to_lowercase(),
                dispersion = match c.dispersion {
                    Dispersion::Gene => "gene",
                    Dispersion::GeneBatch => "gene-batch",
                    Dispersion::GeneCell => "gene-cell",
                },
                library = if c.learn_library { "learned" } else { "observed" },
                encode_covariates = c.encode_covariates
            ),
        ),
        &m.meta.training,
    ))
}

/// `info` followed by how the model was trained (train settings, history,
/// best epoch, early stop, interruption, cells, 1-based validation cells).
pub(crate) fn with_training(info: List, r: &TrainingRecord) -> List {
    let mut pairs: Vec<(String, Robj)> = info.iter().map(|(n, v)| (n.to_string(), v)).collect();
    pairs.extend([
        ("train".to_string(), train_to_r(&r.train).into()),
        ("history".to_string(), history_to_r(&r.history).into()),
        ("best_epoch".to_string(), (r.best_epoch as i32).into()),
        ("stopped_early".to_string(), r.stopped_early.into()),
        ("interrupted".to_string(), r.interrupted.into()),
        ("n_cells".to_string(), (r.n_cells as i32).into()),
        ("validation_cells".to_string(), r.validation_cells.iter().map(|&c| c as i32 + 1).collect::<Vec<i32>>().into()),
    ]);
    List::from_pairs(pairs)
}

/// Runs `work(interrupted, report)` on a worker; each epoch it reports is
/// handed to `progress` (an R function of epoch, training loss and
/// validation -ELBO, or NULL) on the R thread.
pub(crate) fn with_epoch_progress<T: Send>(
    threads: i32,
    progress: &Robj,
    work: impl FnOnce(&dyn Fn() -> bool, &dyn Fn(&EpochRecord)) -> scdistill_core::Result<T> + Send,
) -> Result<T> {
    let pending: Mutex<Vec<EpochRecord>> = Mutex::new(Vec::new());
    let report = |r: &EpochRecord| pending.lock().unwrap_or_else(|e| e.into_inner()).push(r.clone());
    let callback = progress.as_function();
    let tick = || {
        let done: Vec<EpochRecord> = std::mem::take(&mut *pending.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(f) = &callback {
            for r in done {
                // A failing progress callback must not stop training.
                let _ = f.call(pairlist!(r.epoch as i32, r.train_loss, r.validation_elbo));
            }
        }
    };
    worker::run_with_ticks(threads_from_r(threads)?, |interrupted| work(interrupted, &report), tick)
        .map_err(fail)?
        .map_err(fail)
}

/// Trains a VAE. `progress` (an R function of epoch, train loss and
/// validation -ELBO, or NULL) is called on the R thread as epochs finish.
/// Returns the model pointer.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_fit_vae(
    counts: List,
    batch: List,
    categorical: List,
    continuous: List,
    config: List,
    train: List,
    device: &str,
    threads: i32,
    progress: Robj,
) -> Result<Robj> {
    let m = counts_from_r(&counts)?;
    let cov = covariates_from_r(&batch, &categorical, &continuous, m.n_cells())?;
    let (config, train) = (vae_config(&config)?, train_config(&train)?);
    let device = parse_device(device).map_err(fail)?;
    let (model, z) = with_epoch_progress(threads, &progress, |interrupted, report| {
        let model = VaeModel::fit(&m, &cov, config, train, device, interrupted, report)?;
        // The training cells' latent space, with their own covariates.
        let z = infer::latent(&model.vae, &VaeData::new(&m.csr, &cov), true);
        Ok((model, z))
    })?;
    let n_latent = model.meta.config.n_latent;
    Ok(list!(ptr = ExternalPtr::new(model), latent = transpose(&z, m.n_cells(), n_latent)).into())
}

/// The model file's bytes.
/// @noRd
#[extendr]
fn rs_model_bytes(ptr: Robj) -> Result<Raw> {
    let bytes = model_ref(&ptr)?.to_bytes().map_err(fail)?;
    Ok(Raw::from_bytes(&bytes))
}

/// A model pointer from a model file's bytes, on `device`.
/// @noRd
#[extendr]
fn rs_model_from_bytes(bytes: Raw, device: &str) -> Result<Robj> {
    let device = parse_device(device).map_err(fail)?;
    let model = VaeModel::from_bytes(bytes.as_slice(), device).map_err(fail)?;
    Ok(ExternalPtr::new(model).into())
}

/// New (or training) cells aligned to the model's genes.
fn aligned(model: &VaeModel, counts: &List) -> Result<CountMatrix> {
    let mut m = counts_from_r(counts)?;
    let cells = std::mem::take(&mut m.cells);
    let csr = model.align_genes(m).map_err(fail)?;
    Ok(CountMatrix { csr, genes: model.meta.genes.clone(), cells })
}

/// Latent coordinates, column-major cells × n_latent.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_vae_latent(
    ptr: Robj,
    counts: List,
    batch: Robj,
    categorical: List,
    continuous: List,
    give_mean: bool,
    seed: f64,
    threads: i32,
) -> Result<Vec<f64>> {
    let n_latent = model_ref(&ptr)?.meta.config.n_latent;
    let (z, n) = on_cells(&ptr, &counts, &batch, &categorical, &continuous, true, seed, threads, |model, data, _| {
        Ok((infer::latent(&model.vae, data, give_mean), data.counts.n_rows))
    })?;
    Ok(transpose(&z, n, n_latent))
}

/// Visits every (cell i, column j) of an n × d matrix in tiles of cells:
/// a column at a time would miss the cache on every read of a large matrix
/// (e.g. 10^8 Harmony memberships at 10^6 cells).
fn for_each_in_tiles(n: usize, d: usize, mut f: impl FnMut(usize, usize)) {
    const TILE: usize = 256;
    for i0 in (0..n).step_by(TILE) {
        for j in 0..d {
            for i in i0..(i0 + TILE).min(n) {
                f(i, j);
            }
        }
    }
}

/// R's column-major n × d matrix `v` as a row-major copy.
pub(crate) fn from_column_major(v: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * d];
    for_each_in_tiles(n, d, |i, j| out[i * d + j] = v[j * n + i]);
    out
}

/// The row-major n × d matrix `v` as an R matrix, written in place.
pub(crate) fn r_matrix<T: Copy + Into<f64>>(v: &[T], n: usize, d: usize) -> RMatrix<f64> {
    let mut out = RMatrix::<f64>::new(n, d);
    if n * d > 0 {
        let o = out.data_mut();
        for_each_in_tiles(n, d, |i, j| o[j * n + i] = v[i * d + j].into());
    }
    out
}

/// The row-major n × d matrix `v` in R's column-major order.
pub(crate) fn transpose<T: Copy + Into<f64>>(v: &[T], n: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * d];
    for_each_in_tiles(n, d, |i, j| out[j * n + i] = v[i * d + j].into());
    out
}

/// Runs `f(model, cells)` on a worker with libtorch's generator seeded: the
/// cells of `counts` aligned to the model's genes, with their covariates.
/// With `encoder_only`, covariates are needed only when the model encodes
/// them (otherwise neutral placeholders stand in). The one path of the
/// accessors that run the model on cells.
#[allow(clippy::too_many_arguments)]
pub(crate) fn on_cells<T: Send>(
    ptr: &Robj,
    counts: &List,
    batch: &Robj,
    categorical: &List,
    continuous: &List,
    encoder_only: bool,
    seed: f64,
    threads: i32,
    f: impl FnOnce(&VaeModel, &VaeData, &dyn Fn() -> bool) -> scdistill_core::Result<T> + Send,
) -> Result<T> {
    let model = model_ref(ptr)?;
    let m = aligned(model, counts)?;
    let cov = if encoder_only && !model.meta.config.encode_covariates {
        model.neutral_covariates(m.n_cells())
    } else {
        new_covariates(model, m.n_cells(), batch, categorical, continuous, true)?
    };
    let lent = Lent(model);
    crate::run(threads, |interrupted| {
        let model = lent.get();
        scdistill_core::device::seed_torch(seed as u64);
        f(model, &VaeData::new(&m.csr, &cov), interrupted)
    })
}

/// Expected expression, genes × cells column-major (the row-major cells × genes buffer as is).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_vae_expression(
    ptr: Robj,
    counts: List,
    batch: Robj,
    categorical: List,
    continuous: List,
    transform_batch: Robj,
    library_size: f64,
    n_samples: i32,
    seed: f64,
    threads: i32,
) -> Result<Vec<f64>> {
    let model = model_ref(&ptr)?;
    let levels = &model.meta.batch_levels;
    let targets: Vec<u32> = if transform_batch.is_null() {
        vec![]
    } else {
        batch_codes(&transform_batch, levels, "`transform_batch`", "is not a batch of the model")?
    };
    let n = n_samples.max(1) as usize;
    let x = on_cells(&ptr, &counts, &batch, &categorical, &continuous, false, seed, threads, |model, data, _| {
        Ok(infer::expression(&model.vae, data, &targets, library_size, n))
    })?;
    Ok(x.into_iter().map(f64::from).collect())
}

/// Posterior predictive counts: list of `n_samples` CSR slot lists.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_vae_sample(
    ptr: Robj,
    counts: List,
    batch: Robj,
    categorical: List,
    continuous: List,
    n_samples: i32,
    seed: f64,
    threads: i32,
) -> Result<List> {
    let draws = on_cells(&ptr, &counts, &batch, &categorical, &continuous, false, seed, threads, |model, data, _| {
        Ok((0..n_samples.max(1)).map(|_| infer::sample_counts(&model.vae, data)).collect::<Vec<_>>())
    })?;
    Ok(List::from_values(draws.into_iter().map(crate::csr_to_r)))
}

/// c(-ELBO, reconstruction, KL), means per cell.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_vae_elbo(
    ptr: Robj,
    counts: List,
    batch: Robj,
    categorical: List,
    continuous: List,
    seed: f64,
    threads: i32,
) -> Result<Vec<f64>> {
    let (e, r, k) =
        on_cells(&ptr, &counts, &batch, &categorical, &continuous, false, seed, threads, |model, data, _| {
            let task = scdistill_core::models::vae::VaeTask { model: &model.vae, data };
            let rows: Vec<usize> = (0..data.counts.n_rows).collect();
            Ok(scdistill_core::train::evaluate(&task, &rows, 1024))
        })?;
    Ok(vec![e, r, k])
}

extendr_module! {
    mod models;
    fn rs_fit_vae;
    fn rs_model_info;
    fn rs_model_bytes;
    fn rs_model_from_bytes;
    fn rs_vae_latent;
    fn rs_vae_expression;
    fn rs_vae_sample;
    fn rs_vae_elbo;
}
