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

use crate::error::{check_param, invalid, Error, Result};
use crate::numeric::{exp_nonpositive, ln_positive};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Cells per parallel work item (fixed, so sums do not depend on threads).
const CHUNK: usize = 512;
/// Objective values compared by the clustering convergence test.
const WINDOW: usize = 3;
/// Fewest cells per parallel work item within a block of the clustering
/// update (a block is 5% of the cells: 500 at 10^4 must still split); a
/// block is cut into at most 32 items.
const BLOCK_CHUNK: usize = 64;
/// Cells the k-means++ seeds are drawn from at most.
const SEED_POOL: usize = 20_000;
/// Lloyd iterations of the initial k-means at most (10, as harmony 2 and harmonypy 2.1).
const KMEANS_ITER: usize = 10;
/// Above `SEED_POOL` cells, the k-means runs on the seeds' pool and then
/// this many iterations over all cells.
const KMEANS_ITER_ALL: usize = 3;

/// One variable of the design: batch (regressed out) or protected.
#[derive(Debug, Clone)]
pub struct HarmonyCovariate {
    pub name: String,
    /// Level of every cell, 0-based.
    pub codes: Vec<u32>,
    pub n_levels: usize,
    /// Diversity penalty of each level (harmony's θ).
    pub theta: f64,
    /// Ridge penalty of each level; `None` estimates it per cluster as
    /// `alpha` × the expected number of the level's cells in the cluster.
    pub lambda: Option<f64>,
    /// Kept in the design but never subtracted.
    pub protected: bool,
}

/// Settings; defaults are harmonypy 2.1's.
#[derive(Debug, Clone)]
pub struct HarmonyParams {
    pub sigma: f64,
    /// Number of clusters; `None`: min(round(N / 30), 100).
    pub n_clusters: Option<usize>,
    pub max_iter: usize,
    pub max_iter_cluster: usize,
    pub epsilon_cluster: f64,
    pub epsilon_harmony: f64,
    pub block_size: f64,
    pub alpha: f64,
    /// Protection of small batches against over-correction (0: off).
    pub tau: f64,
    /// Batches holding less than this share of a cluster are not corrected in it.
    pub batch_prop_cutoff: f64,
    pub seed: u64,
    /// Return the soft memberships (N × K single-precision values; 400 MB
    /// at 10^6 cells). Without them `HarmonyResult::r` is empty.
    pub memberships: bool,
}

impl Default for HarmonyParams {
    fn default() -> Self {
        HarmonyParams {
            sigma: 0.1,
            n_clusters: None,
            max_iter: 10,
            max_iter_cluster: 4,
            epsilon_cluster: 1e-3,
            epsilon_harmony: 1e-2,
            block_size: 0.05,
            alpha: 0.2,
            tau: 0.0,
            batch_prop_cutoff: 1e-5,
            seed: 0,
            memberships: true,
        }
    }
}

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
}

/// The embedding to correct, cells × d, as stored: one cell after another
/// (row-major) or one dimension after another (R's column-major matrix,
/// read in place without a reordered copy).
#[derive(Clone, Copy)]
pub struct Embedding<'a> {
    z: &'a [f64],
    column_major: bool,
}

impl<'a> Embedding<'a> {
    pub fn row_major(z: &'a [f64]) -> Self {
        Embedding { z, column_major: false }
    }

    pub fn column_major(z: &'a [f64]) -> Self {
        Embedding { z, column_major: true }
    }

    /// (cell, dimension) of the value at `pos`, 0-based.
    fn at(&self, pos: usize, n: usize, d: usize) -> (usize, usize) {
        if self.column_major {
            (pos % n, pos / n)
        } else {
            (pos / d, pos % d)
        }
    }
}

/// Corrects `z` (n cells × d) for the non-protected covariates.
/// `interrupted` is polled between blocks; `on_iter(i)` runs after iteration i.
pub fn harmony(
    z: Embedding,
    n: usize,
    d: usize,
    covariates: &[HarmonyCovariate],
    params: &HarmonyParams,
    interrupted: &dyn Fn() -> bool,
    on_iter: &dyn Fn(usize),
) -> Result<HarmonyResult> {
    check_inputs(z, n, d, covariates, params)?;
    let mut h = Harmony::new(z, n, d, covariates, params)?;
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

fn check_inputs(z: Embedding, n: usize, d: usize, covs: &[HarmonyCovariate], p: &HarmonyParams) -> Result<()> {
    if z.z.len() != n * d {
        return invalid!("the embedding has {} values, not cells × dimensions = {}", z.z.len(), n * d);
    }
    if n < 2 || d < 1 {
        return invalid!("Harmony needs at least 2 cells and 1 dimension (got {n} × {d})");
    }
    if let Some(i) = z.z.iter().position(|v| !v.is_finite()) {
        let (cell, dim) = z.at(i, n, d);
        return invalid!("the embedding has a missing or infinite value (cell {}, dimension {})", cell + 1, dim + 1);
    }
    if !covs.iter().any(|c| !c.protected) {
        return invalid!("Harmony needs at least one batch covariate to correct for");
    }
    for c in covs {
        if c.codes.len() != n {
            return invalid!("covariate `{}` has {} values for {} cells", c.name, c.codes.len(), n);
        }
        if c.codes.iter().any(|&v| v as usize >= c.n_levels) {
            return invalid!("covariate `{}` has codes outside its {} levels", c.name, c.n_levels);
        }
        check_param(c.theta >= 0.0 && c.theta.is_finite(), "theta", "must be finite and non-negative")?;
        if let Some(l) = c.lambda {
            check_param(l >= 0.0 && l.is_finite(), "lambda", "must be finite and non-negative")?;
        }
    }
    check_param(p.sigma > 0.0 && p.sigma.is_finite(), "sigma", "must be positive")?;
    check_param(p.block_size > 0.0 && p.block_size <= 1.0, "block_size", "must be in (0, 1]")?;
    check_param(p.max_iter >= 1, "max_iter", "must be at least 1")?;
    check_param(p.max_iter_cluster >= 1, "max_iter_cluster", "must be at least 1")?;
    check_param(p.alpha > 0.0 && p.alpha.is_finite(), "alpha", "must be positive")?;
    check_param(p.tau >= 0.0, "tau", "must be non-negative")?;
    if let Some(k) = p.n_clusters {
        check_param(k >= 1 && k <= n, "n_clusters", format!("must be between 1 and the number of cells ({n})"))?;
    }
    Ok(())
}

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

/// ‖a − b‖² with eight partial sums (a single running sum is one long
/// dependency chain that does not vectorize).
fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            let t = x[l] - y[l];
            acc[l] += t * t;
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += (x - y) * (x - y);
    }
    acc.iter().sum()
}

