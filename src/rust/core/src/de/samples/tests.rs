use super::*;
use crate::data::{Csr, Rows};
use crate::de::{differential_expression, Method, Watch};
use crate::nn::Pass;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{ChiSquared, Distribution, Normal};

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn trigamma_and_its_inverse_match_known_values() {
    let pi2 = std::f64::consts::PI.powi(2);
    assert!(close(trigamma(1.0), pi2 / 6.0, 1e-10));
    assert!(close(trigamma(0.5), pi2 / 2.0, 1e-10));
    assert!(close(trigamma(10.0), 0.105_166_335_681_685_2, 1e-10));
    for x in [0.05, 0.7, 3.0, 40.0, 2_000.0] {
        assert!(close(trigamma_inverse(trigamma(x)) / x, 1.0, 1e-6), "{x}");
    }
}

#[test]
fn least_squares_gives_the_difference_of_group_means() {
    // Intercept + group over 5 samples (3 in the group): β_group is the
    // difference of the means and (XᵀX)⁻¹ of it is 1/3 + 1/2.
    let x = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0];
    let (rows, kk) = least_squares(&x, 5, 2).unwrap();
    let y = [3.0, 5.0, 4.0, 1.0, 2.0];
    let b: f64 = rows[1].iter().zip(&y).map(|(a, v)| a * v).sum();
    assert!(close(b, 4.0 - 1.5, 1e-12));
    assert!(close(kk, 1.0 / 3.0 + 0.5, 1e-12));
    // A column equal to the intercept: not of full rank.
    assert!(least_squares(&[1.0; 10], 5, 2).is_none());
}

#[test]
fn benjamini_hochberg_matches_r() {
    // p.adjust(c(0.01, 0.04, 0.03, 0.2, NA), "BH") over the 4 finite values:
    // 0.04, 0.0533.., 0.0533.., 0.2.
    let q = bh_adjust(&[0.01, 0.04, 0.03, 0.2, f64::NAN]);
    assert!(close(q[0], 0.04, 1e-12) && close(q[1], 0.16 / 3.0, 1e-12) && close(q[2], 0.16 / 3.0, 1e-12));
    assert!(close(q[3], 0.2, 1e-12) && q[4].is_nan());
}

#[test]
fn the_variance_prior_is_recovered_from_simulated_variances() {
    // σ²_g ~ s0² d0 / χ²(d0), s²_g ~ σ²_g χ²(d) / d: the moment fit finds
    // d0 and s0² (limma's fitFDist on the same draws: d0 within ~15%).
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (d0, s0, d) = (8.0, 0.25, 4.0);
    let (prior, noise) = (ChiSquared::new(d0).unwrap(), ChiSquared::new(d).unwrap());
    let s2: Vec<f64> = (0..20_000).map(|_| s0 * d0 / prior.sample(&mut rng) * noise.sample(&mut rng) / d).collect();
    let (fd0, fs0) = fit_prior(&s2, d);
    assert!(close(fd0 / d0, 1.0, 0.15), "d0 {fd0}");
    assert!(close(fs0 / s0, 1.0, 0.05), "s0² {fs0}");
    // Variances that are pure χ² noise around one value: d0 = ∞.
    let flat: Vec<f64> = (0..20_000).map(|_| s0 * noise.sample(&mut rng) / d).collect();
    let (fd0, fs0) = fit_prior(&flat, d);
    assert!(fd0 > 200.0, "d0 {fd0}");
    assert!(close(fs0 / s0, 1.0, 0.05), "s0² {fs0}");
}

/// Every cell's ρ is its sample's profile: base × a per-sample biological
/// deviation (log-normal, sd `bio` in natural log) × the group effect (genes
/// `0..n_de` up 2.8× in group 1), × 3 on genes 100..200 in batch 1, with a
/// little noise per draw. Counts are Poisson draws of 2,000 × the profile
/// under the cell's own batch.
struct Replicates {
    profiles: Vec<Vec<f32>>,
    sample_of_cell: Vec<usize>,
    batch_of_sample: Vec<u32>,
}

fn under_batch(v: &[f32], b: u32) -> Vec<f32> {
    let mut v = v.to_vec();
    if b == 1 {
        for x in &mut v[100..200] {
            *x *= 3.0;
        }
    }
    let total: f32 = v.iter().sum();
    v.iter().map(|x| x / total).collect()
}

