//! extendr glue of Bayesian differential expression (VAE and distilled models).

use crate::distill::distill_ref;
use crate::models::{batch_codes, model_ref, on_cells, Settings};
use crate::worker::Lent;
use crate::{counts_from_r, fail, int_slice};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::de::{self, DeSettings, DeTable, Method, StudentScales, VaeScales};

/// Settings from R: method, n_samples, n_pairs, batches (labels or NULL),
/// delta and pseudocount (NULL or NA: estimated), delta_floor, low_count,
/// fdr_target, seed.
fn settings(s: &List, levels: &[String]) -> Result<DeSettings> {
    let s = Settings(s);
    let d = DeSettings::default();
    let method = s.choice("method", Method::Change, Method::parse)?;
    // NULL or NA: estimated.
    let optional = |name: &str| -> Result<Option<f64>> {
        match s.get(name) {
            Some(v) if !v.is_null() && !v.is_na() => Ok(Some(s.num(name, f64::NAN)?)),
            _ => Ok(None),
        }
    };
    let batches = match s.get("batches") {
        Some(b) if !b.is_null() => batch_codes(&b, levels, "batch", "is not a batch of the model")?,
        _ => vec![],
    };
    Ok(DeSettings {
        method,
        n_samples: s.count("n_samples", d.n_samples)?,
        n_pairs: s.count("n_pairs", d.n_pairs)?,
        batches,
        delta: optional("delta")?,
        delta_floor: s.num("delta_floor", d.delta_floor)?,
        pseudocount: optional("pseudocount")?,
        low_count: s.num("low_count", d.low_count)?,
        fdr_target: s.num("fdr_target", d.fdr_target)?,
        seed: s.num("seed", 0.0)? as u64,
    })
}

/// 0-based cell indices, checked against the number of cells `n`.
fn groups(group1: &Robj, group2: &Robj, n: usize) -> Result<(Vec<usize>, Vec<usize>)> {
    let pick = |g: &Robj, what: &str| -> Result<Vec<usize>> {
        int_slice(g, what)?
            .iter()
            .map(|&i| {
                (i >= 0 && (i as usize) < n)
                    .then_some(i as usize)
                    .ok_or_else(|| fail(format!("internal: `{what}` out of range")))
            })
            .collect()
    };
    Ok((pick(group1, "group1")?, pick(group2, "group2")?))
}

/// Number of cells of a counts list (the length of its cell names).
fn n_cells(counts: &List) -> Result<usize> {
    counts
        .iter()
        .find(|(n, _)| *n == "cells")
        .map(|(_, v)| v.len())
        .ok_or_else(|| fail("internal: the counts list has no `cells`"))
}

fn table_to_r(t: DeTable) -> List {
    list!(
        lfc_mean = t.lfc_mean,
        lfc_median = t.lfc_median,
        lfc_sd = t.lfc_sd,
        lfc_lower = t.lfc_lower,
        lfc_upper = t.lfc_upper,
        lfc_min = t.lfc_min,
        lfc_max = t.lfc_max,
        proba_de = t.proba_de,
        proba_up = t.proba_up,
        bayes_factor = t.bayes_factor,
        is_de = t.is_de,
        scale1 = t.scale1,
        scale2 = t.scale2,
        delta = t.delta,
        pseudocount = t.pseudocount
    )
}

/// DE with a VAE: `group1`/`group2` are 0-based cell indices into `counts`.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_vae_de(
    ptr: Robj,
    counts: List,
    batch: Robj,
    categorical: List,
    continuous: List,
    group1: Robj,
    group2: Robj,
    settings_list: List,
    threads: i32,
) -> Result<List> {
    let model = model_ref(&ptr)?;
    let s = settings(&settings_list, &model.meta.batch_levels)?;
    let (g1, g2) = groups(&group1, &group2, n_cells(&counts)?)?;
    let t =
        on_cells(&ptr, &counts, &batch, &categorical, &continuous, false, s.seed as f64, threads, |m, data, stop| {
            de::differential_expression(&VaeScales { model: &m.vae, data }, data.counts, &g1, &g2, &s, stop)
        })?;
    Ok(table_to_r(t))
}

/// DE with a distilled model; `batch` = the cells' own batch labels.
/// @noRd
#[extendr]
fn rs_distill_de(
    ptr: Robj,
    counts: List,
    batch: Robj,
    group1: Robj,
    group2: Robj,
    settings_list: List,
    threads: i32,
) -> Result<List> {
    let model = distill_ref(&ptr)?;
    let levels = &model.meta.batch_levels;
    let s = settings(&settings_list, levels)?;
    let own = batch_codes(&batch, levels, "`batch` value", "was not seen in training")?;
    let m = counts_from_r(&counts)?;
    let (g1, g2) = groups(&group1, &group2, m.n_cells())?;
    let lent = Lent(model);
    let t = crate::run(threads, |stop| {
        let model = lent.get();
        scdistill_core::device::seed_torch(s.seed);
        let input = model.input_for(&m)?;
        let keep = m.columns_of(&model.meta.genes, "output ")?;
        let out = m.csr.select_columns(&keep);
        let scales = StudentScales { student: &model.student, input: &input, batch: &own };
        de::differential_expression(&scales, &out, &g1, &g2, &s, stop)
    })?;
    Ok(table_to_r(t))
}

extendr_module! {
    mod de;
    fn rs_vae_de;
    fn rs_distill_de;
}