fn widen_into(dst: &mut [f64], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(o, &v)| *o = v as f64);
}

#[inline(always)]
fn add_into<T: Copy + Into<f64>>(acc: &mut [f64], x: &[T]) {
    acc.iter_mut().zip(x).for_each(|(a, &b)| *a += b.into());
}

/// The columns `lo..hi` of the K × N matrix `m`, widened to f64.
fn columns_f64(m: &[f32], k: usize, lo: usize, hi: usize) -> Vec<f64> {
    m[lo * k..hi * k].iter().map(|&v| v as f64).collect()
}

/// Fixed chunks for reductions over `len` items: the same for any thread count.
fn reduction_chunk(len: usize) -> usize {
    CHUNK.max(len.div_ceil(256))
}

impl<'a> Harmony<'a> {
    fn new(z: Embedding, n: usize, d: usize, covs: &[HarmonyCovariate], p: &'a HarmonyParams) -> Result<Self> {
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
                    let col = &z.z[j * n..(j + 1) * n];
                    for (o, &i) in cells.iter().enumerate() {
                        out[o * d + j] = col[i];
                    }
                }
            });
        } else {
            for (pos, &i) in perm.iter().enumerate() {
                z_orig[pos * d..(pos + 1) * d].copy_from_slice(&z.z[i * d..(i + 1) * d]);
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
            obj_kmeans: Vec::new(),
            obj_harmony: Vec::new(),
            rounds: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(p.seed),
        })
    }

    /// dist = 2 (1 − Yᵀ z_cos), K × N.
    fn compute_dist(&mut self) {
        let (d, k) = (self.d, self.k);
        let yf: Vec<f32> = self.y.iter().map(|&v| v as f32).collect();
        let y = MatRef::from_column_major_slice(&yf, d, k);
        let z_cos = &self.z_cos;
        self.dist.par_chunks_mut(k * CHUNK).enumerate().for_each(|(ci, out)| {
            let m = out.len() / k;
            let zc = MatRef::from_column_major_slice(&z_cos[ci * CHUNK * d..(ci * CHUNK + m) * d], d, m);
            let dst = MatMut::from_column_major_slice_mut(out, k, m);
            matmul(dst, Accum::Replace, y.transpose(), zc, -2.0f32, Par::Seq);
            out.iter_mut().for_each(|o| *o += 2.0);
        });
    }

    /// Turns the distances into each cell's normalized kernel, recording the offsets.
    fn to_scale(&mut self) {
        let (k, inv_sigma) = (self.k, &self.inv_sigma);
        self.dist.par_chunks_mut(k * CHUNK).zip(self.offset.par_chunks_mut(CHUNK)).for_each(|(d, off)| {
            let mut scratch = Vec::with_capacity(k);
            for (col, o) in d.chunks_mut(k).zip(off.iter_mut()) {
                *o = scale_column(col, inv_sigma, &mut scratch);
            }
        });
    }

    /// Initial centroids: k-means on z_cos from K distinct random cells.
    fn init(&mut self, interrupted: &dyn Fn() -> bool) -> Result<()> {
        let (n, d, k) = (self.n, self.d, self.k);
        let pool = self.kmeans_plus_plus();
        if pool.len() < n {
            // Lloyd on the seeds' pool, then a few passes over every cell.
            let mut zp = Vec::with_capacity(pool.len() * d);
            for &i in &pool {
                zp.extend_from_slice(&self.z_cos[i * d..(i + 1) * d]);
            }
            lloyd(&zp, d, k, &mut self.y, KMEANS_ITER, &mut self.rng, interrupted)?;
            lloyd(&self.z_cos, d, k, &mut self.y, KMEANS_ITER_ALL, &mut self.rng, interrupted)?;
        } else {
            lloyd(&self.z_cos, d, k, &mut self.y, KMEANS_ITER, &mut self.rng, interrupted)?;
        }
        normalize_columns(&mut self.y, d);
        self.compute_dist();
        self.to_scale();
        // R = softmax(−dist / σ) per cell, then the diversity statistics.
        self.r.copy_from_slice(&self.dist);
        self.recount();
        // With R equal to the kernel, R ln R − R ln scale vanishes and the R
        // terms reduce to −offset · Σ σ R per cell (no logarithms).
        let (k, sigma) = (self.k, &self.sigma);
        let chunk = reduction_chunk(n);
        let parts: Vec<f64> = self
            .r
            .par_chunks(k * chunk)
            .zip(self.offset.par_chunks(chunk))
            .map(|(r, off)| {
                r.chunks(k).zip(off).map(|(col, o)| -o * lane_sum(k, |c| sigma[c] * col[c] as f64)).sum::<f64>()
            })
            .collect();
        let obj = (parts.iter().sum::<f64>() + self.cross_term()) * 2000.0 / n as f64;
        self.obj_kmeans.push(obj);
        self.obj_harmony.push(obj);
        Ok(())
    }

    /// k-means++ seeds (Arthur & Vassilvitskii 2007) on z_cos into `y`,
    /// drawn from at most `SEED_POOL` random cells: the seeding costs K
    /// passes over its pool, the Lloyd iterations that follow see every cell.
    /// Returns the pool, sorted.
    fn kmeans_plus_plus(&mut self) -> Vec<usize> {
        let (n, d, k) = (self.n, self.d, self.k);
        let pool: Vec<usize> = if n > SEED_POOL.max(k) {
            let mut p = rand::seq::index::sample(&mut self.rng, n, SEED_POOL.max(k)).into_vec();
            p.sort_unstable();
            p
        } else {
            (0..n).collect()
        };
        let m = pool.len();
        let first = pool[self.rng.random_range(0..m)];
        widen_into(&mut self.y[..d], &self.z_cos[first * d..(first + 1) * d]);
        let mut min_d2 = vec![f64::INFINITY; m];
        let mut chosen = vec![false; m];
        chosen[pool.binary_search(&first).unwrap_or(0)] = true;
        for c in 1..k {
            let prev: Vec<f32> = self.y[(c - 1) * d..c * d].iter().map(|&v| v as f32).collect();
            let (z, pool) = (&self.z_cos, &pool);
            min_d2.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, out)| {
                for (j, md) in out.iter_mut().enumerate() {
                    let i = pool[ci * CHUNK + j];
                    *md = md.min(sq_dist(&z[i * d..(i + 1) * d], &prev) as f64);
                }
            });
            for (md, &ch) in min_d2.iter_mut().zip(&chosen) {
                if ch {
                    *md = 0.0;
                }
            }
            let total: f64 = min_d2.iter().sum();
            let mut pick = if total > 0.0 {
                let mut u = self.rng.random::<f64>() * total;
                min_d2
                    .iter()
                    .position(|&w| {
                        u -= w;
                        u <= 0.0
                    })
                    .unwrap_or(m - 1)
            } else {
                self.rng.random_range(0..m)
            };
            while chosen[pick] && chosen.iter().any(|c| !c) {
                pick = self.rng.random_range(0..m);
            }
            chosen[pick] = true;
            let i = pool[pick];
            widen_into(&mut self.y[c * d..(c + 1) * d], &self.z_cos[i * d..(i + 1) * d]);
        }
        pool
    }

    /// E and O from scratch.
    fn recount(&mut self) {
        let (rsum, osum) = self.sums_over(&(0..self.n).collect::<Vec<_>>());
        self.o = osum;
        for b in 0..self.b {
            for c in 0..self.k {
                self.e[b * self.k + c] = rsum[c] * self.pr_b[b];
            }
        }
    }

    /// Σ R over `cells` (K) and per level (B × K, level-major).
    fn sums_over(&self, cells: &[usize]) -> (Vec<f64>, Vec<f64>) {
        self.sums_over_in(cells, reduction_chunk(cells.len()))
    }

    /// `sums_over` with partial sums over fixed chunks of `chunk` cells.
    fn sums_over_in(&self, cells: &[usize], chunk: usize) -> (Vec<f64>, Vec<f64>) {
        let (k, b, n_cov) = (self.k, self.b, self.n_cov);
        let partials: Vec<Vec<f64>> =
            cells.par_chunks(chunk).map(|cs| sum_cells(&self.r, &self.lev, k, b, n_cov, cs)).collect();
        let mut os = vec![0.0; b * k];
        for o in partials {
            add_into(&mut os, &o);
        }
        (self.over_cells(&os), os)
    }

    /// Σ over cells from the sums per level: every cell has one level of
    /// covariate 0 (levels 0..n0), so those sums add up to the total.
    fn over_cells(&self, os: &[f64]) -> Vec<f64> {
        let k = self.k;
        let mut rs = vec![0.0; k];
        for l in 0..self.ranges.len() {
            add_into(&mut rs, &os[l * k..(l + 1) * k]);
        }
        rs
    }

    /// Soft clustering with the diversity penalty. After a correction, R is
    /// re-estimated from scratch against the centroids (harmony 2's cold
    /// start); then up to `max_iter_cluster` rounds of blockwise updates.
    fn cluster(&mut self, interrupted: &dyn Fn() -> bool) -> Result<()> {
        if self.obj_harmony.len() > 1 {
            self.compute_dist();
            self.to_scale();
            self.r.copy_from_slice(&self.dist);
            self.recount();
        }
        // Each round's objective comes with its update, so every round records it.
        let mut rounds = 0;
        for it in 0..self.p.max_iter_cluster {
            let r_term = self.update_r(interrupted)?;
            rounds = it + 1;
            let obj = (r_term + self.cross_term()) * 2000.0 / self.n as f64;
            self.obj_kmeans.push(obj);
            if it > WINDOW {
                let m = self.obj_kmeans.len();
                let old: f64 = (0..WINDOW).map(|i| self.obj_kmeans[m - 2 - i]).sum();
                let new: f64 = (0..WINDOW).map(|i| self.obj_kmeans[m - 1 - i]).sum();
                if (old - new).abs() / old.abs() < self.p.epsilon_cluster {
                    break;
                }
            }
        }
        self.rounds.push(rounds);
        self.obj_harmony.push(*self.obj_kmeans.last().unwrap_or(&f64::NAN));
        Ok(())
    }

    /// harmony's online update of R: cells in a random order, in blocks of
    /// `block_size` · N; each block leaves the statistics, is re-assigned with
    /// the penalty ((2E + 1) / (O + E + 1))^θ, and returns. Returns the
    /// objective's R terms, Σ R·dist + σ R ln R, of the new R.
    fn update_r(&mut self, interrupted: &dyn Fn() -> bool) -> Result<f64> {
        let (n, k, b, n_cov) = (self.n, self.k, self.b, self.n_cov);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut self.rng);
        let n_blocks = (1.0 / self.p.block_size).ceil() as usize;
        let per_block = ((n as f64 * self.p.block_size) as usize).max(1);
        let mut lo = 0;
        let mut blk = 0;
        let mut r_term = 0.0;
        while lo < n {
            let hi = if blk + 1 >= n_blocks { n } else { (lo + per_block).min(n) };
            // A block's cells are updated together, so their order within
            // it does not matter: sorted, they are read in memory order
            // (random order cost a cache miss per cache line).
            order[lo..hi].sort_unstable();
            let cells = &order[lo..hi];
            if interrupted() {
                return Err(Error::Interrupted);
            }
            let chunk = BLOCK_CHUNK.max(cells.len() / 32);
            let (rs, os) = self.sums_over_in(cells, chunk);
            for l in 0..b {
                for c in 0..k {
                    self.e[l * k + c] -= rs[c] * self.pr_b[l];
                    self.o[l * k + c] -= os[l * k + c];
                }
            }
            // ln of the penalty first: one logarithm and one exponential
            // per entry (a powf is both, and the objective needs the ln).
            let ln_pen: Vec<f64> = (0..b * k)
                .map(|i| {
                    let t = self.theta[i / k];
                    if t == 0.0 {
                        0.0
                    } else {
                        t * ((2.0 * self.e[i] + 1.0) / (self.o[i] + self.e[i] + 1.0)).ln()
                    }
                })
                .collect();
            let pen: Vec<f64> = ln_pen.iter().map(|&l| l.exp()).collect();
            // One pass: the new R of each cell, its sums back into the
            // statistics, and its objective terms. With R = scale · f / T,
            // dist = −σ (ln scale + offset) gives R·dist + σ R ln R =
            // σ R (ln f − ln T − offset): one logarithm per cell.
            let parts: Vec<(Vec<f64>, f64)> = {
                // Each cell's column of R is written by exactly one task.
                let r_ptr = SharedMut(self.r.as_mut_ptr());
                let ctx = UpdateCtx {
                    k,
                    b,
                    n_cov,
                    pen: &pen,
                    ln_pen: &ln_pen,
                    scale: &self.dist,
                    lev: &self.lev,
                    sigma: &self.sigma,
                    offset: &self.offset,
                };
                cells.par_chunks(chunk).map(|cs| update_cells(&ctx, cs, &r_ptr)).collect()
            };
            for (os, obj) in parts {
                let rs = self.over_cells(&os);
                for l in 0..b {
                    for c in 0..k {
                        self.e[l * k + c] += rs[c] * self.pr_b[l];
                        self.o[l * k + c] += os[l * k + c];
                    }
                }
                r_term += obj;
            }
            lo = hi;
            blk += 1;
        }
        Ok(r_term)
    }

    /// harmony 2's objective, scaled by 2000 / N: Σ R·dist + Σ σ R log R
    /// + Σ_{k,b} σ_k θ_b O_kb log((O_kb + E_kb + 1) / (2 E_kb + 1)), by a
    /// full pass: the reference the fused computations are tested against.
    #[cfg(test)]
    fn objective(&self) -> f64 {
        let (n, k) = (self.n, self.k);
        let chunk = reduction_chunk(n);
        let parts: Vec<f64> = (0..n.div_ceil(chunk))
            .into_par_iter()
            .map(|ci| {
                (ci * chunk..((ci + 1) * chunk).min(n))
                    .map(|i| {
                        r_terms(
                            &self.r[i * k..(i + 1) * k],
                            &self.dist[i * k..(i + 1) * k],
                            &self.sigma,
                            self.offset[i],
                        )
                    })
                    .sum::<f64>()
            })
            .collect();
        (parts.iter().sum::<f64>() + self.cross_term()) * 2000.0 / n as f64
    }

    /// The objective's diversity term, Σ_{k,b} σ_k θ_b O_kb log((O_kb + E_kb + 1) / (2 E_kb + 1)).
    fn cross_term(&self) -> f64 {
        let k = self.k;
        let mut cross = 0.0;
        for i in 0..self.b * k {
            let t = self.theta[i / k];
            if t != 0.0 {
                cross +=
                    self.sigma[i % k] * t * self.o[i] * ((self.o[i] + self.e[i] + 1.0) / (2.0 * self.e[i] + 1.0)).ln();
            }
        }
        cross
    }

    /// Mixture-of-experts ridge correction: per cluster k, regress z_orig on
    /// [1, Φ] with weights R_k and penalty diag(0, λ), then subtract the
    /// batch terms weighted by R_k.
    fn correct(&mut self) {
        let (n, d, k, b, n_cov) = (self.n, self.d, self.k, self.b, self.n_cov);
        let pdim = b + 1;
        // S[l][k] = Σ_{i ∈ l} R_ki z_i (d values), level-major, (b · K + k) · d.
        let mut s = vec![0.0; b * k * d];
        // Covariate 0: one matrix product per contiguous level block.
        for (l, &(lo, hi)) in self.ranges.iter().enumerate() {
            if hi == lo {
                continue;
            }
            let chunk = reduction_chunk(hi - lo);
            let partials: Vec<Vec<f64>> = (lo..hi)
                .step_by(chunk)
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(|a| {
                    let e = (a + chunk).min(hi);
                    let mut out = vec![0.0; d * k];
                    for a0 in (a..e).step_by(CHUNK) {
                        let e0 = (a0 + CHUNK).min(e);
                        let zc = MatRef::from_column_major_slice(&self.z_orig[a0 * d..e0 * d], d, e0 - a0);
                        let r64 = columns_f64(&self.r, k, a0, e0);
                        let rc = MatRef::from_column_major_slice(&r64, k, e0 - a0);
                        let dst = MatMut::from_column_major_slice_mut(&mut out, d, k);
                        matmul(dst, Accum::Add, zc, rc.transpose(), 1.0, Par::Seq);
                    }
                    out
                })
                .collect();
            for part in partials {
                add_into(&mut s[l * k * d..(l + 1) * k * d], &part);
            }
        }
        // Weighted level sums m[l][k] and, with several covariates, the
        // cross-covariate co-occurrences and the other covariates' S.
        let (_, m) = self.sums_over(&(0..n).collect::<Vec<_>>());
        let mut cross = vec![0.0; if n_cov > 1 { b * b * k } else { 0 }];
        if n_cov > 1 {
            let chunk = reduction_chunk(n);
            let partials: Vec<(Vec<f64>, Vec<f64>)> = (0..n.div_ceil(chunk))
                .into_par_iter()
                .map(|ci| {
                    let mut sp = vec![0.0; b * k * d];
                    let mut cp = vec![0.0; b * b * k];
                    for i in ci * chunk..((ci + 1) * chunk).min(n) {
                        let r = &self.r[i * k..(i + 1) * k];
                        let z = &self.z_orig[i * d..(i + 1) * d];
                        let levels = &self.lev[i * n_cov..(i + 1) * n_cov];
                        for &l in &levels[1..] {
                            for c in 0..k {
                                let out = &mut sp[(l as usize * k + c) * d..(l as usize * k + c + 1) * d];
                                out.iter_mut().zip(z).for_each(|(o, zv)| *o += r[c] as f64 * zv);
                            }
                        }
                        for (x, &l1) in levels.iter().enumerate() {
                            for &l2 in &levels[x + 1..] {
                                add_into(
                                    &mut cp
                                        [(l1 as usize * b + l2 as usize) * k..(l1 as usize * b + l2 as usize + 1) * k],
                                    r,
                                );
                            }
                        }
                    }
                    (sp, cp)
                })
                .collect();
            for (sp, cp) in partials {
                add_into(&mut s, &sp);
                add_into(&mut cross, &cp);
            }
        }
        let n0 = self.ranges.len();
        // W_k, (B + 1) × d per cluster; rows that are not subtracted are zeroed.
        let n_cov_total = self.protected_cov.len();
        let w: Vec<Option<(Vec<f64>, Vec<f64>)>> = (0..k)
            .into_par_iter()
            .map(|c| {
                // Levels with too few of their cells here leave the system;
                // so do covariates left with a single level. Without any
                // batch covariate left, the cluster is not corrected.
                let mut keep: Vec<bool> =
                    (0..b).map(|l| m[l * k + c] / self.n_b[l].max(1.0) > self.p.batch_prop_cutoff).collect();
                let mut active = false;
                for cv in 0..n_cov_total {
                    let kept = (0..b).filter(|&l| self.level_cov[l] == cv && keep[l]).count();
                    if kept <= 1 {
                        (0..b).filter(|&l| self.level_cov[l] == cv).for_each(|l| keep[l] = false);
                    } else if !self.protected_cov[cv] {
                        active = true;
                    }
                }
                if !active {
                    return None;
                }
                let total: f64 = (0..n0).map(|l| m[l * k + c]).sum();
                let mut a = vec![0.0; pdim * pdim];
                let mut rhs = vec![0.0; pdim * d];
                a[0] = total;
                for l in 0..n0 {
                    add_into(&mut rhs[..d], &s[(l * k + c) * d..(l * k + c + 1) * d]);
                }
                for l in 0..b {
                    let ml = m[l * k + c];
                    let lam = self.lambda[l].unwrap_or(self.p.alpha * self.e[l * k + c]);
                    a[(l + 1) * pdim + (l + 1)] = ml + lam;
                    a[l + 1] = ml;
                    a[(l + 1) * pdim] = ml;
                    rhs[(l + 1) * d..(l + 2) * d].copy_from_slice(&s[(l * k + c) * d..(l * k + c + 1) * d]);
                }
                if n_cov > 1 {
                    for l1 in 0..b {
                        for l2 in 0..b {
                            let v = cross[(l1 * b + l2) * k + c];
                            if v != 0.0 {
                                a[(l1 + 1) * pdim + (l2 + 1)] += v;
                                a[(l2 + 1) * pdim + (l1 + 1)] += v;
                            }
                        }
                    }
                }
                // Levels too rare in this cluster leave the system.
                for l in (0..b).filter(|&l| !keep[l]) {
                    for j in 0..pdim {
                        a[(l + 1) * pdim + j] = 0.0;
                        a[j * pdim + (l + 1)] = 0.0;
                    }
                    a[(l + 1) * pdim + (l + 1)] = 1.0;
                    rhs[(l + 1) * d..(l + 2) * d].iter_mut().for_each(|v| *v = 0.0);
                }
                let mut sol = solve(a, rhs, pdim, d);
                let intercept = sol[..d].to_vec();
                sol[..d].iter_mut().for_each(|v| *v = 0.0);
                for l in 0..b {
                    if !self.subtract[l] || !keep[l] {
                        sol[(l + 1) * d..(l + 2) * d].iter_mut().for_each(|v| *v = 0.0);
                    }
                }
                Some((sol, intercept))
            })
            .collect();
        // The regression intercepts are the next centroids.
        for (c, wc) in w.iter().enumerate() {
            if let Some((_, intercept)) = wc {
                self.y[c * d..(c + 1) * d].copy_from_slice(intercept);
            }
        }
        normalize_columns(&mut self.y, d);
        // Per level, the d × K matrix of batch terms: wl[l][(c, j)] = W_c[l + 1, j].
        let wl: Vec<Vec<f64>> = (0..b)
            .map(|l| {
                let mut m = vec![0.0; d * k];
                for (c, wc) in w.iter().enumerate() {
                    if let Some((sol, _)) = wc {
                        m[c * d..(c + 1) * d].copy_from_slice(&sol[(l + 1) * d..(l + 2) * d]);
                    }
                }
                m
            })
            .collect();
        let active: Vec<bool> = wl.iter().map(|m| m.iter().any(|&v| v != 0.0)).collect();
        self.z_corr.copy_from_slice(&self.z_orig);
        let (r, lev, ranges) = (&self.r, &self.lev, &self.ranges);
        self.z_corr.par_chunks_mut(d * CHUNK).enumerate().for_each(|(ci, out)| {
            let lo = ci * CHUNK;
            let hi = lo + out.len() / d;
            // Covariate 0: contiguous runs of one level, one product each.
            for (l, &(a, e)) in ranges.iter().enumerate() {
                let (a, e) = (a.max(lo), e.min(hi));
                if a >= e || !active[l] {
                    continue;
                }
                let wm = MatRef::from_column_major_slice(&wl[l], d, k);
                let r64 = columns_f64(r, k, a, e);
                let rc = MatRef::from_column_major_slice(&r64, k, e - a);
                let dst = MatMut::from_column_major_slice_mut(&mut out[(a - lo) * d..(e - lo) * d], d, e - a);
                matmul(dst, Accum::Add, wm, rc, -1.0, Par::Seq);
            }
            if n_cov > 1 {
                for i in lo..hi {
                    let z = &mut out[(i - lo) * d..(i - lo + 1) * d];
                    let rv = &r[i * k..(i + 1) * k];
                    for &l in &lev[i * n_cov + 1..(i + 1) * n_cov] {
                        if !active[l as usize] {
                            continue;
                        }
                        let wm = &wl[l as usize];
                        for c in 0..k {
                            let col = &wm[c * d..(c + 1) * d];
                            z.iter_mut().zip(col).for_each(|(zv, wv)| *zv -= rv[c] as f64 * wv);
                        }
                    }
                }
            }
        });
        normalized_f32(&self.z_corr, &mut self.z_cos, d);
    }

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
        HarmonyResult {
            z_corr,
            r,
            n_clusters: k,
            objective: self.obj_harmony,
            cluster_rounds: self.rounds,
            n_iter,
            converged,
        }
    }
}

