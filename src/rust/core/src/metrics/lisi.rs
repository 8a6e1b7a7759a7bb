//! Local inverse Simpson's index (Korsunsky et al. 2019), computed as
//! scib-metrics does: a Gaussian kernel exp(−β·d) on the Euclidean distances
//! to the k nearest neighbours, β found by bisection so that the kernel's
//! entropy equals ln(perplexity); LISI = 1 / Σ_label (Σ_{neighbours with that
//! label} P)².

use super::knn::Knn;
use rayon::prelude::*;

const TOL: f64 = 1e-5;
const MAX_TRIES: usize = 50;

/// LISI of every cell for `labels` (codes), with the given perplexity.
pub fn lisi(g: &Knn, labels: &[u32], perplexity: f64) -> Vec<f64> {
    let n_labels = labels.iter().max().map_or(0, |&m| m as usize + 1);
    (0..g.n)
        .into_par_iter()
        .map(|i| {
            let p = neighbour_probabilities(g.dists(i), perplexity);
            let mut per_label = vec![0.0; n_labels];
            for (&j, &pj) in g.neighbors(i).iter().zip(&p) {
                per_label[labels[j as usize] as usize] += pj;
            }
            let simpson: f64 = per_label.iter().map(|v| v * v).sum();
            if simpson > 0.0 {
                1.0 / simpson
            } else {
                f64::NAN
            }
        })
        .collect()
}

/// Entropy and normalized kernel for a given β.
fn h_beta(d: &[f64], beta: f64) -> (f64, Vec<f64>) {
    let p: Vec<f64> = d.iter().map(|&x| (-x * beta).exp()).collect();
    let sum: f64 = p.iter().sum();
    if sum == 0.0 {
        return (0.0, vec![0.0; d.len()]);
    }
    let h = sum.ln() + beta * d.iter().zip(&p).map(|(x, q)| x * q).sum::<f64>() / sum;
    (h, p.into_iter().map(|q| q / sum).collect())
}

fn neighbour_probabilities(d: &[f64], perplexity: f64) -> Vec<f64> {
    let target = perplexity.ln();
    let (mut beta, mut lo, mut hi) = (1.0f64, f64::NEG_INFINITY, f64::INFINITY);
    let (mut h, mut p) = h_beta(d, beta);
    let mut tries = 0;
    while (h - target).abs() >= TOL && tries < MAX_TRIES {
        if h - target > 0.0 {
            lo = beta;
            beta = if hi.is_infinite() { beta * 2.0 } else { (beta + hi) / 2.0 };
        } else {
            hi = beta;
            beta = if lo.is_infinite() { beta / 2.0 } else { (beta + lo) / 2.0 };
        }
        (h, p) = h_beta(d, beta);
        tries += 1;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::knn::{knn, Embedding};
    use crate::numeric::nan_median;

    #[test]
    fn perfectly_mixed_and_perfectly_separated_neighbourhoods() {
        // Two labels alternating along a line: neighbours are half/half, the
        // nearest ones of the other label, so LISI is close to (not at) 2.
        let v: Vec<f64> = (0..200).map(|i| i as f64).collect();
        let g = knn(&Embedding::row_major(&v, 200, 1), 30).unwrap();
        let alternating: Vec<u32> = (0..200).map(|i| i % 2).collect();
        let mixed = nan_median(&lisi(&g, &alternating, 10.0));
        assert!(mixed > 1.8 && mixed <= 2.0, "{mixed}");
        // Two labels in two far blocks: neighbours share the label.
        let blocks: Vec<u32> = (0..200).map(|i| (i >= 100) as u32).collect();
        let separated = nan_median(&lisi(&g, &blocks, 10.0));
        assert!((separated - 1.0).abs() < 1e-6, "{separated}");
    }

    #[test]
    fn bisection_reaches_the_perplexity() {
        let d: Vec<f64> = (1..=60).map(|i| i as f64 * 0.1).collect();
        let p = neighbour_probabilities(&d, 20.0);
        let h: f64 = -p.iter().filter(|&&q| q > 0.0).map(|q| q * q.ln()).sum::<f64>();
        assert!((h - 20f64.ln()).abs() < 1e-4, "{h}");
    }
}
