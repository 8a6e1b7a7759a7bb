//! extendr glue: R vectors ⇄ core types, core errors and panics → R errors,
//! interrupts. No numerics here.

use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::data::{Categorical, CountMatrix, Csr};
use scdistill_core::simulate::{self, AtacParams, ConditionParams, SimParams, SpeciesParams};
use scdistill_core::{device, metrics, prep};

mod de;
mod distill;
mod models;
mod multimodal;
mod worker;

/// Core errors become R errors carrying the core's message.
fn fail(msg: impl ToString) -> Error {
    Error::Other(msg.to_string())
}

fn int_slice<'a>(x: &'a Robj, what: &str) -> Result<&'a [i32]> {
    x.as_integer_slice().ok_or_else(|| fail(format!("internal: `{what}` must be an integer vector")))
}

fn strings(x: &Robj, what: &str) -> Result<Vec<String>> {
    x.as_str_vector()
        .map(|v| v.into_iter().map(String::from).collect())
        .ok_or_else(|| fail(format!("internal: `{what}` must be a character vector")))
}

/// The elements p, i, x, genes, cells of a counts list.
fn count_slots(counts: &List) -> Result<(Robj, Robj, Robj, Robj, Robj)> {
    let get = |name: &str| -> Result<Robj> {
        counts
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| fail(format!("internal: the counts list has no `{name}`")))
    };
    Ok((get("p")?, get("i")?, get("x")?, get("genes")?, get("cells")?))
}

/// The validated count matrix from `list(p, i, x, genes, cells)`: the slots
/// and dimnames of a genes × cells dgCMatrix (R's `slots()`).
fn counts_from_r(counts: &List) -> Result<CountMatrix> {
    let (p, i, x, genes, cells) = count_slots(counts)?;
    let xs = x.as_real_slice().ok_or_else(|| fail("internal: `x` must be a double vector"))?;
    CountMatrix::from_csc_genes_by_cells(
        int_slice(&p, "p")?,
        int_slice(&i, "i")?,
        xs,
        strings(&genes, "genes")?,
        strings(&cells, "cells")?,
    )
    .map_err(fail)
}

/// A categorical covariate from 1-based R factor codes, or None for NULL.
fn categorical_from_r(name: &str, codes: &Robj, levels: &Robj, n_cells: usize) -> Result<Option<Categorical>> {
    if codes.is_null() {
        return Ok(None);
    }
    let codes: Vec<u32> = int_slice(codes, name)?.iter().map(|&c| (c - 1).max(0) as u32).collect();
    Categorical::new(name, codes, strings(levels, "levels")?, n_cells, 2).map(Some).map_err(fail)
}

fn threads_from_r(threads: i32) -> Result<usize> {
    if threads < 1 {
        return Err(fail("`threads` must be at least 1"));
    }
    Ok(threads as usize)
}

/// Runs core work on a worker thread, turning interrupts, core errors and panics into R errors.
fn run<T: Send>(threads: i32, work: impl FnOnce(&dyn Fn() -> bool) -> scdistill_core::Result<T> + Send) -> Result<T> {
    worker::run(threads_from_r(threads)?, work).map_err(fail)?.map_err(fail)
}

/// Validates counts; returns c(n_genes, n_cells, nnz).
/// @noRd
#[extendr]
fn rs_validate_counts(counts: List) -> Result<Vec<f64>> {
    let (p, i, x, genes, cells) = count_slots(&counts)?;
    let xs = x.as_real_slice().ok_or_else(|| fail("internal: `x` must be a double vector"))?;
    let (genes, cells) = (strings(&genes, "genes")?, strings(&cells, "cells")?);
    CountMatrix::check_csc_genes_by_cells(int_slice(&p, "p")?, int_slice(&i, "i")?, xs, &genes, &cells)
        .map_err(fail)?;
    let nnz = xs.iter().filter(|&&v| v != 0.0).count();
    Ok(vec![genes.len() as f64, cells.len() as f64, nnz as f64])
}

/// log2(CPM + 1) as the slots of a genes × cells dgCMatrix: list(p, i, x).
/// @noRd
#[extendr]
fn rs_log2_cpm(counts: List, threads: i32) -> Result<List> {
    let m = counts_from_r(&counts)?;
    let l = run(threads, |_| Ok(prep::log2_cpm(&m)))?;
    Ok(csr_to_r(l))
}

/// A CSR matrix as `list(p, i, x)`: with cells as rows, the slots of a
/// genes × cells dgCMatrix. Written straight into R vectors, each Rust buffer
/// freed once copied: the data can be several GB.
fn csr_to_r(mut csr: Csr) -> List {
    let p = Integers::from_values(std::mem::take(&mut csr.indptr).into_iter().map(|v| v as i32));
    let i = Integers::from_values(std::mem::take(&mut csr.indices).into_iter().map(|v| v as i32));
    let x = Doubles::from_values(std::mem::take(&mut csr.values).into_iter().map(f64::from));
    list!(p = p, i = i, x = x)
}

