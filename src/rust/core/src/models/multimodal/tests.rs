use super::*;
use crate::data::CountMatrix;
use crate::metrics::{integration_metrics, Embedding};
use crate::models::TORCH;
use crate::simulate::{simulate, AtacParams, SimParams, Simulation};
use crate::train::TrainConfig;
use statrs::distribution::{Continuous, Gamma};

fn sim(n_cells: usize, n_groups: usize, atac_only: usize, n_batches: usize, seed: u64) -> Simulation {
    let p = SimParams {
        n_cells,
        n_genes: 200,
        group_prob: vec![1.0 / n_groups as f64; n_groups],
        batch_prob: vec![1.0 / n_batches as f64; n_batches],
        atac: Some(AtacParams { n_peaks: 600, atac_only_groups: atac_only, ..Default::default() }),
        seed,
        ..Default::default()
    };
    simulate(&p).unwrap()
}

fn peaks(s: &Simulation) -> CountMatrix {
    let a = s.atac.as_ref().unwrap();
    CountMatrix { csr: a.counts.clone(), genes: a.peaks.clone(), cells: s.counts.cells.clone() }
}

fn spec(name: &str, ambient: bool, feature_scaling: bool) -> ModalitySpec {
    ModalitySpec { name: name.into(), n_features: 0, n_latent: 8, n_hidden: 64, ambient, feature_scaling, weight: 1.0 }
}

fn batch_covariates(s: &Simulation) -> MultimodalCovariates {
    let b = s.batch.clone();
    MultimodalCovariates {
        ambient: b.clone(),
        scaling: b.clone(),
        dispersion: b.clone(),
        library: b,
        decoder: vec![],
        encoder: vec![],
    }
}

fn fit(counts: &[&CountMatrix], s: &Simulation, cfg: MultimodalConfig, tc: TrainConfig) -> MultimodalModel {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let cov = batch_covariates(s);
    crate::device::with_threads(2, || MultimodalModel::fit(counts, &cov, cfg, tc, Device::Cpu, &|| false, &|_| {}))
        .unwrap()
        .unwrap()
}

fn two() -> MultimodalConfig {
    MultimodalConfig { modalities: vec![spec("RNA", true, false), spec("ATAC", false, true)], ..Default::default() }
}

fn ari(z: &[f32], d: usize, s: &Simulation, rows: &[usize]) -> f64 {
    let v: Vec<f64> = rows.iter().flat_map(|&r| z[r * d..(r + 1) * d].iter().map(|&x| x as f64)).collect();
    let batch: Vec<u32> = rows.iter().map(|&r| s.batch.codes[r]).collect();
    let label: Vec<u32> = rows.iter().map(|&r| s.group.codes[r]).collect();
    let e = Embedding::row_major(&v, rows.len(), d);
    integration_metrics(&e, &batch, &label, None, 0).unwrap().ari_kmeans
}

// Only the test sums every modality's global terms at once; training adds
// each modality's share to its loss (`loss_terms`).
impl Multimodal {
    /// The sum of every modality's global terms, before the division by `n_obs`.
    fn global_loss(&self) -> Tensor {
        (0..self.nets.len()).fold(Tensor::zeros([], (Kind::Float, self.device())), |a, m| a + self.global_terms(m))
    }
}

