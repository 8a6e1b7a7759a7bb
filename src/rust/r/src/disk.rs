//! extendr glue of on-disk counts (mirrors R/disk.R): training and latent
//! spaces from HDF5 files, and writing `.h5ad` files.

use crate::convert::from_r;
use crate::model::{matrix_to_r, model_as, pass_record};
use crate::worker::Lent;
use crate::{fail, int_slice, strings};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::data::Covariates;
use scdistill_core::data::{
    csr_from_csc_slots, CellsH5, CountMatrix, DenseH5, DiskCells, DiskCsr, Embedding, H5Reader, H5adWriter, Layout,
};
use scdistill_core::de::Watch;
use scdistill_core::device::Device;
use scdistill_core::models::vae::{VaeConfig, VaeData, VaeModel};
use scdistill_core::models::{LatentOut, Matrix};
use scdistill_core::train::EpochRecord;
use scdistill_core::train::TrainConfig;

/// The matrix an R description points at: list(path, layout = "sparse" |
/// "dense", data, indices, indptr (sparse) or dataset (dense), n_cells,
/// n_genes). `keep` (1-based gene columns) subsets the genes.
pub(crate) fn open_disk(spec: &List) -> Result<DiskCsr> {
    let get = |k: &str| spec.iter().find(|(n, _)| *n == k).map(|(_, v)| v);
    let text = |k: &str| list_text(spec, k).ok_or_else(|| fail(format!("internal: on-disk `{k}` missing")));
    let number = |k: &str| -> Result<usize> {
        get(k)
            .and_then(|v| v.as_real().or_else(|| v.as_integer().map(f64::from)))
            .map(|v| v as usize)
            .ok_or_else(|| fail(format!("internal: on-disk `{k}` missing")))
    };
    let layout = match text("layout")?.as_str() {
        "sparse" => Layout::Sparse { data: text("data")?, indices: text("indices")?, indptr: text("indptr")? },
        "dense" => Layout::Dense { dataset: text("dataset")? },
        other => return Err(fail(format!("internal: unknown on-disk layout '{other}'"))),
    };
    let d = DiskCsr::open(&text("path")?, layout, number("n_cells")?, number("n_genes")?).map_err(fail)?;
    match get("keep").filter(|v| !v.is_null()) {
        Some(k) => d.select_columns(int_slice(&k, "keep")?.iter().map(|&j| (j - 1) as usize).collect()).map_err(fail),
        None => Ok(d),
    }
}

/// The text field `key` of an R list, if it has one.
pub(crate) fn list_text(l: &List, key: &str) -> Option<String> {
    l.iter().find(|(n, _)| *n == key).and_then(|(_, v)| v.as_str().map(String::from))
}

/// An HDF5 dataset named from R as list(path, name): its path and name.
pub(crate) fn h5_dataset(spec: &Robj, what: &str) -> Result<(String, String)> {
    let l = spec.as_list().ok_or_else(|| fail(format!("{what} must be list(path, name)")))?;
    match (list_text(&l, "path"), list_text(&l, "name")) {
        (Some(p), Some(m)) => Ok((p, m)),
        _ => Err(fail(format!("{what} must be list(path, name)"))),
    }
}

/// Where a fit puts its training cells' latent space (cells × d): a new
/// dataset named by `latent_file` (list(path, name)), made now, so that
/// one already there is an error before any work, not after the fit; or,
/// when `latent_file` is NULL, the R matrix the fit fills in place (no
/// other copy of it) and then returns.
pub(crate) enum LatentTarget {
    File(CellsH5),
    Matrix(RMatrix<f64>),
}

impl LatentTarget {
    pub(crate) fn from_r(latent_file: &Robj, n: usize, d: usize) -> Result<LatentTarget> {
        if latent_file.is_null() {
            return Ok(LatentTarget::Matrix(RMatrix::<f64>::new(n, d)));
        }
        let (path, name) = h5_dataset(latent_file, "`latent_file`")?;
        Ok(LatentTarget::File(CellsH5::create(&path, &name, n, d, true).map_err(fail)?))
    }

