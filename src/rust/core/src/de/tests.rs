use super::stats::*;
use super::*;

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn quantile_interpolates_like_numpy() {
    let mut v = vec![4.0, 1.0, 3.0, 2.0];
    // numpy.percentile([1, 2, 3, 4], 90) = 3.7; median 2.5.
    assert!(close(quantile(&mut v, 0.9), 3.7, 1e-12));
    assert!(close(quantile(&mut v, 0.5), 2.5, 1e-12));
    assert!(close(quantile(&mut v, 0.0), 1.0, 1e-12));
    assert!(close(quantile(&mut v, 1.0), 4.0, 1e-12));
    assert!(quantile(&mut [], 0.5).is_nan());
}

#[test]
fn fdr_rule_calls_the_largest_set_within_target() {
    // Sorted: .99 .97 .90 .50 .20 → 1 − p: .01 .03 .10 .50 .80;
    // running means .010 .020 .0467 .160 .288: the top 3 at 5%.
    let p = [0.99, 0.5, 0.97, 0.9, 0.2];
    assert_eq!(fdr_calls(&p, 0.05), vec![true, false, true, true, false]);
    // At 1.5% only the first (.010; .020 is over).
    assert_eq!(fdr_calls(&p, 0.015), vec![true, false, false, false, false]);
    // At 20% four genes (.16 ≤ .2 < .288).
    assert_eq!(fdr_calls(&p, 0.2), vec![true, true, true, true, false]);
    // Nothing is certain enough: no calls.
    assert_eq!(fdr_calls(&[0.6, 0.7], 0.05), vec![false, false]);
}

#[test]
fn delta_is_sixty_percent_of_the_extreme_modes() {
    // Three tight clusters at −2, 0 and 3: modes −2, 0, 3 → 0.6 × 2.5 = 1.5.
    let mut x = vec![];
    for i in 0..100 {
        let jitter = (i as f64 / 100.0 - 0.5) * 0.02;
        x.push(-2.0 + jitter);
        x.push(3.0 + jitter);
        for _ in 0..8 {
            x.push(jitter);
        }
    }
    let m = gmm3_means(&x);
    assert!(close(m[0], -2.0, 1e-3) && close(m[1], 0.0, 1e-3) && close(m[2], 3.0, 1e-3), "{m:?}");
    assert!(close(estimate_delta(&x, 0.1), 1.5, 1e-3));
    // No real change: the modes sit near 0 and the floor applies.
    let flat: Vec<f64> = (0..300).map(|i| ((i % 3) as f64 - 1.0) * 0.05).collect();
    assert_eq!(estimate_delta(&flat, 0.1), 0.1);
    assert_eq!(estimate_delta(&flat, 0.25), 0.25);
}

#[test]
fn delta_matches_scikit_learn_on_a_bulk_with_wide_tails() {
    // Mean LFCs shaped like a trained VAE's on the simulator's s1: 86% of
    // genes unchanged (−0.09 ± 0.15), wide down and up tails. Points at the
    // normal quantiles (i + 0.5)/n of each part. scikit-learn 1.x
    // `GaussianMixture(3, random_state=0..3)` on the same points: extreme
    // means −0.889 to −0.894 and 0.721, δ 0.483 to 0.485. (The former
    // quantile start with the overall variance ended at δ = 0.1, the floor.)
    use statrs::distribution::{ContinuousCDF, Normal};
    let part = |n: usize, m: f64, s: f64| {
        let z = Normal::new(0.0, 1.0).unwrap();
        (0..n).map(move |i| m + s * z.inverse_cdf((i as f64 + 0.5) / n as f64))
    };
    let x: Vec<f64> = part(1720, -0.09, 0.15).chain(part(130, -0.68, 0.49)).chain(part(150, 0.53, 0.48)).collect();
    let m = gmm3_means(&x);
    assert!(close(m[0], -0.89, 0.02) && close(m[1], -0.09, 0.01) && close(m[2], 0.72, 0.02), "{m:?}");
    assert!(close(estimate_delta(&x, 0.1), 0.483, 0.01));
}

#[test]
fn pseudocount_is_the_ninetieth_percentile_of_absent_genes_maxima() {
    // Group 1: absent genes' maxima 1..10 (×1e-5) → 0.9-quantile 9.1e-5,
    // over 11 genes (scvi-tools divides by the number of genes); present
    // genes (huge maxima) are ignored. Group 2 has no absent gene.
    let mut max1: Vec<f64> = (1..=10).map(|i| i as f64 * 1e-5).collect();
    let mut low1 = vec![true; 10];
    max1.push(0.5);
    low1.push(false);
    let max2 = vec![0.3; 11];
    let low2 = vec![false; 11];
    assert!(close(pseudocount(&max1, &low1, &max2, &low2), 9.1e-5 / 11.0, 1e-15));
    // The larger of the two groups' values wins; none anywhere gives 1e-10.
    let low2b: Vec<bool> = (0..11).map(|i| i == 0).collect();
    assert!(close(pseudocount(&max1, &low1, &max2, &low2b), 0.3 / 11.0, 1e-12));
    assert_eq!(pseudocount(&max2, &low2, &max2, &low2), 1e-10);
}