#[test]
fn global_terms_match_a_hand_computation_and_are_shared_over_training_cells_not_minibatches() {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(3);
    let g = 3usize;
    let cfg = MultimodalConfig {
        modalities: vec![ModalitySpec { n_features: g, ..spec("RNA", false, true) }],
        decoder_l2: 0.0,
        ..Default::default()
    };
    let mut model = Multimodal::new(cfg, Device::Cpu).unwrap();
    // σ → 0 makes the θ draw deterministic: log θ = μ.
    let mu = [1.0f64, 2.0, 0.5];
    tch::no_grad(|| {
        let net = &mut model.nets[0];
        net.theta_mu.copy_(&Tensor::from_slice(&mu.map(|v| v as f32)).view([1, 3]));
        let _ = net.theta_log_sigma.fill_(-30.0);
        net.scaling.as_mut().unwrap().copy_(&Tensor::from_slice(&[0.0f32, 0.5, -0.5]).view([1, 3]));
    });
    // By hand: −log Gamma(y; 200, 200) with y = softplus(γ)/0.7, −H = −Σ(log σ + ½ log 2πe),
    // −Σ(log λ − λ e^(−μ/2)) with λ = 3, −log Gamma(λ; 9, 3).
    let softplus = |x: f64| (1.0 + x.exp()).ln();
    let prior_y = Gamma::new(200.0, 200.0).unwrap();
    let mut want = 0.0;
    for (gamma, m) in [0.0, 0.5, -0.5].iter().zip(mu) {
        want -= prior_y.ln_pdf(softplus(*gamma) / 0.7);
        want -= -30.0 + 0.5 * (2.0 * std::f64::consts::PI * std::f64::consts::E).ln();
        want -= 3f64.ln() - 3.0 * (-m / 2.0).exp();
    }
    want -= Gamma::new(9.0, 3.0).unwrap().ln_pdf(3.0);
    let got = model.global_loss().double_value(&[]);
    assert!((got - want).abs() < 1e-3 * want.abs().max(1.0), "global terms {got}, by hand {want}");

    // Per cell, the loss carries global / n_obs whatever the minibatch size.
    let rows = vec![
        (vec![0, 2], vec![3.0, 1.0]),
        (vec![1, 2], vec![5.0, 2.0]),
        (vec![0, 1], vec![1.0, 1.0]),
        (vec![0], vec![4.0]),
    ];
    let counts = Csr::from_rows(rows, 3);
    let cov = MultimodalCovariates::none(4);
    let data = MultimodalData::new(vec![&counts], &cov).unwrap();
    let mut share = |n_obs: f64, rows: &[usize]| -> Vec<f64> {
        model.n_obs = n_obs;
        tch::manual_seed(1);
        let t = model.loss_terms(&data.inputs(rows, Device::Cpu), false);
        Vec::<f64>::try_from(t.kl_fixed.to_kind(Kind::Double)).unwrap()
    };
    for rows in [vec![0usize, 1], vec![0, 1, 2, 3]] {
        let (a, b) = (share(10.0, &rows), share(1000.0, &rows));
        for (x, y) in a.iter().zip(&b) {
            // Library KL is the same in both; the difference is global · (1/10 − 1/1000).
            assert!(((x - y) - want * (0.1 - 0.001)).abs() < 1e-3 * want.abs().max(1.0), "{x} {y}");
        }
    }
}

#[test]
fn training_on_rna_and_atac_separates_groups_that_only_atac_tells_apart() {
    // 4 cell types; the last one has the first one's RNA and differs in its peaks only.
    let s = sim(1200, 4, 1, 2, 7);
    let atac = peaks(&s);
    let tc = TrainConfig { max_epochs: 200, patience: 10, min_delta: 0.5, kl_warmup: 0.1, ..Default::default() };
    let both = fit(&[&s.counts, &atac], &s, two(), tc.clone());
    let h = &both.meta.training.history;
    let v: Vec<String> = h.iter().step_by(10).map(|r| format!("{:.2}", r.validation_elbo)).collect();
    assert!(both.meta.training.stopped_early, "ran {} epochs without stopping early: {}", h.len(), v.join(" "));
    assert!(h[both.meta.training.best_epoch - 1].validation_elbo < h[0].validation_elbo);
    assert_eq!(both.meta.n_obs, 1200 - 120);
    let rna_only_cfg = MultimodalConfig { modalities: vec![spec("RNA", true, false)], ..Default::default() };
    let rna_only = fit(&[&s.counts], &s, rna_only_cfg, tc);

    let cov = batch_covariates(&s);
    let (z_both, per) =
        infer::latent(&both.model, &MultimodalData::new(vec![&s.counts.csr, &atac.csr], &cov).unwrap(), true);
    let (z_rna, _) = infer::latent(&rna_only.model, &MultimodalData::new(vec![&s.counts.csr], &cov).unwrap(), true);
    assert_eq!(per.len(), 2);
    assert_eq!(per[0].len(), 1200 * 8);
    // Cells of type 0 and its ATAC-only twin, type 3.
    let twins: Vec<usize> = (0..1200).filter(|&c| s.group.codes[c] == 0 || s.group.codes[c] == 3).collect();
    let (a_both, a_rna) = (ari(&z_both, 16, &s, &twins), ari(&z_rna, 8, &s, &twins));
    assert!(a_both > 0.8 && a_rna < 0.3, "twins ARI: joint {a_both}, RNA only {a_rna}");
}

