//! extendr glue of the teacher (Harmony) and the distilled student.

use crate::models::{batch_codes, from_column_major, history_to_r, r_matrix, train_config, transpose, Settings};
use crate::worker::{self, Lent};
use crate::{counts_from_r, fail, int_slice, strings, threads_from_r};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::data::Categorical;
use scdistill_core::device::parse_device;
use scdistill_core::models::distill::{DistillConfig, DistillData, DistillModel, Phase};
use scdistill_core::nn::Norm;
use scdistill_core::teacher::{harmony, Embedding, HarmonyCovariate, HarmonyParams};
use scdistill_core::train::EpochRecord;
use std::sync::Mutex;

type DistillPtr = ExternalPtr<DistillModel>;

pub(crate) fn distill_ref(ptr: &Robj) -> Result<&DistillModel> {
    let p: &DistillPtr = ptr.try_into().map_err(|_| fail("internal: not a distilled model pointer"))?;
    p.try_addr().map_err(|_| fail("internal: the model pointer is empty"))
}

/// Harmony on `x` (cells × d, column-major). `covariates` is a list of
/// lists (name, codes 1-based, n_levels, theta, lambda (NA: estimated),
/// protected); `params` the named settings. `progress(iteration)` is called
/// on the R thread. Returns the corrected matrix (column-major) and the fit.
/// @noRd
#[extendr]
fn rs_run_harmony(
    x: &[f64],
    n: i32,
    d: i32,
    covariates: List,
    params: List,
    threads: i32,
    progress: Robj,
) -> Result<List> {
    let (n, d) = (n.max(0) as usize, d.max(0) as usize);
    if x.len() != n * d {
        return Err(fail("internal: embedding size does not match"));
    }
    let covs = covariates
        .values()
        .map(|v| {
            let l = List::try_from(v).map_err(|_| fail("internal: covariate must be a list"))?;
            let s = Settings(&l);
            let name = s.get("name").and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
            let codes = s.get("codes").ok_or_else(|| fail("internal: covariate without codes"))?;
            let codes: Vec<u32> = int_slice(&codes, &name)?.iter().map(|&c| (c - 1).max(0) as u32).collect();
            let lambda = s.num("lambda", f64::NAN)?;
            Ok(HarmonyCovariate {
                n_levels: s.count("n_levels", 1)?,
                theta: s.num("theta", 2.0)?,
                lambda: (!lambda.is_nan()).then_some(lambda),
                protected: s.flag("protected", false)?,
                name,
                codes,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let s = Settings(&params);
    let dflt = HarmonyParams::default();
    let k = s.count("n_clusters", 0)?;
    let p = HarmonyParams {
        sigma: s.num("sigma", dflt.sigma)?,
        n_clusters: (k > 0).then_some(k),
        max_iter: s.count("max_iter", dflt.max_iter)?,
        max_iter_cluster: s.count("max_iter_cluster", dflt.max_iter_cluster)?,
        epsilon_cluster: s.num("epsilon_cluster", dflt.epsilon_cluster)?,
        epsilon_harmony: s.num("epsilon_harmony", dflt.epsilon_harmony)?,
        block_size: s.num("block_size", dflt.block_size)?,
        alpha: s.num("alpha", dflt.alpha)?,
        tau: s.num("tau", dflt.tau)?,
        batch_prop_cutoff: s.num("batch_prop_cutoff", dflt.batch_prop_cutoff)?,
        seed: s.count("seed", 0)? as u64,
        memberships: s.flag("memberships", false)?,
    };
    let done: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    let callback = progress.as_function();
    let tick = || {
        let its: Vec<usize> = std::mem::take(&mut *done.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(f) = &callback {
            for i in its {
                let _ = f.call(pairlist!(i as i32));
            }
        }
    };
    let mut r = worker::run_with_ticks(
        threads_from_r(threads)?,
        |interrupted| {
            harmony(Embedding::column_major(x), n, d, &covs, &p, interrupted, &|i| {
                done.lock().unwrap_or_else(|e| e.into_inner()).push(i)
            })
        },
        tick,
    )
    .map_err(fail)?
    .map_err(fail)?;
    // Each large array is freed as soon as its R matrix exists (peak memory
    // at 10^6 cells).
    let z = r_matrix(&r.z_corr, n, d);
    r.z_corr = Vec::new();
    let k = r.n_clusters;
    let memberships: Robj = if p.memberships { r_matrix(&r.r, n, k).into() } else { ().into() };
    r.r = Vec::new();
    Ok(list!(
        z = z,
        r = memberships,
        n_clusters = k as i32,
        objective = r.objective,
        cluster_rounds = r.cluster_rounds.iter().map(|&v| v as i32).collect::<Vec<i32>>(),
        n_iter = r.n_iter as i32,
        converged = r.converged
    ))
}

fn distill_config(s: &List) -> Result<DistillConfig> {
    let s = Settings(s);
    let d = DistillConfig::default();
    Ok(DistillConfig {
        n_hidden: s.count("n_hidden", d.n_hidden)?,
        n_layers: s.count("n_layers", d.n_layers)?,
        dropout: s.num("dropout", d.dropout)?,
        norm: s.choice("norm", d.norm, Norm::parse)?,
        batch_embedding: s.count("batch_embedding", d.batch_embedding)?,
        ..d
    })
}

/// Trains a student. `input_genes` / `decoder_genes`: 1-based columns of
/// the counts; `teacher`: cells × d column-major; `progress(phase, epoch,
/// train loss, validation loss)` on the R thread. Returns the model pointer
/// and the training cells' latent space (cells × d, column-major).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_fit_distill(
    counts: List,
    batch: Robj,
    levels: Robj,
    input_genes: Robj,
    decoder_genes: Robj,
    teacher: &[f64],
    teacher_dim: i32,
    teacher_name: &str,
    config: List,
    train_encoder: List,
    train_decoder: List,
    device: &str,
    threads: i32,
    progress: Robj,
) -> Result<Robj> {
    let m = counts_from_r(&counts)?;
    let n = m.n_cells();
    let d = teacher_dim.max(0) as usize;
    if teacher.len() != n * d {
        return Err(fail(format!("the teacher embedding has {} values; expected cells ({n}) × {d}", teacher.len())));
    }
    let codes: Vec<u32> = int_slice(&batch, "batch")?.iter().map(|&c| (c - 1).max(0) as u32).collect();
    let batch = Categorical::new("batch", codes, strings(&levels, "levels")?, n, 1).map_err(fail)?;
    let cols = |x: &Robj, what: &str| -> Result<Vec<usize>> {
        Ok(int_slice(x, what)?.iter().map(|&c| (c - 1).max(0) as usize).collect())
    };
    let (input, output) = (cols(&input_genes, "input genes")?, cols(&decoder_genes, "decoder genes")?);
    let teacher_rm = from_column_major(teacher, n, d);
    let (config, t1, t2) = (distill_config(&config)?, train_config(&train_encoder)?, train_config(&train_decoder)?);
    let device = parse_device(device).map_err(fail)?;
    let pending: Mutex<Vec<(Phase, EpochRecord)>> = Mutex::new(Vec::new());
    let report = |p: Phase, r: &EpochRecord| pending.lock().unwrap_or_else(|e| e.into_inner()).push((p, r.clone()));
    let callback = progress.as_function();
    let tick = || {
        let done = std::mem::take(&mut *pending.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(f) = &callback {
            for (p, r) in done {
                let phase = if p == Phase::Encoder { "encoder" } else { "decoder" };
                let _ = f.call(pairlist!(phase, r.epoch as i32, r.train_loss, r.validation_elbo));
            }
        }
    };
    let data = DistillData {
        counts: &m,
        input_genes: &input,
        decoder_genes: &output,
        batch: &batch,
        teacher: &teacher_rm,
        teacher_dim: d,
        teacher_name: teacher_name.to_string(),
    };
    let (model, z) = worker::run_with_ticks(
        threads_from_r(threads)?,
        |interrupted| {
            let model = DistillModel::fit(&data, config, t1, t2, device, interrupted, &report)?;
            let z = model.latent(&m)?;
            Ok::<_, scdistill_core::Error>((model, z))
        },
        tick,
    )
    .map_err(fail)?
    .map_err(fail)?;
    let d = model.meta.config.n_latent;
    Ok(list!(ptr = ExternalPtr::new(model), latent = transpose(&z, n, d)).into())
}

/// The description of a distilled model as an R list.
/// @noRd
#[extendr]
fn rs_distill_info(ptr: Robj) -> Result<List> {
    let m = distill_ref(&ptr)?;
    let (c, t1, t2) = (&m.meta.config, &m.meta.train_encoder, &m.meta.train_decoder);
    let train = |t: &scdistill_core::train::TrainConfig| {
        list!(
            max_epochs = t.max_epochs as i32,
            batch_size = t.batch_size as i32,
            lr = t.lr,
            weight_decay = t.weight_decay,
            early_stopping = t.early_stopping,
            patience = t.patience as i32,
            validation_fraction = t.validation_fraction,
            seed = t.seed as f64
        )
    };
    Ok(list!(
        kind = "distill",
        device = scdistill_core::device::device_name(m.student.device()),
        genes = m.meta.genes.clone(),
        input_genes = m.meta.input_genes.clone(),
        batch_name = m.meta.batch_name.clone(),
        batch_levels = m.meta.batch_levels.clone(),
        teacher = m.meta.teacher.clone(),
        config = list!(
            n_latent = c.n_latent as i32,
            n_hidden = c.n_hidden as i32,
            n_layers = c.n_layers as i32,
            dropout = c.dropout,
            norm = format!("{:?}", c.norm).to_lowercase(),
            batch_embedding = c.batch_embedding as i32
        ),
        train_encoder = train(t1),
        train_decoder = train(t2),
        history_encoder = history_to_r(&m.meta.history_encoder),
        history_decoder = history_to_r(&m.meta.history_decoder),
        best_epoch_encoder = m.meta.best_epoch_encoder as i32,
        best_epoch_decoder = m.meta.best_epoch_decoder as i32,
        stopped_early = m.meta.stopped_early.to_vec(),
        interrupted = m.meta.interrupted,
        n_cells = m.meta.n_cells as i32,
        validation_cells = m.meta.validation_cells.iter().map(|&c| c as i32 + 1).collect::<Vec<i32>>()
    ))
}

/// The model file's bytes.
/// @noRd
#[extendr]
fn rs_distill_bytes(ptr: Robj) -> Result<Raw> {
    Ok(Raw::from_bytes(&distill_ref(&ptr)?.to_bytes().map_err(fail)?))
}

/// A distilled model's pointer from a model file's bytes.
/// @noRd
#[extendr]
fn rs_distill_from_bytes(bytes: Raw, device: &str) -> Result<Robj> {
    let device = parse_device(device).map_err(fail)?;
    Ok(ExternalPtr::new(DistillModel::from_bytes(bytes.as_slice(), device).map_err(fail)?).into())
}

/// The kind of model a file holds ("vae", "distill"), checking the header only.
/// @noRd
#[extendr]
fn rs_model_kind(bytes: Raw) -> Result<String> {
    let file = scdistill_core::io::from_bytes(bytes.as_slice()).map_err(fail)?;
    Ok(file.meta.get("kind").and_then(|k| k.as_str()).unwrap_or("unknown").to_string())
}

/// Latent Z of the cells (genes matched by name), cells × d column-major.
/// @noRd
#[extendr]
fn rs_distill_latent(ptr: Robj, counts: List, threads: i32) -> Result<Vec<f64>> {
    let model = distill_ref(&ptr)?;
    let m = counts_from_r(&counts)?;
    let lent = Lent(model);
    let z = crate::run(threads, |_| lent.get().latent(&m))?;
    Ok(transpose(&z, m.n_cells(), model.meta.config.n_latent))
}

/// Corrected ρ decoded to the `reference` batches (averaged): the row-major
/// cells × genes buffer, i.e. genes × cells column-major.
/// @noRd
#[extendr]
fn rs_distill_corrected(ptr: Robj, counts: List, reference: Robj, threads: i32) -> Result<Vec<f64>> {
    let model = distill_ref(&ptr)?;
    let levels = &model.meta.batch_levels;
    let refs = batch_codes(&reference, levels, "`reference_batch`", "is not a batch of the model")?;
    let m = counts_from_r(&counts)?;
    let lent = Lent(model);
    let x = crate::run(threads, |_| lent.get().corrected(&m, &refs))?;
    Ok(x.into_iter().map(f64::from).collect())
}

/// Mean negative log-likelihood per cell; `batch` = labels of the cells.
/// @noRd
#[extendr]
fn rs_distill_nll(ptr: Robj, counts: List, batch: Robj, threads: i32) -> Result<f64> {
    let model = distill_ref(&ptr)?;
    let levels = &model.meta.batch_levels;
    let codes = batch_codes(&batch, levels, "`batch` value", "was not seen in training")?;
    let m = counts_from_r(&counts)?;
    let lent = Lent(model);
    crate::run(threads, |_| lent.get().nll(&m, &codes))
}

extendr_module! {
    mod distill;
    fn rs_run_harmony;
    fn rs_fit_distill;
    fn rs_distill_info;
    fn rs_distill_bytes;
    fn rs_distill_from_bytes;
    fn rs_model_kind;
    fn rs_distill_latent;
    fn rs_distill_corrected;
    fn rs_distill_nll;
}
