use super::*;
use crate::models::TORCH;
use crate::prep::{pca, PcaParams};
use crate::simulate::{simulate, SimParams, Simulation};
use crate::teacher::{harmony, Embedding, HarmonyCovariate, HarmonyParams};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

fn sim(n_cells: usize, seed: u64) -> Simulation {
    let p = SimParams {
        n_cells,
        n_genes: 300,
        group_prob: vec![0.4, 0.3, 0.3],
        batch_prob: vec![0.5, 0.5],
        seed,
        ..Default::default()
    };
    simulate(&p).unwrap()
}

/// Harmony on 10 PCs of log2 CPM: the default teacher, built from the core's parts.
fn teacher(s: &Simulation) -> Vec<f64> {
    let x = crate::prep::log2_cpm(&s.counts);
    let pcs = pca(&x, &PcaParams { n_pcs: 10, ..Default::default() }, &|| false).unwrap();
    harmony_of(&pcs.scores, &s.batch)
}

/// Harmony (θ 2, the batch) on PC scores (cells × d): Z*, row-major.
pub(crate) fn harmony_of(scores: &faer::Mat<f64>, batch: &crate::data::Categorical) -> Vec<f64> {
    let (n, d) = (scores.nrows(), scores.ncols());
    let z: Vec<f64> = (0..n).flat_map(|i| (0..d).map(move |j| (i, j))).map(|(i, j)| scores[(i, j)]).collect();
    let cov = HarmonyCovariate {
        name: "batch".into(),
        codes: batch.codes.clone(),
        n_levels: batch.n_levels(),
        theta: 2.0,
        lambda: None,
        protected: false,
    };
    harmony(Embedding::row_major(&z, n, d), &[cov], &HarmonyParams::default(), &|| false, &|_| {}).unwrap().z_corr
}

fn fit(s: &Simulation, z: &[f64], epochs: usize, seed: u64) -> DistillModel {
    fit_with(s, z, 10, epochs, seed, Target::Global)
}

fn fit_with(s: &Simulation, z: &[f64], d: usize, epochs: usize, seed: u64, target: Target) -> DistillModel {
    let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let all: Vec<usize> = (0..s.counts.n_genes()).collect();
    let data = DistillData {
        counts: (&s.counts).into(),
        input_genes: &all,
        decoder_genes: &all,
        batch: &s.batch,
        teacher: Embedding::row_major(z, z.len() / d, d).into(),
        teacher_name: "harmony".into(),
        teacher_protects: vec![],
    };
    let tc = TrainConfig {
        max_epochs: epochs,
        batch_size: 128,
        adam_eps: 1e-8,
        weight_decay: 0.0,
        kl_warmup: 0.0,
        seed,
        ..Default::default()
    };
    let config = DistillConfig { target, ..Default::default() };
    crate::device::with_threads(2, || {
        DistillModel::fit(&data, config, tc.clone(), tc, Device::Cpu, &|| false, &|_, _| {})
    })
    .unwrap()
    .unwrap()
}

