//! Correcting cells Harmony was not fitted on. A fit leaves its centroids Y,
//! each cluster's σ, the diversity penalty at its end and each level's batch
//! terms W (d × K). A cell is corrected the way the fitted cells were: soft
//! memberships R ∝ exp(−2 (1 − Yᵀ ẑ) / σ) times the penalty of its levels,
//! then z − Σ_k R_k W_k, and again from the corrected position (Harmony's
//! iterations with the clusters held fixed). Symphony (Kang et al. 2021)
//! maps query cells into a Harmony reference in the same way, without the
//! penalty and in one step.
//!
//! `sketched` fits Harmony on a sample of the cells and corrects the others
//! so: the clusters × cells matrices then grow with the sample, not with the
//! data (2.3 GB at 10^6 cells and 100 clusters).

use super::{normalize_columns, Embedding, Harmony, HarmonyCovariate, HarmonyParams, HarmonyResult, CHUNK};
use crate::data::CellsH5;
use crate::error::{invalid, Error, Result};
use crate::numeric::exp_nonpositive;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Rounds of memberships and correction per cell. The first assigns the
/// cell from its uncorrected position; the second and third from the
/// corrected one, where the fitted cells were last assigned.
const ROUNDS: usize = 3;

/// Each batch of the first covariate puts at least this many of its cells
/// (or all it has) into a sketch.
pub const SKETCH_FLOOR: usize = 500;

/// Cells corrected between two polls for an interrupt.
const POLL_CELLS: usize = 1 << 16;

/// A fitted Harmony run, reduced to what corrects other cells.
#[derive(Debug, Clone)]
pub struct HarmonyMap {
    d: usize,
    k: usize,
    /// Centroids, d × K, unit columns.
    y: Vec<f64>,
    inv_sigma: Vec<f64>,
    /// θ ln((2E + 1) / (O + E + 1)) per level and cluster (level-major).
    ln_pen: Vec<f64>,
    /// Per level, d × K batch terms; empty where nothing is subtracted.
    terms: Vec<Vec<f64>>,
    /// Levels of each covariate.
    n_levels: Vec<usize>,
}

impl HarmonyMap {
    pub(super) fn of(h: &Harmony) -> Self {
        let k = h.k;
        let ln_pen = h.ln_penalty();
        let n_levels = (0..h.protected_cov.len()).map(|c| h.level_cov.iter().filter(|&&lc| lc == c).count()).collect();
        HarmonyMap {
            d: h.d,
            k,
            y: h.y.clone(),
            inv_sigma: h.inv_sigma.clone(),
            ln_pen,
            terms: h.terms.clone(),
            n_levels,
        }
    }

    /// Corrects the cells of `z` (their levels in `covariates`, coded as in
    /// the fit) into `out`, cells × d row-major.
    pub fn correct(&self, z: Embedding, covariates: &[HarmonyCovariate], out: &mut [f64]) -> Result<()> {
        let (n, d) = (z.n, self.d);
        if z.d != d || z.values.len() != n * d || out.len() != n * d {
            return invalid!("the cells to correct have {} dimensions; Harmony was fitted on {d}", z.d);
        }
        if covariates.len() != self.n_levels.len() {
            return invalid!("Harmony was fitted with {} covariates, not {}", self.n_levels.len(), covariates.len());
        }
        for (c, &nl) in covariates.iter().zip(&self.n_levels) {
            if c.codes.len() != n || c.codes.iter().any(|&v| v as usize >= nl) {
                return invalid!(
                    "covariate `{}` needs one of its {nl} fitted levels for each of the {n} cells",
                    c.name
                );
            }
        }
        self.correct_rows(z, 0, 0, covariates, out);
        Ok(())
    }

    /// Corrects the cells `at..` of `z` into `out` (as many rows as it
    /// holds), in parallel chunks; their levels are those from `lo` in
    /// `covs` (`z` may be a block of the cells, read from a file).
    fn correct_rows(&self, z: Embedding, at: usize, lo: usize, covs: &[HarmonyCovariate], out: &mut [f64]) {
        let d = self.d;
        out.par_chunks_mut(d * CHUNK).enumerate().for_each(|(ci, rows)| {
            self.correct_chunk(z, at + ci * CHUNK, lo + ci * CHUNK, covs, rows);
        });
    }

