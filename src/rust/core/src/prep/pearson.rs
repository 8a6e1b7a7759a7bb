//! PCA of analytic Pearson residuals (Lause, Berens & Kobak 2021), as
//! scanpy's `normalize_pearson_residuals` followed by a centred PCA:
//! μ_cg = n_c · p_g (n_c: the cell's total counts, p_g: the gene's share of
//! all counts), r_cg = (x_cg − μ_cg) / √(μ_cg + μ_cg² / θ), clipped to ±√N.
//! Residuals are dense, so they are formed a chunk of cells at a time and
//! never stored: the genes' covariance is accumulated by matrix products of
//! the chunks, decomposed once, and the scores are a second pass.

use super::pca::{flip_signs, top_eigenpairs, PcaResult};
use crate::data::CountMatrix;
use crate::error::{check_param, Error, Result};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;

/// Cells per chunk (fixed, so sums do not depend on the thread count).
const ROWS: usize = 1024;

struct Residuals<'a> {
    counts: &'a CountMatrix,
    keep: &'a [usize],
    lib: Vec<f64>,
    p: Vec<f64>,
    theta: f64,
    clip: f64,
}

impl Residuals<'_> {
    /// Residuals of cells `lo..hi`, column-major (cells × genes).
    fn chunk(&self, lo: usize, hi: usize) -> Vec<f64> {
        let (m, g) = (hi - lo, self.keep.len());
        let mut out = vec![0.0; m * g];
        let mut col = vec![usize::MAX; self.counts.n_genes()];
        for (j, &k) in self.keep.iter().enumerate() {
            col[k] = j;
        }
        for i in 0..m {
            let c = lo + i;
            let n = self.lib[c];
            for (j, &pg) in self.p.iter().enumerate() {
                let mu = n * pg;
                out[j * m + i] = if mu > 0.0 { -mu / (mu + mu * mu / self.theta).sqrt() } else { 0.0 };
            }
            let (idx, val) = self.counts.csr.row(c);
            for (&gi, &x) in idx.iter().zip(val) {
                let j = col[gi as usize];
                if j != usize::MAX {
                    let mu = n * self.p[j];
                    if mu > 0.0 {
                        out[j * m + i] = (x as f64 - mu) / (mu + mu * mu / self.theta).sqrt();
                    }
                }
            }
        }
        out.iter_mut().for_each(|v| *v = v.clamp(-self.clip, self.clip));
        out
    }
}