#[test]
fn student_learns_the_teacher_and_decodes_without_the_batch() {
    let s = sim(800, 3);
    let z = teacher(&s);
    let m = fit(&s, &z, 100, 1);
    // Phase 1: the student's Z keeps what the teacher has: cell types apart,
    // batches mixed (the teacher's trailing dimensions are noise that no
    // student can predict cell by cell, so compare scores, not coordinates).
    let target: Vec<f32> = z.iter().map(|&v| v as f32).collect();
    let ours = m.latent(&s.counts).unwrap();
    let score = |v: &[f32]| {
        let v: Vec<f64> = v.iter().map(|&x| x as f64).collect();
        let e = crate::metrics::Embedding::row_major(&v, 800, 10);
        crate::metrics::integration_metrics(&e, &s.batch.codes, &s.group.codes, None, 0).unwrap()
    };
    let (st, te) = (score(&ours), score(&target));
    let msg = format!(
        "student iLISI {:.3} cLISI {:.3} ARI {:.3}; teacher {:.3} {:.3} {:.3}",
        st.ilisi, st.clisi, st.ari_kmeans, te.ilisi, te.clisi, te.ari_kmeans
    );
    assert!(te.ilisi > 0.5 && te.ari_kmeans > 0.9, "{msg}");
    assert!(st.ilisi > te.ilisi - 0.05 && st.clisi > te.clisi - 0.02 && st.ari_kmeans > te.ari_kmeans - 0.02, "{msg}");
    // Phase 2 lowered the validation NLL.
    let h = &m.meta.history_decoder;
    assert!(h.last().unwrap().validation_elbo < 0.8 * h[0].validation_elbo);
    // Corrected expression: within a cell type, cells of batch 1 decoded to
    // batch 0 look like batch 0 cells; the raw data differ by the batch factors.
    let rho = m.corrected(&s.counts, &[0]).unwrap();
    let g = 300;
    let lib: Vec<f64> = s.counts.library_sizes();
    let (mut raw_gap, mut cor_gap) = (0.0, 0.0);
    for grp in 0..3u32 {
        let cells = |b: u32| (0..800).filter(|&i| s.group.codes[i] == grp && s.batch.codes[i] == b).collect::<Vec<_>>();
        let (c0, c1) = (cells(0), cells(1));
        for j in 0..g {
            let mean_rho = |cs: &[usize]| cs.iter().map(|&i| rho[i * g + j] as f64).sum::<f64>() / cs.len() as f64;
            let mean_raw = |cs: &[usize]| {
                cs.iter()
                    .map(|&i| {
                        let (idx, val) = s.counts.csr.row(i);
                        idx.iter().position(|&c| c as usize == j).map_or(0.0, |p| val[p] as f64) / lib[i]
                    })
                    .sum::<f64>()
                    / cs.len() as f64
            };
            let w = s.gene_mean[j];
            raw_gap += w * ((mean_raw(&c1) + 1e-6).ln() - (mean_raw(&c0) + 1e-6).ln()).abs();
            cor_gap += w * ((mean_rho(&c1) + 1e-6).ln() - (mean_rho(&c0) + 1e-6).ln()).abs();
        }
    }
    assert!(cor_gap < 0.3 * raw_gap, "batch gap in expression: raw {raw_gap}, corrected {cor_gap}");
}

#[test]
fn the_student_keeps_clusters_that_lie_along_one_direction() {
    // A teacher whose three types sit at 1, 3 and 6 along one direction u:
    // standardizing each cell's row maps all three onto (nearly) the same
    // point, the global standardization keeps them apart.
    let s = sim(800, 4);
    let d = 8;
    let u = [0.9, -0.4, 0.3, 0.1, -0.2, 0.5, -0.1, 0.2];
    let radius = [1.0, 3.0, 6.0];
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let z: Vec<f64> = (0..800)
        .flat_map(|i| {
            let r = radius[s.group.codes[i] as usize];
            u.iter().map(|&v| r * v).collect::<Vec<_>>()
        })
        .map(|v| v + 0.05 * rng.sample::<f64, _>(StandardNormal))
        .collect();
    let ari = |m: &DistillModel| {
        let v: Vec<f64> = m.latent(&s.counts).unwrap().iter().map(|&x| x as f64).collect();
        let e = crate::metrics::Embedding::row_major(&v, 800, d);
        (crate::metrics::integration_metrics(&e, &s.batch.codes, &s.group.codes, None, 0).unwrap().ari_kmeans, v)
    };
    let (global, v) = ari(&fit_with(&s, &z, d, 60, 1, Target::Global));
    let (cell, _) = ari(&fit_with(&s, &z, d, 60, 1, Target::Cell));
    assert!(global > 0.95 && cell < 0.6, "k-means ARI: global target {global:.3}, per-cell target {cell:.3}");
    // The global student's Z is in the teacher's units: per-type means along
    // u (a little shrunk towards the centre, as a regression is).
    for (g, &r) in radius.iter().enumerate() {
        let cells: Vec<usize> = (0..800).filter(|&i| s.group.codes[i] == g as u32).collect();
        let along = cells.iter().map(|&i| (0..d).map(|j| v[i * d + j] * u[j]).sum::<f64>()).sum::<f64>()
            / cells.len() as f64
            / u.iter().map(|x| x * x).sum::<f64>();
        assert!((along - r).abs() < 0.15 * radius[2], "type {g}: {along:.3} along u, teacher {r}");
    }
}