/// A raw pointer handed to parallel tasks that write disjoint parts.
struct SharedMut(*mut f32);
// SAFETY: only used for writes to disjoint ranges (see `update_r`).
unsafe impl Sync for SharedMut {}

crate::kernels::simd::wide_copies! {
    /// In place: dist → exp(−dist/σ) / Z, normalized to sum 1 (shifted by the
    /// smallest distance so that the exponentials cannot all underflow).
    /// Returns c = m + ln Z, so that dist_k = −σ_k (ln scale_k + c). Runs in
    /// the widest SIMD copy the CPU has, where the exponentials vectorize.
    fn scale_column(col: &mut [f32], inv_sigma: &[f64], e: &mut Vec<f64>) -> f64 = scale_column_body
}

#[inline(always)]
fn scale_column_body(col: &mut [f32], inv_sigma: &[f64], e: &mut Vec<f64>) -> f64 {
    let mut hi = f64::NEG_INFINITY;
    for (&v, &s) in col.iter().zip(inv_sigma) {
        let t = -(v as f64) * s;
        hi = if t > hi { t } else { hi };
    }
    e.resize(col.len(), 0.0);
    for ((o, &v), &s) in e.iter_mut().zip(col.iter()).zip(inv_sigma) {
        *o = exp_nonpositive(-(v as f64) * s - hi);
    }
    let total = lane_sum(e.len(), |c| e[c]);
    let inv = 1.0 / total;
    col.iter_mut().zip(e.iter()).for_each(|(v, &x)| *v = (x * inv) as f32);
    hi + total.ln()
}

