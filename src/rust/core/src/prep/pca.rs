//! Truncated PCA of a sparse matrix by randomized SVD (Halko, Martinsson &
//! Tropp 2011, Alg. 4.4 with QR-normalized power iterations). Single-cell
//! spectra are flat past the first few components, so a fixed number of
//! iterations leaves the trailing PCs inaccurate; instead the iterations stop
//! once the top Ritz values (singular values of AᵀQ, computed in every
//! iteration anyway) change by less than `tol`. Centering and
//! scaling are applied implicitly, (X − 1μᵀ)·diag(s), so the sparse matrix is
//! never densified; dense work is limited to n × (k + oversampling) blocks and
//! the small SVD, done by faer.

use crate::data::Csr;
use crate::error::{check_param, Error, Result};
use faer::Mat;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

/// Parameters of [`pca`].
#[derive(Debug, Clone)]
pub struct PcaParams {
    /// Number of components.
    pub n_pcs: usize,
    /// Scale every column to unit variance after centering.
    pub scale: bool,
    /// Extra random directions beyond `n_pcs` (default 20).
    pub n_oversamples: usize,
    /// Most power iterations (default 100).
    pub max_iter: usize,
    /// Stop when no top-`n_pcs` Ritz value changes by more than this, relatively (default 1e-7).
    pub tol: f64,
    pub seed: u64,
    /// Use the exact Gram-matrix method up to this many genes (default 3,000);
    /// randomized SVD beyond.
    pub max_genes_exact: usize,
}

impl Default for PcaParams {
    fn default() -> Self {
        PcaParams {
            n_pcs: 50,
            scale: true,
            n_oversamples: 20,
            max_iter: 100,
            tol: 1e-7,
            seed: 0,
            max_genes_exact: 3000,
        }
    }
}

/// Scores `[cells, k]`, loadings `[genes, k]`, both column-major.
#[derive(Debug, Clone)]
pub struct PcaResult {
    pub scores: Mat<f64>,
    pub loadings: Mat<f64>,
    /// Standard deviation of each component (singular value / sqrt(n − 1)).
    pub sdev: Vec<f64>,
    /// Fraction of the total variance of the centered (scaled) matrix.
    pub variance_ratio: Vec<f64>,
    pub center: Vec<f64>,
    pub scale: Vec<f64>,
    /// Power iterations done (0 for the exact method).
    pub n_iter: usize,
}

/// Top `params.n_pcs` principal components of the rows of `x`. `interrupted`
/// is polled between power iterations.
pub fn pca(x: &Csr, params: &PcaParams, interrupted: &dyn Fn() -> bool) -> Result<PcaResult> {
    let (n, p) = (x.n_rows, x.n_cols);
    check_param(n >= 2, "x", "needs at least 2 cells for PCA")?;
    check_param(params.n_pcs >= 1, "n_pcs", "must be at least 1")?;
    check_param(
        params.n_pcs < n.min(p),
        "n_pcs",
        format!("must be smaller than both the number of cells ({n}) and of genes ({p})"),
    )?;
    // faer's parallel dense kernels sum in an order that depends on the thread
    // count; run them sequentially so that a seed fixes the result. The heavy,
    // parallel part is the sparse products below, summed in fixed chunks.
    faer::set_global_parallelism(faer::Par::Seq);
    let op = Centered::new(x, params.scale);
    let k = params.n_pcs;
    // The exact method's p × p eigendecomposition only pays off with at least
    // as many cells as genes.
    if p <= params.max_genes_exact && n >= p {
        return pca_exact(&op, k, interrupted);
    }
    let l = (k + params.n_oversamples).min(n.min(p));

    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    let omega = Mat::<f64>::from_fn(p, l, |_, _| StandardNormal.sample(&mut rng));
    let mut q = orthonormal(&op.apply(&omega));
    let mut bt = op.apply_t(&q);
    let mut ritz = top_singular_values(&bt, k)?;
    let mut n_iter = 0;
    while n_iter < params.max_iter {
        if interrupted() {
            return Err(Error::Interrupted);
        }
        q = orthonormal(&op.apply(&orthonormal(&bt)));
        bt = op.apply_t(&q);
        n_iter += 1;
        let next = top_singular_values(&bt, k)?;
        let change = next.iter().zip(&ritz).map(|(a, b)| (a - b).abs() / a.max(f64::MIN_POSITIVE)).fold(0.0, f64::max);
        ritz = next;
        if change < params.tol {
            break;
        }
    }
    // Aᵀ Q = W Σ Ûᵀ  ⇒  A ≈ Q Û Σ Wᵀ.
    let svd = bt.thin_svd().map_err(|e| Error::Linalg(format!("SVD did not converge: {e:?}")))?;
    let (w, s) = (svd.U(), svd.S().column_vector());

    let mut loadings = Mat::<f64>::from_fn(p, k, |i, j| w[(i, j)]);
    flip_signs(&mut loadings);
    // Scores = A·V, computed row by row (deterministic, and exact for the V found).
    let scores = op.apply(&loadings);
    let denom = (n - 1) as f64;
    let sdev: Vec<f64> = (0..k).map(|j| s[j] / denom.sqrt()).collect();
    let total = op.total_variance();
    let variance_ratio = sdev.iter().map(|sd| sd * sd / total).collect();
    Ok(PcaResult { scores, loadings, sdev, variance_ratio, center: op.mean.clone(), scale: op.scale.clone(), n_iter })
}

