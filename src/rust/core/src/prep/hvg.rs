//! Highly variable genes, "seurat_v3" flavour (Stuart et al. 2019; as in
//! scanpy's `highly_variable_genes(flavor="seurat_v3")`): per batch, a LOESS
//! fit of log10 variance on log10 mean of raw counts gives an expected
//! standard deviation; counts clipped at mean + sqrt(N)·sd give a
//! standardized variance. Genes are ranked within each batch, then by median
//! rank across the batches where they are in the top `n_top`, ties broken by
//! the number of such batches.

use super::loess::loess_quadratic;
use super::normalize::{column_mean_var, column_sums};
use crate::data::{Categorical, CountMatrix};
use crate::error::{check_param, Result};
use crate::numeric::nan_median;

/// Per-gene statistics and the selection.
#[derive(Debug, Clone)]
pub struct HvgResult {
    /// Mean and variance (n − 1) of raw counts over all cells.
    pub mean: Vec<f64>,
    pub variance: Vec<f64>,
    /// Standardized variance, averaged over batches.
    pub variance_norm: Vec<f64>,
    /// Median rank (0-based) over the batches where the gene is in the top
    /// `n_top`; NaN where it is in none.
    pub rank: Vec<f64>,
    /// Number of batches in which the gene is in the top `n_top`.
    pub n_batches: Vec<u32>,
    /// Selected gene indices, most variable first.
    pub selected: Vec<usize>,
}

/// Selects the `n_top` most variable genes; `batch` makes the selection batch-aware.
pub fn highly_variable_genes(
    counts: &CountMatrix,
    n_top: usize,
    batch: Option<&Categorical>,
    span: f64,
) -> Result<HvgResult> {
    check_param(n_top >= 1, "n_hvg", "must be at least 1")?;
    check_param(span > 0.0 && span <= 1.0, "span", "must be in (0, 1]")?;
    let n_genes = counts.n_genes();
    let n_top = n_top.min(n_genes);
    let all = Categorical::constant("all", counts.n_cells());
    let batch = batch.unwrap_or(&all);

    let everyone: Vec<usize> = (0..counts.n_cells()).collect();
    let (mean, variance) = column_mean_var(&counts.csr, &everyone);

    let norm_vars: Vec<Vec<f64>> =
        batch.cells_by_level().iter().map(|cells| standardized_variance(counts, cells, span)).collect();
    Ok(select(mean, variance, &norm_vars, n_top))
}

/// Ranks the genes by their standardized variances of each batch
/// (`norm_vars`) and keeps the `n_top` first.
pub(super) fn select(mean: Vec<f64>, variance: Vec<f64>, norm_vars: &[Vec<f64>], n_top: usize) -> HvgResult {
    let n_genes = mean.len();
    let mut rank_lists: Vec<Vec<f64>> = vec![Vec::new(); n_genes];
    let mut n_batches = vec![0u32; n_genes];
    for nv in norm_vars {
        let mut order: Vec<usize> = (0..n_genes).collect();
        order.sort_by(|&a, &b| nv[b].total_cmp(&nv[a]).then(a.cmp(&b)));
        for (r, &g) in order.iter().take(n_top).enumerate() {
            rank_lists[g].push(r as f64);
            n_batches[g] += 1;
        }
    }
    let rank: Vec<f64> = rank_lists.iter().map(|r| nan_median(r)).collect();
    let variance_norm: Vec<f64> =
        (0..n_genes).map(|g| norm_vars.iter().map(|nv| nv[g]).sum::<f64>() / norm_vars.len() as f64).collect();

    let mut order: Vec<usize> = (0..n_genes).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (rank[a], rank[b]);
        let by_rank = match (ra.is_nan(), rb.is_nan()) {
            (false, false) => ra.total_cmp(&rb),
            (a_nan, b_nan) => a_nan.cmp(&b_nan),
        };
        by_rank.then(n_batches[b].cmp(&n_batches[a])).then(a.cmp(&b))
    });
    order.truncate(n_top);
    HvgResult { mean, variance, variance_norm, rank, n_batches, selected: order }
}

/// Variance of counts clipped at mean + sqrt(N)·sd_expected, over sd_expected².
fn standardized_variance(counts: &CountMatrix, cells: &[usize], span: f64) -> Vec<f64> {
    let g = counts.n_genes();
    let (mean, var) = column_mean_var(&counts.csr, cells);
    let reg_sd = expected_sd(&mean, &var, span);
    let clip = clip_values(&mean, &reg_sd, cells.len());
    let sums = column_sums(&counts.csr, cells, 2 * g, |j, v, acc| clipped_sums(&clip, j, v, acc));
    clipped_variance(&sums, &mean, &reg_sd, cells.len())
}