#[test]
fn models_saved_before_a_setting_existed_read_as_they_were_fitted() {
    let mut v = serde_json::to_value(DistillConfig::default()).unwrap();
    assert_eq!(v["target"], "global");
    assert_eq!(v["n_hidden_decoder"], 128);
    assert_eq!(v["input_scale_factor"], 1e6);
    for key in ["target", "n_hidden_decoder", "input_scale_factor"] {
        v.as_object_mut().unwrap().remove(key);
    }
    let old: DistillConfig = serde_json::from_value(v).unwrap();
    // Per-cell targets, one width for both networks, and log2 CPM input.
    assert_eq!(old.target, Target::Cell);
    assert_eq!(old.decoder_width(), old.n_hidden);
    assert_eq!(old.input_scale_factor, 1e6);
    let zero = DistillConfig { n_input: 1, n_genes: 1, n_latent: 2, input_scale_factor: 0.0, ..Default::default() };
    assert!(zero.check().unwrap_err().to_string().contains("input_scale_factor"));
}

#[test]
fn same_seed_same_model_and_files_round_trip() {
    let s = sim(300, 5);
    let z = teacher(&s);
    let a = fit(&s, &z, 3, 7);
    let b = fit(&s, &z, 3, 7);
    assert_eq!(a.latent(&s.counts).unwrap(), b.latent(&s.counts).unwrap());
    let c = fit(&s, &z, 3, 8);
    assert_ne!(a.latent(&s.counts).unwrap(), c.latent(&s.counts).unwrap());
    // Building a model draws weights from the global generator: take a turn.
    let back = {
        let _turn = TORCH.lock().unwrap_or_else(|e| e.into_inner());
        DistillModel::from_bytes(&a.to_bytes().unwrap(), Device::Cpu).unwrap()
    };
    assert_eq!(back.meta.genes, a.meta.genes);
    assert_eq!(back.meta.teacher_protects, Some(vec![]));
    // A file from before the protected covariates were recorded reads as
    // "not known" (R then reads them from the teacher's name).
    let mut old = serde_json::to_value(&a.meta).unwrap();
    old.as_object_mut().unwrap().remove("teacher_protects");
    let old: DistillMeta = serde_json::from_value(old).unwrap();
    assert_eq!(old.teacher_protects, None);
    assert_eq!(back.latent(&s.counts).unwrap(), a.latent(&s.counts).unwrap());
    // The encoder reads log2(count / library · 10^6 + 1), library over all
    // genes; a loaded model as it was fitted.
    assert_eq!(back.meta.config.input_scale_factor, 1e6);
    let x = back.input_for(&s.counts).unwrap();
    for r in [0, 150, 299] {
        let (cols, counts) = s.counts.csr.row(r);
        let library: f64 = counts.iter().map(|&c| f64::from(c)).sum();
        let (x_cols, x_values) = x.row(r);
        assert_eq!(x_cols, cols);
        for (&v, &c) in x_values.iter().zip(counts) {
            let by_hand = (f64::from(c) / library * 1e6 + 1.0).log2();
            assert!((f64::from(v) - by_hand).abs() < 1e-5, "cell {r}: {v} against {by_hand}");
        }
    }
    assert_eq!(back.corrected(&s.counts, &[1]).unwrap(), a.corrected(&s.counts, &[1]).unwrap());
    // The encoder did not move in phase 2: Z equals phase 1's best.
    assert_eq!(a.meta.history_decoder.len(), 3);
    let vae_file = DistillModel::from_bytes(b"not a model", Device::Cpu).unwrap_err().to_string();
    assert!(vae_file.contains("not a scdistill model file"));
}

