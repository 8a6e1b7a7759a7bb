//! `run_pca()`'s chain for counts on disk, read in blocks of cells: the
//! same seurat_v3 highly variable genes and the same exact PCA of their
//! log2 CPM as in memory, without holding the matrix.
//!
//! Four passes over the file: (1) per batch, each gene's sum and sum of
//! squares, and each cell's library size; (2) per batch, the sums of the
//! counts clipped at the LOESS trend; (3) the HVGs' log2 CPM: column sums,
//! sums of squares and the sparse Gram matrix XᵀX, whose centred, scaled
//! form is the covariance the components come from; (4) the scores. Sums of
//! counts are of whole numbers, exact in f64 whatever the blocks, so the
//! genes chosen are those of the in-memory function; the components agree
//! to rounding.

use super::hvg::{clip_values, clipped_sums, clipped_variance, expected_sd, select, HvgResult};
use super::normalize::{column_moments, column_sums, mean_var_of_moments};
use super::pca::{centered_product, gram_components, sparse_gram, PcaResult};
use crate::data::{Categorical, CellsH5, Csr, DiskCsr};
use crate::error::{check_param, Error, Result};

/// Cells read at once: a multiple of the in-memory reductions' chunks.
const BLOCK: usize = 16_384;

/// What [`hvg_pca_on_disk`] computes.
#[derive(Debug, Clone)]
pub struct DiskPca {
    pub hvg: HvgResult,
    /// `None` when only the genes were asked for.
    pub pca: Option<PcaResult>,
    /// Each cell's total count over the matrix's genes.
    pub library: Vec<f64>,
}

/// Counts a pass's cells for progress reports (`done`, `total` over every
/// pass) and checks for interrupts between blocks.
struct Passes<'a> {
    disk: &'a DiskCsr,
    n_passes: usize,
    done: std::cell::Cell<usize>,
    progress: &'a dyn Fn(usize, usize),
    interrupted: &'a dyn Fn() -> bool,
}

impl Passes<'_> {
    /// Calls `f(first cell, block)` on every block of cells in order.
    fn pass(&self, mut f: impl FnMut(usize, &Csr)) -> Result<()> {
        let n = self.disk.n_rows();
        for start in (0..n).step_by(BLOCK) {
            if (self.interrupted)() {
                return Err(Error::Interrupted);
            }
            let end = (start + BLOCK).min(n);
            f(start, &self.disk.read_range(start, end)?);
            self.done.set(self.done.get() + end - start);
            (self.progress)(self.done.get(), n * self.n_passes);
        }
        Ok(())
    }
}

/// `n_hvg` seurat_v3 highly variable genes of the counts on disk (batch-aware
/// with `batch`) and, when `n_pcs` is given, the exact PCA of their
/// log2(counts per `scale_factor` + 1) (library sizes over all the matrix's
/// genes; [`super::log_normalized`]), each gene scaled to unit variance
/// when `scale`. `progress(done, total)` counts
/// cells over all passes.
#[allow(clippy::too_many_arguments)]
pub fn hvg_pca_on_disk(
    disk: &DiskCsr,
    n_hvg: usize,
    batch: Option<&Categorical>,
    span: f64,
    n_pcs: Option<usize>,
    scale: bool,
    scale_factor: f64,
    progress: &dyn Fn(usize, usize),
    interrupted: &dyn Fn() -> bool,
) -> Result<DiskPca> {
    let n = disk.n_rows();
    let mut scores = vec![0.0; n * n_pcs.unwrap_or(0)];
    let out = ScoresOut::Memory(&mut scores);
    let mut r = hvg_pca_on_disk_into(disk, n_hvg, batch, span, n_pcs, scale, scale_factor, progress, interrupted, out)?;
    if let Some(p) = r.pca.as_mut() {
        p.scores = faer::Mat::from_fn(n, p.sdev.len(), |i, j| scores[j * n + i]);
    }
    Ok(r)
}