/// r = scale · factor, normalized to sum 1: returns the sum it divided by,
/// or None when all vanished and r was set uniform.
#[inline(always)]
fn reweight(r: &mut [f32], scale: &[f32], factor: &[f64]) -> Option<f64> {
    let total = lane_sum(r.len(), |c| scale[c] as f64 * factor[c]);
    if total > 0.0 && total.is_finite() {
        let inv = 1.0 / total;
        for ((out, &s), &f) in r.iter_mut().zip(scale).zip(factor) {
            *out = (s as f64 * f * inv) as f32;
        }
        Some(total)
    } else {
        let u = 1.0 / r.len() as f32;
        r.iter_mut().for_each(|v| *v = u);
        None
    }
}

/// One cell's objective terms R·dist + σ R ln R, with the distances held as
/// the normalized kernel `scale` and the cell's offset (dist = −σ (ln scale + offset)).
fn r_terms(r: &[f32], scale: &[f32], sigma: &[f64], offset: f64) -> f64 {
    let mut s = 0.0;
    for ((&rv, &sc), &sg) in r.iter().zip(scale).zip(sigma) {
        if rv > 0.0 {
            let (rv, sc) = (rv as f64, sc as f64);
            s += sg * rv * (ln_positive(rv) - ln_positive(sc) - offset);
        }
    }
    s
}

