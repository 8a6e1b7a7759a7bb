//! Integration metrics of the scIB family (Luecken et al. 2022), computed as
//! scib-metrics 0.5 does where it is deterministic: one kNN graph (90
//! neighbours counting the cell itself; exact up to 50,000 cells, an
//! approximate inverted-file search above, where scib-metrics uses
//! pynndescent), iLISI/cLISI (perplexity 30), silhouette scores (on a
//! stratified subsample of 50,000 cells above that size, as scikit-learn's
//! `silhouette_score(sample_size =)`), isolated labels, graph connectivity (15 neighbours),
//! NMI/ARI of k-means clusters, principal-component regression, and kBET per
//! label (on the embedding's own kNN; see `kbet`). Scores: bio = mean(isolated labels, NMI, ARI,
//! label silhouette, cLISI); batch = mean of the available batch scores
//! (iLISI, kBET, graph connectivity, PCR comparison, batch silhouette);
//! total = 0.6 bio + 0.4 batch.

mod cluster;
mod graph;
mod kbet;
mod knn;
mod leiden;
mod lisi;

pub use cluster::{ari, kmeans, nmi, silhouette_samples};
pub use graph::graph_connectivity;
pub use kbet::kbet_per_label;
pub use knn::{knn, knn_approx, knn_auto, neighbor_preservation, Embedding, Knn, EXACT_MAX_CELLS};
pub use leiden::{leiden, leiden_nmi_ari, umap_connectivities, Graph};
pub use lisi::lisi;

use crate::numeric::nan_median;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{check_param, Result};

/// Neighbours used by scib-metrics' Benchmarker, counting the cell itself.
const K_LISI: usize = 90;
const K_CONNECTIVITY: usize = 15;
/// Cells above which the silhouette scores (O(n²)) use a subsample.
pub const SILHOUETTE_MAX_CELLS: usize = 50_000;
/// Every label keeps at least this many cells (or all it has) in that subsample.
const SILHOUETTE_MIN_PER_LABEL: usize = 200;

/// One embedding's scores; NaN where a score could not be computed.
#[derive(Debug, Clone)]
pub struct IntegrationMetrics {
    pub ilisi: f64,
    pub clisi: f64,
    pub kbet: f64,
    pub silhouette_label: f64,
    pub silhouette_batch: f64,
    pub isolated_labels: f64,
    pub nmi_kmeans: f64,
    pub ari_kmeans: f64,
    /// Leiden NMI/ARI (scib-metrics computes them only on request; they are
    /// reported, not part of the bio-conservation mean, as in its default).
    pub nmi_leiden: f64,
    pub ari_leiden: f64,
    pub graph_connectivity: f64,
    pub pcr_comparison: f64,
    pub bio_conservation: f64,
    pub batch_correction: f64,
    pub total: f64,
}

