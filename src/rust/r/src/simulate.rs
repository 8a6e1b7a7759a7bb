//! extendr glue of simulate_counts() (mirrors R/simulate_counts.R).

use crate::convert::csr_to_r;
use crate::{fail, run};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::data::Categorical;
use scdistill_core::simulate::{self, AtacParams, ConditionParams, SimParams, SpeciesParams};

/// Simulator parameters from a named list; names not given keep the core's defaults.
fn sim_params_from_r(params: &List) -> Result<SimParams> {
    let mut p = SimParams::default();
    let mut cond: Option<ConditionParams> = None;
    let mut atac: Option<AtacParams> = None;
    let mut species: Option<SpeciesParams> = None;
    for (name, value) in params.iter() {
        let nums: Vec<f64> = value.as_real_vector().ok_or_else(|| fail(format!("`{name}` must be numeric")))?;
        let one = || -> Result<f64> {
            (nums.len() == 1).then(|| nums[0]).ok_or_else(|| fail(format!("`{name}` must be a single number")))
        };
        let count = || -> Result<usize> {
            let v = one()?;
            (v >= 0.0 && v.fract() == 0.0)
                .then_some(v as usize)
                .ok_or_else(|| fail(format!("`{name}` must be a whole number")))
        };
        match name {
            "n_cells" => p.n_cells = count()?,
            "n_genes" => p.n_genes = count()?,
            "seed" => p.seed = count()? as u64,
            "group_prob" => p.group_prob = nums.clone(),
            "batch_prob" => p.batch_prob = nums.clone(),
            "batch_fac_loc" => p.batch_fac_loc = one()?,
            "batch_fac_scale" => p.batch_fac_scale = one()?,
            "batch_lib_shift" => p.batch_lib_shift = nums.clone(),
            "mean_shape" => p.mean_shape = one()?,
            "mean_rate" => p.mean_rate = one()?,
            "lib_loc" => p.lib_loc = one()?,
            "lib_scale" => p.lib_scale = one()?,
            "out_prob" => p.out_prob = one()?,
            "out_fac_loc" => p.out_fac_loc = one()?,
            "out_fac_scale" => p.out_fac_scale = one()?,
            "de_prob" => p.de_prob = one()?,
            "de_down_prob" => p.de_down_prob = one()?,
            "de_fac_loc" => p.de_fac_loc = one()?,
            "de_fac_scale" => p.de_fac_scale = one()?,
            "bcv_common" => p.bcv_common = one()?,
            "bcv_df" => p.bcv_df = one()?,
            "dropout" => p.dropout = Some((nums.first().copied().unwrap_or(0.0), nums.get(1).copied().unwrap_or(-1.0))),
            "treated_fraction" => condition(&mut cond).treated_fraction = nums.clone(),
            "condition_de_prob" => condition(&mut cond).de_prob = one()?,
            "condition_shared" => condition(&mut cond).shared = one()? != 0.0,
            "condition_de_down_prob" => condition(&mut cond).de_down_prob = one()?,
            "condition_fac_loc" => condition(&mut cond).de_fac_loc = one()?,
            "condition_fac_scale" => condition(&mut cond).de_fac_scale = one()?,
            "samples_per_batch" => condition(&mut cond).samples_per_batch = count()?,
            "age_de_prob" => condition(&mut cond).age_de_prob = one()?,
            "sample_sd" => condition(&mut cond).sample_sd = one()?,
            "n_peaks" => atac.get_or_insert_with(AtacParams::default).n_peaks = count()?,
            "atac_link_prob" => atac.get_or_insert_with(AtacParams::default).link_prob = one()?,
            "atac_de_prob" => atac.get_or_insert_with(AtacParams::default).private_de_prob = one()?,
            "atac_fac_loc" => atac.get_or_insert_with(AtacParams::default).de_fac_loc = one()?,
            "atac_lib_loc" => atac.get_or_insert_with(AtacParams::default).lib_loc = one()?,
            "atac_only_groups" => atac.get_or_insert_with(AtacParams::default).atac_only_groups = count()?,
            "atac_binary" => atac.get_or_insert_with(AtacParams::default).binary = one()? != 0.0,
            "species_n_cells" => species.get_or_insert_with(SpeciesParams::default).n_cells = count()?,
            "species_n_genes" => species.get_or_insert_with(SpeciesParams::default).n_genes = count()?,
            "homolog_fraction" => species.get_or_insert_with(SpeciesParams::default).homolog_fraction = one()?,
            "mean_divergence" => species.get_or_insert_with(SpeciesParams::default).mean_divergence = one()?,
            "de_conservation" => species.get_or_insert_with(SpeciesParams::default).de_conservation = one()?,
            "species_only_first" => species.get_or_insert_with(SpeciesParams::default).only_first = count()?,
            "species_only_second" => species.get_or_insert_with(SpeciesParams::default).only_second = count()?,
            "species_de_prob" => species.get_or_insert_with(SpeciesParams::default).species_de_prob = one()?,
            "species_de_fac_loc" => species.get_or_insert_with(SpeciesParams::default).species_de_fac_loc = one()?,
            "species_de_fac_scale" => species.get_or_insert_with(SpeciesParams::default).species_de_fac_scale = one()?,
            other => return Err(fail(format!("unknown simulation parameter `{other}`"))),
        }
    }
    p.condition = cond;
    p.atac = atac;
    p.species = species;
    Ok(p)
}

