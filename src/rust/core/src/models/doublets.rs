//! Doublet detection (SOLO, Bernstein et al. 2020; Scrublet, Wolock et
//! al. 2019): artificial doublets are the summed counts of random pairs of
//! observed cells of one batch (a doublet forms within a lane); a cell
//! that resembles them more than its neighbours do is likely a doublet.
//! The model's latent space places both; the classifier is
//! `models::labels`' (SOLO's is the same MLP on z and log library size),
//! and `neighbor_doublet_fraction` is Scrublet's kNN score in that space.

use crate::data::{Csr, Embedding};
use crate::error::{check_param, invalid, Result};
use crate::metrics::knn_auto;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Simulated doublets: their counts (cells as rows), parents and batch.
#[derive(Debug, Clone)]
pub struct Doublets {
    pub counts: Csr,
    pub parents: Vec<(u32, u32)>,
    pub batch: Vec<u32>,
}

/// `ratio` × (cells of the batch) doublets per batch (`batch`: a code per
/// cell, `n_batches` codes), each the sum of two distinct cells drawn
/// uniformly from the batch.
pub fn simulate_doublets(counts: &Csr, batch: &[u32], n_batches: usize, ratio: f64, seed: u64) -> Result<Doublets> {
    check_param(batch.len() == counts.n_rows, "batch", "must have one value per cell")?;
    check_param(ratio > 0.0 && ratio.is_finite(), "ratio", "must be positive")?;
    let mut members = vec![Vec::<u32>::new(); n_batches];
    for (i, &b) in batch.iter().enumerate() {
        if b as usize >= n_batches {
            return invalid!("internal: a batch code is out of range");
        }
        members[b as usize].push(i as u32);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut parents, mut out_batch) = (Vec::new(), Vec::new());
    for (b, cells) in members.iter().enumerate() {
        if cells.is_empty() {
            continue;
        }
        if cells.len() < 2 {
            return invalid!("batch {} has one cell: doublets are simulated within a batch, from two cells", b + 1);
        }
        for _ in 0..(ratio * cells.len() as f64).round() as usize {
            let i = rng.random_range(0..cells.len());
            let mut j = rng.random_range(0..cells.len() - 1);
            if j >= i {
                j += 1;
            }
            parents.push((cells[i], cells[j]));
            out_batch.push(b as u32);
        }
    }
    let rows = parents.iter().map(|&(a, b)| Csr::add_rows(counts.row(a as usize), counts.row(b as usize))).collect();
    Ok(Doublets { counts: Csr::from_rows(rows, counts.n_cols), parents, batch: out_batch })
}

/// Binomial thinning: each count x of `counts` becomes a Binomial(x, `p`)
/// draw, so a row keeps about `p` of its molecules with the same expected
/// profile. Artificial doublets thinned at 1/2 have one cell's depth: a
/// latent space read from raw counts (the VAE's encoder sees log(1 + x))
/// otherwise sets summed doublets apart from real ones by depth alone,
/// where Scrublet normalises depth away before its PCA. A row left without
/// counts keeps its original ones (a cell needs counts to be encoded).
pub fn thin_counts(counts: &Csr, p: f64, seed: u64) -> Result<Csr> {
    check_param(p > 0.0 && p <= 1.0, "p", "must be in (0, 1]")?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let rows = (0..counts.n_rows)
        .map(|r| {
            let (idx, val) = counts.row(r);
            let (mut i, mut v) = (Vec::with_capacity(idx.len()), Vec::with_capacity(idx.len()));
            for (&g, &x) in idx.iter().zip(val) {
                // x is a whole count (< 2^24): one Bernoulli per molecule
                // would be slow for large ones, so draw the binomial.
                let kept = rand_distr::Binomial::new(x.round().max(0.0) as u64, p)
                    .map(|b| rand_distr::Distribution::sample(&b, &mut rng))
                    .unwrap_or(0);
                if kept > 0 {
                    i.push(g);
                    v.push(kept as f32);
                }
            }
            if i.is_empty() {
                (idx.to_vec(), val.to_vec())
            } else {
                (i, v)
            }
        })
        .collect();
    Ok(Csr::from_rows(rows, counts.n_cols))
}