#[test]
fn refuses_bad_teachers_and_missing_genes() {
    let s = sim(100, 2);
    let all: Vec<usize> = (0..300).collect();
    let mut z = vec![0.5; 100 * 10];
    z[35] = f64::NAN;
    let tc = TrainConfig::default();
    let mk = |z: &[f64], dim: usize| {
        let data = DistillData {
            counts: (&s.counts).into(),
            input_genes: &all,
            decoder_genes: &all,
            batch: &s.batch,
            teacher: Embedding::row_major(z, z.len() / dim, dim).into(),
            teacher_name: String::new(),
            teacher_protects: vec![],
        };
        DistillModel::fit(&data, DistillConfig::default(), tc.clone(), tc.clone(), Device::Cpu, &|| false, &|_, _| {})
            .unwrap_err()
            .to_string()
    };
    assert!(mk(&z, 10).contains("missing or infinite value (cell 4)"));
    assert!(mk(&z[..990], 10).contains("990 values"));
    let m = fit(&s, &teacher(&s), 1, 1);
    let fewer = s.counts.select_genes(&(0..299).collect::<Vec<_>>());
    let err = m.latent(&fewer).unwrap_err().to_string();
    assert!(err.contains("1 of the model's 300 input genes are missing"), "{err}");
}

#[test]
fn decoding_under_each_cells_own_batch_matches_decoding_to_that_batch() {
    let s = sim(300, 7);
    let m = fit(&s, &teacher(&s), 3, 1);
    let n = s.counts.n_cells();
    let own = m.decoded(&s.counts, &s.batch.codes, &[]).unwrap();
    let g = m.meta.config.n_genes;
    for b in 0..s.batch.n_levels() as u32 {
        let all = m.decoded(&s.counts, &[], &[b]).unwrap();
        for i in (0..n).filter(|&i| s.batch.codes[i] == b) {
            assert_eq!(own[i * g..(i + 1) * g], all[i * g..(i + 1) * g]);
        }
    }
    assert!(m.decoded(&s.counts, &[0], &[]).is_err(), "one label for many cells");
}

#[test]
fn latent_blocks_give_every_cell_and_fill_the_column_major_matrix_or_a_file() {
    // Four full blocks and a part, past one write of cells into a file
    // (65,536): the decoder's rows, then R's matrix or the file.
    let (n, d) = (4 * DISK_BLOCK + 7, 3);
    let value = |i: usize, j: usize| (i * d + j) as f32 * 0.5;
    let blocks = || -> Vec<Vec<f32>> {
        (0..n)
            .step_by(DISK_BLOCK)
            .map(|s| (s..(s + DISK_BLOCK).min(n)).flat_map(|i| (0..d).map(move |j| value(i, j))).collect())
            .collect()
    };
    let z = LatentBlocks { d, blocks: blocks() };
    for i in [0, DISK_BLOCK - 1, DISK_BLOCK, n - 1] {
        assert_eq!(z.row(i), [value(i, 0), value(i, 1), value(i, 2)]);
    }
    let mut out = vec![f64::NAN; n * d];
    z.write_to(&mut LatentOut::Memory(&mut out)).unwrap();
    assert!((0..n).all(|i| (0..d).all(|j| out[j * n + i] == f64::from(value(i, j)))));
    let path = std::env::temp_dir().join(format!("scdistill-latent-blocks-{}.h5", std::process::id()));
    let path = path.to_str().unwrap();
    let file = crate::data::CellsH5::create(path, "z", n, d, true).unwrap();
    LatentBlocks { d, blocks: blocks() }.write_to(&mut LatentOut::File(file.clone())).unwrap();
    let rows = file.read(0, n).unwrap();
    let _ = std::fs::remove_file(path);
    assert!((0..n).all(|i| (0..d).all(|j| rows[i * d + j] == f64::from(value(i, j)))));
}
