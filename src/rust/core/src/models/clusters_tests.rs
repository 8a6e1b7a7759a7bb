use super::*;
use crate::metrics::ari;
use crate::models::TORCH;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// `per` cells around each centre in 4 dimensions (sd 0.6), the last
/// cluster `rare` times smaller; returns z and the true clusters.
fn blobs(centres: &[[f32; 4]], per: usize, rare: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let noise = Normal::new(0.0f32, 0.6).unwrap();
    let (mut z, mut y) = (vec![], vec![]);
    for (c, centre) in centres.iter().enumerate() {
        let m = if c + 1 == centres.len() { per / rare } else { per };
        for _ in 0..m {
            z.extend(centre.iter().map(|v| v + noise.sample(&mut rng)));
            y.push(c as u32);
        }
    }
    (z, y)
}

const CENTRES: [[f32; 4]; 4] = [[4.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0], [0.0, 0.0, 0.0, 4.0]];

fn quick() -> TrainConfig {
    TrainConfig { max_epochs: 20, early_stopping: false, validation_fraction: 0.0, ..Default::default() }
}

fn hard(p: &[f32], k: usize) -> Vec<u32> {
    p.chunks(k).map(|r| (0..k).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap() as u32).collect()
}

#[test]
fn soft_kmeans_recovers_clusters_with_leiden_or_a_given_k_and_assigns_new_cells() {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let (z, y) = blobs(&CENTRES, 300, 5, 1);
    let n = y.len();
    for k in [4, 0] {
        // Leiden splits Gaussian blobs at resolution 1: a coarse one finds the four.
        let cfg = ClusterConfig { n_clusters: k, resolution: 0.1, ..Default::default() };
        let m = ClusterModel::fit(&z, n, None, cfg, quick(), &|| false, &|_| {}).unwrap();
        assert_eq!(m.meta.levels.len(), 4, "K = {k}: found {:?}", m.meta.levels);
        assert!(m.meta.temperature > 0.5 && m.meta.temperature < 3.0, "T = {}", m.meta.temperature);
        let p = m.assign(&z).unwrap();
        for row in p.chunks(4) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        }
        assert!(ari(&y, &hard(&p, 4)) > 0.98, "K = {k}: ARI {}", ari(&y, &hard(&p, 4)));
        // New cells go to the clusters of their kind.
        let (zn, yn) = blobs(&CENTRES, 50, 1, 2);
        assert!(ari(&yn, &hard(&m.assign(&zn).unwrap(), 4)) > 0.98);
        // Round trip through bytes.
        let back = ClusterModel::from_bytes(&m.to_bytes().unwrap()).unwrap();
        assert_eq!(back.assign(&zn).unwrap(), m.assign(&zn).unwrap());
        assert!(m.assign(&zn[..7]).unwrap_err().to_string().contains("4 dimensions"));
    }
}

#[test]
fn training_moves_centroids_to_a_stationary_point_of_the_soft_objective() {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    // Two overlapping clusters: the soft objective's centroids are pulled
    // toward each other relative to the hard k-means means.
    let (z, _) = blobs(&[[0.0, 0.0, 0.0, 0.0], [1.5, 0.0, 0.0, 0.0]], 400, 1, 3);
    let n = z.len() / 4;
    let cfg = ClusterConfig { n_clusters: 2, temperature: 1.0, ..Default::default() };
    let untrained =
        ClusterModel::fit(&z, n, None, cfg.clone(), TrainConfig { max_epochs: 0, ..quick() }, &|| false, &|_| {});
    // Zero epochs is refused by the loop's checks: compare with one epoch instead.
    assert!(untrained.is_err());
    let one = ClusterModel::fit(
        &z,
        n,
        None,
        cfg.clone(),
        TrainConfig { max_epochs: 1, lr: 1e-6, ..quick() },
        &|| false,
        &|_| {},
    )
    .unwrap();
    let many =
        ClusterModel::fit(&z, n, None, cfg, TrainConfig { max_epochs: 60, lr: 1e-2, ..quick() }, &|| false, &|_| {})
            .unwrap();
    let loss = |m: &ClusterModel| {
        let zt = Tensor::from_slice(&z).view([n as i64, 4]);
        f64::try_from(m.loss(&zt, &Tensor::from_slice(&vec![-1i64; n])).mean(Kind::Float)).unwrap()
    };
    assert!(loss(&many) < loss(&one) - 1e-3, "trained {} vs start {}", loss(&many), loss(&one));
    let h = &many.meta.training.history;
    assert!(h.last().unwrap().train_loss < h[0].train_loss);
}

