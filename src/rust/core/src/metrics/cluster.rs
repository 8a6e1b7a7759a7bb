//! Silhouette widths, k-means, and partition agreement (NMI, ARI).

use super::knn::{sq_dists, Embedding};
use faer::Mat;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Silhouette width of every cell for the partition `labels` (Rousseeuw 1987,
/// as scikit-learn: s = (b − a) / max(a, b), 0 for cells alone in their label).
/// Distances come from one dense product per block of cells, as
/// scikit-learn's `pairwise_distances`.
pub fn silhouette_samples(x: &Embedding, labels: &[u32]) -> Vec<f64> {
    let n_labels = labels.iter().max().map_or(0, |&m| m as usize + 1);
    let mut sizes = vec![0usize; n_labels];
    for &l in labels {
        sizes[l as usize] += 1;
    }
    let all = Mat::<f64>::from_fn(x.n, x.d, |i, j| x.values[i * x.d + j]);
    let norms = x.sq_norms();
    let starts: Vec<usize> = (0..x.n).step_by(256).collect();
    starts
        .par_iter()
        .flat_map_iter(|&start| {
            let end = (start + 256).min(x.n);
            let d2 = sq_dists(all.as_ref(), &norms, all.subrows(start, end - start), &norms[start..end]);
            (start..end)
                .map(|i| {
                    let own = labels[i] as usize;
                    if sizes[own] <= 1 {
                        return 0.0;
                    }
                    let mut sums = vec![0.0; n_labels];
                    for (j, &v) in d2.col_as_slice(i - start).iter().enumerate() {
                        if j != i {
                            sums[labels[j] as usize] += v.sqrt();
                        }
                    }
                    let a = sums[own] / (sizes[own] - 1) as f64;
                    let b = (0..n_labels)
                        .filter(|&l| l != own && sizes[l] > 0)
                        .map(|l| sums[l] / sizes[l] as f64)
                        .fold(f64::INFINITY, f64::min);
                    if !b.is_finite() {
                        return 0.0;
                    }
                    let m = a.max(b);
                    if m > 0.0 {
                        (b - a) / m
                    } else {
                        0.0
                    }
                })
                .collect::<Vec<f64>>()
        })
        .collect()
}

/// k-means (Lloyd) from k-means++ seeds; the best of `n_init` runs by inertia.
/// A run stops when no cell changes cluster or, as scikit-learn's, when the
/// centres move by at most 1e-4 × the mean per-dimension variance (summed
/// squared shift); without the latter, a few cells flipping back and forth
/// keep large data sets iterating to `max_iter`.
pub fn kmeans(x: &Embedding, k: usize, n_init: usize, max_iter: usize, seed: u64) -> Vec<u32> {
    let tol = 1e-4 * mean_variance(x);
    let mut best: Option<(f64, Vec<u32>)> = None;
    for run in 0..n_init.max(1) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(run as u64);
        let mut centers = plus_plus(x, k, &mut rng);
        let mut assign = vec![0u32; x.n];
        for _ in 0..max_iter {
            let next: Vec<u32> = (0..x.n).into_par_iter().map(|i| nearest(x.row(i), &centers, x.d).0).collect();
            let changed = next != assign;
            assign = next;
            let moved = means(x, &assign, k, &centers);
            let shift: f64 = moved.iter().zip(&centers).map(|(a, b)| (a - b) * (a - b)).sum();
            centers = moved;
            if !changed || shift <= tol {
                break;
            }
        }
        let inertia: f64 = (0..x.n).map(|i| nearest(x.row(i), &centers, x.d).1).sum();
        if best.as_ref().is_none_or(|b| inertia < b.0) {
            best = Some((inertia, assign));
        }
    }
    best.map(|b| b.1).unwrap_or_default()
}

/// Mean over dimensions of the (population) variance of the cells.
fn mean_variance(x: &Embedding) -> f64 {
    let n = x.n.max(1) as f64;
    (0..x.d)
        .map(|j| {
            let mean = (0..x.n).map(|i| x.values[i * x.d + j]).sum::<f64>() / n;
            (0..x.n).map(|i| (x.values[i * x.d + j] - mean).powi(2)).sum::<f64>() / n
        })
        .sum::<f64>()
        / x.d.max(1) as f64
}

fn nearest(p: &[f64], centers: &[f64], d: usize) -> (u32, f64) {
    let mut best = (0u32, f64::INFINITY);
    for (c, center) in centers.chunks(d).enumerate() {
        let d2: f64 = p.iter().zip(center).map(|(a, b)| (a - b) * (a - b)).sum();
        if d2 < best.1 {
            best = (c as u32, d2);
        }
    }
    best
}

