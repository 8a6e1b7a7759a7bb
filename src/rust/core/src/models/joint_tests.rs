use super::*;
use crate::data::Covariates;
use crate::metrics::ari;
use crate::models::clusters::ClusterConfig;
use crate::models::vae::VaeConfig;
use crate::models::TORCH;
use crate::simulate::{simulate, SimParams, Simulation};
use tch::Device;

fn sim() -> Simulation {
    let p = SimParams {
        n_cells: 600,
        n_genes: 200,
        group_prob: vec![0.4, 0.35, 0.25],
        batch_prob: vec![0.5, 0.5],
        seed: 11,
        ..Default::default()
    };
    simulate(&p).unwrap()
}

fn cells_of(s: &Simulation) -> Cells {
    let b = &s.batch;
    Cells {
        counts: vec![s.counts.clone()],
        batch: Some(b.codes.iter().map(|&c| b.levels[c as usize].clone()).collect()),
        ..Default::default()
    }
}

fn quick(max_epochs: usize) -> TrainConfig {
    TrainConfig { max_epochs, early_stopping: false, validation_fraction: 0.1, ..Default::default() }
}

/// Within-type share of the latent variance (lower: more compact types).
fn within_share(z: &[f32], d: usize, y: &[u32]) -> f64 {
    let n = y.len();
    let k = *y.iter().max().unwrap() as usize + 1;
    let (mut mean, mut by) = (vec![0.0f64; d], vec![vec![0.0f64; d]; k]);
    let mut count = vec![0usize; k];
    for i in 0..n {
        count[y[i] as usize] += 1;
        for j in 0..d {
            mean[j] += z[i * d + j] as f64 / n as f64;
            by[y[i] as usize][j] += z[i * d + j] as f64;
        }
    }
    let (mut within, mut total) = (0.0, 0.0);
    for i in 0..n {
        let c = y[i] as usize;
        for j in 0..d {
            let v = z[i * d + j] as f64;
            within += (v - by[c][j] / count[c] as f64).powi(2);
            total += (v - mean[j]).powi(2);
        }
    }
    within / total
}

fn hard(p: &[f32], k: usize) -> Vec<u32> {
    p.chunks(k).map(|r| (0..k).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap() as u32).collect()
}

