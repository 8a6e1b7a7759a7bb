//! Speed and recall of the approximate kNN search against the exact one, on
//! clustered Gaussian embeddings (40 clusters of unequal size and spread).
//!
//!     cargo run --release --example knn_speed -- [cells] [dims] [k] [centre_sd_x10]
//!
//! `centre_sd_x10` sets how far apart the clusters are (default 20: sd 2.0;
//! 5 makes them overlap, the harder case).
//!
//! Recall is measured on 2,000 random query cells against brute force.
//! With `SCDISTILL_KNN_INPUT=file.bin` the embedding is read from that file
//! instead (row-major f64, `dims` values per cell; e.g. written from R with
//! `writeBin(as.vector(t(pcs)), "file.bin")`).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use scdistill_core::metrics::{knn, knn_approx, leiden, umap_connectivities, Embedding};
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let n = args.first().copied().unwrap_or(200_000);
    let d = args.get(1).copied().unwrap_or(50);
    let k = args.get(2).copied().unwrap_or(89);
    let centre_sd = args.get(3).copied().unwrap_or(20) as f64 / 10.0;
    let mut r = ChaCha8Rng::seed_from_u64(1);
    let unit = Normal::new(0.0, 1.0).unwrap();
    let centres: Vec<f64> = (0..40 * d).map(|_| centre_sd * unit.sample(&mut r)).collect();
    let input = std::env::var("SCDISTILL_KNN_INPUT").ok();
    let values: Vec<f64> = match &input {
        Some(path) => std::fs::read(path)
            .expect("cannot read the embedding file")
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        None => (0..n)
            .flat_map(|i| {
                let c = (i * i + i / 7) % 40;
                let spread = 0.5 + (c % 5) as f64 * 0.25;
                (0..d).map(|j| centres[c * d + j] + spread * unit.sample(&mut r)).collect::<Vec<_>>()
            })
            .collect(),
    };
    let n = if input.is_some() { values.len() / d } else { n };
    let e = Embedding { values: &values, n, d };
    let t = Instant::now();
    let g = knn_approx(&e, k, 1).unwrap();
    println!("approximate: {n} cells x {d} dims, k = {k}: {:.1} s", t.elapsed().as_secs_f64());
    let queries: Vec<usize> = (0..2000).map(|_| r.random_range(0..n)).collect();
    let mut hits = 0;
    for &i in &queries {
        let mut all: Vec<(f64, u32)> = (0..n)
            .filter(|&j| j != i)
            .map(|j| (e.row(i).iter().zip(e.row(j)).map(|(a, b)| (a - b) * (a - b)).sum::<f64>(), j as u32))
            .collect();
        all.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0));
        let truth: Vec<u32> = all[..k].iter().map(|p| p.1).collect();
        hits += g.neighbors(i).iter().filter(|j| truth.contains(j)).count();
    }
    println!("recall on 2,000 cells: {:.4}", hits as f64 / (2000 * k) as f64);
    let t = Instant::now();
    let clusters = leiden(&umap_connectivities(&g, 15), 1.0, 1);
    let n_clusters = clusters.iter().max().map_or(0, |&c| c + 1);
    println!("Leiden (resolution 1) on its 15-NN graph: {n_clusters} clusters, {:.1} s", t.elapsed().as_secs_f64());
    if n <= 100_000 {
        let t = Instant::now();
        let _ = knn(&e, k).unwrap();
        println!("exact: {:.1} s", t.elapsed().as_secs_f64());
    }
}
