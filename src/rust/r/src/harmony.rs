//! extendr glue of run_harmony() (mirrors R/harmony.R).

use crate::convert::from_r;
use crate::worker;
use crate::{fail, r_matrix, threads_from_r};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::data::CellsH5;
use scdistill_core::teacher::{harmony_into, Embedding, HarmonyCells, HarmonyCovariate, HarmonyParams};
use std::sync::Mutex;

/// One batch variable from R: list(name, codes (1-based), n_levels, theta,
/// lambda (NA: estimated), protected).
#[derive(serde::Deserialize)]
struct CovariateFromR {
    #[serde(default)]
    name: String,
    #[serde(deserialize_with = "codes")]
    codes: Vec<u32>,
    n_levels: usize,
    theta: f64,
    lambda: Option<f64>,
    #[serde(default)]
    protected: bool,
}

/// 1-based R codes (one or many) as 0-based codes.
fn codes<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<u32>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
    }
    let v = match <OneOrMany as serde::Deserialize>::deserialize(d)? {
        OneOrMany::One(c) => vec![c],
        OneOrMany::Many(v) => v,
    };
    Ok(v.into_iter().map(|c| c.saturating_sub(1)).collect())
}

/// Harmony on `x` (cells × d, column-major). `covariates` is a list of
/// lists (name, codes 1-based, n_levels, theta, lambda (NA: estimated),
/// protected); `params` the named settings. `progress(iteration)` is called
/// on the R thread. Returns the corrected matrix (column-major) and the fit.
/// With `in_place`, `x` itself is corrected and returned: only for a
/// double matrix that nothing else in R refers to (`distill()`'s own PCs).
/// `x` may instead be list(path, name), a cells × d dataset as
/// `rs_h5_cells_write` stores it, corrected in the file (`z` is then NULL).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_run_harmony(
    x: Robj,
    n: i32,
    d: i32,
    covariates: List,
    params: List,
    threads: i32,
    progress: Robj,
    in_place: bool,
) -> Result<List> {
    let (n, d) = (n.max(0) as usize, d.max(0) as usize);
    let file = if x.is_list() {
        let (path, name) = crate::disk::h5_dataset(&x, "the embedding's file")?;
        Some(CellsH5::open(&path, &name, n, d).map_err(fail)?)
    } else {
        None
    };
    if file.is_none() && (x.len() != n * d || x.rtype() != Rtype::Doubles) {
        return Err(fail("internal: the embedding is not a double matrix of its size"));
    }
    let covs = covariates
        .values()
        .map(|v| {
            let c: CovariateFromR = from_r(&v, "Harmony covariate")?;
            Ok(HarmonyCovariate {
                name: c.name,
                codes: c.codes,
                n_levels: c.n_levels,
                theta: c.theta,
                lambda: c.lambda,
                protected: c.protected,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let p: HarmonyParams = from_r(&params.into(), "Harmony settings")?;
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
    // The corrected cells go straight into the R matrix returned (a new
    // one, or `x`), or into their file.
    let mut fresh = None;
    let mut x = x;
    let file_given = file.is_some();
    let cells = if let Some(f) = file {
        HarmonyCells::File(f)
    } else if in_place {
        let values = x.as_real_slice_mut().ok_or_else(|| fail("internal: the embedding is not double"))?;
        HarmonyCells::InPlace { values, n, d }
    } else {
        let z = x.as_real_slice().ok_or_else(|| fail("internal: the embedding is not double"))?;
        let out = fresh.insert(RMatrix::<f64>::new(n, d)).data_mut();
        HarmonyCells::Apart { z: Embedding::column_major(z, n, d), out }
    };
    let mut r = worker::run_with_ticks(
        threads_from_r(threads)?,
        |interrupted| {
            harmony_into(cells, &covs, &p, interrupted, &|i| done.lock().unwrap_or_else(|e| e.into_inner()).push(i))
        },
        tick,
    )
    .map_err(fail)?
    .map_err(fail)?;
    // The memberships are freed as soon as their R matrix exists (peak
    // memory at 10^6 cells).
    let k = r.n_clusters;
    let memberships: Robj = if p.memberships { r_matrix(&r.r, n, k).into() } else { ().into() };
    r.r = Vec::new();
    let z: Robj = match fresh {
        Some(m) => m.into(),
        None if file_given => ().into(),
        None => x,
    };
    Ok(list!(
        z = z,
        r = memberships,
        n_clusters = k as i32,
        objective = r.objective,
        cluster_rounds = r.cluster_rounds.iter().map(|&v| v as i32).collect::<Vec<i32>>(),
        n_iter = r.n_iter as i32,
        converged = r.converged,
        fitted_cells = r.fitted_cells as f64
    ))
}

extendr_module! {
    mod harmony;
    fn rs_run_harmony;
}