/// Top k singular values of a tall p × l matrix, from the eigenvalues of its
/// l × l Gram matrix (far cheaper than an SVD of the matrix itself; precise
/// enough for a convergence test).
fn top_singular_values(m: &Mat<f64>, k: usize) -> Result<Vec<f64>> {
    let gram = m.transpose() * m;
    let mut s: Vec<f64> = gram
        .self_adjoint_eigenvalues(faer::Side::Lower)
        .map_err(|e| Error::Linalg(format!("eigen-decomposition did not converge: {e:?}")))?
        .into_iter()
        .map(|v| v.max(0.0).sqrt())
        .collect();
    s.sort_by(|a, b| b.total_cmp(a));
    s.truncate(k);
    Ok(s)
}

/// Exact PCA for a moderate number of genes: the covariance matrix of A from
/// the sparse Gram matrix XᵀX (only products of co-occurring non-zeros,
/// accumulated in fixed-order chunks), then one dense symmetric
/// eigendecomposition. Cost Σ_cells nnz² plus O(p³), no iterations.
fn pca_exact(op: &Centered, k: usize, interrupted: &dyn Fn() -> bool) -> Result<PcaResult> {
    let gram = sparse_gram(op.x, interrupted)?;
    let (loadings, sdev) = gram_components(gram, op.x.n_rows, &op.mean, &op.scale, k)?;
    let scores = op.apply(&loadings);
    let total = op.total_variance();
    let variance_ratio = sdev.iter().map(|sd| sd * sd / total).collect();
    Ok(PcaResult {
        scores,
        loadings,
        sdev,
        variance_ratio,
        center: op.mean.clone(),
        scale: op.scale.clone(),
        n_iter: 0,
    })
}

/// The top `k` components (loadings, sign-flipped, and standard deviations)
/// of `n` rows from the upper triangle of their Gram matrix XᵀX (`p × p`,
/// row-major), their column means and the columns' scale factors.
pub(super) fn gram_components(
    gram: Vec<f64>,
    n: usize,
    mean: &[f64],
    scale: &[f64],
    k: usize,
) -> Result<(Mat<f64>, Vec<f64>)> {
    let p = mean.len();
    let denom = (n - 1) as f64;
    let cov = Mat::<f64>::from_fn(p, p, |a, b| {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        (gram[lo * p + hi] - n as f64 * mean[a] * mean[b]) * scale[a] * scale[b] / denom
    });
    drop(gram);
    let (mut loadings, values) = top_eigenpairs(&cov, k)?;
    flip_signs(&mut loadings);
    Ok((loadings, values.iter().map(|&v| v.max(0.0).sqrt()).collect()))
}

/// The k largest eigenpairs of a symmetric matrix, largest first.
pub(super) fn top_eigenpairs(c: &Mat<f64>, k: usize) -> Result<(Mat<f64>, Vec<f64>)> {
    let p = c.nrows();
    let eig = c
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| Error::Linalg(format!("eigen-decomposition did not converge: {e:?}")))?;
    let (u, s) = (eig.U(), eig.S().column_vector());
    let top: Vec<usize> = (0..p).rev().take(k).collect(); // faer's order is ascending
    Ok((Mat::<f64>::from_fn(p, k, |i, j| u[(i, top[j])]), top.iter().map(|&j| s[j]).collect()))
}