fn hvg_list(h: &prep::HvgResult) -> List {
    let selected: Vec<i32> = h.selected.iter().map(|&g| g as i32 + 1).collect();
    let n_batches: Vec<i32> = h.n_batches.iter().map(|&n| n as i32).collect();
    list!(
        mean = h.mean.clone(),
        variance = h.variance.clone(),
        variance_norm = h.variance_norm.clone(),
        rank = h.rank.clone(),
        n_batches = n_batches,
        selected = selected
    )
}

/// seurat_v3 highly variable genes on raw counts.
/// @noRd
#[extendr]
fn rs_hvg(counts: List, batch: Robj, levels: Robj, n_hvg: i32, span: f64, threads: i32) -> Result<List> {
    let m = counts_from_r(&counts)?;
    let b = categorical_from_r("batch", &batch, &levels, m.n_cells())?;
    let h = run(threads, |_| prep::highly_variable_genes(&m, n_hvg.max(0) as usize, b.as_ref(), span))?;
    Ok(hvg_list(&h))
}

/// HVG selection, log2(CPM+1) of those genes, and truncated PCA.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_run_pca(
    counts: List,
    batch: Robj,
    levels: Robj,
    n_pcs: i32,
    n_hvg: i32,
    scale: bool,
    n_oversamples: i32,
    max_iter: i32,
    tol: f64,
    max_genes_exact: i32,
    seed: f64,
    residual_theta: f64,
    threads: i32,
) -> Result<List> {
    let m = counts_from_r(&counts)?;
    let b = categorical_from_r("batch", &batch, &levels, m.n_cells())?;
    let params = prep::PcaParams {
        n_pcs: n_pcs.max(0) as usize,
        scale,
        n_oversamples: n_oversamples.max(0) as usize,
        max_iter: max_iter.max(0) as usize,
        tol,
        seed: seed as u64,
        max_genes_exact: max_genes_exact.max(0) as usize,
    };
    let (h, r) = run(threads, |interrupted| {
        let h = prep::highly_variable_genes(&m, n_hvg.max(0) as usize, b.as_ref(), 0.3)?;
        let r = if residual_theta > 0.0 {
            prep::pearson_residual_pca(&m, &h.selected, params.n_pcs, residual_theta, interrupted)?
        } else {
            let lognorm = prep::log2_cpm(&m).select_columns(&h.selected);
            prep::pca(&lognorm, &params, interrupted)?
        };
        Ok((h, r))
    })?;
    let k = r.sdev.len();
    let scores: Vec<f64> =
        (0..k).flat_map(|j| (0..m.n_cells()).map(move |i| (i, j))).map(|(i, j)| r.scores[(i, j)]).collect();
    let loadings: Vec<f64> =
        (0..k).flat_map(|j| (0..h.selected.len()).map(move |g| (g, j))).map(|(g, j)| r.loadings[(g, j)]).collect();
    Ok(list!(
        scores = scores,
        loadings = loadings,
        sdev = r.sdev,
        variance_ratio = r.variance_ratio,
        n_iter = r.n_iter as i32,
        hvg = hvg_list(&h)
    ))
}

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