fn plus_plus(x: &Embedding, k: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let mut centers: Vec<f64> = x.row(rng.random_range(0..x.n)).to_vec();
    let mut d2: Vec<f64> = (0..x.n).map(|i| nearest(x.row(i), &centers, x.d).1).collect();
    while centers.len() < k * x.d {
        let total: f64 = d2.iter().sum();
        let pick = if total > 0.0 {
            let mut u = rng.random::<f64>() * total;
            d2.iter()
                .position(|&w| {
                    u -= w;
                    u <= 0.0
                })
                .unwrap_or(x.n - 1)
        } else {
            rng.random_range(0..x.n)
        };
        centers.extend_from_slice(x.row(pick));
        let new = &centers[centers.len() - x.d..];
        for (i, v) in d2.iter_mut().enumerate() {
            *v = v.min(x.row(i).iter().zip(new).map(|(a, b)| (a - b) * (a - b)).sum());
        }
    }
    centers
}

fn means(x: &Embedding, assign: &[u32], k: usize, old: &[f64]) -> Vec<f64> {
    let mut sums = vec![0.0; k * x.d];
    let mut counts = vec![0usize; k];
    for (i, &c) in assign.iter().enumerate() {
        counts[c as usize] += 1;
        for (s, v) in sums[c as usize * x.d..(c as usize + 1) * x.d].iter_mut().zip(x.row(i)) {
            *s += v;
        }
    }
    for c in 0..k {
        for j in 0..x.d {
            let idx = c * x.d + j;
            sums[idx] = if counts[c] > 0 { sums[idx] / counts[c] as f64 } else { old[idx] };
        }
    }
    sums
}

fn contingency(a: &[u32], b: &[u32]) -> (Vec<Vec<f64>>, Vec<f64>, Vec<f64>) {
    let na = a.iter().max().map_or(0, |&m| m as usize + 1);
    let nb = b.iter().max().map_or(0, |&m| m as usize + 1);
    let mut t = vec![vec![0.0; nb]; na];
    for (&x, &y) in a.iter().zip(b) {
        t[x as usize][y as usize] += 1.0;
    }
    let ra = t.iter().map(|r| r.iter().sum()).collect();
    let rb = (0..nb).map(|j| t.iter().map(|r| r[j]).sum()).collect();
    (t, ra, rb)
}

/// Normalized mutual information with the arithmetic-mean normalization
/// (scikit-learn's default): I(a; b) / ((H(a) + H(b)) / 2).
pub fn nmi(a: &[u32], b: &[u32]) -> f64 {
    let n = a.len() as f64;
    let (t, ra, rb) = contingency(a, b);
    let h = |v: &[f64]| -v.iter().filter(|&&c| c > 0.0).map(|&c| c / n * (c / n).ln()).sum::<f64>();
    let (ha, hb) = (h(&ra), h(&rb));
    let mut mi = 0.0;
    for (i, row) in t.iter().enumerate() {
        for (j, &c) in row.iter().enumerate() {
            if c > 0.0 {
                mi += c / n * (c * n / (ra[i] * rb[j])).ln();
            }
        }
    }
    let denom = (ha + hb) / 2.0;
    if denom <= 0.0 {
        1.0
    } else {
        (mi / denom).clamp(0.0, 1.0)
    }
}

/// Adjusted Rand index (Hubert & Arabie 1985).
pub fn ari(a: &[u32], b: &[u32]) -> f64 {
    let comb2 = |x: f64| x * (x - 1.0) / 2.0;
    let (t, ra, rb) = contingency(a, b);
    let index: f64 = t.iter().flatten().map(|&c| comb2(c)).sum();
    let (sa, sb): (f64, f64) = (ra.iter().map(|&c| comb2(c)).sum(), rb.iter().map(|&c| comb2(c)).sum());
    let expected = sa * sb / comb2(a.len() as f64);
    let max = (sa + sb) / 2.0;
    if max == expected {
        1.0
    } else {
        (index - expected) / (max - expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_scores_by_hand() {
        let a = [0, 0, 1, 1];
        assert!((nmi(&a, &[1, 1, 0, 0]) - 1.0).abs() < 1e-12);
        assert!((ari(&a, &[1, 1, 0, 0]) - 1.0).abs() < 1e-12);
        // a = {0,0,1,1}, b = {0,1,0,1}: independent → MI 0, ARI = -0.5
        assert!(nmi(&a, &[0, 1, 0, 1]).abs() < 1e-12);
        assert!((ari(&a, &[0, 1, 0, 1]) + 0.5).abs() < 1e-12);
    }

    #[test]
    fn silhouette_by_hand_and_kmeans_on_two_blobs() {
        // 1-d points 0, 1 (label 0) and 10, 12 (label 1)
        let v = [0.0, 1.0, 10.0, 12.0];
        let e = Embedding::row_major(&v, 4, 1);
        let s = silhouette_samples(&e, &[0, 0, 1, 1]);
        // cell 0: a = 1, b = mean(10, 12) = 11 → 10/11
        assert!((s[0] - 10.0 / 11.0).abs() < 1e-12);
        // cell 3: a = 2, b = mean(12, 11) = 11.5 → 9.5/11.5
        assert!((s[3] - 9.5 / 11.5).abs() < 1e-12);
        let k = kmeans(&e, 2, 3, 50, 1);
        assert_eq!(k[0], k[1]);
        assert_eq!(k[2], k[3]);
        assert_ne!(k[0], k[2]);
    }
}