/// Upper triangle of XᵀX (row-major p × p). Chunks of rows are summed in
/// their order, a fixed number at a time, so memory stays bounded and the
/// result does not depend on the thread count.
pub(super) fn sparse_gram(x: &Csr, interrupted: &dyn Fn() -> bool) -> Result<Vec<f64>> {
    const ROWS: usize = 2048;
    const CHUNKS_AT_ONCE: usize = 8;
    let p = x.n_cols;
    let starts: Vec<usize> = (0..x.n_rows).step_by(ROWS).collect();
    let mut total = vec![0.0f64; p * p];
    for group in starts.chunks(CHUNKS_AT_ONCE) {
        if interrupted() {
            return Err(Error::Interrupted);
        }
        let partials: Vec<Vec<f64>> = group
            .par_iter()
            .map(|&start| {
                let mut g = vec![0.0f64; p * p];
                let mut vals: Vec<f64> = Vec::new();
                for r in start..(start + ROWS).min(x.n_rows) {
                    let (idx, val) = x.row(r);
                    vals.clear();
                    vals.extend(val.iter().map(|&v| v as f64));
                    for (a, (&ia, &va)) in idx.iter().zip(&vals).enumerate() {
                        let row = &mut g[ia as usize * p..(ia as usize + 1) * p];
                        for (&ib, &vb) in idx[a..].iter().zip(&vals[a..]) {
                            row[ib as usize] += va * vb;
                        }
                    }
                }
                g
            })
            .collect();
        for g in partials {
            total.iter_mut().zip(g).for_each(|(t, v)| *t += v);
        }
    }
    Ok(total)
}

/// Sign convention: the largest-magnitude loading of each component is positive.
pub(super) fn flip_signs(loadings: &mut Mat<f64>) {
    for j in 0..loadings.ncols() {
        let (mut best, mut sign) = (0.0, 1.0);
        for i in 0..loadings.nrows() {
            if loadings[(i, j)].abs() > best {
                best = loadings[(i, j)].abs();
                sign = loadings[(i, j)].signum();
            }
        }
        for i in 0..loadings.nrows() {
            loadings[(i, j)] *= sign;
        }
    }
}

fn orthonormal(m: &Mat<f64>) -> Mat<f64> {
    m.qr().compute_thin_Q()
}

/// The implicit operator A = (X − 1μᵀ)·diag(s).
struct Centered<'a> {
    x: &'a Csr,
    mean: Vec<f64>,
    scale: Vec<f64>,
    var: Vec<f64>,
}

/// (X − 1μᵀ)·diag(s)·M for M of shape [genes, l]: rows of X times
/// diag(s)·M, minus μᵀ diag(s) M.
pub(super) fn centered_product(x: &Csr, mean: &[f64], scale: &[f64], m: &Mat<f64>) -> Mat<f64> {
    let (p, l) = (x.n_cols, m.ncols());
    let ms: Vec<f64> = (0..p).flat_map(|j| (0..l).map(move |c| (j, c))).map(|(j, c)| m[(j, c)] * scale[j]).collect();
    let mut offset = vec![0.0; l];
    for j in 0..p {
        for c in 0..l {
            offset[c] += mean[j] * ms[j * l + c];
        }
    }
    let mut out = vec![0.0; x.n_rows * l];
    out.par_chunks_mut(l).enumerate().for_each(|(r, dst)| {
        dst.iter_mut().zip(&offset).for_each(|(d, o)| *d = -o);
        let (idx, val) = x.row(r);
        for (&j, &v) in idx.iter().zip(val) {
            let src = &ms[j as usize * l..(j as usize + 1) * l];
            let v = v as f64;
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += v * s);
        }
    });
    Mat::from_fn(x.n_rows, l, |i, c| out[i * l + c])
}

/// Rows per chunk for reductions; fixed so results do not depend on threads.
const CHUNK: usize = 4096;

impl<'a> Centered<'a> {
    fn new(x: &'a Csr, scale: bool) -> Self {
        let rows: Vec<usize> = (0..x.n_rows).collect();
        let (mean, var) = super::column_mean_var(x, &rows);
        let scale = var.iter().map(|&v| if scale && v > 0.0 { 1.0 / v.sqrt() } else { 1.0 }).collect();
        Centered { x, mean, scale, var }
    }

    fn total_variance(&self) -> f64 {
        self.var.iter().zip(&self.scale).map(|(v, s)| v * s * s).sum()
    }

    /// A·M for M of shape [genes, l].
    fn apply(&self, m: &Mat<f64>) -> Mat<f64> {
        centered_product(self.x, &self.mean, &self.scale, m)
    }