impl ScaleModel for Replicates {
    fn n_genes(&self) -> usize {
        self.profiles[0].len()
    }
    fn scales(&self, rows: &[usize], under: Option<u32>, _pass: Pass) -> Tensor {
        let g = self.n_genes() as i64;
        let buf: Vec<f32> = rows
            .iter()
            .flat_map(|&r| {
                let s = self.sample_of_cell[r];
                under_batch(&self.profiles[s], under.unwrap_or(self.batch_of_sample[s]))
            })
            .collect();
        let t = Tensor::from_slice(&buf).view([rows.len() as i64, g]);
        let t = &t * (t.randn_like() * 0.02).exp();
        &t / t.sum_dim_intlist(1, true, tch::Kind::Float)
    }
}

/// `batch_error`: the sd (natural log) of a per-gene error of batch 1's
/// effect in the data that the model does not know: its correction then
/// leaves that error in every batch-1 sample.
fn replicates(
    n_per_group: usize,
    bio: f64,
    batch_error: f64,
    seed: u64,
) -> (Replicates, Csr, Vec<usize>, Vec<usize>, Vec<u32>, usize) {
    let (genes, n_de, cells_per_sample) = (1000, 50, 40);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let error: Vec<f64> =
        (0..genes).map(|_| (Normal::new(0.0, batch_error.max(1e-12)).unwrap().sample(&mut rng)).exp()).collect();
    let base: Vec<f64> = (0..genes).map(|j| 1.0 + (j % 7) as f64).collect();
    let dev = Normal::new(0.0, bio).unwrap();
    let n_samples = 2 * n_per_group;
    let profiles: Vec<Vec<f32>> = (0..n_samples)
        .map(|s| {
            let v: Vec<f64> = (0..genes)
                .map(|j| {
                    let up = if s < n_per_group && j < n_de { 2.8 } else { 1.0 };
                    base[j] * up * dev.sample(&mut rng).exp()
                })
                .collect();
            let total: f64 = v.iter().sum();
            v.iter().map(|x| (x / total) as f32).collect()
        })
        .collect();
    // Batch 1 holds group 1's samples: the batch is confounded with the
    // groups, which only a model that knows the batch effect can undo.
    let batch_of_sample: Vec<u32> = (0..n_samples).map(|s| (s < n_per_group) as u32).collect();
    let sample_of_cell: Vec<usize> = (0..n_samples * cells_per_sample).map(|c| c / cells_per_sample).collect();
    let rows = sample_of_cell
        .iter()
        .map(|&s| {
            let mut p = under_batch(&profiles[s], batch_of_sample[s]);
            if batch_of_sample[s] == 1 {
                for (v, e) in p.iter_mut().zip(&error) {
                    *v *= *e as f32;
                }
            }
            let (mut idx, mut val) = (vec![], vec![]);
            for (j, &share) in p.iter().enumerate() {
                let c = rand_distr::Poisson::new(2000.0 * share as f64).unwrap().sample(&mut rng);
                if c > 0.0 {
                    idx.push(j as u32);
                    val.push(c as f32);
                }
            }
            (idx, val)
        })
        .collect();
    let counts = Csr::from_rows(rows, genes);
    let n = sample_of_cell.len();
    let g1: Vec<usize> = (0..n / 2).collect();
    let g2: Vec<usize> = (n / 2..n).collect();
    let codes: Vec<u32> = g1.iter().chain(&g2).map(|&c| sample_of_cell[c] as u32).collect();
    (Replicates { profiles, sample_of_cell, batch_of_sample }, counts, g1, g2, codes, n_de)
}