#[test]
fn draw_summary_counts_both_tails() {
    let mut v = vec![1.0, 2.0, -1.0, 0.0, 3.0];
    let s = summarize_draws(&mut v, 1.0);
    assert!(close(s.mean, 1.0, 1e-12) && close(s.median, 1.0, 1e-12));
    assert!(close(s.sd, 2f64.sqrt(), 1e-12));
    assert_eq!((s.min, s.max), (-1.0, 3.0));
    // ≥ 1: {1, 2, 3} = 3/5; ≤ −1: {−1} = 1/5.
    assert!(close(s.proba_de, 0.6, 1e-12));
    // 2.5% and 97.5% by interpolation: −1 + 0.1 × 1 and 2 + 0.9 × 1.
    assert!(close(s.lower, -0.9, 1e-12) && close(s.upper, 2.9, 1e-12));
}

#[test]
fn gaussian_summary_uses_the_normal_tails() {
    // N(1, 0.5²), δ = 0.5: P(L ≥ .5) = Φ(1) = .841345, P(L ≤ −.5) = Φ(−3).
    let s = summarize_normal(1.0, 0.5, 0.5);
    assert!(close(s.proba_de, 0.841_344_746, 1e-8));
    assert!(close(s.lower, 1.0 - 1.959_964 * 0.5, 1e-6));
    assert!(close(bayes_factor(s.proba_de), (0.841_344_746f64 / 0.158_655_254).ln(), 1e-6));
    let down = summarize_normal(-2.0, 0.5, 0.5);
    assert!(close(down.proba_de, 0.998_650_102, 1e-8));
}

/// Known expression: every cell of group A has ρ = `a`, of group B ρ = `b`,
/// times log-normal cell noise (in cells' own batch); batch 1 doubles gene
/// 0 relative to batch 0 (then renormalized).
struct Known {
    a: Vec<f32>,
    b: Vec<f32>,
    n_a: usize,
    own_batch: Vec<u32>,
}

impl ScaleModel for Known {
    fn n_genes(&self) -> usize {
        self.a.len()
    }
    fn scales(&self, rows: &[usize], under: Option<u32>, pass: Pass) -> Tensor {
        let g = self.a.len() as i64;
        let mut buf = Vec::with_capacity(rows.len() * self.a.len());
        for &r in rows {
            let mut v = if r < self.n_a { self.a.clone() } else { self.b.clone() };
            if under.unwrap_or(self.own_batch[r]) == 1 {
                v[0] *= 2.0;
            }
            let s: f32 = v.iter().sum();
            buf.extend(v.iter().map(|x| x / s));
        }
        let t = Tensor::from_slice(&buf).view([rows.len() as i64, g]);
        let sd = if pass == Pass::McDropout { 0.05 } else { 0.1 };
        let noise = (t.randn_like() * sd).exp();
        let t = t * noise;
        &t / t.sum_dim_intlist(1, true, Kind::Float)
    }
}

fn known() -> (Known, Csr, Vec<usize>, Vec<usize>) {
    // 20 genes; genes 0–3 up 4× in A, genes 4–5 down 4×, the rest equal.
    let mut a = vec![1.0f32; 20];
    let mut b = vec![1.0f32; 20];
    for j in 0..4 {
        a[j] = 4.0;
    }
    for j in 4..6 {
        b[j] = 4.0;
    }
    let n = 400;
    let own_batch: Vec<u32> = (0..n).map(|i| (i % 2) as u32).collect();
    let counts = Csr::from_rows((0..n).map(|_| ((0..20).collect(), vec![5.0; 20])).collect(), 20);
    let g1: Vec<usize> = (0..n / 2).collect();
    let g2: Vec<usize> = (n / 2..n).collect();
    (Known { a, b, n_a: n / 2, own_batch }, counts, g1, g2)
}

/// ρ of a group in batch `b`, without noise.
fn profile(v: &[f32], b: u32) -> Vec<f64> {
    let mut v: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    if b == 1 {
        v[0] *= 2.0;
    }
    let s: f64 = v.iter().sum();
    v.iter().map(|x| x / s).collect()
}

/// Expected mean LFC over pairs of draws: both batches are equally common
/// in each group, so it is the mean over batches of log2 ρA − log2 ρB.
fn true_lfc(m: &Known) -> Vec<f64> {
    let (a0, a1, b0, b1) = (profile(&m.a, 0), profile(&m.a, 1), profile(&m.b, 0), profile(&m.b, 1));
    (0..a0.len()).map(|j| (a0[j].log2() + a1[j].log2() - b0[j].log2() - b1[j].log2()) / 2.0).collect()
}

/// log2 of the ratio of the groups' mean ρ (what MC dropout estimates).
fn true_lfc_of_means(m: &Known) -> Vec<f64> {
    let (a0, a1, b0, b1) = (profile(&m.a, 0), profile(&m.a, 1), profile(&m.b, 0), profile(&m.b, 1));
    (0..a0.len()).map(|j| ((a0[j] + a1[j]) / (b0[j] + b1[j])).log2()).collect()
}

