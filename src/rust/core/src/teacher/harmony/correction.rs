//! The mixture-of-experts ridge correction: per cluster, a ridge regression
//! of the original coordinates on the design, weighted by the memberships;
//! its intercepts become the next centroids and its batch terms are
//! subtracted from every cell in proportion to its membership.

use super::{add_into, normalize_columns, normalized_f32, reduction_chunk, Harmony, CHUNK};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

impl Harmony<'_> {
    /// Mixture-of-experts ridge correction: per cluster k, regress z_orig on
    /// [1, Φ] with weights R_k and penalty diag(0, λ), then subtract the
    /// batch terms weighted by R_k.
    pub(super) fn correct(&mut self) {
        let (n, d, k, b, n_cov) = (self.n, self.d, self.k, self.b, self.n_cov);
        // S[l][k] = Σ_{i ∈ l} R_ki z_i (d values), level-major, (b · K + k) · d.
        let mut s = self.first_covariate_sums();
        // Weighted level sums m[l][k] and, with several covariates, the
        // cross-covariate co-occurrences and the other covariates' S.
        let (_, m) = self.sums_over(&(0..n).collect::<Vec<_>>());
        let mut cross = vec![0.0; if n_cov > 1 { b * b * k } else { 0 }];
        if n_cov > 1 {
            self.add_other_covariates(&mut s, &mut cross);
        }
        // W_k, (B + 1) × d per cluster; rows that are not subtracted are zeroed.
        let w: Vec<Option<(Vec<f64>, Vec<f64>)>> =
            (0..k).into_par_iter().map(|c| self.cluster_ridge(c, &m, &s, &cross)).collect();
        // The regression intercepts are the next centroids.
        for (c, wc) in w.iter().enumerate() {
            if let Some((_, intercept)) = wc {
                self.y[c * d..(c + 1) * d].copy_from_slice(intercept);
            }
        }
        normalize_columns(&mut self.y, d);
        self.terms = level_terms(&w, b, d, k);
        self.subtract_batch_terms();
    }

    /// S of the levels of covariate 0 (see `correct`): one matrix product
    /// per contiguous level block.
    fn first_covariate_sums(&self) -> Vec<f64> {
        let (d, k, b) = (self.d, self.k, self.b);
        let mut s = vec![0.0; b * k * d];
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
        s
    }

    /// Adds the other covariates' S to `s`, and their co-occurrences with
    /// every level (Σ R over the cells that have both) to `cross`.
    fn add_other_covariates(&self, s: &mut [f64], cross: &mut [f64]) {
        let (n, d, k, b, n_cov) = (self.n, self.d, self.k, self.b, self.n_cov);
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
                                &mut cp[(l1 as usize * b + l2 as usize) * k..(l1 as usize * b + l2 as usize + 1) * k],
                                r,
                            );
                        }
                    }
                }
                (sp, cp)
            })
            .collect();
        for (sp, cp) in partials {
            add_into(s, &sp);
            add_into(cross, &cp);
        }
    }

    /// Cluster `c`'s ridge regression of z_orig on [1, Φ] from the level
    /// sums `m`, the S sums `s` and the co-occurrences `cross`: its
    /// coefficients ((B + 1) × d, rows not subtracted zeroed) and intercept,
    /// or None when no batch covariate is left to correct in it.
    fn cluster_ridge(&self, c: usize, m: &[f64], s: &[f64], cross: &[f64]) -> Option<(Vec<f64>, Vec<f64>)> {
        let (d, k, b, n_cov) = (self.d, self.k, self.b, self.n_cov);
        let pdim = b + 1;
        let n0 = self.ranges.len();
        let n_cov_total = self.protected_cov.len();
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
    }

    /// z_corr = z_orig − Σ_k R_k · (batch terms of W_k), cell by cell, and
    /// z_cos from it.
    fn subtract_batch_terms(&mut self) {
        let (d, k, n_cov) = (self.d, self.k, self.n_cov);
        let wl = &self.terms;
        let active: Vec<bool> = wl.iter().map(|m| !m.is_empty()).collect();
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
}

/// Per level, the d × K matrix of batch terms, wl[l][(c, j)] = W_c[l + 1, j];
/// empty for a level that no cluster corrects.
pub(super) fn level_terms(w: &[Option<(Vec<f64>, Vec<f64>)>], b: usize, d: usize, k: usize) -> Vec<Vec<f64>> {
    (0..b)
        .map(|l| {
            let mut m = vec![0.0; d * k];
            for (c, wc) in w.iter().enumerate() {
                if let Some((sol, _)) = wc {
                    m[c * d..(c + 1) * d].copy_from_slice(&sol[(l + 1) * d..(l + 2) * d]);
                }
            }
            if m.iter().all(|&v| v == 0.0) {
                m = Vec::new();
            }
            m
        })
        .collect()
}

/// The columns `lo..hi` of the K × N matrix `m`, widened to f64.
fn columns_f64(m: &[f32], k: usize, lo: usize, hi: usize) -> Vec<f64> {
    m[lo * k..hi * k].iter().map(|&v| v as f64).collect()
}

/// Solves A X = B (A p × p row-major, B p × d row-major) by Gaussian
/// elimination with partial pivoting; a singular pivot leaves its row 0.
pub(super) fn solve(mut a: Vec<f64>, mut rhs: Vec<f64>, p: usize, d: usize) -> Vec<f64> {
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
