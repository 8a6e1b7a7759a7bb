//! kBET (Büttner et al. 2019) per cell-type label, as scIB aggregates it:
//! within each label, every cell's neighbourhood (itself and its k0 nearest
//! cells of that label) is tested for batch composition against the label's
//! overall batch shares with a χ² test (B − 1 degrees of freedom); the score
//! is the share of cells whose test accepts (p ≥ 0.05), averaged over labels.
//! k0 = min(70, max(10, ⌊mean cells per batch / 4⌋)). Labels with fewer than
//! 10 cells or one batch are skipped. Unlike scib-metrics, neighbourhoods come
//! from the embedding itself rather than a diffusion map of its UMAP graph,
//! so values are close to, not identical with, scib-metrics'.

use super::knn::{knn_auto, Embedding};
use super::recode;
use statrs::function::gamma::gamma_ur;

const ALPHA: f64 = 0.05;

pub fn kbet_per_label(x: &Embedding, batch: &[u32], labels: &[u32], seed: u64) -> f64 {
    let n_labels = labels.iter().max().map_or(0, |&m| m as usize + 1);
    let mut scores = Vec::new();
    for l in 0..n_labels as u32 {
        let cells: Vec<usize> = (0..x.n).filter(|&i| labels[i] == l).collect();
        let (codes, n_batches) = recode(&cells.iter().map(|&i| batch[i]).collect::<Vec<_>>());
        if cells.len() < 10 || n_batches < 2 {
            continue;
        }
        let k0 = ((cells.len() as f64 / n_batches as f64 / 4.0).floor() as usize).clamp(10, 70).min(cells.len() - 1);
        let values: Vec<f64> = cells.iter().flat_map(|&i| x.row(i).to_vec()).collect();
        let Ok(g) = knn_auto(&Embedding::row_major(&values, cells.len(), x.d), k0, seed) else { continue };
        scores.push(acceptance(&g.indices, k0, &codes, n_batches));
    }
    if scores.is_empty() {
        f64::NAN
    } else {
        scores.iter().sum::<f64>() / scores.len() as f64
    }
}

/// Share of cells whose neighbourhood (self + `k` neighbours) passes the χ² test.
fn acceptance(neighbours: &[u32], k: usize, codes: &[u32], n_batches: usize) -> f64 {
    let n = codes.len();
    let mut share = vec![0.0; n_batches];
    for &c in codes {
        share[c as usize] += 1.0 / n as f64;
    }
    let dof = (n_batches - 1) as f64;
    let accepted = (0..n)
        .filter(|&i| {
            let mut observed = vec![0.0; n_batches];
            observed[codes[i] as usize] += 1.0;
            for &j in &neighbours[i * k..(i + 1) * k] {
                observed[codes[j as usize] as usize] += 1.0;
            }
            let size = (k + 1) as f64;
            let stat: f64 = observed.iter().zip(&share).map(|(o, s)| (o - s * size).powi(2) / (s * size)).sum();
            gamma_ur(dof / 2.0, stat / 2.0) >= ALPHA
        })
        .count();
    accepted as f64 / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chi_square_acceptance_by_hand() {
        // 4 cells, 2 batches, 1 neighbour each: neighbourhoods of 2 cells.
        // Cells 0,1 (batch 0) are each other's neighbours: observed (2, 0) vs
        // expected (1, 1): χ² = 2, p = 0.157 ≥ 0.05 → accepted.
        let codes = [0, 0, 1, 1];
        let nb = [1u32, 0, 3, 2];
        assert!((acceptance(&nb, 1, &codes, 2) - 1.0).abs() < 1e-12);
        // With 9 neighbours all of its own batch among 20 cells (10 per batch):
        // observed (10, 0) vs (5, 5): χ² = 10, p = 0.0016 → rejected.
        let codes: Vec<u32> = (0..20).map(|i| i / 10).collect();
        let nb: Vec<u32> = (0..20u32).flat_map(|i| (0..20u32).filter(move |&j| j != i && j / 10 == i / 10)).collect();
        assert_eq!(acceptance(&nb, 9, &codes, 2), 0.0);
    }

    #[test]
    fn mixed_batches_are_accepted_and_separated_rejected() {
        let n = 400;
        let mixed: Vec<f64> = (0..n).map(|i| i as f64).collect();
        let batch: Vec<u32> = (0..n as u32).map(|i| i % 2).collect();
        let label = vec![0u32; n];
        let e = Embedding::row_major(&mixed, n, 1);
        assert!(kbet_per_label(&e, &batch, &label, 1) > 0.9);
        let separated: Vec<f64> = (0..n).map(|i| i as f64 + if i % 2 == 1 { 10_000.0 } else { 0.0 }).collect();
        let e = Embedding::row_major(&separated, n, 1);
        assert!(kbet_per_label(&e, &batch, &label, 1) < 0.05);
    }
}