/// The LOESS fit of log10 variance on log10 mean (genes with variance), as
/// the expected standard deviation of each gene.
pub(super) fn expected_sd(mean: &[f64], var: &[f64], span: f64) -> Vec<f64> {
    let varying: Vec<usize> = (0..mean.len()).filter(|&j| var[j] > 0.0).collect();
    let x: Vec<f64> = varying.iter().map(|&j| mean[j].log10()).collect();
    let y: Vec<f64> = varying.iter().map(|&j| var[j].log10()).collect();
    let mut log_expected = vec![0.0; mean.len()]; // constant genes: expected sd 1, as scanpy
    for (k, fit) in loess_quadratic(&x, &y, span).into_iter().enumerate() {
        log_expected[varying[k]] = fit;
    }
    log_expected.iter().map(|&e| 10f64.powf(e).sqrt()).collect()
}

/// Where each gene's counts are clipped, among `n` cells.
pub(super) fn clip_values(mean: &[f64], reg_sd: &[f64], n: usize) -> Vec<f64> {
    mean.iter().zip(reg_sd).map(|(m, sd)| sd * (n as f64).sqrt() + m).collect()
}

/// Adds a count's clipped value and its square (at `j` and `g + j`).
#[inline]
pub(super) fn clipped_sums(clip: &[f64], j: u32, v: f32, acc: &mut [f64]) {
    let g = clip.len();
    let c = (v as f64).min(clip[j as usize]);
    acc[j as usize] += c;
    acc[g + j as usize] += c * c;
}

/// The standardized variance from the clipped sums of `n` cells.
pub(super) fn clipped_variance(sums: &[f64], mean: &[f64], reg_sd: &[f64], n: usize) -> Vec<f64> {
    let (g, n) = (mean.len(), n as f64);
    (0..g)
        .map(|j| {
            let (s, s2, m) = (sums[j], sums[g + j], mean[j]);
            (n * m * m + s2 - 2.0 * s * m) / ((n - 1.0) * reg_sd[j] * reg_sd[j])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Poisson};

    /// Genes 0..10 switch between two expression states across cells (high
    /// variance, same mean as their Poisson peers, so the trend is set by the
    /// majority); the rest are Poisson (variance = mean).
    fn two_state_counts(n_cells: usize, seed: u64) -> CountMatrix {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n_genes = 200;
        let (mut p, mut i, mut x) = (vec![0i32], Vec::new(), Vec::new());
        for c in 0..n_cells {
            let state = c % 2 == 0;
            for g in 0..n_genes {
                let base = 2.0 + (g % 20) as f64;
                let lambda = if g < 10 {
                    if state {
                        base * 1.9
                    } else {
                        base * 0.1
                    }
                } else {
                    base
                };
                let v: f64 = Poisson::new(lambda).unwrap().sample(&mut rng);
                if v > 0.0 {
                    i.push(g as i32);
                    x.push(v);
                }
            }
            if x.len() == *p.last().unwrap() as usize {
                i.push(0);
                x.push(1.0 + rng.random_range(0..2) as f64);
            }
            p.push(x.len() as i32);
        }
        let genes = (0..n_genes).map(|g| format!("g{g}")).collect();
        let cells = (0..n_cells).map(|c| format!("c{c}")).collect();
        CountMatrix::from_csc_genes_by_cells(&p, &i, &x, genes, cells).unwrap()
    }

    #[test]
    fn finds_the_genes_that_switch_state() {
        let m = two_state_counts(400, 1);
        let r = highly_variable_genes(&m, 10, None, 0.3).unwrap();
        let mut sel = r.selected.clone();
        sel.sort_unstable();
        assert_eq!(sel, (0..10).collect::<Vec<_>>());
        // Poisson genes have standardized variance near 1.
        let pois: f64 = r.variance_norm[10..].iter().sum::<f64>() / 190.0;
        assert!((pois - 1.0).abs() < 0.25, "{pois}");
    }

    #[test]
    fn batch_aware_selection_counts_batches() {
        let m = two_state_counts(400, 2);
        let codes: Vec<u32> = (0..400).map(|c| (c / 200) as u32).collect();
        let b = Categorical::new("batch", codes, vec!["a".into(), "b".into()], 400, 2).unwrap();
        let r = highly_variable_genes(&m, 10, Some(&b), 0.3).unwrap();
        for &g in &r.selected {
            assert!(g < 10);
            assert_eq!(r.n_batches[g], 2);
        }
        assert!(r.rank[150].is_nan() || r.n_batches[150] < 2);
    }
}
