//! extendr glue of every fitted model (mirrors R/model.R): one pointer
//! type and one set of `rs_model_*` entry points, whatever the model.

use crate::convert::{from_r, to_json, to_r};
use crate::worker::{self, Lent};
use crate::{counts_from_r, csr_to_r, fail, strings, threads_from_r};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::de::Watch;
use scdistill_core::device::parse_device;
use scdistill_core::mapping::MapOptions;
use scdistill_core::models::{Cells, ExpressionOptions, FittedModel, LatentOptions, Matrix};
use scdistill_core::train::{EpochRecord, TrainConfig};
use std::sync::Mutex;

/// Every fitted model behind one external pointer.
pub(crate) type Model = Box<dyn FittedModel>;

/// A new pointer holding `model`.
pub(crate) fn model_ptr(model: Model) -> Robj {
    ExternalPtr::new(model).into()
}

pub(crate) fn model_ref(ptr: &Robj) -> Result<&Model> {
    let p: &ExternalPtr<Model> = ptr.try_into().map_err(|_| fail("internal: not a scdistill model pointer"))?;
    p.try_addr().map_err(|_| fail("internal: the model pointer is empty"))
}

/// The model (typed) behind a pointer, for operations of one kind.
pub(crate) fn model_as<'a, T: 'static>(ptr: &'a Robj, what: &str) -> Result<&'a T> {
    model_ref(ptr)?.as_any().downcast_ref::<T>().ok_or_else(|| fail(format!("{what} needs a different kind of model")))
}

/// Cells from R: list(counts = list of count lists, one per modality;
/// batch = NULL or labels; categorical = list of NULL or labels;
/// continuous = list of doubles).
pub(crate) fn cells_from_r(cells: &List) -> Result<Cells> {
    let get = |name: &str| cells.iter().find(|(n, _)| *n == name).map(|(_, v)| v);
    let list = |name: &str| -> Result<List> {
        match get(name) {
            None => Ok(List::new(0)),
            Some(v) if v.is_null() => Ok(List::new(0)),
            Some(v) => List::try_from(v).map_err(|_| fail(format!("internal: `{name}` must be a list"))),
        }
    };
    let counts = list("counts")?
        .values()
        .map(|v| counts_from_r(&List::try_from(v).map_err(|_| fail("internal: counts must be lists"))?))
        .collect::<Result<Vec<_>>>()?;
    let labels = |v: Robj, what: &str| if v.is_null() { Ok(None) } else { strings(&v, what).map(Some) };
    let batch = match get("batch") {
        Some(b) => labels(b, "batch")?,
        None => None,
    };
    let categorical = list("categorical")?.values().map(|v| labels(v, "covariate")).collect::<Result<Vec<_>>>()?;
    let continuous = list("continuous")?
        .iter()
        .map(|(name, v)| {
            v.as_real_vector()
                .map(|x| x.into_iter().map(|x| x as f32).collect())
                .ok_or_else(|| fail(format!("continuous covariate `{name}` must be numeric")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Cells { counts, batch, categorical, continuous })
}

/// A row-major core matrix as an R matrix (rows × cols).
pub(crate) fn matrix_to_r(m: &Matrix) -> Robj {
    crate::r_matrix(&m.values, m.rows, m.cols).into()
}

/// A row-major cells × features core matrix as R's features × cells
/// matrix: the same buffer read column-major, no transposition.
fn features_by_cells(m: Matrix) -> Robj {
    let mut out = RMatrix::<f64>::new(m.cols, m.rows);
    if !m.values.is_empty() {
        out.data_mut().iter_mut().zip(m.values).for_each(|(o, v)| *o = f64::from(v));
    }
    out.into()
}

/// Runs `f(model)` on a worker thread (R's thread polls for Ctrl-C).
fn with_model<T: Send>(
    ptr: &Robj,
    threads: i32,
    f: impl FnOnce(&dyn FittedModel, &dyn Fn() -> bool) -> scdistill_core::Result<T> + Send,
) -> Result<T> {
    let lent = Lent(model_ref(ptr)?);
    crate::run(threads, |interrupted| f(lent.get().as_ref(), interrupted))
}

/// The model's description (kind, device, architecture, features,
/// covariate levels, training record) as an R list.
/// @noRd
#[extendr]
fn rs_model_info(ptr: Robj) -> Result<Robj> {
    Ok(to_r(&model_ref(&ptr)?.describe().map_err(fail)?))
}

/// The model file's bytes.
/// @noRd
#[extendr]
fn rs_model_bytes(ptr: Robj) -> Result<Raw> {
    Ok(Raw::from_bytes(&model_ref(&ptr)?.to_bytes().map_err(fail)?))
}

/// A model pointer from a model file's bytes, on `device`, whatever its kind.
/// @noRd
#[extendr]
fn rs_model_from_bytes(bytes: Raw, device: &str) -> Result<Robj> {
    let device = parse_device(device).map_err(fail)?;
    Ok(model_ptr(scdistill_core::models::from_bytes(bytes.as_slice(), device).map_err(fail)?))
}

/// Latent spaces of `cells`: list(joint = cells × d matrix, parts = named
/// list of each modality's own, for models of several modalities).
/// @noRd
#[extendr]
fn rs_model_latent(ptr: Robj, cells: List, options: Robj, threads: i32) -> Result<List> {
    let opts: LatentOptions = from_r(&options, "latent options")?;
    let cells = cells_from_r(&cells)?;
    let z = with_model(&ptr, threads, |m, _| m.latent(cells, &opts))?;
    let parts = List::from_pairs(z.parts.iter().map(|(n, m)| (n.as_str(), matrix_to_r(m))));
    Ok(list!(joint = matrix_to_r(&z.joint), parts = parts))
}

/// Expected expression of `cells`: a features × cells matrix.
/// @noRd
#[extendr]
fn rs_model_expression(ptr: Robj, cells: List, options: Robj, threads: i32) -> Result<Robj> {
    let opts: ExpressionOptions = from_r(&options, "expression options")?;
    let cells = cells_from_r(&cells)?;
    Ok(features_by_cells(with_model(&ptr, threads, |m, _| m.expression(cells, &opts))?))
}

/// c(elbo, reconstruction, kl): means per cell.
/// @noRd
#[extendr]
fn rs_model_elbo(ptr: Robj, cells: List, seed: Robj, threads: i32) -> Result<Vec<f64>> {
    let seed: u64 = from_r(&seed, "`seed`")?;
    let cells = cells_from_r(&cells)?;
    let e = with_model(&ptr, threads, |m, _| m.elbo(cells, seed))?;
    Ok(vec![e.elbo, e.reconstruction, e.kl])
}

/// Posterior predictive counts: a list of `n_samples` CSR slot lists.
/// @noRd
#[extendr]
fn rs_model_sample(ptr: Robj, cells: List, n_samples: i32, seed: Robj, threads: i32) -> Result<List> {
    let seed: u64 = from_r(&seed, "`seed`")?;
    let cells = cells_from_r(&cells)?;
    let draws = with_model(&ptr, threads, |m, _| m.sample_counts(cells, n_samples.max(1) as usize, seed))?;
    Ok(List::from_values(draws.into_iter().map(csr_to_r)))
}

/// Bayesian DE between two groups of `cells` (0-based indices); `settings`
/// holds the core's DE settings and `batches` (labels, or NULL);
/// `progress` as for training, phase "de" (`pass_record`).
/// @noRd
#[extendr]
fn rs_model_de(
    ptr: Robj,
    cells: List,
    group1: Robj,
    group2: Robj,
    settings: Robj,
    threads: i32,
    progress: Robj,
) -> Result<Robj> {
    let (settings, batches) = de_settings(&settings)?;
    let cells = cells_from_r(&cells)?;
    let n = cells.n_cells();
    let (g1, g2) = (group_rows(&group1, n, "group1")?, group_rows(&group2, n, "group2")?);
    let lent = Lent(model_ref(&ptr)?);
    let t = with_epoch_progress(threads, &progress, |interrupted, report| {
        let progress = |done, total| report("de", &pass_record(done, total));
        lent.get().differential_expression(cells, &g1, &g2, settings, &batches, &Watch::new(interrupted, &progress))
    })?;
    de_table_to_r(&t)
}

/// The progress of a pass over cells as an epoch record, the shape progress
/// reports take to R: `epoch` the cells done, `train_loss` all of them.
pub(crate) fn pass_record(done: usize, total: usize) -> EpochRecord {
    EpochRecord { epoch: done, train_loss: total as f64, ..Default::default() }
}

/// The core's DE settings from R's list, and the batches every cell is
/// decoded under (`batches`: labels, or NULL).
pub(crate) fn de_settings(settings: &Robj) -> Result<(scdistill_core::de::DeSettings, Vec<String>)> {
    let mut json = to_json(settings)?;
    let batches: Vec<String> = match json.as_object_mut().and_then(|o| o.remove("batches")) {
        None | Some(serde_json::Value::Null) => vec![],
        Some(serde_json::Value::String(s)) => vec![s],
        Some(v) => serde_json::from_value(v).map_err(|e| fail(format!("`batch_correction`: {e}")))?,
    };
    let settings = serde_json::from_value(json).map_err(|e| fail(format!("DE settings: {e}")))?;
    Ok((settings, batches))
}

/// A group's cells: 0-based indices below `n`.
pub(crate) fn group_rows(g: &Robj, n: usize, what: &str) -> Result<Vec<usize>> {
    crate::int_slice(g, what)?
        .iter()
        .map(|&i| {
            (i >= 0 && (i as usize) < n)
                .then_some(i as usize)
                .ok_or_else(|| fail(format!("internal: `{what}` out of range")))
        })
        .collect()
}

pub(crate) fn de_table_to_r(t: &scdistill_core::de::DeTable) -> Result<Robj> {
    Ok(to_r(&serde_json::to_value(t).map_err(|e| fail(e.to_string()))?))
}

/// The model mapped onto the query `cells` (their batches new to it), and
/// the query's latent space: list(ptr, latent) (latent as for `rs_model_latent`
/// where the model has several modalities). `options` holds the core's
/// `MapOptions`, `train` its `TrainConfig`; `progress` as for training.
/// @noRd
#[extendr]
fn rs_model_map_query(
    ptr: Robj,
    cells: List,
    options: Robj,
    train: Robj,
    threads: i32,
    progress: Robj,
) -> Result<Robj> {
    let opts: MapOptions = from_r(&options, "mapping options")?;
    let train: TrainConfig = from_r(&train, "training settings")?;
    let cells = cells_from_r(&cells)?;
    let again = Cells {
        counts: cells.counts.clone(),
        batch: cells.batch.clone(),
        categorical: cells.categorical.clone(),
        continuous: cells.continuous.clone(),
    };
    let lent = Lent(model_ref(&ptr)?);
    let (model, z) = with_epoch_progress(threads, &progress, |interrupted, report| {
        let m = lent.get().map_query(cells, &opts, train, interrupted, &|r| report("train", r))?;
        let z = m.latent(again, &LatentOptions::default())?;
        Ok((m, z))
    })?;
    let latent = if z.parts.is_empty() {
        matrix_to_r(&z.joint)
    } else {
        let parts = List::from_pairs(z.parts.iter().map(|(n, m)| (n.as_str(), matrix_to_r(m))));
        list!(joint = matrix_to_r(&z.joint), parts = parts).into()
    };
    Ok(fitted_to_r(model, latent))
}

/// Runs `work(interrupted, report)` on a worker; each epoch it reports is
/// handed to `progress` (an R function of the phase, epoch, training loss
/// and validation loss, or NULL) on the R thread.
pub(crate) fn with_epoch_progress<T: Send>(
    threads: i32,
    progress: &Robj,
    work: impl FnOnce(&dyn Fn() -> bool, &dyn Fn(&str, &EpochRecord)) -> scdistill_core::Result<T> + Send,
) -> Result<T> {
    let pending: Mutex<Vec<(String, EpochRecord)>> = Mutex::new(Vec::new());
    let report = |phase: &str, r: &EpochRecord| {
        pending.lock().unwrap_or_else(|e| e.into_inner()).push((phase.to_string(), r.clone()))
    };
    let callback = progress.as_function();
    let tick = || {
        let done = std::mem::take(&mut *pending.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(f) = &callback {
            for (phase, r) in done {
                // A failing progress callback must not stop training.
                let _ = f.call(pairlist!(phase, r.epoch as i32, r.train_loss, r.validation_elbo));
            }
        }
    };
    let done = worker::run_with_ticks(threads_from_r(threads)?, |interrupted| work(interrupted, &report), tick);
    // What the training threads freed goes back to the system.
    scdistill_core::device::release_free_memory();
    done.map_err(fail)?.map_err(fail)
}

/// Hands the allocator's free pages back to the system (after R's gc(), as
/// `distill()` does once its teacher's matrices are garbage).
/// @noRd
#[extendr]
fn rs_release_memory() {
    scdistill_core::device::release_free_memory();
}

/// A fitted model and its training cells' latent space, as R receives both.
pub(crate) fn fitted_to_r(model: Model, latent: Robj) -> Robj {
    list!(ptr = model_ptr(model), latent = latent).into()
}

extendr_module! {
    mod model;
    fn rs_model_info;
    fn rs_model_bytes;
    fn rs_model_from_bytes;
    fn rs_model_latent;
    fn rs_model_expression;
    fn rs_model_elbo;
    fn rs_model_sample;
    fn rs_model_de;
    fn rs_model_map_query;
    fn rs_release_memory;
}
