//! Harmony (Korsunsky et al. 2019) as the R package `harmony` 2.x and
//! harmonypy 2.1 compute it: k-means++ centroids on cosine-normalized
//! coordinates; then per iteration a fresh soft assignment, rounds of
//! blockwise updates with the diversity penalty ((2E + 1) / (O + E + 1))^θ,
//! and a mixture-of-experts ridge regression per cluster whose intercepts
//! become the next centroids and whose batch terms are removed, until the
//! objective settles. One difference: with several covariates the ridge
//! design includes their co-occurrence (harmony 2 keeps only its diagonal).
//!
//! Data are held cells-as-columns (d × N, column-major), the layout of the
//! reference implementations. All heavy steps run over fixed chunks of cells
//! in parallel and are summed in a fixed order, so the result depends on the
//! seed, not on the number of threads. Cells are kept sorted by the level of
//! the first covariate so that each level's cells are one contiguous block
//! and the regression sums are matrix products.
//!
//! Protected covariates (for example `condition`) enter the diversity
//! statistics with their own penalty and the ridge design, but their
//! coefficients, like the intercept, are never subtracted: batch effects are
//! estimated while holding the condition fixed, and the condition effect stays.

use crate::error::{invalid, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

mod clustering;
mod correction;
mod kmeans;
mod map;
mod params;

pub use map::HarmonyMap;
use params::{check_design, check_inputs};
pub use params::{HarmonyCovariate, HarmonyParams};

/// Cells per parallel work item (fixed, so sums do not depend on threads).
const CHUNK: usize = 512;

/// What Harmony returns.
#[derive(Debug, Clone)]
pub struct HarmonyResult {
    /// Corrected coordinates, cells × d, row-major.
    pub z_corr: Vec<f64>,
    /// Soft cluster memberships, cells × K, row-major (single precision);
    /// empty unless `HarmonyParams::memberships`.
    pub r: Vec<f32>,
    pub n_clusters: usize,
    /// Objective after initialisation and after each iteration's clustering.
    pub objective: Vec<f64>,
    /// Clustering rounds of each iteration.
    pub cluster_rounds: Vec<usize>,
    pub n_iter: usize,
    pub converged: bool,
    /// The fitted clusters and batch terms, which correct other cells of
    /// the same batches (`HarmonyMap::correct`).
    pub map: HarmonyMap,
    /// Cells Harmony was fitted on: all, or the sketch (`HarmonyParams::sketch`).
    pub fitted_cells: usize,
}

use crate::data::CellsH5;
pub use crate::data::Embedding;

/// Corrects `z` (cells × dimensions, row- or column-major) for the
/// non-protected covariates.
/// `interrupted` is polled between blocks; `on_iter(i)` runs after iteration i.
pub fn harmony(
    z: Embedding,
    covariates: &[HarmonyCovariate],
    params: &HarmonyParams,
    interrupted: &dyn Fn() -> bool,
    on_iter: &dyn Fn(usize),
) -> Result<HarmonyResult> {
    check_inputs(z, covariates, params)?;
    if let Some(m) = params.sketch.filter(|&m| m < z.n) {
        let mut z_corr = vec![0.0; z.n * z.d];
        let mut cells = map::Apart { z, out: &mut z_corr, column_major: false };
        let r = map::sketched(&mut cells, covariates, params, m, interrupted, on_iter)?;
        return Ok(HarmonyResult { z_corr, ..r });
    }
    let mut h = Harmony::new(z, covariates, params)?;
    h.init(interrupted)?;
    let mut converged = false;
    let mut n_iter = 0;
    for it in 0..params.max_iter {
        h.cluster(interrupted)?;
        h.correct();
        n_iter = it + 1;
        on_iter(n_iter);
        let (old, new) = (h.obj_harmony[h.obj_harmony.len() - 2], h.obj_harmony[h.obj_harmony.len() - 1]);
        if objective_settled(old, new, params.epsilon_harmony) {
            converged = true;
            break;
        }
    }
    Ok(h.finish(n_iter, converged))
}

/// Where [`harmony_into`] reads the cells and writes them corrected, cells
/// × d: column-major R matrices, filled in place, or a file.
pub enum HarmonyCells<'a> {
    /// Read from `z`, written into `out`.
    Apart { z: Embedding<'a>, out: &'a mut [f64] },
    /// Corrected where they are: a matrix that only the caller holds (the
    /// PCs `distill()`'s teacher computed), so that no second cells × d
    /// matrix exists (2 GB at 5·10^6 cells and 50 dimensions).
    InPlace { values: &'a mut [f64], n: usize, d: usize },
    /// Corrected where they are, in an HDF5 dataset (`distill(h5_file =)`
    /// of counts on disk: the PCA wrote its scores there). With a sketch,
    /// only the sketch and a block of cells are ever in memory.
    File(CellsH5),
}

/// `harmony`, with the corrected cells written as `cells` says and `z_corr`
/// of the result left empty. On a sketch the cells are corrected block by
/// block straight into the output, so no other cells × d matrix is made.
pub fn harmony_into(
    cells: HarmonyCells,
    covariates: &[HarmonyCovariate],
    params: &HarmonyParams,
    interrupted: &dyn Fn() -> bool,
    on_iter: &dyn Fn(usize),
) -> Result<HarmonyResult> {
    // With a sketch, the cells are checked here (those in a file block by
    // block as they are read); without, by the fit.
    let sketch = |n: usize| params.sketch.filter(|&m| m < n);
    let mut apart;
    let mut in_place;
    let mut in_file;
    let store: &mut dyn map::Store = match cells {
        HarmonyCells::Apart { z, out } => {
            if out.len() != z.n * z.d {
                return invalid!(
                    "room for {} corrected values; expected cells ({}) × dimensions ({})",
                    out.len(),
                    z.n,
                    z.d
                );
            }
            if sketch(z.n).is_some() {
                check_inputs(z, covariates, params)?;
            }
            apart = map::Apart { z, out, column_major: true };
            &mut apart
        }
        HarmonyCells::InPlace { values, n, d } => {
            if values.len() != n * d {
                return invalid!("the embedding has {} values, not cells ({n}) × dimensions ({d})", values.len());
            }
            if sketch(n).is_some() {
                check_inputs(Embedding::column_major(values, n, d), covariates, params)?;
            }
            in_place = map::InPlace { values, n, d };
            &mut in_place
        }
        HarmonyCells::File(cells) => {
            if sketch(cells.n).is_some() {
                check_design(cells.n, cells.d, covariates, params)?;
            }
            in_file = map::InFile(cells);
            &mut in_file
        }
    };
    let n = store.shape().0;
    if let Some(m) = sketch(n) {
        return map::sketched(store, covariates, params, m, interrupted, on_iter);
    }
    // The fit holds its own copies of the cells, so the result can
    // overwrite them after it. Cells in a file are all read: a fit on all
    // cells holds several times as much anyway.
    let mut all = Vec::new();
    let (z, _) = store.block(0, n, &mut all)?;
    let mut r = harmony(z, covariates, params, interrupted, on_iter)?;
    drop(all);
    store.write(0, &r.z_corr)?;
    r.z_corr = Vec::new();
    Ok(r)
}

/// Whether the objective fell from `old` to `new` by less than the fraction
/// `eps`. A rise is not convergence (as in harmonypy 2.1; R harmony's signed
/// test stops at any rise, often after a few iterations on large data).
fn objective_settled(old: f64, new: f64, eps: f64) -> bool {
    if !old.is_finite() || !new.is_finite() {
        return false;
    }
    if old == 0.0 {
        return new == 0.0;
    }
    let fall = (old - new) / old.abs();
    (0.0..eps).contains(&fall)
}

/// One run's state. Its steps live beside it: the starting centroids in
/// `kmeans.rs`, the soft clustering in `clustering.rs`, the ridge correction
/// in `correction.rs`; the set-up and the results are below.
struct Harmony<'a> {
    p: &'a HarmonyParams,
    n: usize,
    d: usize,
    k: usize,
    /// Total number of levels over all covariates.
    b: usize,
    n_cov: usize,
    /// Internal position → original cell.
    perm: Vec<usize>,
    z_orig: Vec<f64>,
    z_corr: Vec<f64>,
    /// Cosine-normalized z_corr in single precision (as harmonypy 2.1):
    /// the distance and k-means products are f32, their sums f64.
    z_cos: Vec<f32>,
    /// Global level of each (internal) cell and covariate, n_cov per cell.
    lev: Vec<u32>,
    /// Internal cell ranges of the levels of covariate 0.
    ranges: Vec<(usize, usize)>,
    pr_b: Vec<f64>,
    theta: Vec<f64>,
    lambda: Vec<Option<f64>>,
    subtract: Vec<bool>,
    /// Covariate of each level, and cells per level.
    level_cov: Vec<usize>,
    n_b: Vec<f64>,
    protected_cov: Vec<bool>,
    sigma: Vec<f64>,
    inv_sigma: Vec<f64>,
    /// Centroids, d × K.
    y: Vec<f64>,
    /// K × N, column-major (one cell per column): distances 2 (1 − Yᵀ z_cos)
    /// while they are computed, then, until the centroids move, the
    /// normalized kernel exp(−dist / σ) of each cell (`to_scale`), which the
    /// rounds of a clustering share (no exponentials per round).
    dist: Vec<f32>,
    /// Per cell, c with dist_k = −σ_k (ln scale_k + c).
    offset: Vec<f64>,
    /// Soft assignments, K × N like `dist`. Both are f32 (as in harmonypy
    /// 2.1): the clustering rounds stream them, and sums are taken in f64.
    r: Vec<f32>,
    /// Observed and expected cluster × level counts, stored level-major (b·K + k).
    o: Vec<f64>,
    e: Vec<f64>,
    /// The last correction's batch terms per level, d × K (empty: none).
    terms: Vec<Vec<f64>>,
    obj_kmeans: Vec<f64>,
    obj_harmony: Vec<f64>,
    rounds: Vec<usize>,
    rng: ChaCha8Rng,
}

