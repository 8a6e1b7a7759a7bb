use super::infer;
use super::*;
use crate::metrics::{integration_metrics, Embedding};
use crate::simulate::{simulate, SimParams};
use crate::train::evaluate;

fn sim(n_cells: usize, seed: u64) -> crate::simulate::Simulation {
    let p = SimParams {
        n_cells,
        n_genes: 200,
        group_prob: vec![0.4, 0.3, 0.3],
        batch_prob: vec![0.5, 0.5],
        seed,
        ..Default::default()
    };
    simulate(&p).unwrap()
}

fn covariates(s: &crate::simulate::Simulation) -> Covariates {
    Covariates::new(s.batch.clone(), vec![], vec![]).unwrap()
}

fn quick(max_epochs: usize) -> TrainConfig {
    TrainConfig { max_epochs, early_stopping: false, ..Default::default() }
}

fn never() -> bool {
    false
}

use crate::models::TORCH;

fn fit(s: &crate::simulate::Simulation, config: VaeConfig, tc: TrainConfig) -> VaeModel {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let cov = covariates(s);
    crate::device::with_threads(2, || VaeModel::fit(&s.counts, &cov, config, tc, Device::Cpu, &never, &|_| {}))
        .unwrap()
        .unwrap()
}

fn latent_of(m: &VaeModel, s: &crate::simulate::Simulation) -> Vec<f32> {
    let cov = covariates(s);
    infer::latent(&m.vae, &VaeData::new(&s.counts.csr, &cov), true)
}

#[test]
fn training_lowers_the_elbo_and_the_latent_separates_cell_types() {
    let s = sim(600, 1);
    for likelihood in [Likelihood::Zinb, Likelihood::Nb, Likelihood::Poisson] {
        let m = fit(&s, VaeConfig { likelihood, ..Default::default() }, quick(60));
        let h = &m.meta.training.history;
        assert_eq!(h.len(), 60);
        let (first, last) = (h[0].validation_elbo, h[59].validation_elbo);
        assert!(last < 0.9 * first, "{likelihood:?}: validation -ELBO {first} -> {last}");
        let z: Vec<f64> = latent_of(&m, &s).into_iter().map(f64::from).collect();
        let e = Embedding::row_major(&z, 600, 10);
        let scores = integration_metrics(&e, &s.batch.codes, &s.group.codes, None, 0).unwrap();
        if likelihood == Likelihood::Poisson {
            // Poisson ignores overdispersion: its groups are well apart but
            // unevenly spread, and k-means' ARI on them swings between about
            // 0.43 and 0.97 with the seed (seeds 0-6). Neighbourhoods and
            // silhouettes do not: cLISI ≥ 0.998 and label silhouette
            // 0.66-0.70 at every one of those seeds.
            assert!(scores.clisi > 0.95, "{likelihood:?}: cLISI {}", scores.clisi);
            assert!(scores.silhouette_label > 0.6, "{likelihood:?}: label silhouette {}", scores.silhouette_label);
        } else {
            assert!(scores.ari_kmeans > 0.8, "{likelihood:?}: ARI {}", scores.ari_kmeans);
        }
    }
}