    /// Aᵀ·Q for Q of shape [cells, l]: diag(s)·(Xᵀ Q − μ·(1ᵀ Q)).
    fn apply_t(&self, q: &Mat<f64>) -> Mat<f64> {
        let (n, p, l) = (self.x.n_rows, self.x.n_cols, q.ncols());
        let q_rows: Vec<f64> = (0..n).flat_map(|i| (0..l).map(move |c| (i, c))).map(|(i, c)| q[(i, c)]).collect();
        let partials: Vec<(Vec<f64>, Vec<f64>)> = (0..n)
            .collect::<Vec<_>>()
            .par_chunks(CHUNK)
            .map(|rows| {
                let mut acc = vec![0.0; p * l];
                let mut colsum = vec![0.0; l];
                for &r in rows {
                    let qr = &q_rows[r * l..(r + 1) * l];
                    colsum.iter_mut().zip(qr).for_each(|(s, v)| *s += v);
                    let (idx, val) = self.x.row(r);
                    for (&j, &v) in idx.iter().zip(val) {
                        let dst = &mut acc[j as usize * l..(j as usize + 1) * l];
                        let v = v as f64;
                        dst.iter_mut().zip(qr).for_each(|(d, s)| *d += v * s);
                    }
                }
                (acc, colsum)
            })
            .collect();
        let mut xtq = vec![0.0; p * l];
        let mut colsum = vec![0.0; l];
        for (acc, cs) in partials {
            xtq.iter_mut().zip(acc).for_each(|(t, a)| *t += a);
            colsum.iter_mut().zip(cs).for_each(|(t, a)| *t += a);
        }
        Mat::from_fn(p, l, |j, c| self.scale[j] * (xtq[j * l + c] - self.mean[j] * colsum[c]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dense reference: column-centered, scaled matrix and its exact SVD.
    fn dense_reference(x: &Csr) -> (Vec<f64>, Mat<f64>) {
        let op = Centered::new(x, true);
        let eye = Mat::<f64>::from_fn(x.n_cols, x.n_cols, |i, j| if i == j { 1.0 } else { 0.0 });
        let a = op.apply(&eye);
        let svd = a.thin_svd().unwrap();
        let s: Vec<f64> = (0..x.n_cols).map(|j| svd.S().column_vector()[j]).collect();
        (s, a)
    }

    fn random_low_rank(n: usize, p: usize, seed: u64) -> Csr {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let f = Mat::<f64>::from_fn(n, 3, |_, _| StandardNormal.sample(&mut rng));
        let g = Mat::<f64>::from_fn(3, p, |_, _| StandardNormal.sample(&mut rng));
        let dense = &f * &g;
        let rows = (0..n)
            .map(|i| {
                (0..p)
                    .filter_map(|j| {
                        let noise: f64 = StandardNormal.sample(&mut rng);
                        let v = dense[(i, j)] + 0.1 * noise;
                        (v > 0.3).then_some((j as u32, v as f32))
                    })
                    .unzip()
            })
            .collect();
        Csr::from_rows(rows, p)
    }

    #[test]
    fn matches_the_exact_svd() {
        let x = random_low_rank(300, 40, 3);
        let (s_exact, a) = dense_reference(&x);
        for max_genes_exact in [0, 1000] {
            let r = pca(&x, &PcaParams { n_pcs: 5, max_genes_exact, ..Default::default() }, &|| false).unwrap();
            for j in 0..5 {
                let sd_exact = s_exact[j] / (299f64).sqrt();
                assert!((r.sdev[j] - sd_exact).abs() / sd_exact < 1e-6, "pc{j}: {} vs {sd_exact}", r.sdev[j]);
            }
            // scores = A · loadings
            let want = &a * &r.loadings;
            for i in 0..300 {
                for j in 0..5 {
                    assert!((want[(i, j)] - r.scores[(i, j)]).abs() < 1e-6);
                }
            }
            let total: f64 = r.variance_ratio.iter().sum();
            assert!(total > 0.0 && total <= 1.0 + 1e-9);
        }
    }

    #[test]
    fn same_seed_same_result() {
        let x = random_low_rank(200, 30, 4);
        let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        for max_genes_exact in [0, 1000] {
            let p = PcaParams { n_pcs: 4, seed: 11, max_genes_exact, ..Default::default() };
            let a = crate::device::with_threads(1, || pca(&x, &p, &|| false).unwrap()).unwrap();
            let b = crate::device::with_threads(2, || pca(&x, &p, &|| false).unwrap()).unwrap();
            assert_eq!(a.scores, b.scores);
        }
    }

    #[test]
    fn rejects_too_many_components_and_honours_interrupts() {
        let x = random_low_rank(50, 10, 5);
        let e = pca(&x, &PcaParams { n_pcs: 10, ..Default::default() }, &|| false).unwrap_err();
        assert!(e.to_string().contains("n_pcs"), "{e}");
        for max_genes_exact in [0, 1000] {
            let e = pca(&x, &PcaParams { n_pcs: 3, max_genes_exact, ..Default::default() }, &|| true).unwrap_err();
            assert!(matches!(e, Error::Interrupted));
        }
    }
}