/// `dst` = the columns of `src` (d values each) scaled to unit length, in f32.
fn normalized_f32(src: &[f64], dst: &mut [f32], d: usize) {
    dst.par_chunks_mut(d * CHUNK).zip(src.par_chunks(d * CHUNK)).for_each(|(o, c)| {
        for (out, col) in o.chunks_mut(d).zip(c.chunks(d)) {
            let norm = col.iter().map(|v| v * v).sum::<f64>().sqrt();
            let inv = if norm > 0.0 { 1.0 / norm } else { 1.0 };
            out.iter_mut().zip(col).for_each(|(o, v)| *o = (v * inv) as f32);
        }
    });
}

fn normalize_columns(m: &mut [f64], d: usize) {
    m.par_chunks_mut(d * CHUNK).for_each(|c| {
        for col in c.chunks_mut(d) {
            let norm = col.iter().map(|v| v * v).sum::<f64>().sqrt();
            if norm > 0.0 {
                col.iter_mut().for_each(|v| *v /= norm);
            }
        }
    });
}

#[inline(always)]
fn add_into<T: Copy + Into<f64>>(acc: &mut [f64], x: &[T]) {
    acc.iter_mut().zip(x).for_each(|(a, &b)| *a += b.into());
}

/// Fixed chunks for reductions over `len` items: the same for any thread count.
fn reduction_chunk(len: usize) -> usize {
    CHUNK.max(len.div_ceil(256))
}