    /// The cells `at..` of `z`, whose levels are those from `first` in
    /// `covs` (as many as `out` has rows), see the module's note: per
    /// round, the memberships of all of them by one product with the
    /// centroids, and each level's batch terms by one product with the
    /// memberships of its cells.
    fn correct_chunk(&self, z: Embedding, at: usize, first: usize, covs: &[HarmonyCovariate], out: &mut [f64]) {
        let (d, k) = (self.d, self.k);
        let m = out.len() / d;
        let mut zin = vec![0.0; m * d];
        for (i, row) in zin.chunks_mut(d).enumerate() {
            z.row_into(at + i, row);
        }
        // The cells of each level, and each cell's summed log penalty (K × m).
        let mut of_level: Vec<Vec<usize>> = vec![Vec::new(); self.terms.len()];
        let mut pen = vec![0.0; k * m];
        for i in 0..m {
            let mut base = 0;
            for (c, &nl) in covs.iter().zip(&self.n_levels) {
                let l = base + c.codes[first + i] as usize;
                base += nl;
                of_level[l].push(i);
                pen[i * k..(i + 1) * k].iter_mut().zip(&self.ln_pen[l * k..(l + 1) * k]).for_each(|(p, q)| *p += q);
            }
        }
        let y = MatRef::from_column_major_slice(&self.y, d, k);
        let (mut u, mut r) = (vec![0.0; m * d], vec![0.0; k * m]);
        let (mut r_sub, mut shift) = (Vec::new(), Vec::new());
        out.copy_from_slice(&zin);
        for _ in 0..ROUNDS {
            u.copy_from_slice(out);
            normalize_columns(&mut u, d);
            // r = Yᵀ u, then per cell exp(−2 (1 − r) / σ + ln penalty), normalized.
            let uc = MatRef::from_column_major_slice(&u, d, m);
            matmul(MatMut::from_column_major_slice_mut(&mut r, k, m), Accum::Replace, y.transpose(), uc, 1.0, Par::Seq);
            for (col, p) in r.chunks_mut(k).zip(pen.chunks(k)) {
                let mut hi = f64::NEG_INFINITY;
                for ((v, &is), &lp) in col.iter_mut().zip(&self.inv_sigma).zip(p) {
                    *v = -2.0 * (1.0 - *v) * is + lp;
                    hi = hi.max(*v);
                }
                let mut total = 0.0;
                for v in col.iter_mut() {
                    *v = exp_nonpositive(*v - hi);
                    total += *v;
                }
                col.iter_mut().for_each(|v| *v /= total);
            }
            out.copy_from_slice(&zin);
            for (l, cells) in of_level.iter().enumerate() {
                let w = &self.terms[l];
                if w.is_empty() || cells.is_empty() {
                    continue;
                }
                r_sub.clear();
                cells.iter().for_each(|&i| r_sub.extend_from_slice(&r[i * k..(i + 1) * k]));
                shift.resize(d * cells.len(), 0.0);
                let rc = MatRef::from_column_major_slice(&r_sub, k, cells.len());
                let wm = MatRef::from_column_major_slice(w, d, k);
                let dst = MatMut::from_column_major_slice_mut(&mut shift, d, cells.len());
                matmul(dst, Accum::Replace, wm, rc, 1.0, Par::Seq);
                for (&i, s) in cells.iter().zip(shift.chunks(d)) {
                    out[i * d..(i + 1) * d].iter_mut().zip(s).for_each(|(o, v)| *o -= v);
                }
            }
        }
    }
}

/// The sketch: from each level of `cov`, its share of `m` cells but at least
/// `SKETCH_FLOOR` (or all it has), drawn with `seed`; sorted.
pub fn sketch_cells(cov: &HarmonyCovariate, m: usize, seed: u64) -> Vec<usize> {
    let n = cov.codes.len();
    let mut by_level: Vec<Vec<usize>> = vec![Vec::new(); cov.n_levels];
    for (i, &c) in cov.codes.iter().enumerate() {
        by_level[c as usize].push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5ce7_c400);
    let mut cells = Vec::with_capacity(m + cov.n_levels * SKETCH_FLOOR);
    for level in &by_level {
        let nl = level.len();
        let share = (m as f64 * nl as f64 / n as f64).round() as usize;
        let take = share.max(SKETCH_FLOOR).min(nl);
        cells.extend(rand::seq::index::sample(&mut rng, nl, take).into_iter().map(|j| level[j]));
    }
    cells.sort_unstable();
    cells
}

/// The cells a sketched fit reads and the place their corrections go.
pub(super) trait Store {
    /// Cells × dimensions.
    fn shape(&self) -> (usize, usize);
    /// Cells `lo..hi` and the row of cell `lo` in what is returned: all the
    /// cells where they are in memory (as they are now, so before a block is
    /// written, its cells), or the block read into `buf`.
    fn block<'s>(&'s self, lo: usize, hi: usize, buf: &'s mut Vec<f64>) -> Result<(Embedding<'s>, usize)>;
    /// Corrected cells `first..`, row-major.
    fn write(&mut self, first: usize, rows: &[f64]) -> Result<()>;
}

/// Cells read from `z` and written into `out`, cells × d.
pub(super) struct Apart<'a> {
    pub z: Embedding<'a>,
    pub out: &'a mut [f64],
    pub column_major: bool,
}

impl Store for Apart<'_> {
    fn shape(&self) -> (usize, usize) {
        (self.z.n, self.z.d)
    }

    fn block<'s>(&'s self, lo: usize, _: usize, _: &'s mut Vec<f64>) -> Result<(Embedding<'s>, usize)> {
        Ok((self.z, lo))
    }

    fn write(&mut self, first: usize, rows: &[f64]) -> Result<()> {
        put(self.out, self.z.n, self.z.d, self.column_major, first, rows);
        Ok(())
    }
}

/// Cells × d column-major, overwritten by their corrections.
pub(super) struct InPlace<'a> {
    pub values: &'a mut [f64],
    pub n: usize,
    pub d: usize,
}

