use super::*;
use crate::metrics::{ari, kmeans, neighbor_preservation};
use crate::models::TORCH;
use rand_distr::{Distribution, Normal};

/// `per` cells around each of `k` centres in 10 dimensions: z and the truth.
fn blobs(k: usize, per: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let noise = Normal::new(0.0f32, 1.0).unwrap();
    let (mut z, mut y) = (vec![], vec![]);
    for i in 0..k * per {
        let c = i % k;
        z.extend((0..10).map(|j| if j == c { 8.0 } else { 0.0 } + noise.sample(&mut rng)));
        y.push(c as u32);
    }
    (z, y)
}

#[test]
fn ab_params_match_umaps_for_its_defaults() {
    let (a, b) = ab_params(0.1, 1.0);
    assert!((a - 1.577).abs() < 0.01 && (b - 0.895).abs() < 0.005, "a {a} b {b}");
    // umap-learn: min_dist 0.5 gives a = 0.583, b = 1.334.
    let (a, b) = ab_params(0.5, 1.0);
    assert!((a - 0.583).abs() < 0.01 && (b - 1.334).abs() < 0.01, "a {a} b {b}");
}

#[test]
fn a_parametric_map_separates_clusters_keeps_neighbours_and_places_new_cells() {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let (z, y) = blobs(5, 160, 1);
    let n = y.len();
    let cfg = UmapConfig::default();
    let tc = TrainConfig { max_epochs: 10, batch_size: 512, ..Default::default() };
    let (m, coords) = UmapModel::fit(&z, n, cfg, tc, &|| false, &|_| {}).unwrap();
    assert_eq!(coords.len(), 2 * n);
    let emb = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let (zx, cx) = (emb(&z), emb(&coords));
    let two = Embedding::row_major(&cx, n, 2);
    assert!(ari(&y, &kmeans(&two, 5, 5, 100, 1)) > 0.98);
    // Neighbourhoods within blobs are random; still, a good map keeps a
    // good part of them, and a random map keeps about k / n.
    let kept = neighbor_preservation(&Embedding::row_major(&zx, n, 10), &two, 15, 1).unwrap();
    assert!(kept > 0.15, "15-NN preservation {kept}");
    let h = &m.meta.training.history;
    assert!(h.last().unwrap().train_loss < h[0].train_loss);
    // New cells land in their own cluster: nearest cluster mean of the map.
    let (zn, yn) = blobs(5, 20, 2);
    let pn = m.project(&zn).unwrap();
    let means: Vec<[f64; 2]> = (0..5)
        .map(|c| {
            let pts: Vec<usize> = (0..n).filter(|&i| y[i] == c).collect();
            let f = |k: usize| pts.iter().map(|&i| cx[2 * i + k]).sum::<f64>() / pts.len() as f64;
            [f(0), f(1)]
        })
        .collect();
    let right = (0..yn.len())
        .filter(|&i| {
            let p = [pn[2 * i] as f64, pn[2 * i + 1] as f64];
            let best = (0..5)
                .min_by(|&a, &b| {
                    let d = |c: usize| (p[0] - means[c][0]).powi(2) + (p[1] - means[c][1]).powi(2);
                    d(a).total_cmp(&d(b))
                })
                .unwrap();
            best as u32 == yn[i]
        })
        .count();
    assert!(right as f64 >= 0.98 * yn.len() as f64, "{right} of {} new cells in their cluster", yn.len());
    // Round trip; the same seed gives the same map.
    let back = UmapModel::from_bytes(&m.to_bytes().unwrap()).unwrap();
    assert_eq!(back.project(&zn).unwrap(), pn);
    let tc = TrainConfig { max_epochs: 10, batch_size: 512, ..Default::default() };
    let (_, again) = UmapModel::fit(&z, n, UmapConfig::default(), tc, &|| false, &|_| {}).unwrap();
    assert_eq!(again, coords);
    assert!(m.project(&zn[..15]).unwrap_err().to_string().contains("10 dimensions"));
}