#[test]
fn supervised_clusters_are_a_classifier_that_uses_unlabelled_cells_too() {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let (z, y) = blobs(&CENTRES, 200, 4, 4);
    let n = y.len();
    let codes: Vec<u32> = y.iter().enumerate().map(|(i, &c)| if i % 3 == 0 { c } else { UNLABELED }).collect();
    let levels: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
    let m =
        ClusterModel::fit(&z, n, Some((&codes, levels.clone())), ClusterConfig::default(), quick(), &|| false, &|_| {})
            .unwrap();
    assert!(m.meta.supervised);
    assert_eq!(m.meta.levels, levels);
    let (zn, yn) = blobs(&CENTRES, 60, 4, 5);
    let pred = hard(&m.assign(&zn).unwrap(), 4);
    let right = pred.iter().zip(&yn).filter(|(a, b)| a == b).count();
    assert!(right as f64 / yn.len() as f64 > 0.97, "{right}/{}", yn.len());
    // A label without cells, and too many clusters, are refused by name.
    let mut missing = codes.clone();
    missing.iter_mut().filter(|c| **c == 3).for_each(|c| *c = UNLABELED);
    let e = ClusterModel::fit(&z, n, Some((&missing, levels)), ClusterConfig::default(), quick(), &|| false, &|_| {});
    assert!(e.err().unwrap().to_string().contains("label 'd' has no cells"));
    let cfg = ClusterConfig { n_clusters: n + 1, ..Default::default() };
    let e = ClusterModel::fit(&z, n, None, cfg, quick(), &|| false, &|_| {});
    assert!(e.err().unwrap().to_string().contains("n_clusters"));
}

#[test]
fn per_cluster_temperatures_give_a_wide_type_its_own_boundary() {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    // A large narrow type (sd 0.4) and a smaller wide one (sd 1.2), 4 apart.
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let draw = |rng: &mut ChaCha8Rng, m: usize, centre: f32, sd: f32, z: &mut Vec<f32>, y: &mut Vec<u32>, c: u32| {
        let noise = Normal::new(0.0f32, sd).unwrap();
        for _ in 0..m {
            z.push(centre + noise.sample(rng));
            z.extend((0..3).map(|_| noise.sample(rng)));
            y.push(c);
        }
    };
    let (mut z, mut y) = (vec![], vec![]);
    draw(&mut rng, 400, 0.0, 0.4, &mut z, &mut y, 0);
    draw(&mut rng, 150, 4.0, 1.2, &mut z, &mut y, 1);
    let (mut zn, mut yn) = (vec![], vec![]);
    draw(&mut rng, 400, 0.0, 0.4, &mut zn, &mut yn, 0);
    draw(&mut rng, 400, 4.0, 1.2, &mut zn, &mut yn, 1);
    let n = y.len();
    let fit = |per_cluster: bool| {
        let cfg = ClusterConfig { n_clusters: 2, per_cluster, ..Default::default() };
        ClusterModel::fit(&z, n, None, cfg, quick(), &|| false, &|_| {}).unwrap()
    };
    let (own, shared) = (fit(true), fit(false));
    assert!(shared.meta.temperatures.is_empty() && !shared.meta.config.per_cluster);
    let t = &own.meta.temperatures;
    let wide = hard(&own.assign(&[4.0, 0.0, 0.0, 0.0]).unwrap(), 2)[0] as usize;
    assert!(t[wide] > 3.0 * t[1 - wide], "T_k = {t:?}");
    // A point 1.8 from the narrow type and 2.2 from the wide one: nearer
    // the narrow centroid, but far out for its spread.
    let boundary = [1.8, 0.0, 0.0, 0.0];
    assert_eq!(hard(&own.assign(&boundary).unwrap(), 2)[0] as usize, wide);
    assert_ne!(hard(&shared.assign(&boundary).unwrap(), 2)[0] as usize, wide);
    // New cells: the wide type's outskirts are assigned to it.
    let a_own = ari(&yn, &hard(&own.assign(&zn).unwrap(), 2));
    let a_shared = ari(&yn, &hard(&shared.assign(&zn).unwrap(), 2));
    assert!(a_own > a_shared + 0.02 && a_own > 0.95, "ARI per cluster {a_own}, shared {a_shared}");
    // The temperatures travel with the model, and a model with one T (as
    // every file written before them) keeps it.
    let back = ClusterModel::from_bytes(&own.to_bytes().unwrap()).unwrap();
    assert_eq!(back.assign(&zn).unwrap(), own.assign(&zn).unwrap());
    let old = ClusterModel::from_bytes(&shared.to_bytes().unwrap()).unwrap();
    assert_eq!(old.assign(&zn).unwrap(), shared.assign(&zn).unwrap());
}

