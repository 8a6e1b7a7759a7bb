//! Seconds per epoch of the VAE on simulated counts (no R involved):
//!     cargo run --release --example vae_speed -- [n_cells] [n_genes] [epochs] [threads] [device]
use scdistill_core::data::Covariates;
use scdistill_core::device::{parse_device, thread_pool};
use scdistill_core::models::vae::{VaeConfig, VaeModel};
use scdistill_core::simulate::{simulate, SimParams};
use scdistill_core::train::TrainConfig;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n_cells, n_genes, epochs, threads) = (arg(1, 20_000), arg(2, 2_000), arg(3, 3), arg(4, 2));
    let device = parse_device(a.get(5).map(String::as_str).unwrap_or("cpu")).unwrap();
    let pool = thread_pool(threads).unwrap();
    pool.install(|| {
        let p = SimParams { n_cells, n_genes, batch_prob: vec![1.0; 4], ..Default::default() };
        let s = simulate(&p).unwrap();
        let cov = Covariates::new(s.batch.clone(), vec![], vec![]).unwrap();
        let tc = TrainConfig { max_epochs: epochs, early_stopping: false, ..Default::default() };
        let t0 = std::time::Instant::now();
        let m = VaeModel::fit(&s.counts, &cov, VaeConfig::default(), tc, device, &|| false, &|r| {
            eprintln!("epoch {} {:.3} s  train {:.2}  validation {:.2}", r.epoch, r.seconds, r.train_elbo, r.validation_elbo)
        })
        .unwrap();
        let secs: Vec<f64> = m.meta.training.history.iter().map(|r| r.seconds).collect();
        println!(
            "{n_cells} cells x {n_genes} genes, {threads} threads, {:?}: {:.3} s/epoch (median), {:.0} cells/s, total {:.1} s",
            device,
            median(&secs),
            n_cells as f64 * 0.9 / median(&secs),
            t0.elapsed().as_secs_f64()
        );
    });
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[s.len() / 2]
}
