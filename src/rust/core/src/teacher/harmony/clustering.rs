//! The soft clustering: per cell, memberships R ∝ exp(−dist / σ) reweighted
//! by the diversity penalty ((2E + 1) / (O + E + 1))^θ, updated in blocks of
//! cells (harmony's online update), and the objective that tracks it.

use super::{add_into, lane_sum, reduction_chunk, Harmony, CHUNK};
use crate::error::{Error, Result};
use crate::numeric::{exp_nonpositive, ln_positive};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rand::seq::SliceRandom;
use rayon::prelude::*;

/// Objective values compared by the clustering convergence test.
const WINDOW: usize = 3;
/// Fewest cells per parallel work item within a block of the clustering
/// update (a block is 5% of the cells: 500 at 10^4 must still split); a
/// block is cut into at most 32 items.
const BLOCK_CHUNK: usize = 64;

impl Harmony<'_> {
    /// dist = 2 (1 − Yᵀ z_cos), K × N.
    pub(super) fn compute_dist(&mut self) {
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
    pub(super) fn to_scale(&mut self) {
        let (k, inv_sigma) = (self.k, &self.inv_sigma);
        self.dist.par_chunks_mut(k * CHUNK).zip(self.offset.par_chunks_mut(CHUNK)).for_each(|(d, off)| {
            let mut scratch = Vec::with_capacity(k);
            for (col, o) in d.chunks_mut(k).zip(off.iter_mut()) {
                *o = scale_column(col, inv_sigma, &mut scratch);
            }
        });
    }

    /// E and O from scratch.
    pub(super) fn recount(&mut self) {
        let (rsum, osum) = self.sums_over(&(0..self.n).collect::<Vec<_>>());
        self.o = osum;
        for b in 0..self.b {
            for c in 0..self.k {
                self.e[b * self.k + c] = rsum[c] * self.pr_b[b];
            }
        }
    }

    /// Σ R over `cells` (K) and per level (B × K, level-major).
    pub(super) fn sums_over(&self, cells: &[usize]) -> (Vec<f64>, Vec<f64>) {
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
    pub(super) fn cluster(&mut self, interrupted: &dyn Fn() -> bool) -> Result<()> {
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
    pub(super) fn update_r(&mut self, interrupted: &dyn Fn() -> bool) -> Result<f64> {
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
            let ln_pen = self.ln_penalty();
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

    /// θ ln((2E + 1) / (O + E + 1)) per level and cluster (level-major):
    /// the log of the diversity penalty under the current statistics.
    pub(super) fn ln_penalty(&self) -> Vec<f64> {
        let k = self.k;
        (0..self.b * k)
            .map(|i| {
                let t = self.theta[i / k];
                if t == 0.0 {
                    0.0
                } else {
                    t * ((2.0 * self.e[i] + 1.0) / (self.o[i] + self.e[i] + 1.0)).ln()
                }
            })
            .collect()
    }

    /// harmony 2's objective, scaled by 2000 / N: Σ R·dist + Σ σ R log R
    /// + Σ_{k,b} σ_k θ_b O_kb log((O_kb + E_kb + 1) / (2 E_kb + 1)), by a
    /// full pass: the reference the fused computations are tested against.
    #[cfg(test)]
    pub(super) fn objective(&self) -> f64 {
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
    pub(super) fn cross_term(&self) -> f64 {
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