/// Σ_{i < n} f(i) in `LANES` independent partial sums (a single running sum
/// waits on the latency of every addition), in a fixed order.
#[inline(always)]
fn lane_sum(n: usize, f: impl Fn(usize) -> f64) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0.0; LANES];
    let full = n - n % LANES;
    for i0 in (0..full).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(i0 + l);
        }
    }
    for (l, a) in acc.iter_mut().enumerate().take(n - full) {
        *a += f(full + l);
    }
    acc.iter().sum()
}

impl<'a> Harmony<'a> {
    /// The state before the first k-means: cells in the internal order, their
    /// levels and the per-level penalties.
    fn new(z: Embedding, covs: &[HarmonyCovariate], p: &'a HarmonyParams) -> Result<Self> {
        let (n, d) = (z.n, z.d);
        let k = p.n_clusters.unwrap_or_else(|| ((n as f64 / 30.0).round() as usize).clamp(1, 100));
        // Sort cells by the first covariate's level (stable).
        let mut perm: Vec<usize> = (0..n).collect();
        perm.sort_by_key(|&i| covs[0].codes[i]);
        let mut z_orig = vec![0.0; n * d];
        if z.column_major {
            // In tiles of cells: within a tile the sorted cells mostly run
            // in order, so each dimension is read as a stream.
            z_orig.par_chunks_mut(d * 64).zip(perm.par_chunks(64)).for_each(|(out, cells)| {
                for j in 0..d {
                    let col = &z.values[j * n..(j + 1) * n];
                    for (o, &i) in cells.iter().enumerate() {
                        out[o * d + j] = col[i];
                    }
                }
            });
        } else {
            for (pos, &i) in perm.iter().enumerate() {
                z_orig[pos * d..(pos + 1) * d].copy_from_slice(z.row(i));
            }
        }
        let n_cov = covs.len();
        let offsets: Vec<usize> = covs
            .iter()
            .scan(0, |s, c| {
                let o = *s;
                *s += c.n_levels;
                Some(o)
            })
            .collect();
        let b = covs.iter().map(|c| c.n_levels).sum();
        let mut lev = vec![0u32; n * n_cov];
        for (pos, &i) in perm.iter().enumerate() {
            for (c, cov) in covs.iter().enumerate() {
                lev[pos * n_cov + c] = (offsets[c] + cov.codes[i] as usize) as u32;
            }
        }
        let mut ranges = vec![(0, 0); covs[0].n_levels];
        let mut start = 0;
        for (l, range) in ranges.iter_mut().enumerate() {
            let len = covs[0].codes.iter().filter(|&&c| c as usize == l).count();
            *range = (start, start + len);
            start += len;
        }
        let mut n_b = vec![0f64; b];
        for &l in &lev {
            n_b[l as usize] += 1.0;
        }
        let pr_b: Vec<f64> = n_b.iter().map(|&x| x / n as f64).collect();
        let mut theta = vec![0.0; b];
        let mut lambda = vec![None; b];
        let mut subtract = vec![false; b];
        let mut level_cov = vec![0; b];
        for (c, cov) in covs.iter().enumerate() {
            for l in 0..cov.n_levels {
                let g = offsets[c] + l;
                level_cov[g] = c;
                theta[g] = cov.theta;
                if p.tau > 0.0 {
                    // harmony's tau: small batches get a smaller penalty.
                    theta[g] *= 1.0 - (-(n_b[g] / (k as f64 * p.tau)).powi(2)).exp();
                }
                lambda[g] = cov.lambda;
                subtract[g] = !cov.protected;
            }
        }
        let z_corr = z_orig.clone();
        let mut z_cos = vec![0f32; n * d];
        normalized_f32(&z_orig, &mut z_cos, d);
        Ok(Harmony {
            p,
            n,
            d,
            k,
            b,
            n_cov,
            perm,
            z_orig,
            z_corr,
            z_cos,
            lev,
            ranges,
            pr_b,
            theta,
            lambda,
            subtract,
            level_cov,
            n_b,
            protected_cov: covs.iter().map(|c| c.protected).collect(),
            sigma: vec![p.sigma; k],
            inv_sigma: vec![1.0 / p.sigma; k],
            y: vec![0.0; d * k],
            dist: vec![0.0; k * n],
            offset: vec![0.0; n],
            r: vec![0.0; k * n],
            o: vec![0.0; b * k],
            e: vec![0.0; b * k],
            terms: vec![Vec::new(); b],
            obj_kmeans: Vec::new(),
            obj_harmony: Vec::new(),
            rounds: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(p.seed),
        })
    }