#[test]
fn samples_mode_is_calibrated_under_replicate_variation() {
    // 4 against 4 samples, biological sd 0.3 between samples: the unchanged
    // genes' p-values are uniform (5% below 0.05, within noise), the
    // calls (BH at δ = 0) keep the target, and the true changes are found.
    let (m, counts, g1, g2, codes, n_de) = replicates(4, 0.3, 0.0, 7);
    let s = DeSettings {
        method: Method::Samples,
        n_samples: 10,
        sample_of: codes,
        batches: vec![0, 1],
        seed: 1,
        ..Default::default()
    };
    // torch's random stream is global: hold it while this test draws.
    let _torch = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
    crate::device::seed_torch(1);
    let t = differential_expression(&m, Rows::Memory(&counts), &g1, &g2, &s, &Watch::quiet()).unwrap();
    let null_p: Vec<f64> = t.pvalue[n_de..].to_vec();
    let below = null_p.iter().filter(|&&p| p < 0.05).count() as f64 / null_p.len() as f64;
    assert!((0.02..=0.09).contains(&below), "null p < 0.05: {below}");
    let calls = t.is_de.iter().filter(|&&c| c).count();
    let false_calls = t.is_de[n_de..].iter().filter(|&&c| c).count();
    let found = t.is_de[..n_de].iter().filter(|&&c| c).count();
    assert!(found >= 40, "found {found} of {n_de}");
    assert!((false_calls as f64) <= 0.1 * calls as f64 + 1.0, "{false_calls} false of {calls}");
    // The fold changes: log2 2.8 on the changed genes (the renormalisation
    // shifts every gene by the same small amount).
    // The fold changes: the posterior means of the changed genes are all up
    // and shrunk toward 0 from the truth (log2 2.8 less the renormalisation
    // shift of ~0.12), not beyond it; the unchanged genes' sit near 0.
    let truth = 2.8f64.log2() - 0.12;
    let de_mean = t.lfc_mean[..n_de].iter().sum::<f64>() / n_de as f64;
    assert!(t.lfc_mean[..n_de].iter().all(|&v| v > 0.0));
    assert!(de_mean > 0.7 * truth && de_mean < truth + 0.05, "{de_mean}");
    let null_abs = t.lfc_mean[n_de..].iter().map(|v| v.abs()).sum::<f64>() / (1000 - n_de) as f64;
    assert!(null_abs < 0.1, "{null_abs}");
    assert!(t.null_weight > 0.7 && t.null_weight < 1.0, "{}", t.null_weight);
    assert_eq!(t.residual_df, 6.0);
    // Without the model's batch correction, genes 100..200 (tripled in
    // batch 1, which holds group 1) are called; with it, hardly any.
    let batch_calls = |t: &DeTable| t.is_de[100..200].iter().filter(|&&c| c).count();
    let raw = differential_expression(
        &m,
        Rows::Memory(&counts),
        &g1,
        &g2,
        &DeSettings { batches: vec![], ..s.clone() },
        &Watch::quiet(),
    )
    .unwrap();
    assert!(batch_calls(&raw) >= 10 * batch_calls(&t).max(1), "{} vs {}", batch_calls(&raw), batch_calls(&t));
    // The same seed, the same table.
    crate::device::seed_torch(1);
    let again = differential_expression(&m, Rows::Memory(&counts), &g1, &g2, &s, &Watch::quiet()).unwrap();
    assert_eq!(again.lfc_mean, t.lfc_mean);
    assert_eq!(again.is_de, t.is_de);
}

#[test]
fn the_empirical_null_absorbs_the_errors_of_the_batch_correction() {
    // Batch 1 (group 1's samples) has a per-gene effect the model does not
    // know (sd 0.15): its correction leaves it in group 1, where a t-test
    // over samples cannot tell it from a change. With the statistics
    // widened by their central spread, the unchanged genes' p-values are
    // near uniform again and the calls keep the target; without, they do
    // not.
    let (m, counts, g1, g2, codes, n_de) = replicates(4, 0.2, 0.15, 11);
    let s = DeSettings {
        method: Method::Samples,
        n_samples: 4,
        sample_of: codes,
        batches: vec![0, 1],
        batch_df: 1,
        seed: 1,
        ..Default::default()
    };
    let _torch = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let run = |s: &DeSettings| {
        crate::device::seed_torch(1);
        differential_expression(&m, Rows::Memory(&counts), &g1, &g2, s, &Watch::quiet()).unwrap()
    };
    let below = |t: &DeTable| t.pvalue[n_de..].iter().filter(|&&p| p < 0.05).count() as f64 / (1000 - n_de) as f64;
    let false_calls = |t: &DeTable| t.is_de[n_de..].iter().filter(|&&c| c).count();
    let calls = |t: &DeTable| t.is_de.iter().filter(|&&c| c).count();
    let t = run(&s);
    assert_eq!(t.null_sd.len(), 2);
    assert!(t.null_sd.iter().all(|&v| v > 1.1), "{:?}", t.null_sd);
    assert!(below(&t) <= 0.09, "null p < 0.05: {}", below(&t));
    assert!((false_calls(&t) as f64) <= 0.1 * calls(&t) as f64 + 1.0, "{} false of {}", false_calls(&t), calls(&t));
    let found = t.is_de[..n_de].iter().filter(|&&c| c).count();
    assert!(found >= 30, "found {found}");
    // The same data without the widening: the errors pass as changes.
    let plain = run(&DeSettings { empirical_null: false, ..s.clone() });
    assert!(plain.null_sd.is_empty());
    assert!(below(&plain) > 0.1 && below(&plain) > 1.5 * below(&t), "{} vs {}", below(&plain), below(&t));
    assert!(false_calls(&plain) > false_calls(&t) + 4, "{} vs {}", false_calls(&plain), false_calls(&t));
}