#[test]
fn same_seed_same_latent_and_saved_models_reload_exactly() {
    let s = sim(300, 2);
    let cfg = VaeConfig { learn_library: true, dispersion: Dispersion::GeneBatch, ..Default::default() };
    let a = fit(&s, cfg.clone(), quick(5));
    let b = fit(&s, cfg.clone(), quick(5));
    let (za, zb) = (latent_of(&a, &s), latent_of(&b, &s));
    assert!(za == zb, "same seed, different latent");
    let c = fit(&s, cfg, TrainConfig { seed: 1, ..quick(5) });
    assert!(za != latent_of(&c, &s));

    let bytes = a.to_bytes().unwrap();
    // Building a model draws weights from the global generator: take a turn.
    let back = {
        let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
        VaeModel::from_bytes(&bytes, Device::Cpu).unwrap()
    };
    assert_eq!(back.meta.genes, a.meta.genes);
    assert_eq!(back.meta.training.history.len(), 5);
    assert!(latent_of(&back, &s) == za, "reloaded model, different latent");
    let cov = covariates(&s);
    let data = VaeData::new(&s.counts.csr, &cov);
    assert!(infer::expression(&back.vae, &data, &[1], 1.0, 1) == infer::expression(&a.vae, &data, &[1], 1.0, 1));

    assert!(VaeModel::from_bytes(b"not a model at all", Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("not a scdistill"));
    let mut damaged = bytes.clone();
    damaged.truncate(bytes.len() - 4);
    assert!(VaeModel::from_bytes(&damaged, Device::Cpu).unwrap_err().to_string().contains("damaged"));
}

#[test]
fn expression_rows_are_proportions_and_counterfactual_batches_differ() {
    let s = sim(300, 3);
    // NB, so that the posterior predictive mean is library · ρ (ZINB scales it by 1 − π).
    let m = fit(&s, VaeConfig { likelihood: Likelihood::Nb, ..Default::default() }, quick(20));
    let cov = covariates(&s);
    let data = VaeData::new(&s.counts.csr, &cov);
    let own = infer::expression(&m.vae, &data, &[], 1e4, 1);
    let g = 200;
    for c in [0, 150, 299] {
        let total: f32 = own[c * g..(c + 1) * g].iter().sum();
        assert!((total - 1e4).abs() < 1.0, "row {c} sums to {total}");
    }
    let b0 = infer::expression(&m.vae, &data, &[0], 1.0, 1);
    let b1 = infer::expression(&m.vae, &data, &[1], 1.0, 1);
    let both = infer::expression(&m.vae, &data, &[0, 1], 1.0, 1);
    assert!(b0 != b1);
    for k in [0usize, 777, 59_999] {
        assert!((both[k] - (b0[k] + b1[k]) / 2.0).abs() < 1e-6);
    }
    let x = infer::sample_counts(&m.vae, &data);
    assert_eq!((x.n_rows, x.n_cols), (300, 200));
    // Posterior predictive totals follow the observed library sizes.
    let (obs, sim): (f64, f64) = (s.counts.csr.row_sums().iter().sum(), x.row_sums().iter().sum());
    assert!((sim / obs - 1.0).abs() < 0.1, "sampled {sim} vs observed {obs} counts");
}

#[test]
fn early_stopping_restores_the_best_weights() {
    let s = sim(1000, 4);
    let tc = TrainConfig { max_epochs: 300, kl_warmup: 0.0, patience: 3, min_delta: 5.0, ..Default::default() };
    let m = fit(&s, VaeConfig::default(), tc);
    assert!(m.meta.training.stopped_early);
    assert_eq!(m.meta.training.best_epoch + 3, m.meta.training.history.len());
    let cov = covariates(&s);
    let data = VaeData::new(&s.counts.csr, &cov);
    // The ELBO draws z: average a few evaluations of the 100 held-out cells.
    let task = VaeTask { model: &m.vae, data: &data };
    let val: f64 = (0..10).map(|_| evaluate(&task, &m.meta.training.validation_cells, 1024).0).sum::<f64>() / 10.0;
    let best = m.meta.training.history[m.meta.training.best_epoch - 1].validation_elbo;
    assert!((val - best).abs() / best < 0.01, "restored {val} vs best {best}");
}

#[test]
fn interrupts_stop_training_and_keep_a_usable_model() {
    let s = sim(300, 5);
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let stop = || calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 7;
    let cov = covariates(&s);
    let tc = TrainConfig { max_epochs: 50, kl_warmup: 0.0, ..Default::default() };
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let m = VaeModel::fit(&s.counts, &cov, VaeConfig::default(), tc, Device::Cpu, &stop, &|_| {}).unwrap();
    assert!(m.meta.training.interrupted);
    assert!(m.meta.training.history.len() <= 4, "{} epochs", m.meta.training.history.len());
    let z = latent_of(&m, &s);
    assert!(z.iter().all(|v| v.is_finite()));
    // The pass that encodes the training cells after the fit runs to its
    // end although the interrupt is still raised (the model would be lost
    // with it), and without Σ log x! it encodes as with it.
    let d = m.meta.config.n_latent;
    let mut into = vec![0.0; 300 * d];
    let out = &mut crate::models::LatentOut::Memory(&mut into);
    m.training_latent_into(&VaeData::for_encoding(&s.counts.csr, &cov), &|_, _| {}, &stop, out).unwrap();
    assert!((0..300 * d).all(|k| into[(k % d) * 300 + k / d] == f64::from(z[k])));
}

#[test]
fn new_cells_are_matched_by_gene_name_and_batch_label() {
    let s = sim(200, 6);
    let m = fit(&s, VaeConfig::default(), quick(2));
    let fewer = s.counts.select_genes(&(5..200).collect::<Vec<_>>());
    let e = m.align_genes(fewer).unwrap_err().to_string();
    assert!(e.contains("5 of the model's 200 genes are missing"), "{e}");
    let reversed = s.counts.select_genes(&(0..200).rev().collect::<Vec<_>>());
    assert!(m.align_genes(reversed).unwrap() == s.counts.csr);
    let labels: Vec<String> = vec!["plate 9".into(); 200];
    let e = m.covariates_for(200, Some(&labels), &[], vec![], true).unwrap_err().to_string();
    assert!(e.contains("'plate 9' was not seen"), "{e}");
    let e = m.covariates_for(200, None, &[], vec![], true).unwrap_err().to_string();
    assert!(e.contains("trained on 2 batches"), "{e}");
}

#[test]
fn counts_kept_on_the_device_train_the_same_model() {
    let s = sim(300, 8);
    let cov = covariates(&s);
    let tc = quick(3);
    // One turn for both runs: no other test may touch libtorch's global
    // state (generator, threads) between or during them.
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let run = |resident: bool| {
        // The same thread count for both runs: sums split differently otherwise.
        crate::device::set_threads(2).unwrap();
        seed_torch(tc.seed);
        let cfg = VaeConfig { n_genes: 200, n_batch: 2, n_design: 2, ..Default::default() };
        let vae = Vae::new(cfg, Device::Cpu).unwrap();
        let mut data = VaeData::new(&s.counts.csr, &cov);
        if resident {
            data = data.keep_on(Device::Cpu).unwrap();
        }
        train(&VaeTask { model: &vae, data: &data }, &tc, &never, &|_| {}).unwrap();
        infer::latent(&vae, &data, true)
    };
    assert!(run(true) == run(false), "resident and host minibatches trained different models");
}

/// The model seen through the one interface every kind implements.
fn cells_of(s: &crate::simulate::Simulation) -> crate::models::Cells {
    let b = &s.batch;
    crate::models::Cells {
        counts: vec![s.counts.clone()],
        batch: Some(b.codes.iter().map(|&c| b.levels[c as usize].clone()).collect()),
        ..Default::default()
    }
}

#[test]
fn the_fitted_model_interface_matches_the_model_and_survives_its_file() {
    use crate::models::{ExpressionOptions, FittedModel, LatentOptions};
    let s = sim(300, 4);
    let m = fit(&s, VaeConfig::default(), quick(3));
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let z = FittedModel::latent(&m, cells_of(&s), &LatentOptions::default()).unwrap();
    assert_eq!((z.joint.rows, z.joint.cols), (300, 10));
    assert!(z.joint.values == latent_of(&m, &s));
    let back = crate::models::from_bytes(&FittedModel::to_bytes(&m).unwrap(), Device::Cpu).unwrap();
    assert_eq!(back.kind(), "vae");
    let opts = ExpressionOptions { transform_batch: vec![s.batch.levels[1].clone()], ..Default::default() };
    let e1 = FittedModel::expression(&m, cells_of(&s), &opts).unwrap();
    let e2 = back.expression(cells_of(&s), &opts).unwrap();
    assert!(e1 == e2, "expression differs after the round trip");
    assert_eq!((e1.rows, e1.cols), (300, 200));
    let d = back.describe().unwrap();
    assert_eq!(d["kind"], "vae");
    assert_eq!(d["genes"].as_array().map(Vec::len), Some(200));
    // Options a VAE cannot honour are refused by name.
    let err = back.expression(cells_of(&s), &ExpressionOptions { ambient: true, ..Default::default() });
    assert!(err.unwrap_err().to_string().contains("`ambient`"));
    let unknown = ExpressionOptions { transform_batch: vec!["nope".into()], ..Default::default() };
    assert!(back.expression(cells_of(&s), &unknown).unwrap_err().to_string().contains("'nope' is not a batch"));
}

#[test]
fn a_non_finite_loss_stops_training_and_keeps_the_last_finite_weights() {
    let s = sim(300, 5);
    let m = fit(&s, VaeConfig::default(), TrainConfig { lr: 1e6, ..quick(20) });
    let t = &m.meta.training;
    let at = t.diverged_at.expect("lr = 1e6 diverges");
    assert_eq!(t.history.len(), at);
    assert!(!t.history[at - 1].train_loss.is_finite());
    assert!(latent_of(&m, &s).iter().all(|v| v.is_finite()), "NaN weights were kept");
    for (name, v) in m.vae.vs.variables() {
        assert!(v.isfinite().all().int64_value(&[]) == 1, "{name} holds non-finite values");
    }
}

#[test]
fn a_model_file_inconsistent_with_its_tensors_is_refused_naming_the_problem() {
    let s = sim(200, 6);
    let m = fit(&s, VaeConfig::default(), quick(1));
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let mut meta = m.meta.clone();
    meta.genes.pop();
    let bytes = crate::io::model_to_bytes(&m.vae.vs, "vae", &meta).unwrap();
    let err = VaeModel::from_bytes(&bytes, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("199 genes") && err.contains("200"), "{err}");
    // A tensor missing from the file is named.
    let file = crate::io::from_bytes(&m.to_bytes().unwrap()).unwrap();
    let mut tensors = file.tensors;
    let gone = tensors.keys().next().cloned().unwrap();
    tensors.remove(&gone);
    let err = crate::io::load_into(&m.vae.vs, &tensors).unwrap_err().to_string();
    assert!(err.contains(&format!("`{gone}`")), "{err}");
}

#[test]
fn a_model_without_validation_cells_reloads_with_its_nan_history() {
    let s = sim(200, 8);
    let m = fit(&s, VaeConfig::default(), TrainConfig { validation_fraction: 0.0, ..quick(2) });
    assert!(m.meta.training.history[0].validation_elbo.is_nan());
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let back = VaeModel::from_bytes(&m.to_bytes().unwrap(), Device::Cpu).unwrap();
    assert!(back.meta.training.history[1].validation_elbo.is_nan());
    assert_eq!(back.meta.training.history[1].train_loss, m.meta.training.history[1].train_loss);
}