/// Up to `max_iter` Lloyd iterations of k-means from the centroids `y`
/// (d × K) over the cells `z` (d values each); stops once no centroid moves.
/// An empty cluster restarts at a random cell.
fn lloyd(
    z: &[f32],
    d: usize,
    k: usize,
    y: &mut [f64],
    max_iter: usize,
    rng: &mut ChaCha8Rng,
    interrupted: &dyn Fn() -> bool,
) -> Result<()> {
    let n = z.len() / d;
    for _ in 0..max_iter {
        if interrupted() {
            return Err(Error::Interrupted);
        }
        // One fused pass per iteration: for a chunk of cells, Yᵀz in a
        // small buffer, the nearest centroid (argmin ‖z − y‖² = argmin
        // (‖y‖² − 2 yᵀz)), and the chunk's sums per centroid.
        let sq: Vec<f32> = y.chunks(d).map(|c| c.iter().map(|v| v * v).sum::<f64>() as f32).collect();
        let chunk = reduction_chunk(n);
        let yf: Vec<f32> = y.iter().map(|&v| v as f32).collect();
        let yr = &yf;
        let partials: Vec<(Vec<f64>, Vec<usize>)> = (0..n.div_ceil(chunk))
            .into_par_iter()
            .map(|ci| {
                let mut sums = vec![0.0; d * k];
                let mut counts = vec![0usize; k];
                let mut buf = vec![0f32; k * CHUNK];
                let (lo, hi) = (ci * chunk, ((ci + 1) * chunk).min(n));
                for a in (lo..hi).step_by(CHUNK) {
                    let e = (a + CHUNK).min(hi);
                    let m = e - a;
                    let zc = MatRef::from_column_major_slice(&z[a * d..e * d], d, m);
                    let dst = MatMut::from_column_major_slice_mut(&mut buf[..k * m], k, m);
                    let yt = MatRef::from_column_major_slice(yr, d, k).transpose();
                    matmul(dst, Accum::Replace, yt, zc, -2.0f32, Par::Seq);
                    for (j, col) in buf[..k * m].chunks(k).enumerate() {
                        let mut best = (0usize, f32::INFINITY);
                        for (c, (&v, &q)) in col.iter().zip(&sq).enumerate() {
                            if v + q < best.1 {
                                best = (c, v + q);
                            }
                        }
                        counts[best.0] += 1;
                        add_into(&mut sums[best.0 * d..(best.0 + 1) * d], &z[(a + j) * d..(a + j + 1) * d]);
                    }
                }
                (sums, counts)
            })
            .collect();
        let mut sums = vec![0.0; d * k];
        let mut counts = vec![0usize; k];
        for (ps, pc) in partials {
            add_into(&mut sums, &ps);
            counts.iter_mut().zip(pc).for_each(|(c, v)| *c += v);
        }
        let mut change = 0.0f64;
        for c in 0..k {
            let new: Vec<f64> = if counts[c] > 0 {
                sums[c * d..(c + 1) * d].iter().map(|v| v / counts[c] as f64).collect()
            } else {
                let i = rng.random_range(0..n);
                z[i * d..(i + 1) * d].iter().map(|&v| v as f64).collect()
            };
            for (j, v) in new.into_iter().enumerate() {
                change += (v - y[c * d + j]).powi(2);
                y[c * d + j] = v;
            }
        }
        if change.sqrt() < 1e-6 {
            break;
        }
    }
    Ok(())
}