    /// The results, back in the caller's cell order.
    fn finish(mut self, n_iter: usize, converged: bool) -> HarmonyResult {
        let (n, d, k) = (self.n, self.d, self.k);
        // Freed before the outputs are allocated: at 10^6 cells and 50
        // dimensions they are 1 GB.
        (self.z_orig, self.z_cos, self.dist) = (Vec::new(), Vec::new(), Vec::new());
        let mut z_corr = vec![0.0; n * d];
        for (pos, &i) in self.perm.iter().enumerate() {
            z_corr[i * d..(i + 1) * d].copy_from_slice(&self.z_corr[pos * d..(pos + 1) * d]);
        }
        self.z_corr = Vec::new();
        let mut r = vec![0.0; if self.p.memberships { n * k } else { 0 }];
        if self.p.memberships {
            for (pos, &i) in self.perm.iter().enumerate() {
                r[i * k..(i + 1) * k].copy_from_slice(&self.r[pos * k..(pos + 1) * k]);
            }
        }
        self.r = Vec::new();
        let map = HarmonyMap::of(&self);
        HarmonyResult {
            z_corr,
            r,
            n_clusters: k,
            objective: self.obj_harmony,
            cluster_rounds: self.rounds,
            n_iter,
            converged,
            map,
            fitted_cells: n,
        }
    }
}

#[cfg(test)]
mod tests;