impl Store for InPlace<'_> {
    fn shape(&self) -> (usize, usize) {
        (self.n, self.d)
    }

    fn block<'s>(&'s self, lo: usize, _: usize, _: &'s mut Vec<f64>) -> Result<(Embedding<'s>, usize)> {
        Ok((Embedding::column_major(self.values, self.n, self.d), lo))
    }

    fn write(&mut self, first: usize, rows: &[f64]) -> Result<()> {
        put(self.values, self.n, self.d, true, first, rows);
        Ok(())
    }
}

/// Cells in an HDF5 dataset, overwritten by their corrections: neither the
/// cells nor their corrections are ever all in memory.
pub(super) struct InFile(pub CellsH5);

impl Store for InFile {
    fn shape(&self) -> (usize, usize) {
        (self.0.n, self.0.d)
    }

    /// The block's values are checked here: unlike cells in memory, those
    /// in a file were not checked before the fit.
    fn block<'s>(&'s self, lo: usize, hi: usize, buf: &'s mut Vec<f64>) -> Result<(Embedding<'s>, usize)> {
        let d = self.0.d;
        *buf = self.0.read(lo, hi - lo)?;
        if let Some(i) = buf.iter().position(|v| !v.is_finite()) {
            return invalid!(
                "the embedding has a missing or infinite value (cell {}, dimension {})",
                lo + i / d + 1,
                i % d + 1
            );
        }
        Ok((Embedding::row_major(buf, hi - lo, d), 0))
    }

    fn write(&mut self, first: usize, rows: &[f64]) -> Result<()> {
        self.0.write(first, rows)
    }
}

/// Row-major `rows` as cells `first..` of the n × d matrix `out`.
fn put(out: &mut [f64], n: usize, d: usize, column_major: bool, first: usize, rows: &[f64]) {
    if column_major {
        for (i, row) in rows.chunks(d).enumerate() {
            row.iter().enumerate().for_each(|(j, &v)| out[j * n + first + i] = v);
        }
    } else {
        out[first * d..first * d + rows.len()].copy_from_slice(rows);
    }
}

/// Harmony fitted on a sketch of `m` cells (`sketch_cells`); the others
/// corrected by the fit's `HarmonyMap`, the sketch's cells keep their fit.
/// The corrected cells are written to `store` in blocks, each after all its
/// cells were read (into the block's corrections), so a store may overwrite
/// the cells it reads; no other cells × d matrix is made. `z_corr` of the
/// result is empty.
pub(super) fn sketched(
    store: &mut dyn Store,
    covs: &[HarmonyCovariate],
    params: &HarmonyParams,
    m: usize,
    interrupted: &dyn Fn() -> bool,
    on_iter: &dyn Fn(usize),
) -> Result<HarmonyResult> {
    let (n, d) = store.shape();
    let cells = sketch_cells(&covs[0], m, params.seed);
    let mut sub = vec![0.0; cells.len() * d];
    let mut buf = Vec::new();
    // One pass over the blocks (of a file; in memory, the same cells).
    let mut next = 0;
    for lo in (0..n).step_by(POLL_CELLS) {
        if interrupted() {
            return Err(Error::Interrupted);
        }
        let hi = (lo + POLL_CELLS).min(n);
        let first = next;
        while next < cells.len() && cells[next] < hi {
            next += 1;
        }
        if first < next {
            let (z, at) = store.block(lo, hi, &mut buf)?;
            for (row, &i) in sub[first * d..next * d].chunks_mut(d).zip(&cells[first..next]) {
                z.row_into(at + i - lo, row);
            }
        }
    }
    let sub_covs: Vec<HarmonyCovariate> = covs
        .iter()
        .map(|c| HarmonyCovariate { codes: cells.iter().map(|&i| c.codes[i]).collect(), ..c.clone() })
        .collect();
    let p = HarmonyParams { sketch: None, ..params.clone() };
    let mut fit = super::harmony(Embedding::row_major(&sub, cells.len(), d), &sub_covs, &p, interrupted, on_iter)?;
    drop((sub, sub_covs));
    let mut corrected = vec![0.0; POLL_CELLS.min(n) * d];
    // The sketch's cells (sorted) in turn.
    let mut next = 0;
    for lo in (0..n).step_by(POLL_CELLS) {
        if interrupted() {
            return Err(Error::Interrupted);
        }
        let hi = (lo + POLL_CELLS).min(n);
        let out = &mut corrected[..(hi - lo) * d];
        // The sketch's cells too (overwritten below): simpler than skipping them.
        let (z, at) = store.block(lo, hi, &mut buf)?;
        fit.map.correct_rows(z, at, lo, covs, out);
        while next < cells.len() && cells[next] < hi {
            let i = cells[next] - lo;
            out[i * d..(i + 1) * d].copy_from_slice(&fit.z_corr[next * d..(next + 1) * d]);
            next += 1;
        }
        store.write(lo, out)?;
    }
    fit.z_corr = Vec::new();
    Ok(HarmonyResult { fitted_cells: cells.len(), ..fit })
}