crate::kernels::simd::wide_copies! {
    /// Σ R over `cells` per level (B × K, level-major), in the widest SIMD
    /// copy the CPU has.
    fn sum_cells(r: &[f32], lev: &[u32], k: usize, b: usize, n_cov: usize, cells: &[usize]) -> Vec<f64> = sum_cells_body
}

#[inline(always)]
fn sum_cells_body(r: &[f32], lev: &[u32], k: usize, b: usize, n_cov: usize, cells: &[usize]) -> Vec<f64> {
    let mut os = vec![0.0; b * k];
    for &i in cells {
        add_cell(&mut os, &r[i * k..(i + 1) * k], &lev[i * n_cov..(i + 1) * n_cov]);
    }
    os
}

/// Adds one cell's column of R to the sums over the cells of each of its
/// levels (`os`, level-major).
#[inline(always)]
fn add_cell(os: &mut [f64], col: &[f32], levels: &[u32]) {
    let k = col.len();
    for &l in levels {
        add_into(&mut os[l as usize * k..(l as usize + 1) * k], col);
    }
}

/// What `update_cells` reads.
struct UpdateCtx<'a> {
    k: usize,
    b: usize,
    n_cov: usize,
    pen: &'a [f64],
    ln_pen: &'a [f64],
    scale: &'a [f32],
    lev: &'a [u32],
    sigma: &'a [f64],
    offset: &'a [f64],
}