/// Top `n_pcs` principal components of the Pearson residuals of the genes
/// `keep` (library sizes and gene shares over all genes).
pub fn pearson_residual_pca(
    counts: &CountMatrix,
    keep: &[usize],
    n_pcs: usize,
    theta: f64,
    interrupted: &dyn Fn() -> bool,
) -> Result<PcaResult> {
    let (n, g) = (counts.n_cells(), keep.len());
    check_param(theta > 0.0 && theta.is_finite(), "theta", "must be positive")?;
    check_param(
        n_pcs >= 1 && n_pcs < n.min(g),
        "n_pcs",
        format!("must be smaller than both the number of cells ({n}) and of genes ({g})"),
    )?;
    faer::set_global_parallelism(Par::Seq);
    let lib = counts.library_sizes();
    let total: f64 = lib.iter().sum();
    let mut gene_sums = vec![0.0; counts.n_genes()];
    for r in 0..n {
        let (idx, val) = counts.csr.row(r);
        for (&j, &v) in idx.iter().zip(val) {
            gene_sums[j as usize] += v as f64;
        }
    }
    let p: Vec<f64> = keep.iter().map(|&j| gene_sums[j] / total).collect();
    let res = Residuals { counts, keep, lib, p, theta, clip: (n as f64).sqrt() };
    let starts: Vec<usize> = (0..n).step_by(ROWS).collect();
    // Σ r and Σ r rᵀ over cells, chunk by chunk, summed in chunk order.
    let mut gram = vec![0.0; g * g];
    let mut sum = vec![0.0; g];
    for group in starts.chunks(8) {
        if interrupted() {
            return Err(Error::Interrupted);
        }
        let parts: Vec<(Vec<f64>, Vec<f64>)> = group
            .par_iter()
            .map(|&lo| {
                let hi = (lo + ROWS).min(n);
                let r = res.chunk(lo, hi);
                let m = hi - lo;
                let rm = MatRef::from_column_major_slice(&r, m, g);
                let mut gg = vec![0.0; g * g];
                matmul(
                    MatMut::from_column_major_slice_mut(&mut gg, g, g),
                    Accum::Replace,
                    rm.transpose(),
                    rm,
                    1.0,
                    Par::Seq,
                );
                let s = (0..g).map(|j| r[j * m..(j + 1) * m].iter().sum()).collect();
                (gg, s)
            })
            .collect();
        for (gg, s) in parts {
            gram.iter_mut().zip(gg).for_each(|(a, b)| *a += b);
            sum.iter_mut().zip(s).for_each(|(a, b)| *a += b);
        }
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / n as f64).collect();
    let denom = (n - 1) as f64;
    let cov = Mat::<f64>::from_fn(g, g, |a, b| (gram[b * g + a] - n as f64 * mean[a] * mean[b]) / denom);
    drop(gram);
    let total_var: f64 = (0..g).map(|j| cov[(j, j)]).sum();
    let (mut loadings, values) = top_eigenpairs(&cov, n_pcs)?;
    flip_signs(&mut loadings);
    // Scores: (R − 1 meanᵀ) V, a second pass over the chunks.
    let lv: Vec<f64> = (0..n_pcs).map(|k| (0..g).map(|j| mean[j] * loadings[(j, k)]).sum()).collect();
    let chunks: Vec<Vec<f64>> = starts
        .par_iter()
        .map(|&lo| {
            let hi = (lo + ROWS).min(n);
            let m = hi - lo;
            let r = res.chunk(lo, hi);
            let mut sc = vec![0.0; m * n_pcs];
            matmul(
                MatMut::from_column_major_slice_mut(&mut sc, m, n_pcs),
                Accum::Replace,
                MatRef::from_column_major_slice(&r, m, g),
                loadings.as_ref(),
                1.0,
                Par::Seq,
            );
            sc
        })
        .collect();
    let mut scores = Mat::<f64>::zeros(n, n_pcs);
    for (ci, sc) in chunks.iter().enumerate() {
        let lo = ci * ROWS;
        let m = sc.len() / n_pcs;
        for k in 0..n_pcs {
            for i in 0..m {
                scores[(lo + i, k)] = sc[k * m + i] - lv[k];
            }
        }
    }
    let sdev: Vec<f64> = values.iter().map(|&v| v.max(0.0).sqrt()).collect();
    let variance_ratio = values.iter().map(|&v| v.max(0.0) / total_var).collect();
    Ok(PcaResult { scores, loadings, sdev, variance_ratio, center: mean, scale: vec![1.0; g], n_iter: 0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::{simulate, SimParams};

    /// Against a direct dense computation of the residuals and their
    /// covariance eigenvectors (small enough to do naively).
    #[test]
    fn matches_a_dense_computation() {
        let s = simulate(&SimParams { n_cells: 300, n_genes: 60, seed: 4, ..Default::default() }).unwrap();
        let keep: Vec<usize> = (0..60).step_by(2).collect();
        let r = pearson_residual_pca(&s.counts, &keep, 3, 100.0, &|| false).unwrap();
        let (n, g) = (300, keep.len());
        let lib = s.counts.library_sizes();
        let total: f64 = lib.iter().sum();
        let mut dense = vec![vec![0.0; 60]; n];
        for (c, row) in dense.iter_mut().enumerate() {
            let (idx, val) = s.counts.csr.row(c);
            for (&j, &v) in idx.iter().zip(val) {
                row[j as usize] = v as f64;
            }
        }
        let pg: Vec<f64> = (0..60).map(|j| dense.iter().map(|r| r[j]).sum::<f64>() / total).collect();
        let clip = (n as f64).sqrt();
        let res: Vec<Vec<f64>> = (0..n)
            .map(|c| {
                keep.iter()
                    .map(|&j| {
                        let mu = lib[c] * pg[j];
                        ((dense[c][j] - mu) / (mu + mu * mu / 100.0).sqrt()).clamp(-clip, clip)
                    })
                    .collect()
            })
            .collect();
        let mean: Vec<f64> = (0..g).map(|j| res.iter().map(|r| r[j]).sum::<f64>() / n as f64).collect();
        // The first PC's scores are the projection of the centred residuals.
        for c in [0, 17, 299] {
            let proj: f64 = (0..g).map(|j| (res[c][j] - mean[j]) * r.loadings[(j, 0)]).sum();
            assert!((proj - r.scores[(c, 0)]).abs() < 1e-8, "cell {c}: {proj} vs {}", r.scores[(c, 0)]);
        }
        // Loadings are orthonormal and the variances decrease.
        let dot: f64 = (0..g).map(|j| r.loadings[(j, 0)] * r.loadings[(j, 1)]).sum();
        assert!(dot.abs() < 1e-10);
        assert!(r.sdev[0] >= r.sdev[1] && r.sdev[1] >= r.sdev[2]);
        // Variance of PC1's scores equals its eigenvalue.
        let m0 = (0..n).map(|c| r.scores[(c, 0)]).sum::<f64>() / n as f64;
        let v0 = (0..n).map(|c| (r.scores[(c, 0)] - m0).powi(2)).sum::<f64>() / (n - 1) as f64;
        assert!((v0.sqrt() - r.sdev[0]).abs() < 1e-8);
    }
}
