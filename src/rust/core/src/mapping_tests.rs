use crate::data::{Categorical, CountMatrix, Covariates, Csr, Embedding};
use crate::mapping::MapOptions;
use crate::models::distill::{DistillConfig, DistillData, DistillModel};
use crate::models::vae::{Dispersion, VaeConfig, VaeModel};
use crate::models::{Cells, ExpressionOptions, FittedModel, LatentOptions, TORCH};
use crate::simulate::{simulate, SimParams, Simulation};
use crate::train::TrainConfig;
use tch::Device;

fn never() -> bool {
    false
}

/// Three batches: the first two are the reference, the third the query.
fn sim() -> Simulation {
    let p = SimParams {
        n_cells: 900,
        n_genes: 150,
        group_prob: vec![0.4, 0.3, 0.3],
        batch_prob: vec![0.35, 0.35, 0.3],
        seed: 5,
        ..Default::default()
    };
    simulate(&p).unwrap()
}

fn rows_of(m: &CountMatrix, rows: &[usize]) -> CountMatrix {
    let mut csr = Csr { n_rows: rows.len(), n_cols: m.csr.n_cols, indptr: vec![0], indices: vec![], values: vec![] };
    for &r in rows {
        let (i, v) = m.csr.row(r);
        csr.indices.extend_from_slice(i);
        csr.values.extend_from_slice(v);
        csr.indptr.push(csr.indices.len());
    }
    CountMatrix { csr, genes: m.genes.clone(), cells: rows.iter().map(|&r| m.cells[r].clone()).collect() }
}

struct Split {
    reference: CountMatrix,
    ref_batch: Vec<String>,
    query: CountMatrix,
    query_batch: Vec<String>,
}

fn split(s: &Simulation) -> Split {
    let lv = &s.batch.levels;
    let (q, r): (Vec<usize>, Vec<usize>) = (0..s.counts.n_cells()).partition(|&c| s.batch.codes[c] == 2);
    let label = |rows: &[usize]| rows.iter().map(|&c| lv[s.batch.codes[c] as usize].clone()).collect::<Vec<_>>();
    Split {
        reference: rows_of(&s.counts, &r),
        ref_batch: label(&r),
        query: rows_of(&s.counts, &q),
        query_batch: label(&q),
    }
}

fn cells(m: &CountMatrix, batch: &[String]) -> Cells {
    Cells { counts: vec![m.clone()], batch: Some(batch.to_vec()), ..Default::default() }
}

fn quick(max_epochs: usize, seed: u64) -> TrainConfig {
    TrainConfig { max_epochs, early_stopping: false, seed, kl_warmup: 0.0, ..Default::default() }
}

fn fit_vae(sp: &Split, config: VaeConfig) -> VaeModel {
    let levels: Vec<String> = {
        let mut l = sp.ref_batch.clone();
        l.sort();
        l.dedup();
        l
    };
    let codes = sp.ref_batch.iter().map(|b| levels.iter().position(|l| l == b).unwrap() as u32).collect();
    let batch = Categorical::new("batch", codes, levels, sp.reference.n_cells(), 1).unwrap();
    let cov = Covariates::new(batch, vec![], vec![]).unwrap();
    VaeModel::fit(&sp.reference, &cov, config, quick(40, 0), Device::Cpu, &never, &|_| {}).unwrap()
}

fn latent(m: &dyn FittedModel, c: &CountMatrix, b: &[String]) -> Vec<f32> {
    m.latent(cells(c, b), &LatentOptions::default()).unwrap().joint.values
}

