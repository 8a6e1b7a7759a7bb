//! Times Harmony on synthetic PCs: `harmony_speed N D BATCHES THREADS [OUT]`.
//! Cells come from 12 Gaussian clusters with a per-batch shift; with OUT the
//! input (f64, cells × D row-major) and batch codes (u32) are written to
//! OUT.x and OUT.batch for the same run in another tool. HARMONY_SEED and
//! HARMONY_ITER in the environment set the seed and the iterations at most.
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use scdistill_core::teacher::{harmony, Embedding, HarmonyCovariate, HarmonyParams};
use std::io::Write;
use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let arg = |i: usize, def: usize| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(def);
    let (n, d, nb, threads) = (arg(1, 100_000), arg(2, 50), arg(3, 10), arg(4, 2));
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let g = Normal::new(0.0, 1.0).unwrap();
    let centres: Vec<f64> = (0..12 * d).map(|_| 4.0 * g.sample(&mut rng)).collect();
    let shifts: Vec<f64> = (0..nb * d).map(|_| 1.5 * g.sample(&mut rng)).collect();
    let mut x = vec![0.0; n * d];
    let mut batch = vec![0u32; n];
    for i in 0..n {
        let (c, b) = (i % 12, (i / 7) % nb);
        batch[i] = b as u32;
        for j in 0..d {
            x[i * d + j] = centres[c * d + j] / (1.0 + j as f64 / 5.0) + shifts[b * d + j] + g.sample(&mut rng);
        }
    }
    // OUT naming a folder with pcs.f64 and batch.i32 (bench/harmony_peer.py's
    // input): run on those instead.
    if let Some(dir) = a.get(5).filter(|p| std::path::Path::new(p).join("pcs.f64").exists()) {
        let bytes = std::fs::read(std::path::Path::new(dir).join("pcs.f64")).unwrap();
        x = bytes.chunks(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
        let bytes = std::fs::read(std::path::Path::new(dir).join("batch.i32")).unwrap();
        batch = bytes.chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32).collect();
        assert_eq!((x.len(), batch.len()), (n * d, n), "N and D must match the files");
    } else if let Some(out) = a.get(5) {
        let mut f = std::fs::File::create(format!("{out}.x")).unwrap();
        for v in &x {
            f.write_all(&v.to_le_bytes()).unwrap();
        }
        let mut f = std::fs::File::create(format!("{out}.batch")).unwrap();
        for v in &batch {
            f.write_all(&v.to_le_bytes()).unwrap();
        }
    }
    let cov = HarmonyCovariate {
        name: "batch".into(),
        codes: batch,
        n_levels: nb,
        theta: 2.0,
        lambda: None,
        protected: false,
    };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let mut params = HarmonyParams::default();
    if let Some(seed) = std::env::var("HARMONY_SEED").ok().and_then(|s| s.parse().ok()) {
        params.seed = seed;
    }
    if let Some(it) = std::env::var("HARMONY_ITER").ok().and_then(|s| s.parse().ok()) {
        params.max_iter = it;
    }
    let t = Instant::now();
    let r = pool.install(|| harmony(Embedding::row_major(&x), n, d, &[cov], &params, &|| false, &|_| {})).unwrap();
    println!(
        "harmony n={n} d={d} batches={nb} threads={threads}: {:.2} s, {} iterations, rounds {:?}",
        t.elapsed().as_secs_f64(),
        r.n_iter,
        r.cluster_rounds
    );
    println!("objective {:?}", r.objective.iter().map(|v| (v * 10.0).round() / 10.0).collect::<Vec<_>>());
}