/// Where [`hvg_pca_on_disk_into`] writes the scores.
pub enum ScoresOut<'a> {
    /// Cells × `n_pcs` column-major (R's layout; empty without `n_pcs`).
    Memory(&'a mut [f64]),
    /// A dataset of cells × `n_pcs`, written a block at a time: the scores
    /// are never all in memory (`distill(h5_file =)`).
    File(&'a CellsH5),
}

/// [`hvg_pca_on_disk`] with the scores written where `scores` says as the
/// last pass computes them: no second copy of all cells' scores (2 GB at
/// 5·10^6 cells and 50 PCs). The returned `scores` matrix is then empty.
#[allow(clippy::too_many_arguments)]
pub fn hvg_pca_on_disk_into(
    disk: &DiskCsr,
    n_hvg: usize,
    batch: Option<&Categorical>,
    span: f64,
    n_pcs: Option<usize>,
    scale: bool,
    scale_factor: f64,
    progress: &dyn Fn(usize, usize),
    interrupted: &dyn Fn() -> bool,
    mut scores: ScoresOut,
) -> Result<DiskPca> {
    check_param(n_hvg >= 1, "n_hvg", "must be at least 1")?;
    check_param(span > 0.0 && span <= 1.0, "span", "must be in (0, 1]")?;
    check_param(scale_factor > 0.0 && scale_factor.is_finite(), "scale_factor", "must be a positive number")?;
    let (n, g) = (disk.n_rows(), disk.n_cols());
    let all = Categorical::constant("all", n);
    let batch = batch.unwrap_or(&all);
    check_param(batch.codes.len() == n, "batch", format!("has {} values for {n} cells", batch.codes.len()))?;
    let n_top = n_hvg.min(g);
    if let Some(k) = n_pcs {
        check_param(k >= 1, "n_pcs", "must be at least 1")?;
        check_param(
            k < n.min(n_top),
            "n_pcs",
            format!("must be smaller than both the number of cells ({n}) and of genes ({n_top})"),
        )?;
    }
    let k = n_pcs.unwrap_or(0);
    match &scores {
        ScoresOut::Memory(v) => {
            check_param(v.len() == n * k, "scores", format!("has room for {} values, not {}", v.len(), n * k))?
        }
        ScoresOut::File(f) => check_param(
            f.n == n && f.d == k,
            "scores",
            format!("dataset '{}' holds {} cells x {}, not {n} x {k}", f.name, f.n, f.d),
        )?,
    }
    let passes = Passes { disk, n_passes: if n_pcs.is_some() { 4 } else { 2 }, done: 0.into(), progress, interrupted };
    let n_batch = batch.n_levels();
    // Local rows of each batch in a block.
    let by_batch = |start: usize, m: &Csr| -> Vec<Vec<usize>> {
        let mut rows = vec![Vec::new(); n_batch];
        for r in 0..m.n_rows {
            rows[batch.codes[start + r] as usize].push(r);
        }
        rows
    };
    let add = |total: &mut [f64], part: Vec<f64>| total.iter_mut().zip(part).for_each(|(t, v)| *t += v);

    // Pass 1: per-batch sums and sums of squares; library sizes.
    let mut sums = vec![vec![0.0; 2 * g]; n_batch];
    let mut library = Vec::with_capacity(n);
    passes.pass(|start, m| {
        library.extend(m.row_sums());
        for (b, rows) in by_batch(start, m).iter().enumerate() {
            add(&mut sums[b], column_moments(m, rows));
        }
    })?;
    let sizes = batch.level_sizes();
    let total: Vec<f64> = (0..2 * g).map(|j| sums.iter().map(|s| s[j]).sum()).collect();
    let (mean, variance) = mean_var_of_moments(&total, n);
    let per_batch: Vec<_> = (0..n_batch)
        .map(|b| {
            let (m, v) = mean_var_of_moments(&sums[b], sizes[b]);
            let sd = expected_sd(&m, &v, span);
            let clip = clip_values(&m, &sd, sizes[b]);
            (m, sd, clip)
        })
        .collect();

    // Pass 2: clipped sums.
    let mut clipped = vec![vec![0.0; 2 * g]; n_batch];
    passes.pass(|start, m| {
        for (b, rows) in by_batch(start, m).iter().enumerate() {
            let clip = &per_batch[b].2;
            add(&mut clipped[b], column_sums(m, rows, 2 * g, |j, v, acc| clipped_sums(clip, j, v, acc)));
        }
    })?;
    let norm_vars: Vec<Vec<f64>> =
        (0..n_batch).map(|b| clipped_variance(&clipped[b], &per_batch[b].0, &per_batch[b].1, sizes[b])).collect();
    let hvg = select(mean, variance, &norm_vars, n_top);
    let Some(k) = n_pcs else {
        return Ok(DiskPca { hvg, pca: None, library });
    };

    // Pass 3: the HVGs' log-normalized values, their column sums and Gram matrix.
    let p = hvg.selected.len();
    let lognorm = |start: usize, m: &Csr| -> Csr {
        let scale: Vec<f64> = (0..m.n_rows).map(|r| scale_factor / library[start + r]).collect();
        m.select_columns(&hvg.selected).map_values(|r, v| ((v as f64 * scale[r]) + 1.0).log2() as f32)
    };
    let mut moments = vec![0.0; 2 * p];
    let mut gram = vec![0.0; p * p];
    let mut failed = None;
    passes.pass(|start, m| {
        let x = lognorm(start, m);
        let every: Vec<usize> = (0..x.n_rows).collect();
        add(&mut moments, column_moments(&x, &every));
        match sparse_gram(&x, interrupted) {
            Ok(part) => add(&mut gram, part),
            Err(e) => failed = Some(e),
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    let (center, var) = mean_var_of_moments(&moments, n);
    let unit: Vec<f64> = var.iter().map(|&v| if scale && v > 0.0 { 1.0 / v.sqrt() } else { 1.0 }).collect();
    let (loadings, sdev) = gram_components(gram, n, &center, &unit, k)?;
    let total_var: f64 = var.iter().zip(&unit).map(|(v, s)| v * s * s).sum();
    let variance_ratio = sdev.iter().map(|sd| sd * sd / total_var).collect();

    // Pass 4: scores, into the caller's column-major matrix or its file.
    let mut failed = None;
    passes.pass(|start, m| {
        let s = centered_product(&lognorm(start, m), &center, &unit, &loadings);
        match &mut scores {
            ScoresOut::Memory(v) => {
                for c in 0..k {
                    let column = &mut v[c * n + start..c * n + start + s.nrows()];
                    column.iter_mut().enumerate().for_each(|(r, v)| *v = s[(r, c)]);
                }
            }
            ScoresOut::File(f) if failed.is_none() => {
                let rows: Vec<f64> =
                    (0..s.nrows()).flat_map(|r| (0..k).map(move |c| (r, c))).map(|(r, c)| s[(r, c)]).collect();
                if let Err(e) = f.write(start, &rows) {
                    failed = Some(e);
                }
            }
            ScoresOut::File(_) => {}
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    let scores = faer::Mat::<f64>::zeros(0, k);
    let pca = PcaResult { scores, loadings, sdev, variance_ratio, center, scale: unit, n_iter: 0 };
    Ok(DiskPca { hvg, pca: Some(pca), library })
}