    /// What the core writes into.
    pub(crate) fn out(&mut self) -> LatentOut<'_> {
        match self {
            LatentTarget::File(f) => LatentOut::File(f.clone()),
            LatentTarget::Matrix(m) => LatentOut::Memory(m.data_mut()),
        }
    }

    /// The filled matrix for R, or NULL when it went to the file.
    pub(crate) fn into_r(self) -> Robj {
        match self {
            LatentTarget::File(_) => Robj::from(()),
            LatentTarget::Matrix(m) => Robj::from(m),
        }
    }
}

/// The counts a training glue function takes: count slots in memory, or a
/// description of counts on disk (`open_disk`'s, with the kept genes' names
/// as `genes`).
pub(crate) enum Input {
    Memory(CountMatrix),
    Disk(DiskCsr, Vec<String>),
}

impl Input {
    pub(crate) fn from_r(counts: &List) -> Result<Input> {
        let disk = counts.iter().any(|(n, _)| n == "layout");
        match counts.iter().find(|(n, _)| disk && *n == "genes") {
            Some((_, genes)) => Ok(Input::Disk(open_disk(counts)?, strings(&genes, "genes")?)),
            None => Ok(Input::Memory(crate::counts_from_r(counts)?)),
        }
    }

    pub(crate) fn n_cells(&self) -> usize {
        match self {
            Input::Memory(m) => m.n_cells(),
            Input::Disk(d, _) => d.n_rows(),
        }
    }

    /// Trains a VAE on these counts and computes the training cells'
    /// latent space (with their own covariates); on disk, after one pass
    /// over the file for the per-cell totals. `report` gets the epochs as
    /// phase "train" and, on disk, that pass's progress as phase "scan"
    /// and the latent pass's as phase "latent" (`pass_record`).
    #[allow(clippy::too_many_arguments)]
    /// Trains a VAE and writes its training cells' latent space into `out`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fit_vae(
        &self,
        cov: &Covariates,
        config: VaeConfig,
        train: TrainConfig,
        device: Device,
        interrupted: &dyn Fn() -> bool,
        report: &dyn Fn(&str, &EpochRecord),
        out: &mut LatentOut,
    ) -> scdistill_core::Result<VaeModel> {
        let on_epoch = |r: &EpochRecord| report("train", r);
        let encoded = |done, total| report("latent", &pass_record(done, total));
        match self {
            Input::Memory(m) => {
                let model = VaeModel::fit(m, cov, config, train, device, interrupted, &on_epoch)?;
                model.training_latent_into(&VaeData::for_encoding(&m.csr, cov), &encoded, interrupted, out)?;
                Ok(model)
            }
            Input::Disk(d, genes) => {
                let scan = d.scan(&|done, total| report("scan", &pass_record(done, total)), interrupted)?;
                check_scan(d, &scan)?;
                let model = VaeModel::fit_on_disk(d, &scan, genes, cov, config, train, device, interrupted, &on_epoch)?;
                model.training_latent_into(&VaeData::on_disk(d, &scan, cov), &encoded, interrupted, out)?;
                Ok(model)
            }
        }
    }
}

/// Cells without counts, which the in-memory checks refuse too.
pub(crate) fn check_scan(disk: &DiskCsr, scan: &scdistill_core::data::Scan) -> scdistill_core::Result<()> {
    check_library(disk, &scan.row_sums)
}

