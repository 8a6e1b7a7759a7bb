//! extendr glue of align_species() and its analyses (mirrors R/species.R).

use crate::convert::from_r;
use crate::model::{cells_from_r, fitted_to_r, matrix_to_r, model_as, with_epoch_progress};
use crate::vae::categorical_list;
use crate::{counts_from_r, fail, strings};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::device::parse_device;
use scdistill_core::models::species::analysis::TargetCells;
use scdistill_core::models::species::fitted::Species;
use scdistill_core::models::Cells;
use scdistill_core::models::species::{SpeciesConfig, SpeciesData, SpeciesModel};
use scdistill_core::train::TrainConfig;

/// Trains a cross-species model. `context`/`target`: count lists;
/// `*_batch`, `labels`: list(name, codes (1-based), levels); `homologs`:
/// list(target = genes, context = genes); `config`, `train_context`,
/// `train_target`: named lists of the core's settings. Returns list(ptr,
/// latent = list(context, target)).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_fit_species(
    context: List,
    context_batch: List,
    labels: List,
    target: List,
    target_batch: List,
    homologs: List,
    config: Robj,
    train_context: Robj,
    train_target: Robj,
    device: &str,
    threads: i32,
    progress: Robj,
) -> Result<Robj> {
    let c = counts_from_r(&context)?;
    let t = counts_from_r(&target)?;
    let cb = categorical_list(&context_batch, c.n_cells())?;
    let tb = categorical_list(&target_batch, t.n_cells())?;
    let labels = categorical_list(&labels, c.n_cells())?;
    let get = |k: &str| homologs.iter().find(|(n, _)| *n == k).map(|(_, v)| v).ok_or_else(|| fail("internal: homologs"));
    let ht = strings(&get("target")?, "homologs$target")?;
    let hc = strings(&get("context")?, "homologs$context")?;
    let pairs: Vec<(String, String)> = ht.into_iter().zip(hc).collect();
    let config: SpeciesConfig = from_r(&config, "cross-species settings")?;
    let tc: TrainConfig = from_r(&train_context, "context training settings")?;
    let tt: TrainConfig = from_r(&train_target, "target training settings")?;
    let device = parse_device(device).map_err(fail)?;
    let (model, zc, zt) = with_epoch_progress(threads, &progress, |interrupted, report| {
        let model = SpeciesModel::fit(
            SpeciesData { counts: &c, batch: cb.clone() },
            &labels,
            SpeciesData { counts: &t, batch: tb.clone() },
            &pairs,
            config,
            tc,
            tt,
            device,
            interrupted,
            &|phase, r| report(if phase == 0 { "context" } else { "target" }, r),
        )?;
        let zc = model.training_latent(Species::Context, &c.csr, &cb)?;
        let zt = model.training_latent(Species::Target, &t.csr, &tb)?;
        Ok((model, zc, zt))
    })?;
    Ok(fitted_to_r(Box::new(model), list!(context = matrix_to_r(&zc), target = matrix_to_r(&zt)).into()))
}

/// Runs `f` on a worker with the model behind `ptr` and the target `cells`
/// encoded (`what` names the caller in the error for another kind of model).
fn on_target<T: Send>(
    ptr: &Robj,
    cells: Cells,
    threads: i32,
    what: &str,
    f: impl FnOnce(&SpeciesModel, &TargetCells, &dyn Fn() -> bool) -> scdistill_core::Result<T> + Send,
) -> Result<T> {
    let model = crate::worker::Lent(model_as::<SpeciesModel>(ptr, what)?);
    crate::run(threads, |interrupted| {
        let m = model.get();
        let (csr, cov) = m.prepare(Species::Target, cells)?;
        f(m, &m.target_cells(&csr, &cov), interrupted)
    })
}

/// Labels transferred to target `cells`: list(label (0-based codes into the
/// model's label levels), confidence, similarity).
/// @noRd
#[extendr]
fn rs_species_transfer(ptr: Robj, cells: List, n_candidates: i32, top_neigh: i32, threads: i32) -> Result<List> {
    let (k, top) = (n_candidates.max(1) as usize, top_neigh.max(1) as usize);
    let tr = on_target(&ptr, cells_from_r(&cells)?, threads, "transfer_labels()", |m, t, stop| {
        m.transfer_labels(t, k, top, stop)
    })?;
    Ok(list!(
        label = tr.label.iter().map(|&l| l as i32).collect::<Vec<_>>(),
        confidence = tr.confidence,
        similarity = tr.similarity
    ))
}

/// Cell-type similarity of target cells (labels: list(codes 1-based,
/// levels)) to the context types: a row-major flat vector.
/// @noRd
#[extendr]
fn rs_species_similarity(
    ptr: Robj,
    cells: List,
    labels: List,
    max_target: i32,
    max_context: i32,
    seed: f64,
    threads: i32,
) -> Result<Vec<f64>> {
    let cells = cells_from_r(&cells)?;
    let labels = categorical_list(&labels, cells.n_cells())?;
    let (nt, nc) = (max_target.max(1) as usize, max_context.max(1) as usize);
    on_target(&ptr, cells, threads, "species_similarity()", |m, t, _| {
        m.similarity_table(t, &labels.codes, labels.n_levels(), nt, nc, seed as u64)
    })
}

/// Homologous-gene fold changes per shared type: a list of lists of columns.
/// @noRd
#[extendr]
fn rs_species_fold_changes(
    ptr: Robj,
    cells: List,
    labels: List,
    n_samples: i32,
    delta: f64,
    seed: f64,
    threads: i32,
) -> Result<List> {
    let cells = cells_from_r(&cells)?;
    let labels = categorical_list(&labels, cells.n_cells())?;
    let fc = on_target(&ptr, cells, threads, "homolog_fold_changes()", |m, t, _| {
        m.fold_changes(t, &labels.codes, &labels.levels, n_samples.max(1) as usize, delta, seed as u64)
    })?;
    let items: Vec<(String, Robj)> = fc
        .into_iter()
        .map(|f| {
        let cols = list!(
            n_target_cells = f.n_target_cells as i32,
            n_used = f.n_used as i32,
            rho_median_context = f.rho_median_context,
            mu_median_context = f.mu_median_context,
            rho_median_target = f.rho_median_target,
            mu_median_target = f.mu_median_target,
            lfc = f.lfc,
            p = f.p,
            lfc_rand = f.lfc_rand,
            p_rand = f.p_rand
        );
        (f.cell_type, Robj::from(cols))
    })
        .collect();
    Ok(List::from_pairs(items.iter().map(|(n, v)| (n.as_str(), v.clone()))))
}

/// The model's homologous pairs (1-based context and target gene indices)
/// and the context cells' labels (1-based codes).
/// @noRd
#[extendr]
fn rs_species_pairs(ptr: Robj) -> Result<List> {
    let m = model_as::<SpeciesModel>(&ptr, "homologs")?;
    Ok(list!(
        context = m.meta.homologs.iter().map(|p| p.0 as i32 + 1).collect::<Vec<_>>(),
        target = m.meta.homologs.iter().map(|p| p.1 as i32 + 1).collect::<Vec<_>>(),
        labels = m.meta.context_labels.iter().map(|&l| l as i32 + 1).collect::<Vec<_>>()
    ))
}

extendr_module! {
    mod species;
    fn rs_fit_species;
    fn rs_species_transfer;
    fn rs_species_similarity;
    fn rs_species_fold_changes;
    fn rs_species_pairs;
}