#[test]
fn attribution_favours_the_modality_that_carries_the_signal_and_the_model_round_trips() {
    // Every cell type copies the first one's RNA: only the peaks differ.
    let s = sim(800, 3, 2, 1, 11);
    let atac = peaks(&s);
    let tc = TrainConfig { max_epochs: 60, early_stopping: false, kl_warmup: 0.2, ..Default::default() };
    let m = fit(&[&s.counts, &atac], &s, two(), tc);
    let cov = batch_covariates(&s);
    let data = MultimodalData::new(vec![&s.counts.csr, &atac.csr], &cov).unwrap();
    let a = infer::attribution(&m.model, &data, &|| false);
    assert_eq!(a.len(), 800 * 2 * 16);
    assert!(a.iter().all(|v| v.is_finite() && *v >= 0.0));
    let (mut rna, mut peak) = (0f64, 0f64);
    for c in 0..800 {
        rna += a[(c * 2) * 16..(c * 2 + 1) * 16].iter().map(|&v| v as f64).sum::<f64>();
        peak += a[(c * 2 + 1) * 16..(c * 2 + 2) * 16].iter().map(|&v| v as f64).sum::<f64>();
    }
    assert!(peak > 2.0 * rna, "attribution: ATAC {peak}, RNA {rna}");

    // The file round-trip gives the same latent space.
    // (Building a model draws initial weights from the global generator: take a turn.)
    let back = {
        let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
        MultimodalModel::from_bytes(&m.to_bytes().unwrap(), Device::Cpu).unwrap()
    };
    let (z1, _) = infer::latent(&m.model, &data, true);
    let (z2, _) = infer::latent(&back.model, &data, true);
    assert_eq!(z1, z2);
    assert_eq!(back.meta.features[1], atac.genes);
    // Another kind of model file is refused.
    let err = crate::models::vae::VaeModel::from_bytes(&m.to_bytes().unwrap(), Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("not a VAE"), "{err}");
}

#[test]
fn same_seed_same_model_and_bad_settings_are_refused() {
    let s = sim(300, 2, 0, 2, 2);
    let atac = peaks(&s);
    let tc = TrainConfig { max_epochs: 3, early_stopping: false, ..Default::default() };
    let a = fit(&[&s.counts, &atac], &s, two(), tc.clone());
    let b = fit(&[&s.counts, &atac], &s, two(), tc.clone());
    let cov = batch_covariates(&s);
    let data = MultimodalData::new(vec![&s.counts.csr, &atac.csr], &cov).unwrap();
    assert_eq!(infer::latent(&a.model, &data, true).0, infer::latent(&b.model, &data, true).0);

    let mut mean = two();
    mean.combine = Combine::Mean;
    mean.modalities[1].n_latent = 5;
    let err =
        MultimodalModel::fit(&[&s.counts, &atac], &cov, mean, tc.clone(), Device::Cpu, &|| false, &|_| {}).unwrap_err();
    assert!(err.to_string().contains("n_latent"), "{err}");
    let err = MultimodalModel::fit(&[&s.counts], &cov, two(), tc, Device::Cpu, &|| false, &|_| {}).unwrap_err();
    assert!(err.to_string().contains("1 count matrices for 2 modalities"), "{err}");
}