/// No cell of `disk` may have a zero total (`library`, one per cell).
pub(crate) fn check_library(disk: &DiskCsr, library: &[f64]) -> scdistill_core::Result<()> {
    let empty: Vec<usize> = (0..library.len()).filter(|&c| library[c] == 0.0).collect();
    if !empty.is_empty() {
        return Err(scdistill_core::Error::InvalidInput(format!(
            "'{}': {} cell(s) have zero total counts (first: cell {}); remove them before fitting",
            disk.path(),
            empty.len(),
            empty.iter().take(3).map(|c| (c + 1).to_string()).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(())
}

/// Latent coordinates of cells on disk under a fitted VAE (the cells as
/// `disk_cells` takes them); `progress` as for training, phase "latent".
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_vae_latent_disk(
    ptr: Robj,
    spec: List,
    genes: Robj,
    batch: Robj,
    categorical: List,
    continuous: List,
    give_mean: bool,
    seed: Robj,
    threads: i32,
    progress: Robj,
) -> Result<Robj> {
    let model: &VaeModel = model_as(&ptr, "latent() of on-disk cells")?;
    let cells = disk_cells(&spec, &genes, batch, categorical, continuous)?;
    let seed: u64 = from_r(&seed, "`seed`")?;
    let lent = Lent(model);
    let z: Matrix = crate::model::with_epoch_progress(threads, &progress, |interrupted, report| {
        let encoded = |done, total| report("latent", &pass_record(done, total));
        lent.get().latent_on_disk(cells, give_mean, seed, &encoded, interrupted)
    })?;
    Ok(matrix_to_r(&z))
}

/// Bayesian DE between the cells `group1` and `group2` (0-based) of a
/// matrix on disk under a fitted VAE; the cells as for
/// `rs_vae_latent_disk`, the rest as for `rs_model_de`.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_vae_de_disk(
    ptr: Robj,
    spec: List,
    genes: Robj,
    batch: Robj,
    categorical: List,
    continuous: List,
    group1: Robj,
    group2: Robj,
    settings: Robj,
    threads: i32,
    progress: Robj,
) -> Result<Robj> {
    let model: &VaeModel = model_as(&ptr, "differential_expression() of on-disk cells")?;
    let cells = disk_cells(&spec, &genes, batch, categorical, continuous)?;
    let (settings, batches) = crate::model::de_settings(&settings)?;
    let n = cells.disk.n_rows();
    let g1 = crate::model::group_rows(&group1, n, "group1")?;
    let g2 = crate::model::group_rows(&group2, n, "group2")?;
    let lent = Lent(model);
    let t = crate::model::with_epoch_progress(threads, &progress, |interrupted, report| {
        let progress = |done, total| report("de", &pass_record(done, total));
        lent.get().differential_expression_on_disk(
            cells,
            &g1,
            &g2,
            settings,
            &batches,
            &Watch::new(interrupted, &progress),
        )
    })?;
    crate::model::de_table_to_r(&t)
}

/// Cells on disk as R gives them: the matrix's description (`open_disk`),
/// the file's gene names, `batch` NULL or labels, `categorical` a list of
/// NULL or labels, `continuous` a list of doubles.
fn disk_cells(spec: &List, genes: &Robj, batch: Robj, categorical: List, continuous: List) -> Result<DiskCells> {
    let labels = |v: Robj, what: &str| if v.is_null() { Ok(None) } else { strings(&v, what).map(Some) };
    let continuous = continuous
        .values()
        .map(|v| {
            v.as_real_vector()
                .map(|x| x.into_iter().map(|x| x as f32).collect())
                .ok_or_else(|| fail("continuous covariates must be numeric"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(DiskCells {
        disk: open_disk(spec)?,
        genes: strings(genes, "genes")?,
        batch: labels(batch, "batch")?,
        categorical: categorical.values().map(|v| labels(v, "covariate")).collect::<Result<Vec<_>>>()?,
        continuous,
    })
}

/// Writes a genes × cells dgCMatrix (`counts` = list(p, i, x, genes, cells),
/// checked as counts) to an `.h5ad` file at `path`, with categorical cell
/// columns `columns` = named list of list(codes (1-based), levels).
/// @noRd
#[extendr]
fn rs_write_h5ad(path: &str, counts: List, columns: List) -> Result<()> {
    let m: CountMatrix = crate::counts_from_r(&counts)?;
    let cols = columns
        .iter()
        .map(|(name, v)| {
            let l = List::try_from(v).map_err(|_| fail("internal: a column must be a list"))?;
            let get = |k: &str| l.iter().find(|(n, _)| *n == k).map(|(_, v)| v);
            let codes = int_slice(&get("codes").ok_or_else(|| fail("internal: codes"))?, "codes")?
                .iter()
                .map(|&c| (c - 1) as u32)
                .collect();
            Ok((name.to_string(), codes, strings(&get("levels").ok_or_else(|| fail("internal: levels"))?, "levels")?))
        })
        .collect::<Result<Vec<_>>>()?;
    crate::run(1, |_| {
        let mut w = H5adWriter::create(path, m.n_genes())?;
        let block = 65_536;
        for s in (0..m.n_cells()).step_by(block) {
            let rows: Vec<usize> = (s..(s + block).min(m.n_cells())).collect();
            let part = m.csr.select_rows(&rows);
            w.append(&part)?;
        }
        w.finish(&m.cells, &m.genes, &cols)
    })
}

/// Creates the `.h5ad` file `path` for cells of `n_genes` genes, to be
/// written block by block (`rs_h5ad_append`) and closed by
/// `rs_h5ad_finish`; nothing stays open between the calls.
/// @noRd
#[extendr]
fn rs_h5ad_create(path: &str, n_genes: f64) -> Result<()> {
    H5adWriter::create(path, n_genes as usize).map(|_| ()).map_err(fail)
}

/// Appends cells to a file `rs_h5ad_create` made: `csr` = list(p, i, x),
/// the slots of a genes × cells dgCMatrix (rows of cells, 0-based).
/// @noRd
#[extendr]
fn rs_h5ad_append(path: &str, n_genes: f64, csr: List) -> Result<()> {
    let get =
        |k: &str| csr.iter().find(|(n, _)| *n == k).map(|(_, v)| v).ok_or_else(|| fail(format!("internal: `{k}`")));
    let (p, i, x) = (get("p")?, get("i")?, get("x")?);
    let x = x.as_real_slice().ok_or_else(|| fail("internal: `x` must be doubles"))?;
    let block = csr_from_csc_slots(int_slice(&p, "p")?, int_slice(&i, "i")?, x, n_genes as usize).map_err(fail)?;
    let mut w = H5adWriter::reopen(path, n_genes as usize).map_err(fail)?;
    w.append(&block).map_err(fail)
}

/// Writes the cell and gene names of a file `rs_h5ad_append` wrote and
/// closes it for good.
/// @noRd
#[extendr]
fn rs_h5ad_finish(path: &str, n_genes: f64, cells: Robj, genes: Robj) -> Result<()> {
    let (cells, genes) = (strings(&cells, "cells")?, strings(&genes, "genes")?);
    let w = H5adWriter::reopen(path, n_genes as usize).map_err(fail)?;
    w.finish(&cells, &genes, &[]).map_err(fail)
}

/// Which of `names` exist in the HDF5 file `path` (an error when it is
/// not an HDF5 file). The package reads HDF5 metadata here rather than with
/// rhdf5: an rhdf5 call that ends in an R error (a file that is not HDF5,
/// say) can leave HDF5's library lock held by R's thread, which would block
/// the readers' threads forever.
/// @noRd
#[extendr]
fn rs_h5_exists(path: &str, names: Vec<String>) -> Result<Vec<bool>> {
    let r = H5Reader::open(path).map_err(fail)?;
    names.iter().map(|n| r.exists(n).map_err(fail)).collect()
}

/// The strings of a dataset.
/// @noRd
#[extendr]
fn rs_h5_strings(path: &str, name: &str) -> Result<Vec<String>> {
    H5Reader::open(path).and_then(|r| r.strings(name)).map_err(fail)
}

/// A string attribute's value(s), or NULL.
/// @noRd
#[extendr]
fn rs_h5_attr(path: &str, obj: &str, attr: &str) -> Result<Robj> {
    let v = H5Reader::open(path).and_then(|r| r.attr_strings(obj, attr)).map_err(fail)?;
    Ok(v.map_or_else(|| ().into(), |v| v.into()))
}

/// A dataset's dimensions (HDF5's order) and whether it holds numbers:
/// list(dims, numeric).
/// @noRd
#[extendr]
fn rs_h5_shape(path: &str, name: &str) -> Result<List> {
    let (dims, numeric) = H5Reader::open(path).and_then(|r| r.shape(name)).map_err(fail)?;
    Ok(list!(dims = dims.iter().map(|&d| d as f64).collect::<Vec<_>>(), numeric = numeric))
}

/// A 1-D numeric dataset as doubles.
/// @noRd
#[extendr]
fn rs_h5_numbers(path: &str, name: &str) -> Result<Vec<f64>> {
    let r = H5Reader::open(path).map_err(fail)?;
    let (dims, numeric) = r.shape(name).map_err(fail)?;
    if !numeric || dims.len() != 1 {
        return Err(fail(format!("'{path}': '{name}' is not a 1-D numeric dataset")));
    }
    r.read_1d::<f64>(name, 0, dims[0]).map_err(fail)
}

/// Creates an `n_rows` × `n_cols` f32 dataset `name` in `path` (a new file
/// or one more dataset of an HDF5 file; never overwrites).
/// @noRd
#[extendr]
fn rs_h5_dense_create(path: &str, name: &str, n_rows: f64, n_cols: f64) -> Result<()> {
    DenseH5::create(path, name, n_rows as usize, n_cols as usize).map_err(fail)
}

/// Writes an R matrix (features × cells, column-major: rows of cells) into
/// rows `start` (1-based) onward of dataset `name` of `path`.
/// @noRd
#[extendr]
fn rs_h5_dense_write(path: &str, name: &str, start: f64, values: &[f64]) -> Result<()> {
    DenseH5::write_rows(path, name, start as usize - 1, values).map_err(fail)
}

/// Writes a cells × `d` double matrix (R's, read in place) into a new f64
/// dataset `name` of `path` as `CellsH5` stores it (so that
/// `HDF5Array::HDF5Array(path, name)` reads it back as cells × d), a block
/// of cells at a time.
/// @noRd
#[extendr]
fn rs_h5_cells_write(path: &str, name: &str, values: &[f64], d: i32) -> Result<()> {
    let d = d.max(1) as usize;
    let n = values.len() / d;
    let file = CellsH5::create(path, name, n, d, false).map_err(fail)?;
    let z = Embedding::column_major(values, n, d);
    const BLOCK: usize = 16_384;
    for start in (0..n).step_by(BLOCK) {
        let end = (start + BLOCK).min(n);
        let mut rows = vec![0.0; (end - start) * d];
        rows.chunks_mut(d).enumerate().for_each(|(k, r)| z.row_into(start + k, r));
        file.write(start, &rows).map_err(fail)?;
    }
    Ok(())
}

/// Cells `rows` (1-based; NULL: all) of a matrix on disk as a CSR slot list.
/// @noRd
#[extendr]
fn rs_read_h5_cells(spec: List, rows: Robj, threads: i32) -> Result<Robj> {
    let disk = open_disk(&spec)?;
    let rows: Option<Vec<usize>> = if rows.is_null() {
        None
    } else {
        Some(int_slice(&rows, "cells")?.iter().map(|&r| (r - 1) as usize).collect())
    };
    let m = crate::run(threads, |_| match &rows {
        Some(r) => disk.read_rows(r),
        None => disk.read_range(0, disk.n_rows()),
    })?;
    Ok(crate::csr_to_r(m).into())
}

extendr_module! {
    mod disk;
    fn rs_read_h5_cells;
    fn rs_h5_exists;
    fn rs_h5_strings;
    fn rs_h5_attr;
    fn rs_h5_shape;
    fn rs_h5_numbers;
    fn rs_h5_dense_create;
    fn rs_h5_dense_write;
    fn rs_h5_cells_write;
    fn rs_vae_latent_disk;
    fn rs_vae_de_disk;
    fn rs_write_h5ad;
    fn rs_h5ad_create;
    fn rs_h5ad_append;
    fn rs_h5ad_finish;
}