#[test]
fn central_matching_recovers_the_null_spread() {
    // z-scores of unchanged genes N(0, σ²) and 10% changed ones at ±(4 ±
    // 1.5): the fit on the centre finds σ within 5%.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for sd in [1.0, 1.3] {
        let null = Normal::new(0.0, sd).unwrap();
        let alt = Normal::new(4.0, 1.5).unwrap();
        let z: Vec<f64> = (0..3000)
            .map(|i| {
                if i % 10 == 0 {
                    alt.sample(&mut rng) * if i % 20 == 0 { 1.0 } else { -1.0 }
                } else {
                    null.sample(&mut rng)
                }
            })
            .collect();
        let fit = central_sd(&z);
        assert!(close(fit / sd, 1.0, 0.05), "σ {sd}: {fit}");
    }
    assert!(central_sd(&[1.0; 10]).is_nan());
    // Spread growing with level: three bands, interpolated, never below 1.
    let level: Vec<f64> = (0..3000).map(|i| i as f64).collect();
    let z: Vec<f64> =
        (0..3000).map(|i| Normal::new(0.0, [0.8, 1.2, 1.5][i / 1000]).unwrap().sample(&mut rng)).collect();
    let (per_gene, bands) = empirical_null(&z, &level);
    assert_eq!(bands.len(), 3);
    for (b, want) in bands.iter().zip([0.8, 1.2, 1.5]) {
        assert!(close(*b / want, 1.0, 0.12), "{bands:?}");
    }
    assert!(per_gene.iter().all(|&v| v >= 1.0));
    assert_eq!(per_gene[0], 1.0);
    assert!(close(per_gene[1500], bands[1], 1e-9) || close(per_gene[1499], bands[1], 0.01));
    assert!(close(per_gene[2999], bands[2], 1e-12));
}

#[test]
fn the_shrinkage_posterior_keeps_its_point_mass_at_zero() {
    // Mostly nulls (β̂ ~ N(0, 1)) and a few large effects: the prior's null
    // weight is high; a null-looking gene's posterior sits mostly on 0, so
    // P(LFC > 0) and P(LFC < 0) are both small even at δ = 0, and a clear
    // effect's is near 1 with its mean shrunk a little toward 0.
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let z = Normal::new(0.0, 1.0).unwrap();
    let mut beta: Vec<f64> = (0..2000).map(|_| z.sample(&mut rng)).collect();
    for b in beta.iter_mut().take(100) {
        *b += 6.0;
    }
    let se = vec![1.0; beta.len()];
    let prior = AshPrior::fit(&beta, &se);
    assert!(prior.weights[0] > 0.85, "{:?}", prior.weights);
    let null = prior.posterior(0.3, 1.0);
    assert!(null.tail_above(0.0) < 0.2 && null.tail_below(0.0) < 0.2);
    assert!((null.tail_above(0.0) + null.tail_below(0.0)) < 0.3);
    assert_eq!(null.quantile(0.5), 0.0);
    let clear = prior.posterior(7.0, 1.0);
    assert!(clear.tail_above(1.0) > 0.99);
    assert!(clear.mean() < 7.0 && clear.mean() > 5.5, "{}", clear.mean());
    assert!(clear.quantile(0.025) < clear.mean() && clear.quantile(0.975) > clear.mean());
}

#[test]
fn samples_mode_errors_name_the_problem() {
    let (m, counts, g1, g2, codes, _) = replicates(2, 0.3, 0.0, 1);
    let base = DeSettings { method: Method::Samples, n_samples: 2, ..Default::default() };
    // A sample with cells in both groups.
    let mut mixed = codes.clone();
    mixed[0] = *codes.last().unwrap();
    let e = differential_expression(
        &m,
        Rows::Memory(&counts),
        &g1,
        &g2,
        &DeSettings { sample_of: mixed, ..base.clone() },
        &Watch::quiet(),
    );
    assert!(e.unwrap_err().to_string().contains("cells in both groups"));
    // One sample in group 1.
    let one: Vec<u32> = codes.iter().map(|&c| if c == 1 { 0 } else { c }).collect();
    let one: Vec<u32> = one.iter().map(|&c| if c == 0 { 0 } else { c - 1 }).collect();
    let e = differential_expression(
        &m,
        Rows::Memory(&counts),
        &g1,
        &g2,
        &DeSettings { sample_of: one, ..base.clone() },
        &Watch::quiet(),
    );
    assert!(e.unwrap_err().to_string().contains("at least 2 samples per group"), "one sample");
    // A design with as many columns as samples.
    let e = differential_expression(
        &m,
        Rows::Memory(&counts),
        &g1,
        &g2,
        &DeSettings { sample_of: codes, design: vec![1.0; 16], design_columns: 4, ..base },
        &Watch::quiet(),
    );
    assert!(e.unwrap_err().to_string().contains("more samples than design columns"));
}