fn n_levels(codes: &[u32]) -> usize {
    let mut seen: Vec<u32> = codes.to_vec();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

/// Codes renumbered 0..levels in sorted order of the values present, and the
/// number of levels.
pub(crate) fn recode(codes: &[u32]) -> (Vec<u32>, usize) {
    let mut levels = codes.to_vec();
    levels.sort_unstable();
    levels.dedup();
    let recoded = codes.iter().map(|c| levels.binary_search(c).unwrap_or(0) as u32).collect();
    (recoded, levels.len())
}

fn mean_finite(v: &[f64]) -> f64 {
    let f: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if f.is_empty() {
        f64::NAN
    } else {
        f.iter().sum::<f64>() / f.len() as f64
    }
}

/// Scores of `x` for batch mixing and conservation of `labels`. `pre`, the
/// embedding before integration (e.g. its PCA), enables the PCR comparison.
pub fn integration_metrics(
    x: &Embedding,
    batch: &[u32],
    labels: &[u32],
    pre: Option<&Embedding>,
    seed: u64,
) -> Result<IntegrationMetrics> {
    check_param(batch.len() == x.n && labels.len() == x.n, "batch", "and `label` need one value per cell")?;
    check_param(x.n > K_LISI, "embedding", format!("needs more than {K_LISI} cells"))?;
    let (n_batches, n_labels) = (n_levels(batch), n_levels(labels));
    let g = knn_auto(x, K_LISI - 1, seed)?;
    let perplexity = (K_LISI / 3) as f64;

    let ilisi_median = nan_median(&lisi(&g, batch, perplexity));
    let ilisi = if n_batches > 1 { (ilisi_median - 1.0) / (n_batches - 1) as f64 } else { f64::NAN };
    let clisi_median = nan_median(&lisi(&g, labels, perplexity));
    let clisi = if n_labels > 1 { (n_labels as f64 - clisi_median) / (n_labels - 1) as f64 } else { f64::NAN };

    let (silhouette_label, isolated_labels, silhouette_batch) = match silhouette_subsample(labels, seed) {
        None => silhouette_scores(x, batch, labels),
        Some(rows) => {
            let values: Vec<f64> = rows.iter().flat_map(|&i| x.row(i).to_vec()).collect();
            let sub = Embedding::row_major(&values, rows.len(), x.d);
            let b: Vec<u32> = rows.iter().map(|&i| batch[i]).collect();
            let (l, _) = recode(&rows.iter().map(|&i| labels[i]).collect::<Vec<_>>());
            silhouette_scores(&sub, &b, &l)
        }
    };

    let g15 = Knn {
        n: g.n,
        k: K_CONNECTIVITY - 1,
        indices: (0..g.n).flat_map(|i| g.neighbors(i)[..K_CONNECTIVITY - 1].to_vec()).collect(),
        distances: (0..g.n).flat_map(|i| g.dists(i)[..K_CONNECTIVITY - 1].to_vec()).collect(),
    };
    let graph_connectivity = graph_connectivity(&g15, labels);

    let clusters = kmeans(x, n_labels, 5, 300, seed);
    let (nmi_kmeans, ari_kmeans) = (nmi(labels, &clusters), ari(labels, &clusters));
    let (nmi_leiden, ari_leiden) = leiden_nmi_ari(&g, labels, seed);

    let pcr_comparison = match pre {
        Some(p) => {
            check_param(p.n == x.n, "pre", "needs one row per cell")?;
            let (before, after) = (pcr(p, batch), pcr(x, batch));
            if before > 0.0 {
                ((before - after) / before).max(0.0)
            } else {
                f64::NAN
            }
        }
        None => f64::NAN,
    };
    let kbet = kbet_per_label(x, batch, labels, seed);
    let bio_conservation = mean_finite(&[isolated_labels, nmi_kmeans, ari_kmeans, silhouette_label, clisi]);
    let batch_correction = mean_finite(&[ilisi, kbet, graph_connectivity, pcr_comparison, silhouette_batch]);
    Ok(IntegrationMetrics {
        ilisi,
        clisi,
        kbet,
        silhouette_label,
        silhouette_batch,
        isolated_labels,
        nmi_kmeans,
        ari_kmeans,
        nmi_leiden,
        ari_leiden,
        graph_connectivity,
        pcr_comparison,
        bio_conservation,
        batch_correction,
        total: 0.6 * bio_conservation + 0.4 * batch_correction,
    })
}

/// Label silhouette, isolated-label score and batch silhouette.
fn silhouette_scores(x: &Embedding, batch: &[u32], labels: &[u32]) -> (f64, f64, f64) {
    let sil = silhouette_samples(x, labels);
    let silhouette_label = (sil.iter().sum::<f64>() / x.n as f64 + 1.0) / 2.0;
    (silhouette_label, isolated_label_score(&sil, batch, labels), batch_silhouette(x, batch, labels))
}

/// Above `SILHOUETTE_MAX_CELLS` cells, a seeded subsample of about that many
/// cells, stratified by label (each label in proportion, but at least
/// `SILHOUETTE_MIN_PER_LABEL` cells or all it has), sorted; `None` below.
fn silhouette_subsample(labels: &[u32], seed: u64) -> Option<Vec<usize>> {
    let n = labels.len();
    if n <= SILHOUETTE_MAX_CELLS {
        return None;
    }
    let n_labels = labels.iter().max().map_or(0, |&m| m as usize + 1);
    let mut by_label = vec![Vec::new(); n_labels];
    for (i, &l) in labels.iter().enumerate() {
        by_label[l as usize].push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let share = SILHOUETTE_MAX_CELLS as f64 / n as f64;
    let mut rows: Vec<usize> = by_label
        .iter()
        .flat_map(|cells| {
            let keep = ((cells.len() as f64 * share).round() as usize).max(SILHOUETTE_MIN_PER_LABEL).min(cells.len());
            rand::seq::index::sample(&mut rng, cells.len(), keep).into_iter().map(|j| cells[j]).collect::<Vec<_>>()
        })
        .collect();
    rows.sort_unstable();
    Some(rows)
}

/// Labels found in the fewest batches; the mean of their cells' rescaled
/// silhouette (with all labels as clusters), averaged over those labels.
fn isolated_label_score(sil: &[f64], batch: &[u32], labels: &[u32]) -> f64 {
    let n_labels = labels.iter().max().map_or(0, |&m| m as usize + 1);
    let mut batches_of = vec![Vec::new(); n_labels];
    for (&l, &b) in labels.iter().zip(batch) {
        batches_of[l as usize].push(b);
    }
    let counts: Vec<usize> = batches_of.iter().map(|b| if b.is_empty() { usize::MAX } else { n_levels(b) }).collect();
    let min = counts.iter().copied().min().unwrap_or(0);
    let scores: Vec<f64> = (0..n_labels)
        .filter(|&l| counts[l] == min)
        .map(|l| {
            let v: Vec<f64> = labels.iter().zip(sil).filter(|(&x, _)| x as usize == l).map(|(_, &s)| s).collect();
            (v.iter().sum::<f64>() / v.len() as f64 + 1.0) / 2.0
        })
        .collect();
    mean_finite(&scores)
}

/// For each label, 1 − |silhouette| with batches as clusters, averaged over
/// its cells; then over labels (skipping labels seen in one batch only).
fn batch_silhouette(x: &Embedding, batch: &[u32], labels: &[u32]) -> f64 {
    let n_labels = labels.iter().max().map_or(0, |&m| m as usize + 1);
    let mut scores = Vec::new();
    for l in 0..n_labels as u32 {
        let cells: Vec<usize> = (0..x.n).filter(|&i| labels[i] == l).collect();
        let b: Vec<u32> = cells.iter().map(|&i| batch[i]).collect();
        let (codes, nb) = recode(&b);
        if cells.is_empty() || nb == 1 || nb == cells.len() {
            continue;
        }
        let values: Vec<f64> = cells.iter().flat_map(|&i| x.row(i).to_vec()).collect();
        let sub = Embedding::row_major(&values, cells.len(), x.d);
        let s = silhouette_samples(&sub, &codes);
        scores.push(s.iter().map(|v| 1.0 - v.abs()).sum::<f64>() / s.len() as f64);
    }
    mean_finite(&scores)
}

/// Variance of the embedding explained by a categorical covariate, over all
/// principal components weighted by their variance. For a categorical
/// covariate this equals the between-group sum of squares over the total
/// (PCA rotates the centred data without changing either).
pub fn pcr(x: &Embedding, covariate: &[u32]) -> f64 {
    let n_levels = covariate.iter().max().map_or(0, |&m| m as usize + 1);
    let mut mean = vec![0.0; x.d];
    let mut group_sum = vec![vec![0.0; x.d]; n_levels];
    let mut group_n = vec![0.0; n_levels];
    for i in 0..x.n {
        let c = covariate[i] as usize;
        group_n[c] += 1.0;
        for (j, v) in x.row(i).iter().enumerate() {
            mean[j] += v / x.n as f64;
            group_sum[c][j] += v;
        }
    }
    let total: f64 = (0..x.n).map(|i| x.row(i).iter().zip(&mean).map(|(v, m)| (v - m).powi(2)).sum::<f64>()).sum();
    let between: f64 = (0..n_levels)
        .filter(|&c| group_n[c] > 0.0)
        .map(|c| (0..x.d).map(|j| group_n[c] * (group_sum[c][j] / group_n[c] - mean[j]).powi(2)).sum::<f64>())
        .sum();
    if total > 0.0 {
        between / total
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Normal};

    /// 3 cell types × 2 batches in 5-d; `shift` moves batch 1.
    fn blobs(shift: f64) -> (Vec<f64>, Vec<u32>, Vec<u32>) {
        let mut r = ChaCha8Rng::seed_from_u64(7);
        let noise = Normal::new(0.0, 1.0).unwrap();
        let (mut v, mut b, mut l) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..600 {
            let (label, batch) = ((i % 3) as u32, ((i / 3) % 2) as u32);
            for j in 0..5 {
                let centre = if j == label as usize { 8.0 } else { 0.0 };
                v.push(centre + if j == 4 { shift * batch as f64 } else { 0.0 } + noise.sample(&mut r));
            }
            b.push(batch);
            l.push(label);
        }
        (v, b, l)
    }

    #[test]
    fn mixed_batches_score_high_and_separated_batches_low() {
        let (v, b, l) = blobs(0.0);
        let mixed = integration_metrics(&Embedding::row_major(&v, 600, 5), &b, &l, None, 1).unwrap();
        assert!(mixed.ilisi > 0.8, "{mixed:?}");
        assert!(mixed.clisi > 0.95 && mixed.nmi_kmeans > 0.95 && mixed.ari_kmeans > 0.95, "{mixed:?}");
        assert!(mixed.graph_connectivity > 0.95 && mixed.silhouette_batch > 0.9, "{mixed:?}");
        let (v2, _, _) = blobs(30.0);
        let split = integration_metrics(&Embedding::row_major(&v2, 600, 5), &b, &l, None, 1).unwrap();
        assert!(split.ilisi < 0.05 && split.silhouette_batch < mixed.silhouette_batch, "{split:?}");
        // PCR comparison: integrating `split` into `mixed` removes the batch variance
        let with_pre = integration_metrics(
            &Embedding::row_major(&v, 600, 5),
            &b,
            &l,
            Some(&Embedding::row_major(&v2, 600, 5)),
            1,
        )
        .unwrap();
        assert!(with_pre.pcr_comparison > 0.9, "{}", with_pre.pcr_comparison);
        assert!((with_pre.total - (0.6 * with_pre.bio_conservation + 0.4 * with_pre.batch_correction)).abs() < 1e-12);
    }

    #[test]
    fn silhouette_subsample_keeps_every_label() {
        // 60,000 cells: label 0 has 50 cells, label 1 has 950, label 2 the rest
        let labels: Vec<u32> = (0..60_000).map(|i| if i < 50 { 0 } else if i < 1000 { 1 } else { 2 }).collect();
        assert!(silhouette_subsample(&labels[..SILHOUETTE_MAX_CELLS], 1).is_none());
        let rows = silhouette_subsample(&labels, 1).unwrap();
        let count = |l: u32| rows.iter().filter(|&&i| labels[i] == l).count();
        assert_eq!(count(0), 50); // all it has
        assert_eq!(count(1), 792); // in proportion: 950 · 5/6 ≈ 792 >= 200
        assert_eq!(count(2), (59_000.0f64 * 5.0 / 6.0).round() as usize);
        assert!(rows.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(silhouette_subsample(&labels, 1).unwrap(), rows);
        assert_ne!(silhouette_subsample(&labels, 2).unwrap(), rows);
    }

    #[test]
    fn pcr_by_hand() {
        // 1-d: batch 0 at {0, 2}, batch 1 at {10, 12}: between = 4·25 = 100, total = 104
        let v = [0.0, 2.0, 10.0, 12.0];
        let r = pcr(&Embedding::row_major(&v, 4, 1), &[0, 0, 1, 1]);
        assert!((r - 100.0 / 104.0).abs() < 1e-12);
    }
}