crate::kernels::simd::wide_copies! {
    /// New R of the distinct `cells`, written through `r`; returns their sums
    /// per level (B × K, level-major) and objective terms. With R = scale · f / T,
    /// dist = −σ (ln scale + offset) gives R·dist + σ R ln R =
    /// σ R (ln f − ln T − offset): one logarithm per cell. Runs in the widest
    /// SIMD copy the CPU has.
    fn update_cells(ctx: &UpdateCtx, cells: &[usize], r: &SharedMut) -> (Vec<f64>, f64) = update_cells_body
}

#[inline(always)]
fn update_cells_body(ctx: &UpdateCtx, cells: &[usize], r: &SharedMut) -> (Vec<f64>, f64) {
    let (k, n_cov) = (ctx.k, ctx.n_cov);
    let mut factor = vec![1.0; k];
    let mut ln_factor = vec![0.0; k];
    let (mut os, mut obj) = (vec![0.0; ctx.b * k], 0.0);
    for &i in cells {
        let levels = &ctx.lev[i * n_cov..(i + 1) * n_cov];
        let l0 = levels[0] as usize;
        // One covariate: the penalty row is the cell's factor as it is.
        let (f, lf): (&[f64], &[f64]) = if n_cov == 1 {
            (&ctx.pen[l0 * k..(l0 + 1) * k], &ctx.ln_pen[l0 * k..(l0 + 1) * k])
        } else {
            factor.copy_from_slice(&ctx.pen[l0 * k..(l0 + 1) * k]);
            ln_factor.copy_from_slice(&ctx.ln_pen[l0 * k..(l0 + 1) * k]);
            for &l in &levels[1..] {
                let p = &ctx.pen[l as usize * k..(l as usize + 1) * k];
                factor.iter_mut().zip(p).for_each(|(f, q)| *f *= q);
                let lp = &ctx.ln_pen[l as usize * k..(l as usize + 1) * k];
                ln_factor.iter_mut().zip(lp).for_each(|(f, q)| *f += q);
            }
            (&factor, &ln_factor)
        };
        // SAFETY: the cells of a block are distinct and each chunk of them
        // goes to one task, so no two tasks touch the same column.
        let col = unsafe { std::slice::from_raw_parts_mut(r.0.add(i * k), k) };
        let sc = &ctx.scale[i * k..(i + 1) * k];
        obj += match reweight(col, sc, f) {
            Some(total) => {
                let c0 = total.ln() + ctx.offset[i];
                lane_sum(k, |c| ctx.sigma[c] * col[c] as f64 * (lf[c] - c0))
            }
            None => r_terms(col, sc, ctx.sigma, ctx.offset[i]),
        };
        add_cell(&mut os, col, levels);
    }
    (os, obj)
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

/// Solves A X = B (A p × p row-major, B p × d row-major) by Gaussian
/// elimination with partial pivoting; a singular pivot leaves its row 0.
fn solve(mut a: Vec<f64>, mut rhs: Vec<f64>, p: usize, d: usize) -> Vec<f64> {
    for col in 0..p {
        let piv = (col..p).max_by(|&i, &j| a[i * p + col].abs().total_cmp(&a[j * p + col].abs())).unwrap_or(col);
        if a[piv * p + col].abs() < 1e-300 {
            continue;
        }
        if piv != col {
            for j in 0..p {
                a.swap(col * p + j, piv * p + j);
            }
            for j in 0..d {
                rhs.swap(col * d + j, piv * d + j);
            }
        }
        let pv = a[col * p + col];
        for i in col + 1..p {
            let f = a[i * p + col] / pv;
            if f != 0.0 {
                for j in col..p {
                    a[i * p + j] -= f * a[col * p + j];
                }
                for j in 0..d {
                    rhs[i * d + j] -= f * rhs[col * d + j];
                }
            }
        }
    }
    let mut x = vec![0.0; p * d];
    for i in (0..p).rev() {
        let pv = a[i * p + i];
        if pv.abs() < 1e-300 {
            continue;
        }
        for j in 0..d {
            let mut v = rhs[i * d + j];
            for t in i + 1..p {
                v -= a[i * p + t] * x[t * d + j];
            }
            x[i * d + j] = v / pv;
        }
    }
    x
}

#[cfg(test)]
mod tests;