#[test]
fn change_mode_recovers_known_fold_changes_and_calls() {
    let (m, counts, g1, g2) = known();
    let truth = true_lfc(&m);
    for batches in [vec![], vec![0, 1]] {
        let s = DeSettings { n_samples: 2000, n_pairs: 4000, batches: batches.clone(), seed: 3, ..Default::default() };
        let _torch = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(1);
        let t = differential_expression(&m, Rows::Memory(&counts), &g1, &g2, &s, &Watch::quiet()).unwrap();
        for j in 0..20 {
            // Cell noise is symmetric on the log scale: the mean LFC is the truth.
            assert!(close(t.lfc_mean[j], truth[j], 0.05), "gene {j}: {} vs {}", t.lfc_mean[j], truth[j]);
            assert!(t.lfc_lower[j] < t.lfc_median[j] && t.lfc_median[j] < t.lfc_upper[j]);
        }
        // Modes at −1 (down 4× → log2 −2 + 0.?) and +2: δ well above the floor.
        assert!(t.delta > 0.5, "delta {}", t.delta);
        let called: Vec<usize> = (0..20).filter(|&j| t.is_de[j]).collect();
        if batches.is_empty() {
            // Gene 0 doubles in batch 1: a quarter of the pairs (A in batch
            // 0, B in batch 1) fall below δ, so P(DE) ≈ 0.75, at the edge
            // of the FDR rule: it may or may not be called.
            assert!(called == [1, 2, 3, 4, 5] || called == [0, 1, 2, 3, 4, 5], "{called:?}");
            assert!(t.proba_de[0] > 0.6 && t.proba_de[0] < 0.9, "{}", t.proba_de[0]);
        } else {
            assert_eq!(called, vec![0, 1, 2, 3, 4, 5]);
        }
        assert!(t.bayes_factor[1] > 3.0 && t.bayes_factor[10] < 0.0);
    }
}

#[test]
fn change_mode_is_reproducible_for_a_seed() {
    let (m, counts, g1, g2) = known();
    let s = DeSettings { n_samples: 500, n_pairs: 1000, seed: 9, ..Default::default() };
    let run = || {
        let _torch = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(4);
        differential_expression(&m, Rows::Memory(&counts), &g1, &g2, &s, &Watch::quiet()).unwrap()
    };
    let (x, y) = (run(), run());
    assert_eq!(x.lfc_mean, y.lfc_mean);
    assert_eq!(x.proba_de, y.proba_de);
}

#[test]
fn vanilla_mode_gives_the_probability_of_higher_expression() {
    let (m, counts, g1, g2) = known();
    let s = DeSettings { method: Method::Vanilla, n_samples: 1000, n_pairs: 2000, seed: 1, ..Default::default() };
    let _torch = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(2);
    let t = differential_expression(&m, Rows::Memory(&counts), &g1, &g2, &s, &Watch::quiet()).unwrap();
    assert!(t.proba_up[0] > 0.99 && t.proba_up[4] < 0.01);
    // Equal genes: ρ1 > ρ2 in about half the pairs (both slightly lower in A, whose up genes take mass).
    assert!(t.bayes_factor[0] > 3.0 && t.bayes_factor[4] < -3.0);
}

#[test]
fn mc_dropout_recovers_fold_changes_with_small_uncertainty() {
    let (m, counts, g1, g2) = known();
    let truth = true_lfc_of_means(&m);
    let s = DeSettings { method: Method::McDropout, n_samples: 30, seed: 1, ..Default::default() };
    let _torch = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(5);
    let t = differential_expression(&m, Rows::Memory(&counts), &g1, &g2, &s, &Watch::quiet()).unwrap();
    for j in 0..20 {
        // Means of 200 cells: lfc is log2 of means ratio, close to the truth.
        assert!(close(t.lfc_mean[j], truth[j], 0.05), "gene {j}");
        assert!(t.lfc_sd[j] > 0.0 && t.lfc_sd[j] < 0.05);
        assert!(t.lfc_min[j].is_nan());
    }
    let called: Vec<usize> = (0..20).filter(|&j| t.is_de[j]).collect();
    assert_eq!(called, vec![0, 1, 2, 3, 4, 5]);
}

#[test]
fn empty_groups_are_an_error() {
    let (m, counts, g1, _) = known();
    let e = differential_expression(&m, Rows::Memory(&counts), &g1, &[], &DeSettings::default(), &Watch::quiet())
        .unwrap_err();
    assert!(e.to_string().contains("at least one cell"));
}

#[test]
fn low_count_genes_use_the_group_mean() {
    // 2 cells: gene 0 has 1 count in total (mean 0.5), gene 1 none.
    let c = Csr::from_rows(vec![(vec![0], vec![1.0]), (vec![], vec![])], 2);
    assert_eq!(low_count_genes(Rows::Memory(&c), &[0, 1], 0.01), vec![false, true]);
    assert_eq!(low_count_genes(Rows::Memory(&c), &[0, 1], 0.6), vec![true, true]);
}