#[test]
fn a_shared_covariance_keeps_types_that_share_an_elongated_shape() {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    // Three types 2.5 apart along x, each stretched along y (sd 3, as
    // sequencing depth stretches every type of a PCA alike), sd 0.5
    // elsewhere. Euclidean soft k-means' optimum cuts across y.
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (wide, narrow) = (Normal::new(0.0f32, 3.0).unwrap(), Normal::new(0.0f32, 0.5).unwrap());
    let mut draw = |m: usize| {
        let (mut z, mut y) = (vec![], vec![]);
        for c in 0..3u32 {
            for _ in 0..m {
                z.push(2.5 * c as f32 + narrow.sample(&mut rng));
                z.push(wide.sample(&mut rng));
                z.extend((0..2).map(|_| narrow.sample(&mut rng)));
                y.push(c);
            }
        }
        (z, y)
    };
    let ((z, y), (zn, yn)) = (draw(400), draw(200));
    let n = y.len();
    let fit = |shared_covariance: bool| {
        let cfg = ClusterConfig { n_clusters: 3, shared_covariance, ..Default::default() };
        let train = TrainConfig { max_epochs: 50, ..quick() };
        ClusterModel::fit(&z, n, None, cfg, train, &|| false, &|_| {}).unwrap()
    };
    let (shared, euclid) = (fit(true), fit(false));
    assert!(euclid.meta.metric.is_empty());
    assert_eq!(shared.meta.metric.len(), 16);
    let a_shared = ari(&yn, &hard(&shared.assign(&zn).unwrap(), 3));
    let a_euclid = ari(&yn, &hard(&euclid.assign(&zn).unwrap(), 3));
    assert!(a_shared > 0.9 && a_shared > a_euclid + 0.2, "ARI shared {a_shared}, Euclidean {a_euclid}");
    // The metric travels with the model.
    let back = ClusterModel::from_bytes(&shared.to_bytes().unwrap()).unwrap();
    assert_eq!(back.assign(&zn).unwrap(), shared.assign(&zn).unwrap());
    // On round clusters the metric is the identity (T keeps its units).
    let (zb, yb) = blobs(&CENTRES, 300, 1, 8);
    let cfg = ClusterConfig { n_clusters: 4, ..Default::default() };
    let round = ClusterModel::fit(&zb, yb.len(), None, cfg, quick(), &|| false, &|_| {}).unwrap();
    // Eigenvectors come with any sign and, for equal eigenvalues, any
    // rotation: check A Aᵀ ≈ I instead of A.
    let a = Tensor::from_slice(&round.meta.metric).view([4, 4]);
    let gap = f64::try_from((a.matmul(&a.tr()) - Tensor::eye(4, (Kind::Double, Device::Cpu))).abs().max()).unwrap();
    assert!(gap < 0.15, "A Aᵀ − I up to {gap}");
}