fn condition(c: &mut Option<ConditionParams>) -> &mut ConditionParams {
    c.get_or_insert_with(ConditionParams::default)
}

fn codes_r(c: &Categorical) -> Vec<i32> {
    c.codes.iter().map(|&v| v as i32 + 1).collect()
}

fn factor_list(c: &Option<Categorical>) -> Robj {
    match c {
        Some(c) => list!(codes = codes_r(c), levels = c.levels.clone()).into(),
        None => ().into(),
    }
}

fn flatten(rows: &[Vec<f64>]) -> Vec<f64> {
    rows.iter().flatten().copied().collect()
}

/// Simulated counts (slots of a genes × cells dgCMatrix) and their truth.
/// @noRd
#[extendr]
fn rs_simulate(params: List, threads: i32) -> Result<List> {
    let p = sim_params_from_r(&params)?;
    let s = run(threads, |_| simulate::simulate(&p))?;
    Ok(simulation_to_r(s))
}

/// `rs_simulate` writing the counts to an .h5ad file at `path` in blocks,
/// and the ATAC peaks, if simulated, to `atac_path` ("" for none; the
/// list's counts are empty).
/// @noRd
#[extendr]
fn rs_simulate_file(params: List, path: &str, atac_path: &str, threads: i32) -> Result<List> {
    let p = sim_params_from_r(&params)?;
    let atac = (!atac_path.is_empty()).then_some(atac_path);
    let s = run(threads, |_| simulate::simulate_to_h5ad(&p, path, atac))?;
    Ok(simulation_to_r(s))
}

/// A simulation and its truth as an R list (the second species, if any, as
/// `species`, with attributes `homolog`: the 1-based first-species gene of
/// each gene or 0, `homolog_lfc`: the homolog truth, [group][gene] flattened,
/// and `shared_groups`: the 1-based cell types in both species).
fn simulation_to_r(mut s: simulate::Simulation) -> List {
    let species: Robj = match s.species.take() {
        Some(sp) => species_to_r(*sp),
        None => ().into(),
    };
    let counts = csr_to_r(std::mem::take(&mut s.counts.csr));
    let atac: Robj = match s.atac.take() {
        Some(a) => list!(
            counts = csr_to_r(a.counts),
            peaks = a.peaks,
            linked_gene = a.linked_gene.iter().map(|g| g.map_or(0, |g| g as i32 + 1)).collect::<Vec<_>>(),
            group_factor = flatten(&a.group_factor)
        )
        .into(),
        None => ().into(),
    };
    list!(
        species = species,
        atac = atac,
        counts = counts,
        genes = s.counts.genes.clone(),
        cells = s.counts.cells.clone(),
        group = factor_list(&Some(s.group.clone())),
        batch = factor_list(&Some(s.batch.clone())),
        condition = factor_list(&s.condition),
        sample = factor_list(&s.sample),
        age_group = factor_list(&s.age_group),
        library_size = s.library_size.clone(),
        gene_mean = s.gene_mean.clone(),
        group_factor = flatten(&s.group_factor),
        batch_factor = flatten(&s.batch_factor),
        condition_factor = flatten(&s.condition_factor),
        age_factor = s.age_factor.clone(),
        true_lfc = flatten(&s.true_lfc),
        true_lfc_population = s.true_lfc_population.clone()
    )
}

/// The second species as [`simulation_to_r`] returns it, with its homolog
/// map and truth as attributes.
fn species_to_r(sp: simulate::SpeciesSimulation) -> Robj {
    let homolog: Vec<i32> = sp.homolog.iter().map(|h| h.map_or(0, |g| g as i32 + 1)).collect();
    let shared: Vec<i32> = (1..).zip(&sp.shared_groups).filter(|(_, &both)| both).map(|(t, _)| t).collect();
    let lfc = flatten(&sp.homolog_lfc);
    let mut l = simulation_to_r(sp.sim);
    l.set_attrib("homolog", homolog).ok();
    l.set_attrib("homolog_lfc", lfc).ok();
    l.set_attrib("shared_groups", shared).ok();
    l.into()
}

extendr_module! {
    mod simulate;
    fn rs_simulate;
    fn rs_simulate_file;
}