fn own_expression(m: &dyn FittedModel, c: &CountMatrix, b: &[String]) -> Vec<f32> {
    m.expression(cells(c, b), &ExpressionOptions::default()).unwrap().values
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn a_mapped_vae_keeps_the_reference_and_learns_the_query_batch() {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let s = sim();
    let sp = split(&s);
    crate::device::with_threads(2, || {
        // The default VAE: the encoder reads no covariates.
        let cfg =
            VaeConfig { dispersion: Dispersion::GeneBatch, learn_library: true, n_layers: 2, ..Default::default() };
        let r = fit_vae(&sp, cfg);
        let m = r
            .map_query_cells(cells(&sp.query, &sp.query_batch), &MapOptions::default(), quick(150, 0), &never, &|_| {})
            .unwrap();
        assert_eq!(m.meta.batch_levels, vec!["Batch1", "Batch2", "Batch3"]);
        assert_eq!(m.meta.query_batches, vec!["Batch3"]);
        // Bit-identical latent spaces, for reference and query cells alike.
        assert!(latent(&r, &sp.reference, &sp.ref_batch) == latent(&m, &sp.reference, &sp.ref_batch));
        assert!(latent(&r, &sp.query, &sp.ref_batch[..sp.query.n_cells()]) == latent(&m, &sp.query, &sp.query_batch));
        // Reference cells decode exactly as before under their own batches.
        let d = max_diff(
            &own_expression(&r, &sp.reference, &sp.ref_batch),
            &own_expression(&m, &sp.reference, &sp.ref_batch),
        );
        assert!(d < 1e-6, "reference expression moved by {d}");
        // The query's ELBO is better under its own (learned) batch than the
        // reference model's best guess, any reference batch.
        let q = m.elbo(cells(&sp.query, &sp.query_batch), 1).unwrap().elbo;
        for b in ["Batch1", "Batch2"] {
            let as_ref = r.elbo(cells(&sp.query, &vec![b.to_string(); sp.query.n_cells()]), 1).unwrap().elbo;
            assert!(q < as_ref - 1.0, "query -ELBO {q} as its own batch, {as_ref} as {b}");
        }
        // Same seed, same mapped model.
        let again = r
            .map_query_cells(cells(&sp.query, &sp.query_batch), &MapOptions::default(), quick(150, 0), &never, &|_| {})
            .unwrap();
        let expr = |m: &VaeModel| own_expression(m, &sp.query, &sp.query_batch);
        assert!(expr(&again) == expr(&m), "same seed, different mapped model");
        // A query batch the reference knows is refused, naming it.
        let e = r
            .map_query_cells(cells(&sp.reference, &sp.ref_batch), &MapOptions::default(), quick(2, 0), &never, &|_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("query batch 'Batch1' is also a batch of the reference"), "{e}");
    })
    .unwrap();
}

#[test]
fn a_vae_that_encodes_its_batch_maps_the_query_through_new_encoder_columns() {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let s = sim();
    let sp = split(&s);
    crate::device::with_threads(2, || {
        let cfg = VaeConfig { encode_covariates: true, ..Default::default() };
        let r = fit_vae(&sp, cfg);
        let opts = MapOptions { train_decoder_first_layer: true };
        let m = r.map_query_cells(cells(&sp.query, &sp.query_batch), &opts, quick(30, 0), &never, &|_| {}).unwrap();
        // Reference cells read zeros in the new columns: the same latent
        // space up to the order of floating-point sums.
        let d = max_diff(&latent(&r, &sp.reference, &sp.ref_batch), &latent(&m, &sp.reference, &sp.ref_batch));
        assert!(d < 1e-5, "reference latent moved by {d}");
        // The first decoder layer trained: reference expression changes.
        let d = max_diff(
            &own_expression(&r, &sp.reference, &sp.ref_batch),
            &own_expression(&m, &sp.reference, &sp.ref_batch),
        );
        assert!(d > 1e-6, "the decoder's first layer did not train");
        // The query's cells land among reference cells of their own type:
        // nearest reference neighbour's type agrees for most query cells.
        let zr = latent(&m, &sp.reference, &sp.ref_batch);
        let zq = latent(&m, &sp.query, &sp.query_batch);
        let k = r.meta.config.n_latent;
        let group = |rows: Vec<usize>| rows.into_iter().map(|c| s.group.codes[c]).collect::<Vec<_>>();
        let (q_rows, r_rows): (Vec<usize>, Vec<usize>) = (0..s.counts.n_cells()).partition(|&c| s.batch.codes[c] == 2);
        let (gq, gr) = (group(q_rows), group(r_rows));
        let mut agree = 0;
        for i in 0..gq.len() {
            let q = &zq[i * k..(i + 1) * k];
            let nearest = (0..gr.len())
                .min_by(|&a, &b| {
                    let d = |j: usize| zr[j * k..(j + 1) * k].iter().zip(q).map(|(x, y)| (x - y).powi(2)).sum::<f32>();
                    d(a).total_cmp(&d(b))
                })
                .unwrap();
            agree += usize::from(gr[nearest] == gq[i]);
        }
        let frac = agree as f64 / gq.len() as f64;
        assert!(frac > 0.9, "query cells next to their own type: {frac}");
    })
    .unwrap();
}

#[test]
fn a_mapped_distilled_model_adds_an_embedding_row_and_keeps_the_reference() {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let s = sim();
    let sp = split(&s);
    crate::device::with_threads(2, || {
        let levels = vec!["Batch1".to_string(), "Batch2".to_string()];
        let codes = sp.ref_batch.iter().map(|b| levels.iter().position(|l| l == b).unwrap() as u32).collect();
        let batch = Categorical::new("batch", codes, levels, sp.reference.n_cells(), 1).unwrap();
        // The teacher: the simulated groups, one-hot with a little spread.
        let (_, r_rows): (Vec<usize>, Vec<usize>) = (0..s.counts.n_cells()).partition(|&c| s.batch.codes[c] == 2);
        let groups = &s.group.codes;
        let teacher: Vec<f64> = r_rows
            .iter()
            .flat_map(|&c| (0..3).map(move |g| if groups[c] == g { 1.0 } else { 0.0 } + 0.01 * (c % 7) as f64))
            .collect();
        let genes: Vec<usize> = (0..sp.reference.n_genes()).collect();
        let data = DistillData {
            counts: (&sp.reference).into(),
            input_genes: &genes,
            decoder_genes: &genes,
            batch: &batch,
            teacher: Embedding::row_major(&teacher, teacher.len() / 3, 3).into(),
            teacher_name: "groups".into(),
            teacher_protects: vec![],
        };
        let r = DistillModel::fit(
            &data,
            DistillConfig::default(),
            quick(20, 0),
            quick(20, 0),
            Device::Cpu,
            &never,
            &|_, _| {},
        )
        .unwrap();
        let m = r
            .map_query_cells(cells(&sp.query, &sp.query_batch), &MapOptions::default(), quick(20, 0), &never, &|_| {})
            .unwrap();
        assert_eq!(m.meta.batch_levels.len(), 3);
        assert!(latent(&r, &sp.reference, &sp.ref_batch) == latent(&m, &sp.reference, &sp.ref_batch));
        let d = max_diff(
            &own_expression(&r, &sp.reference, &sp.ref_batch),
            &own_expression(&m, &sp.reference, &sp.ref_batch),
        );
        assert_eq!(d, 0.0, "reference expression moved by {d}");
        assert!(m.meta.history_decoder.last().unwrap().train_loss < m.meta.history_decoder[0].train_loss);
    })
    .unwrap();
}

#[test]
fn a_mapped_multimodal_model_grows_every_batch_key_and_keeps_the_reference() {
    use crate::models::multimodal::{ModalitySpec, MultimodalConfig, MultimodalCovariates, MultimodalModel};
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let s = sim();
    let sp = split(&s);
    crate::device::with_threads(2, || {
        let levels = vec!["Batch1".to_string(), "Batch2".to_string()];
        let codes: Vec<u32> = sp.ref_batch.iter().map(|b| levels.iter().position(|l| l == b).unwrap() as u32).collect();
        let b = Categorical::new("batch", codes, levels, sp.reference.n_cells(), 1).unwrap();
        // The batch also enters the decoder (nn_conditioning_covariates).
        let cov = MultimodalCovariates {
            ambient: b.clone(),
            scaling: Categorical::constant("", b.codes.len()),
            dispersion: b.clone(),
            library: b.clone(),
            decoder: vec![b],
            encoder: vec![],
        };
        let spec = ModalitySpec {
            name: "RNA".into(),
            n_features: 0,
            n_latent: 8,
            n_hidden: 64,
            ambient: true,
            feature_scaling: false,
            weight: 1.0,
        };
        let cfg = MultimodalConfig { modalities: vec![spec], ..Default::default() };
        let r = MultimodalModel::fit(&[&sp.reference], &cov, cfg, quick(30, 0), Device::Cpu, &never, &|_| {}).unwrap();
        // One label vector per key: ambient, scaling, dispersion, library, decoder.
        let labels = |b: &[String]| {
            let v = Some(b.to_vec());
            vec![v.clone(), None, v.clone(), v.clone(), v]
        };
        let mm_cells = |c: &CountMatrix, b: &[String]| Cells {
            counts: vec![c.clone()],
            categorical: labels(b),
            ..Default::default()
        };
        let m = r
            .map_query_cells(
                mm_cells(&sp.query, &sp.query_batch),
                &MapOptions::default(),
                quick(60, 0),
                &never,
                &|_| {},
            )
            .unwrap();
        for key in [&m.meta.ambient, &m.meta.dispersion, &m.meta.library, &m.meta.decoder[0]] {
            assert_eq!(key.levels, vec!["Batch1", "Batch2", "Batch3"]);
        }
        assert_eq!(m.meta.config.n_decoder_cov, 3);
        let lat = |m: &dyn FittedModel, c: &CountMatrix, b: &[String]| {
            m.latent(mm_cells(c, b), &LatentOptions::default()).unwrap().joint.values
        };
        assert!(lat(&r, &sp.reference, &sp.ref_batch) == lat(&m, &sp.reference, &sp.ref_batch));
        let expr = |m: &dyn FittedModel, c: &CountMatrix, b: &[String]| {
            m.expression(mm_cells(c, b), &ExpressionOptions::default()).unwrap().values
        };
        let d = max_diff(&expr(&r, &sp.reference, &sp.ref_batch), &expr(&m, &sp.reference, &sp.ref_batch));
        assert!(d < 1e-6, "reference expression moved by {d}");
        let h = &m.meta.training.history;
        let (first, last) = (h[0].train_loss, h.last().unwrap().train_loss);
        assert!(last < first, "query training did not lower its loss: {first} -> {last}");
    })
    .unwrap();
}