#[test]
fn sparse_input_and_fused_likelihood_give_the_tensor_paths_loss_and_gradients() {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let s = sim(90, 3, 1, 2, 5);
    let atac = peaks(&s);
    // An encoder covariate too: its one-hot columns follow the features.
    let cov = MultimodalCovariates { encoder: vec![s.batch.clone()], ..batch_covariates(&s) };
    let data = MultimodalData::new(vec![&s.counts.csr, &atac.csr], &cov).unwrap();
    let mut cfg = two();
    cfg.modalities[0].n_features = 200;
    cfg.modalities[1].n_features = 600;
    cfg.n_ambient = 2;
    cfg.n_scaling = 2;
    cfg.n_dispersion = 2;
    cfg.n_library = 2;
    cfg.n_encoder_cov = 2;
    // A ridge strong enough to matter in the output layer's gradient.
    cfg.decoder_l2 = 50.0;
    tch::manual_seed(5);
    let mut model = Multimodal::new(cfg, Device::Cpu).unwrap();
    model.init_from_data(&data).unwrap();
    model.n_obs = 90.0;
    let rows: Vec<usize> = (0..90).step_by(2).collect();
    // dense: dense encoder input; tensor: the likelihood's tensor path too
    // (no host rows), where the output layer's ridge is in the graph.
    let run = |dense: bool, tensor: bool| -> (f64, Vec<Tensor>) {
        let mut inp = data.inputs(&rows, Device::Cpu);
        assert!(inp.encoder_input.iter().all(|x| matches!(x, EncoderInput::Sparse(_))));
        if dense {
            inp.encoder_input = data
                .counts
                .iter()
                .map(|c| {
                    EncoderInput::Dense(crate::data::log1p_rows_to_tensor(c.memory().unwrap(), &rows, Device::Cpu))
                })
                .collect();
        }
        if tensor {
            // Build the entries' tensors, then drop the host rows the fused kernel reads.
            inp.nonzero.iter_mut().for_each(|c| {
                c.x();
                c.host = None;
            });
        }
        for v in model.vs.trainable_variables() {
            let mut g = v.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        tch::manual_seed(9);
        let t = model.loss_terms(&inp, true);
        assert_eq!(t.deferred.len(), if dense { 0 } else { 4 });
        let loss = (&t.reconstruction + &t.kl_warmup + &t.kl_fixed).mean(Kind::Float);
        loss.backward();
        let extra: Vec<(Tensor, Tensor)> = t.deferred.iter().filter_map(|d| d.gradient()).collect();
        assert_eq!(extra.len(), t.deferred.len());
        let grads = model
            .vs
            .trainable_variables()
            .iter()
            .map(|v| match extra.iter().find(|(p, _)| p.data_ptr() == v.data_ptr()) {
                Some((_, g)) => g.copy(),
                None => v.grad().copy(),
            })
            .collect();
        (loss.double_value(&[]), grads)
    };
    let (sparse_loss, sparse_grads) = run(false, false);
    for tensor in [false, true] {
        let (loss, grads) = run(true, tensor);
        assert!((sparse_loss - loss).abs() < 1e-4 * loss.abs(), "loss {sparse_loss} vs {loss}, tensor path {tensor}");
        for (a, b) in sparse_grads.iter().zip(&grads) {
            let scale = b.abs().max().double_value(&[]).max(1e-3);
            let err = (a - b).abs().max().double_value(&[]);
            assert!(err < 1e-3 * scale, "gradient {:?}: error {err} at scale {scale}, tensor path {tensor}", b.size());
        }
    }
}

#[test]
fn a_model_trained_from_disk_matches_one_trained_in_memory() {
    use crate::data::{DiskCsr, H5adWriter, Layout};
    use crate::models::LatentOut;
    // RNA and peaks side by side in one file (a 10x multiome matrix's
    // layout), each modality opened as its own columns of it.
    let s = sim(1_200, 3, 0, 2, 8);
    let atac = peaks(&s);
    let (g, p) = (s.counts.n_genes(), atac.n_genes());
    let both: Vec<(Vec<u32>, Vec<f32>)> = (0..1_200)
        .map(|c| {
            let (ri, rv) = s.counts.csr.row(c);
            let (ai, av) = atac.csr.row(c);
            (ri.iter().copied().chain(ai.iter().map(|&j| j + g as u32)).collect(), [rv, av].concat())
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("scdistill-mm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("multiome.h5ad").to_string_lossy().into_owned();
    let mut w = H5adWriter::create(&path, g + p).unwrap();
    w.append(&Csr::from_rows(both, g + p)).unwrap();
    let features: Vec<String> = s.counts.genes.iter().chain(&atac.genes).cloned().collect();
    w.finish(&s.counts.cells, &features, &[]).unwrap();
    let open = || {
        let layout = Layout::Sparse { data: "X/data".into(), indices: "X/indices".into(), indptr: "X/indptr".into() };
        let d = |keep: Vec<usize>| DiskCsr::open(&path, layout.clone(), 1_200, g + p).unwrap().select_columns(keep);
        let mut disks = vec![d((0..g).collect()).unwrap(), d((g..g + p).collect()).unwrap()];
        disks[0].window_blocks = 5;
        disks[1].window_blocks = 3; // windows of unequal size stream out of step: aligned
        DiskCsr::in_step(&mut disks).unwrap();
        let scans: Vec<_> = disks.iter().map(|d| d.scan(&|_, _| {}, &|| false).unwrap()).collect();
        (disks, scans)
    };
    // The batch as an encoder covariate too: the sparse input appends it by
    // cell, not by the row of the block read.
    let mut cov = batch_covariates(&s);
    cov.encoder = vec![s.batch.clone()];
    let (disks, scans) = open();
    assert!(disks.iter().all(|d| d.window_blocks == 3));
    let refs: Vec<&DiskCsr> = disks.iter().collect();
    let on_disk = MultimodalData::on_disk(&refs, &scans, &cov).unwrap();
    let in_memory = MultimodalData::new(vec![&s.counts.csr, &atac.csr], &cov).unwrap();
    assert_eq!(on_disk.log_library, in_memory.log_library);
    assert_eq!(on_disk.log_factorial, in_memory.log_factorial);

    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let mut cfg = two();
    cfg.n_encoder_cov = 2;
    let tc = TrainConfig { max_epochs: 25, early_stopping: false, ..Default::default() };
    // The same start from either (the ambient profile and the library
    // prior are read from the file in blocks), and the same loss of any cells.
    let start = |data: &MultimodalData| {
        crate::device::seed_torch(1);
        let mut cfg = cfg.clone();
        (cfg.modalities[0].n_features, cfg.modalities[1].n_features) = (g, p);
        (cfg.n_ambient, cfg.n_scaling, cfg.n_dispersion, cfg.n_library) = (2, 2, 2, 2);
        let mut m = Multimodal::new(cfg, Device::Cpu).unwrap();
        m.init_from_data(data).unwrap();
        m
    };
    let (a, b) = (start(&on_disk), start(&in_memory));
    let rows = [901, 3, 517, 4, 1_100, 250];
    let loss = |m: &Multimodal, data: &MultimodalData| {
        crate::device::seed_torch(2);
        let t = m.loss_terms(&data.inputs(&rows, Device::Cpu), false);
        Vec::<f32>::try_from(t.reconstruction + t.kl_warmup + t.kl_fixed).unwrap()
    };
    assert_eq!(loss(&a, &on_disk), loss(&b, &in_memory));

    let fit_disk = || {
        let (disks, scans) = open();
        let refs: Vec<&DiskCsr> = disks.iter().collect();
        let f: Vec<&[String]> = vec![&s.counts.genes, &atac.genes];
        let m = crate::device::with_threads(2, || {
            MultimodalModel::fit_on_disk(
                &refs,
                &scans,
                &f,
                &cov,
                cfg.clone(),
                tc.clone(),
                Device::Cpu,
                &|| false,
                &|_| {},
            )
        })
        .unwrap()
        .unwrap();
        // The training cells' latent spaces written as they are encoded
        // into column-major matrices (R's).
        let data = MultimodalData::on_disk(&refs, &scans, &cov).unwrap();
        let dims: Vec<usize> = cfg.modalities.iter().map(|m| m.n_latent).collect();
        let mut joint = vec![0.0; 1_200 * cfg.n_latent()];
        let mut parts: Vec<Vec<f64>> = dims.iter().map(|&k| vec![0.0; 1_200 * k]).collect();
        let mut outs: Vec<LatentOut> = parts.iter_mut().map(|p| LatentOut::Memory(p)).collect();
        let seen = std::cell::Cell::new((0, 0));
        let progress = |done, all| seen.set((done, all));
        m.training_latent_into(&data, &progress, &|| false, &mut LatentOut::Memory(&mut joint), &mut outs).unwrap();
        assert_eq!(seen.get(), (1_200, 1_200), "progress reaches every cell");
        let stopped = m.training_latent_into(&data, &progress, &|| true, &mut LatentOut::Memory(&mut joint), &mut outs);
        assert!(stopped.is_err(), "an interrupt stops the pass");
        let bad =
            m.training_latent_into(&data, &|_, _| {}, &|| false, &mut LatentOut::Memory(&mut joint), &mut outs[..1]);
        assert!(bad.unwrap_err().to_string().contains("1 latent outputs for the model's 2 modalities"));
        (m, (joint, parts))
    };
    let (disk, z) = fit_disk();
    let memory = crate::device::with_threads(2, || {
        MultimodalModel::fit(&[&s.counts, &atac], &cov, cfg.clone(), tc.clone(), Device::Cpu, &|| false, &|_| {})
    })
    .unwrap()
    .unwrap();
    // Scored alike on every cell in memory: streaming both modalities in
    // step trains as well as the full shuffle.
    let all: Vec<usize> = (0..1_200).collect();
    let score = |m: &MultimodalModel| {
        crate::device::seed_torch(0);
        crate::train::evaluate(&MultimodalTask { model: &m.model, data: &in_memory }, &all, 1024).0
    };
    let (e_disk, e_mem) = (score(&disk), score(&memory));
    assert!((e_disk - e_mem).abs() < 0.01 * e_mem.abs(), "-ELBO disk {e_disk} vs memory {e_mem}");
    // The held-out cells are whole blocks; the latent read from disk is the
    // one computed in memory; the same seed gives the same model.
    let block = disks[0].block;
    let v = &disk.meta.training.validation_cells;
    assert!(!v.is_empty() && v.iter().all(|&r| v.contains(&(r / block * block))));
    let cols = |m: &crate::models::Matrix| -> Vec<f64> {
        (0..m.cols).flat_map(|j| (0..m.rows).map(move |i| f64::from(m.values[i * m.cols + j]))).collect()
    };
    let mem = disk.training_latent(&[&s.counts, &atac], &cov).unwrap();
    assert_eq!(z.0, cols(&mem.joint));
    assert!(z.1.iter().zip(&mem.parts).all(|(p, (_, m))| *p == cols(m)));
    assert_eq!(fit_disk().1 .0, z.0);
    // Modalities of different cells are refused.
    let layout = Layout::Sparse { data: "X/data".into(), indices: "X/indices".into(), indptr: "X/indptr".into() };
    let other = dir.join("other.h5ad").to_string_lossy().into_owned();
    let mut w = H5adWriter::create(&other, g).unwrap();
    w.append(&Csr::from_rows(
        (0..100).map(|c| (s.counts.csr.row(c).0.to_vec(), s.counts.csr.row(c).1.to_vec())).collect(),
        g,
    ))
    .unwrap();
    w.finish(&s.counts.cells[..100], &s.counts.genes, &[]).unwrap();
    let mut mixed = vec![
        DiskCsr::open(&path, layout.clone(), 1_200, g + p).unwrap(),
        DiskCsr::open(&other, layout, 100, g).unwrap(),
    ];
    let err = DiskCsr::in_step(&mut mixed).unwrap_err();
    assert!(err.to_string().contains("has 100 cells where"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
