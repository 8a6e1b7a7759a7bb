use super::*;
use crate::models::TORCH;
use crate::simulate::tests::pearson;
use crate::simulate::{contaminate, simulate, AmbientParams, SimParams};

/// Sum over cells and genes of |estimate − clean|, over the clean total.
fn error(est: &Csr, clean: &Csr) -> f64 {
    let (mut diff, mut total) = (0.0f64, 0.0f64);
    for i in 0..clean.n_rows {
        let mut a = vec![0f32; clean.n_cols];
        let (ie, ve) = est.row(i);
        ie.iter().zip(ve).for_each(|(&j, &v)| a[j as usize] += v);
        let (ic, vc) = clean.row(i);
        ic.iter().zip(vc).for_each(|(&j, &v)| a[j as usize] -= v);
        diff += a.iter().map(|v| v.abs() as f64).sum::<f64>();
        total += vc.iter().map(|&v| v as f64).sum::<f64>();
    }
    diff / total
}

#[test]
fn removal_brings_counts_closer_to_the_clean_ones_and_finds_each_cells_contamination() {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let p = SimParams {
        n_cells: 1500,
        n_genes: 300,
        group_prob: vec![0.5, 0.3, 0.2],
        batch_prob: vec![1.0],
        seed: 2,
        ..Default::default()
    };
    let sim = simulate(&p).unwrap();
    let clean = &sim.counts.csr;
    let c = contaminate(clean, &AmbientParams { mean_fraction: 0.15, n_empty: 2000, seed: 3 }).unwrap();
    // The prior from the empty droplets' sizes; the profile from their counts.
    let sizes: Vec<f64> = c.empty.row_sums().iter().filter(|&&s| s > 0.0).map(|s| s.ln()).collect();
    let m = sizes.iter().sum::<f64>() / sizes.len() as f64;
    let sd = (sizes.iter().map(|v| (v - m).powi(2)).sum::<f64>() / sizes.len() as f64).sqrt();
    let mut profile = vec![0.0f64; clean.n_cols];
    for (&j, &v) in c.empty.indices.iter().zip(&c.empty.values) {
        profile[j as usize] += v as f64;
    }
    let cfg = AmbientConfig { prior_log_mean: m, prior_log_sd: sd, ..Default::default() };
    let tc = TrainConfig { max_epochs: 200, ..Default::default() };
    let genes: Vec<String> = (0..clean.n_cols).map(|g| format!("g{g}")).collect();
    let model = AmbientModel::fit(&c.observed, genes, None, &profile, cfg, tc, &|| false, &|_| {}).unwrap();
    let d = model.decontaminate(&c.observed, None).unwrap();
    let (before, after) = (error(&c.observed, clean), error(&d.counts, clean));
    eprintln!("error of the counts: {before:.4} observed, {after:.4} decontaminated");
    assert!(after < 0.6 * before, "error of the counts: {before:.4} observed, {after:.4} decontaminated");
    assert!(d.counts.values.iter().all(|&v| v >= 1.0 && v == v.round()));
    let share: Vec<f64> = d.ambient_share.iter().map(|&v| v as f64).collect();
    let r = pearson(&share, &c.fraction);
    // Per cell the ambient share is weakly identified (the prior carries
    // it, as in CellBender); its mean is well identified.
    assert!(r > 0.25, "correlation of the estimated and true contamination {r:.3}");
    let mean_est = share.iter().sum::<f64>() / share.len() as f64;
    let mean_true = c.fraction.iter().sum::<f64>() / c.fraction.len() as f64;
    assert!((mean_est - mean_true).abs() < 0.05, "mean contamination {mean_est:.3} vs {mean_true:.3}");
    // Round trip; other genes are refused.
    let back = AmbientModel::from_bytes(&model.to_bytes().unwrap()).unwrap();
    assert_eq!(back.decontaminate(&c.observed, None).unwrap().counts.values, d.counts.values);
    let fewer = c.observed.select_columns(&(0..100).collect::<Vec<_>>());
    assert!(model.decontaminate(&fewer, None).unwrap_err().to_string().contains("100 genes where the model has 300"));
}
