//! The starting centroids: k-means++ seeds on the cosine-normalized cells,
//! then Lloyd iterations (as harmony 2 and harmonypy 2.1), and the soft
//! assignment and objective they give.

use super::{add_into, lane_sum, normalize_columns, reduction_chunk, Harmony, CHUNK};
use crate::error::{Error, Result};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Cells the k-means++ seeds are drawn from at most.
pub(super) const SEED_POOL: usize = 20_000;
/// Lloyd iterations of the initial k-means at most (10, as harmony 2 and harmonypy 2.1).
const KMEANS_ITER: usize = 10;
/// Above `SEED_POOL` cells, the k-means runs on the seeds' pool and then
/// this many iterations over all cells.
const KMEANS_ITER_ALL: usize = 3;

impl Harmony<'_> {
    /// Initial centroids: k-means on z_cos from K distinct random cells.
    pub(super) fn init(&mut self, interrupted: &dyn Fn() -> bool) -> Result<()> {
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
    pub(super) fn kmeans_plus_plus(&mut self) -> Vec<usize> {
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