/// A simulation and its truth as an R list (the second species, if any, as
/// `species`, with `homolog`: the 1-based first-species gene of each gene or 0).
fn simulation_to_r(mut s: simulate::Simulation) -> List {
    let species: Robj = match s.species.take() {
        Some(sp) => {
            let homolog: Vec<i32> = sp.homolog.iter().map(|h| h.map_or(0, |g| g as i32 + 1)).collect();
            let mut l = simulation_to_r(sp.sim);
            l.set_attrib("homolog", homolog).ok();
            l.into()
        }
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

/// Row-major copy of an R (column-major) numeric matrix.
fn row_major(values: &Robj, n: usize, d: usize, what: &str) -> Result<Vec<f64>> {
    let v = values.as_real_slice().ok_or_else(|| fail(format!("internal: `{what}` must be a double matrix")))?;
    if v.len() != n * d {
        return Err(fail(format!("internal: `{what}` has {} values for {n} x {d}", v.len())));
    }
    Ok(models::from_column_major(v, n, d))
}

fn zero_based(codes: &Robj, what: &str) -> Result<Vec<u32>> {
    Ok(int_slice(codes, what)?.iter().map(|&c| (c - 1).max(0) as u32).collect())
}

/// scIB-family integration metrics of one embedding (cells x dims).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_integration_metrics(
    x: Robj,
    n: i32,
    d: i32,
    batch: Robj,
    label: Robj,
    pre: Robj,
    pre_d: i32,
    seed: f64,
    threads: i32,
) -> Result<List> {
    let (n, d) = (n as usize, d as usize);
    let values = row_major(&x, n, d, "embedding")?;
    let pre_values = if pre.is_null() { None } else { Some(row_major(&pre, n, pre_d as usize, "pre")?) };
    let (batch, label) = (zero_based(&batch, "batch")?, zero_based(&label, "label")?);
    let m = run(threads, |_| {
        let pre = pre_values.as_ref().map(|v| metrics::Embedding { values: v, n, d: pre_d as usize });
        metrics::integration_metrics(
            &metrics::Embedding { values: &values, n, d },
            &batch,
            &label,
            pre.as_ref(),
            seed as u64,
        )
    })?;
    Ok(list!(
        ilisi = m.ilisi,
        clisi = m.clisi,
        kbet = m.kbet,
        silhouette_label = m.silhouette_label,
        silhouette_batch = m.silhouette_batch,
        isolated_labels = m.isolated_labels,
        nmi_kmeans = m.nmi_kmeans,
        ari_kmeans = m.ari_kmeans,
        nmi_leiden = m.nmi_leiden,
        ari_leiden = m.ari_leiden,
        graph_connectivity = m.graph_connectivity,
        pcr_comparison = m.pcr_comparison,
        bio_conservation = m.bio_conservation,
        batch_correction = m.batch_correction,
        total = m.total
    ))
}

/// Cells `rows` (1-based) densified through a libtorch tensor, genes × cells, column-major.
/// @noRd
#[extendr]
fn rs_dense_cells(counts: List, rows: Robj) -> Result<Vec<f64>> {
    let m = counts_from_r(&counts)?;
    let rows: Vec<usize> = int_slice(&rows, "rows")?
        .iter()
        .map(|&r| {
            if r >= 1 && r as usize <= m.n_cells() {
                Ok(r as usize - 1)
            } else {
                Err(fail(format!("cell index {r} out of range")))
            }
        })
        .collect::<Result<_>>()?;
    let t = scdistill_core::data::rows_to_tensor(&m.csr, &rows, tch_device_cpu());
    Vec::<f32>::try_from(t.flatten(0, -1)).map(|v| v.into_iter().map(f64::from).collect()).map_err(fail)
}

fn tch_device_cpu() -> scdistill_core::device::Device {
    scdistill_core::device::Device::Cpu
}

/// libtorch version, CUDA availability, device and thread count.
/// @noRd
#[extendr]
fn rs_torch_config(device: &str, threads: i32) -> Result<List> {
    let info = device::torch_info(device, threads_from_r(threads)?).map_err(fail)?;
    Ok(list!(
        libtorch_version = info.libtorch_version,
        cuda_available = info.cuda_available,
        cuda_device_count = info.cuda_device_count as i32,
        cudnn_available = info.cudnn_available,
        device = info.device,
        threads = info.threads as i32
    ))
}

#[repr(C)]
struct DlInfo {
    fname: *const std::ffi::c_char,
    fbase: *mut std::ffi::c_void,
    sname: *const std::ffi::c_char,
    saddr: *mut std::ffi::c_void,
}

extern "C" {
    fn dladdr(addr: *const std::ffi::c_void, info: *mut DlInfo) -> i32;
    // Single-precision matrix product of the Fortran BLAS interface, as
    // libtorch calls it.
    fn sgemm_();
}

/// The shared object whose `sgemm_` the core (and so libtorch) calls: it
/// must be libtorch's own, not R's BLAS (see src/entrypoint.c).
/// @noRd
#[extendr]
fn rs_blas_library() -> String {
    let mut info = DlInfo {
        fname: std::ptr::null(),
        fbase: std::ptr::null_mut(),
        sname: std::ptr::null(),
        saddr: std::ptr::null_mut(),
    };
    // SAFETY: dladdr only reads the address; the name it returns is owned by the loader.
    unsafe {
        if dladdr(sgemm_ as *const std::ffi::c_void, &mut info) == 0 || info.fname.is_null() {
            return String::new();
        }
        std::ffi::CStr::from_ptr(info.fname).to_string_lossy().into_owned()
    }
}

/// Threads this process may use (respects CPU affinity and cgroup limits).
/// @noRd
#[extendr]
fn rs_available_threads() -> i32 {
    std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(1)
}

/// Panics on purpose, on the R thread or on a worker: proves panics become R errors.
/// @noRd
#[extendr]
fn rs_panic_for_test(on_worker: bool) -> Result<()> {
    if on_worker {
        run(1, |_| -> scdistill_core::Result<()> { panic!("deliberate panic on a worker thread") })
    } else {
        panic!("deliberate panic on the R thread")
    }
}

/// Spins until interrupted (for manual Ctrl-C checks) or `seconds` pass.
/// @noRd
#[extendr]
fn rs_wait_for_interrupt(seconds: f64) -> Result<bool> {
    run(1, |interrupted| {
        let start = std::time::Instant::now();
        while start.elapsed().as_secs_f64() < seconds {
            if interrupted() {
                return Err(scdistill_core::Error::Interrupted);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(true)
    })
}

extendr_module! {
    mod scdistill;
    use models;
    use distill;
    use de;
    use multimodal;
    fn rs_validate_counts;
    fn rs_log2_cpm;
    fn rs_hvg;
    fn rs_run_pca;
    fn rs_dense_cells;
    fn rs_simulate;
    fn rs_integration_metrics;
    fn rs_torch_config;
    fn rs_available_threads;
    fn rs_blas_library;
    fn rs_panic_for_test;
    fn rs_wait_for_interrupt;
}