/// Scrublet's neighbourhood score: for each observed cell (the first
/// `n_observed` rows of `z`, then the simulated doublets), the fraction of
/// simulated doublets among its `k` nearest neighbours, scaled to the
/// simulated share so that 1 means "as many as chance".
pub fn neighbor_doublet_fraction(z: &Embedding, n_observed: usize, k: usize, seed: u64) -> Result<Vec<f64>> {
    check_param(n_observed < z.n && n_observed > 0, "doublets", "needs observed and simulated cells")?;
    let g = knn_auto(z, k.min(z.n - 1), seed)?;
    let share = (z.n - n_observed) as f64 / z.n as f64;
    Ok((0..n_observed)
        .map(|i| g.neighbors(i).iter().filter(|&&j| j as usize >= n_observed).count() as f64 / g.k as f64 / share)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doublets_sum_two_distinct_cells_of_one_batch() {
        // Cell i has count i + 1 in gene i % 4, and 1 in gene 4.
        let rows: Vec<(Vec<u32>, Vec<f32>)> = (0..10u32)
            .map(|i| {
                let g = i % 4;
                (vec![g, 4], vec![i as f32 + 1.0, 1.0])
            })
            .collect();
        let counts = Csr::from_rows(rows, 5);
        let batch: Vec<u32> = (0..10).map(|i| u32::from(i >= 6)).collect();
        let d = simulate_doublets(&counts, &batch, 2, 2.0, 1).unwrap();
        assert_eq!(d.parents.len(), 20);
        assert_eq!(d.batch.iter().filter(|&&b| b == 0).count(), 12);
        for (r, &(a, b)) in d.parents.iter().enumerate() {
            assert_ne!(a, b);
            assert_eq!(batch[a as usize], batch[b as usize]);
            assert_eq!(batch[a as usize], d.batch[r]);
            let mut want = [0f32; 5];
            for c in [a, b] {
                want[(c % 4) as usize] += c as f32 + 1.0;
                want[4] += 1.0;
            }
            let (idx, val) = d.counts.row(r);
            let mut got = [0f32; 5];
            idx.iter().zip(val).for_each(|(&j, &v)| got[j as usize] += v);
            assert_eq!(got, want, "doublet {r} of cells {a} and {b}");
            assert!(idx.windows(2).all(|w| w[0] < w[1]));
        }
        // The same seed gives the same doublets; a one-cell batch is refused.
        assert_eq!(simulate_doublets(&counts, &batch, 2, 2.0, 1).unwrap().parents, d.parents);
        let lonely: Vec<u32> = (0..10).map(|i| u32::from(i == 9)).collect();
        let e = simulate_doublets(&counts, &lonely, 2, 2.0, 1).unwrap_err().to_string();
        assert!(e.contains("batch 2 has one cell"), "{e}");
    }

    #[test]
    fn the_neighbour_score_is_high_among_simulated_doublets() {
        // Observed: 40 singlets near 0 and 10 doublets spread over [5, 5.1),
        // among 50 simulated doublets spread 5 times more densely.
        let mut z = vec![];
        for i in 0..50 {
            z.push(if i < 40 { i as f64 * 1e-3 } else { 5.0 + (i - 40) as f64 * 0.01 + 1e-4 });
        }
        for i in 0..50 {
            z.push(5.0 + (i as f64) * 0.002);
        }
        let s = neighbor_doublet_fraction(&Embedding::row_major(&z, 100, 1), 50, 10, 1).unwrap();
        assert!(s[..40].iter().all(|&v| v == 0.0));
        assert!(s[40..].iter().all(|&v| v > 1.5));
    }

    #[test]
    fn thinning_keeps_half_the_molecules_of_each_gene_and_never_empties_a_row() {
        // Row 0: 10,000 molecules of gene 0 and 2,000 of gene 1; row 1: one molecule.
        let counts = Csr::from_rows(vec![(vec![0, 1], vec![10_000.0, 2_000.0]), (vec![2], vec![1.0])], 3);
        let half = thin_counts(&counts, 0.5, 7).unwrap();
        let (idx, val) = half.row(0);
        assert_eq!(idx, &[0, 1]);
        // Binomial(10^4, 1/2) has sd 50; Binomial(2000, 1/2) sd 22.
        assert!((val[0] - 5_000.0).abs() < 250.0 && (val[1] - 1_000.0).abs() < 110.0, "{val:?}");
        assert!(val.iter().all(|v| v.fract() == 0.0));
        // The one molecule is either kept or, when dropped, the row keeps its original count.
        assert_eq!(half.row(1), (&[2u32][..], &[1.0f32][..]));
        assert_eq!(thin_counts(&counts, 0.5, 7).unwrap().row(0), half.row(0));
        assert_eq!(thin_counts(&counts, 1.0, 7).unwrap().row(0), counts.row(0));
        assert!(thin_counts(&counts, 0.0, 7).is_err());
    }
}