#[test]
fn fine_tuning_keeps_the_types_leaves_the_originals_and_repeats_with_the_seed() {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let s = sim();
    let cov = Covariates::new(s.batch.clone(), vec![], vec![]).unwrap();
    let (vae, clusters, z0) = crate::device::with_threads(2, || {
        let vae =
            VaeModel::fit(&s.counts, &cov, VaeConfig::default(), quick(40), Device::Cpu, &|| false, &|_| {}).unwrap();
        let z0 = vae.training_latent(&s.counts.csr, &cov);
        let cfg = ClusterConfig { n_clusters: 3, ..Default::default() };
        let clusters = ClusterModel::fit(&z0.values, z0.rows, None, cfg, quick(20), &|| false, &|_| {}).unwrap();
        (vae, clusters, z0)
    })
    .unwrap();
    let (vae_bytes, cluster_bytes) = (vae.to_bytes().unwrap(), clusters.to_bytes().unwrap());
    let d = z0.cols;
    let before = within_share(&z0.values, d, &s.group.codes);
    let ari0 = ari(&s.group.codes, &hard(&clusters.assign(&z0.values).unwrap(), 3));

    // (On this thread: the models are not `Sync`; the thread count is the one just used.)
    let tune = |weight: f64, seed: u64| {
        fine_tune(
            &vae,
            &clusters,
            cells_of(&s),
            weight,
            TrainConfig { seed, kl_warmup: 0.0, ..quick(15) },
            &|| false,
            &|_| {},
        )
        .unwrap()
    };
    let strong = tune(20.0, 3);
    let after = within_share(&strong.latent.values, d, &s.group.codes);
    let ari1 = ari(&s.group.codes, &hard(&strong.clusters.assign(&strong.latent.values).unwrap(), 3));
    // The clusters keep the cell types (with dropout in the loss, cells
    // crossed between clusters: ARI 0.88 -> 0.55, share 0.31 -> 0.42).
    assert!(after <= before + 0.02, "within-type variance share {before:.3} -> {after:.3}");
    assert!(ari1 >= ari0 - 0.02, "ARI {ari0:.3} -> {ari1:.3}");
    let plain = tune(0.0, 3);
    let ari_plain = ari(&s.group.codes, &hard(&plain.clusters.assign(&plain.latent.values).unwrap(), 3));
    assert!(ari1 >= ari_plain - 0.05, "weight 20: ARI {ari1:.3}, weight 0: {ari_plain:.3}");

    // The record is in both models and survives their files.
    let record = strong.vae.meta.fine_tuned.as_ref().unwrap();
    assert_eq!((record.weight, record.n_clusters, record.training.history.len()), (20.0, 3, 15));
    let back = ClusterModel::from_bytes(&strong.clusters.to_bytes().unwrap()).unwrap();
    assert_eq!(back.meta.fine_tuned.as_ref().unwrap().weight, 20.0);
    assert_eq!(back.centroids().unwrap(), strong.clusters.centroids().unwrap());
    // The centroids follow the tuned latent space: each is near its cells' mean.
    let p = strong.clusters.assign(&strong.latent.values).unwrap();
    let c = strong.clusters.centroids().unwrap();
    for k in 0..3 {
        let (mut sum, mut mass) = (vec![0.0f64; d], 0.0f64);
        for (i, row) in p.chunks(3).enumerate() {
            mass += row[k] as f64;
            for j in 0..d {
                sum[j] += row[k] as f64 * strong.latent.values[i * d + j] as f64;
            }
        }
        for j in 0..d {
            assert!((sum[j] / mass - c[k * d + j] as f64).abs() < 0.05, "centroid {k}, dimension {j}");
        }
    }
    // The inputs are untouched; the same seed gives the same models.
    assert_eq!(vae.to_bytes().unwrap(), vae_bytes);
    assert_eq!(clusters.to_bytes().unwrap(), cluster_bytes);
    assert_eq!(tune(20.0, 3).latent.values, strong.latent.values);
}

#[test]
fn fine_tuning_refuses_a_classifier_and_a_clustering_of_another_space() {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let s = sim();
    let cov = Covariates::new(s.batch.clone(), vec![], vec![]).unwrap();
    let vae = VaeModel::fit(&s.counts, &cov, VaeConfig::default(), quick(2), Device::Cpu, &|| false, &|_| {}).unwrap();
    let z = vae.training_latent(&s.counts.csr, &cov);
    let levels: Vec<String> = (1..=3).map(|i| format!("t{i}")).collect();
    let classifier = ClusterModel::fit(
        &z.values,
        z.rows,
        Some((&s.group.codes, levels)),
        ClusterConfig::default(),
        quick(2),
        &|| false,
        &|_| {},
    )
    .unwrap();
    let err = fine_tune(&vae, &classifier, cells_of(&s), 1.0, quick(2), &|| false, &|_| {}).err().unwrap();
    assert!(err.to_string().contains("unsupervised"), "{err}");
    let other: Vec<f32> = z.values.chunks(z.cols).flat_map(|r| r[..4].to_vec()).collect();
    let cfg = ClusterConfig { n_clusters: 3, ..Default::default() };
    let four = ClusterModel::fit(&other, z.rows, None, cfg, quick(2), &|| false, &|_| {}).unwrap();
    let err = fine_tune(&vae, &four, cells_of(&s), 1.0, quick(2), &|| false, &|_| {}).err().unwrap();
    assert!(err.to_string().contains("4-dimensional"), "{err}");
    let err = fine_tune(&vae, &four, cells_of(&s), -1.0, quick(2), &|| false, &|_| {}).err().unwrap();
    assert!(err.to_string().contains("weight"), "{err}");
}
