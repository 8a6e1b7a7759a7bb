//! Library sizes and log-normalization.

use crate::data::{CountMatrix, Csr};

/// log2(counts / library size × 10^6 + 1), keeping the sparsity pattern.
pub fn log2_cpm(counts: &CountMatrix) -> Csr {
    log_normalized(counts, 1e6)
}

/// log2(counts / library size × `scale_factor` + 1), keeping the sparsity
/// pattern: Seurat's LogNormalize (in base 2) for 10^4, log2 CPM for 10^6.
pub fn log_normalized(counts: &CountMatrix, scale_factor: f64) -> Csr {
    let scale: Vec<f64> = counts.library_sizes().iter().map(|&l| scale_factor / l).collect();
    counts.csr.map_values(|r, v| ((v as f64 * scale[r]) + 1.0).log2() as f32)
}

/// Sums of `f(value)` per column over `rows`, computed in a fixed number of row
/// chunks added in order, so the result does not depend on the thread count.
pub(crate) fn column_sums(m: &Csr, rows: &[usize], n_out: usize, f: impl Fn(u32, f32, &mut [f64]) + Sync) -> Vec<f64> {
    use rayon::prelude::*;
    const CHUNK: usize = 2048;
    let partials: Vec<Vec<f64>> = rows
        .par_chunks(CHUNK)
        .map(|chunk| {
            let mut acc = vec![0.0; n_out];
            for &r in chunk {
                let (idx, val) = m.row(r);
                for (&j, &v) in idx.iter().zip(val) {
                    f(j, v, &mut acc);
                }
            }
            acc
        })
        .collect();
    let mut total = vec![0.0; n_out];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// Per-column sums and sums of squares over `rows`: `[sums…, squares…]`.
pub(crate) fn column_moments(m: &Csr, rows: &[usize]) -> Vec<f64> {
    let p = m.n_cols;
    column_sums(m, rows, 2 * p, |j, v, acc| {
        let v = v as f64;
        acc[j as usize] += v;
        acc[p + j as usize] += v * v;
    })
}

/// Per-column mean and unbiased (n − 1) variance of `n` rows from their
/// `column_moments` (added up over blocks of rows, if need be).
pub(crate) fn mean_var_of_moments(moments: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let p = moments.len() / 2;
    let n = n as f64;
    let mean: Vec<f64> = moments[..p].iter().map(|s| s / n).collect();
    let var = (0..p)
        .map(|j| if n > 1.0 { ((moments[p + j] - n * mean[j] * mean[j]) / (n - 1.0)).max(0.0) } else { 0.0 })
        .collect();
    (mean, var)
}

/// Per-column mean and unbiased (n − 1) variance over `rows`.
pub(crate) fn column_mean_var(m: &Csr, rows: &[usize]) -> (Vec<f64>, Vec<f64>) {
    mean_var_of_moments(&column_moments(m, rows), rows.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_cpm_by_hand() {
        let m = CountMatrix::from_csc_genes_by_cells(
            &[0, 2, 3],
            &[0, 1, 1],
            &[1., 3., 7.],
            vec!["a".into(), "b".into()],
            vec!["c1".into(), "c2".into()],
        )
        .unwrap();
        let l = log2_cpm(&m);
        let want = [(250_000f64 + 1.0).log2(), (750_000f64 + 1.0).log2(), (1e6f64 + 1.0).log2()];
        for (a, b) in l.values.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-5);
        }
        // Per 10^4: 1 of 4 counts is 2,500 per 10^4.
        let l = log_normalized(&m, 1e4);
        let want = [2_501f64.log2(), 7_501f64.log2(), 10_001f64.log2()];
        for (a, b) in l.values.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-5);
        }
    }
}
