//! Seconds per epoch of the multimodal model on simulated RNA + ATAC (no R involved):
//!     cargo run --release --example multimodal_speed -- [n_cells] [n_genes] [n_peaks] [epochs] [threads] [device]
use scdistill_core::data::CountMatrix;
use scdistill_core::device::{parse_device, thread_pool};
use scdistill_core::models::multimodal::{ModalitySpec, MultimodalConfig, MultimodalCovariates, MultimodalModel};
use scdistill_core::simulate::{simulate, AtacParams, SimParams};
use scdistill_core::train::TrainConfig;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n_cells, n_genes, n_peaks, epochs, threads) =
        (arg(1, 20_000), arg(2, 2_000), arg(3, 20_000), arg(4, 3), arg(5, 2));
    let device = parse_device(a.get(6).map(String::as_str).unwrap_or("cpu")).unwrap();
    let pool = thread_pool(threads).unwrap();
    pool.install(|| {
        let p = SimParams {
            n_cells,
            n_genes,
            batch_prob: vec![1.0; 2],
            atac: Some(AtacParams { n_peaks, ..Default::default() }),
            ..Default::default()
        };
        let s = simulate(&p).unwrap();
        let at = s.atac.as_ref().unwrap();
        let peaks = CountMatrix { csr: at.counts.clone(), genes: at.peaks.clone(), cells: s.counts.cells.clone() };
        let b = s.batch.clone();
        let cov = MultimodalCovariates {
            ambient: b.clone(),
            scaling: MultimodalCovariates::none(n_cells).scaling,
            dispersion: b.clone(),
            library: b,
            decoder: vec![],
            encoder: vec![],
        };
        let spec = |name: &str, ambient: bool, feature_scaling: bool| ModalitySpec {
            name: name.into(),
            n_features: 0,
            n_latent: 10,
            n_hidden: 128,
            ambient,
            feature_scaling,
            weight: 1.0,
        };
        let cfg = MultimodalConfig { modalities: vec![spec("RNA", true, false), spec("ATAC", false, true)], ..Default::default() };
        let tc = TrainConfig { max_epochs: epochs, early_stopping: false, ..Default::default() };
        let t0 = std::time::Instant::now();
        let m = MultimodalModel::fit(&[&s.counts, &peaks], &cov, cfg, tc, device, &|| false, &|r| {
            eprintln!("epoch {} {:.3} s  train {:.2}  validation {:.2}", r.epoch, r.seconds, r.train_elbo, r.validation_elbo)
        })
        .unwrap();
        let mut secs: Vec<f64> = m.meta.training.history.iter().map(|r| r.seconds).collect();
        secs.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "{n_cells} cells x {n_genes} genes + {n_peaks} peaks, {threads} threads, {device:?}: {:.3} s/epoch (median), total {:.1} s",
            secs[secs.len() / 2],
            t0.elapsed().as_secs_f64()
        );
    });
}
