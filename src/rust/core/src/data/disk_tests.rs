use super::*;
use crate::data::{CellsH5, Embedding, H5adWriter};
use tch::Device;

fn random_counts(n: usize, g: usize, seed: u64) -> Csr {
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let rows = (0..n)
        .map(|_| {
            let mut idx = vec![];
            let mut val = vec![];
            for j in 0..g {
                if rng.random::<f64>() < 0.3 {
                    idx.push(j as u32);
                    val.push(rng.random_range(1..20) as f32);
                }
            }
            if idx.is_empty() {
                idx.push(0);
                val.push(1.0);
            }
            (idx, val)
        })
        .collect();
    Csr::from_rows(rows, g)
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|k| format!("{prefix}{k}")).collect()
}

/// Writes `m` as an .h5ad file in blocks of `block` cells.
pub(crate) fn write_h5ad(path: &str, m: &Csr, block: usize, batch: &[u32]) {
    let mut w = H5adWriter::create(path, m.n_cols).unwrap();
    for s in (0..m.n_rows).step_by(block) {
        let rows: Vec<usize> = (s..(s + block).min(m.n_rows)).collect();
        let part = Csr::from_rows(rows.iter().map(|&r| (m.row(r).0.to_vec(), m.row(r).1.to_vec())).collect(), m.n_cols);
        w.append(&part).unwrap();
    }
    let cols = vec![("batch".to_string(), batch.to_vec(), vec!["a".to_string(), "b".to_string()])];
    w.finish(&names("c", m.n_rows), &names("g", m.n_cols), &cols).unwrap();
}

#[test]
fn an_h5ad_file_reopened_between_blocks_is_the_one_written_in_one_go() {
    // Each block appended by a writer reopened for it (nothing kept open in
    // between): the same file as one writer's, and `reopen` of a file that
    // is not this package's says so.
    let m = random_counts(230, 30, 4);
    let path = tmp("reopened.h5ad");
    H5adWriter::create(&path, 30).unwrap();
    for s in (0..230).step_by(64) {
        let rows: Vec<usize> = (s..(s + 64).min(230)).collect();
        let mut w = H5adWriter::reopen(&path, 30).unwrap();
        assert_eq!(w.n_rows(), s as u64);
        w.append(&m.select_rows(&rows)).unwrap();
    }
    let w = H5adWriter::reopen(&path, 30).unwrap();
    assert_eq!(w.n_rows(), 230);
    w.finish(&names("c", 230), &names("g", 30), &[]).unwrap();
    let d = DiskCsr::open(&path, sparse(), 230, 30).unwrap();
    assert_eq!(d.read_range(0, 230).unwrap(), m);
    let r = crate::data::H5Reader::open(&path).unwrap();
    assert_eq!(r.strings("obs/_index").unwrap(), names("c", 230));
    // A file without X/data.
    let other = tmp("dense-only.h5");
    crate::data::DenseH5::create(&other, "values", 3, 2).unwrap();
    let e = H5adWriter::reopen(&other, 2).err().expect("not an h5ad file");
    assert!(e.to_string().contains("X"), "{e}");
}

fn sparse() -> Layout {
    Layout::Sparse { data: "X/data".into(), indices: "X/indices".into(), indptr: "X/indptr".into() }
}

fn tmp(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("scdistill-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name).to_string_lossy().into_owned()
}

#[test]
fn an_h5ad_file_written_in_blocks_reads_back_the_same_cells() {
    let m = random_counts(300, 40, 1);
    let path = tmp("roundtrip.h5ad");
    write_h5ad(&path, &m, 70, &vec![0; 300]);
    let d = DiskCsr::open(&path, sparse(), 300, 40).unwrap();
    assert_eq!(d.read_range(0, 300).unwrap(), m);
    assert_eq!(d.read_range(123, 124).unwrap().row(0), m.row(123));
    // Any order, repeats, far-apart runs.
    let rows = [299, 0, 5, 5, 200, 17, 250, 1];
    let got = d.read_rows(&rows).unwrap();
    for (k, &r) in rows.iter().enumerate() {
        assert_eq!(got.row(k), m.row(r), "cell {r}");
    }
    let scan = d.scan(&|_, _| {}, &|| false).unwrap();
    assert_eq!(scan.row_sums, m.row_sums());
    assert_eq!(scan.log_factorial, crate::models::log_factorial(&m));
    assert_eq!(scan.nnz, m.nnz() as u64);
    let mut per_gene = vec![0u64; 40];
    m.indices.iter().for_each(|&j| per_gene[j as usize] += 1);
    assert_eq!(scan.gene_cells, per_gene);
    // Names and attributes as AnnData writes them.
    let r = crate::data::H5Reader::open(&path).unwrap();
    assert_eq!(r.strings("var/_index").unwrap(), names("g", 40));
    assert_eq!(r.strings("obs/batch/categories").unwrap(), vec!["a", "b"]);
    assert_eq!(r.attr_strings("X", "encoding-type").unwrap().unwrap(), vec!["csr_matrix"]);
    assert_eq!(r.attr_strings("obs", "column-order").unwrap().unwrap(), vec!["batch"]);
    assert_eq!(r.attr_strings("obs", "nothing").unwrap(), None);
    assert_eq!(r.attr_strings("nothing", "x").unwrap(), None);
    assert_eq!(r.read_1d::<i32>("obs/batch/codes", 0, 300).unwrap(), vec![0; 300]);
    // A gene subset, reordered.
    let keep = vec![39, 0, 7];
    let d = DiskCsr::open(&path, sparse(), 300, 40).unwrap().select_columns(keep.clone()).unwrap();
    assert_eq!(d.read_range(0, 300).unwrap(), m.select_columns(&keep));
    // A selection of a selection.
    let d = d.select_columns(vec![2, 0]).unwrap();
    assert_eq!(d.read_range(0, 300).unwrap(), m.select_columns(&[7, 39]));
}

#[test]
fn an_epoch_streams_every_training_cell_once_in_block_shuffled_windows() {
    let m = random_counts(2_000, 12, 2);
    let path = tmp("stream.h5ad");
    write_h5ad(&path, &m, 512, &vec![0; 2000]);
    let mut d = DiskCsr::open(&path, sparse(), 2_000, 12).unwrap();
    d.window_blocks = 4; // several windows per epoch
    let (train, val) = d.split(0.1, 3);
    assert_eq!(train.len() + val.len(), 2_000);
    // Whole blocks are held out, and the split is seeded.
    assert!(val.iter().all(|&r| val.contains(&(r / d.block * d.block))));
    assert_eq!(d.split(0.1, 3), (train.clone(), val.clone()));
    assert_ne!(d.split(0.1, 4).1, val);
    let order = d.epoch_order(&train, 9, None);
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, train);
    assert_ne!(order, train, "shuffled");
    // Minibatches of the order come from the stream and equal direct reads,
    // also across window boundaries (batch size 37 does not divide them).
    for chunk in order.chunks(37) {
        assert_eq!(d.fetch(chunk).unwrap(), d.read_rows(chunk).unwrap());
    }
    d.end_stream();
    // The next epoch (seed + 1) starts from the window read ahead meanwhile:
    // the same cells as a fresh reader's, in the same order.
    let next = d.epoch_order(&train, 10, None);
    let mut fresh = DiskCsr::open(&path, sparse(), 2_000, 12).unwrap();
    fresh.window_blocks = 4;
    assert_eq!(next, fresh.epoch_order(&train, 10, None));
    fresh.end_stream();
    for chunk in next.chunks(37) {
        assert_eq!(d.fetch(chunk).unwrap(), d.read_rows(chunk).unwrap());
    }
    d.end_stream();
    // Another seed, another order; the same seed, the same order.
    let again = d.epoch_order(&train, 9, None);
    d.end_stream();
    assert_eq!(again, order);
    assert_ne!(d.epoch_order(&train, 10, None), order);
    d.end_stream();
}

#[test]
fn with_several_ranks_each_reads_its_own_windows_and_the_order_deals_their_cells() {
    let m = random_counts(3_000, 12, 5);
    let path = tmp("ranks.h5ad");
    write_h5ad(&path, &m, 512, &vec![0; 3000]);
    let mut d = DiskCsr::open(&path, sparse(), 3_000, 12).unwrap();
    d.window_blocks = 3;
    let (train, _) = d.split(0.1, 3);
    let world = 3;
    let orders: Vec<Vec<usize>> = (0..world)
        .map(|rank| {
            let order = d.epoch_order(&train, 9, Some((rank, world)));
            // This rank's cells: positions rank, rank + world, ... of the order.
            let mine: Vec<usize> = order.iter().skip(rank).step_by(world).copied().collect();
            for chunk in mine.chunks(29) {
                assert_eq!(d.fetch(chunk).unwrap(), d.read_rows(chunk).unwrap());
            }
            d.end_stream();
            order
        })
        .collect();
    assert!(orders.iter().all(|o| *o == orders[0]), "every rank computes the same order");
    let mut sorted = orders[0].clone();
    sorted.sort_unstable();
    assert_eq!(sorted, train, "every training cell once");
    // Each rank's cells come from about a third of the blocks (whole blocks
    // dealt to it, apart from the few cells moved to even the shares out).
    let blocks_of = |rank: usize| {
        let mut b: Vec<usize> = orders[0].iter().skip(rank).step_by(world).map(|&r| r / d.block).collect();
        b.sort_unstable();
        b.dedup();
        b
    };
    let n_blocks = train.iter().map(|&r| r / d.block).collect::<std::collections::BTreeSet<_>>().len();
    for rank in 0..world {
        assert!(
            blocks_of(rank).len() <= n_blocks / world + 5,
            "rank {rank}: {} of {n_blocks} blocks",
            blocks_of(rank).len()
        );
    }
    // One rank is the plain order.
    assert_eq!(d.epoch_order(&train, 9, Some((0, 1))), d.epoch_order(&train, 9, None));
    d.end_stream();
}

#[test]
fn bad_files_and_bad_values_are_errors_that_name_the_file_and_the_cell() {
    let err = |r: Result<DiskCsr>| r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err(DiskCsr::open("/nonexistent/x.h5ad", sparse(), 1, 1)).contains("does not exist"));
    let text = tmp("text.h5ad");
    std::fs::write(&text, "not hdf5").unwrap();
    assert!(err(DiskCsr::open(&text, sparse(), 1, 1)).contains("not an HDF5 file"));

    let mut m = random_counts(50, 6, 3);
    let path = tmp("shape.h5ad");
    write_h5ad(&path, &m, 50, &vec![0; 50]);
    assert!(err(DiskCsr::open(&path, sparse(), 49, 6)).contains("entries for 49 cells"));
    let dense = Layout::Dense { dataset: "X/data".into() };
    assert!(err(DiskCsr::open(&path, dense, 50, 6)).contains("expected cells x genes"));
    let missing = Layout::Sparse { data: "X/counts".into(), indices: "X/indices".into(), indptr: "X/indptr".into() };
    assert!(err(DiskCsr::open(&path, missing, 50, 6)).contains("no dataset 'X/counts'"));

    let at = m.indptr[30];
    m.values[at] = 2.5;
    let path = tmp("fraction.h5ad");
    write_h5ad(&path, &m, 50, &vec![0; 50]);
    let d = DiskCsr::open(&path, sparse(), 50, 6).unwrap();
    let e = d.scan(&|_, _| {}, &|| false).unwrap_err().to_string();
    assert!(e.contains("cell 31") && e.contains("non-integer") && e.contains("fraction.h5ad"), "{e}");
    m.values[at] = -1.0;
    let path = tmp("negative.h5ad");
    write_h5ad(&path, &m, 50, &vec![0; 50]);
    let d = DiskCsr::open(&path, sparse(), 50, 6).unwrap();
    assert!(d.read_range(0, 50).unwrap_err().to_string().contains("negative"));
}

#[test]
fn a_vae_trained_from_disk_matches_one_trained_in_memory() {
    use crate::data::Covariates;
    use crate::models::vae::{VaeConfig, VaeData, VaeModel};
    use crate::simulate::{simulate, SimParams};
    use crate::train::TrainConfig;
    let s = simulate(&SimParams {
        n_cells: 1_500,
        n_genes: 150,
        group_prob: vec![0.5, 0.3, 0.2],
        batch_prob: vec![0.5, 0.5],
        seed: 5,
        ..Default::default()
    })
    .unwrap();
    let path = tmp("vae.h5ad");
    write_h5ad(&path, &s.counts.csr, 400, &s.batch.codes);
    let cov = Covariates::new(s.batch.clone(), vec![], vec![]).unwrap();
    let tc = TrainConfig { max_epochs: 30, early_stopping: false, ..Default::default() };
    let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let all: Vec<usize> = (0..1_500).collect();
    let score = |m: &VaeModel| {
        let data = VaeData::new(&s.counts.csr, &cov);
        crate::device::seed_torch(0); // the ELBO draws z
        crate::train::evaluate(&crate::models::vae::VaeTask { model: &m.vae, data: &data }, &all, 1024).0
    };
    let fit_disk = || {
        let d = DiskCsr::open(&path, sparse(), 1_500, 150).unwrap();
        let scan = d.scan(&|_, _| {}, &|| false).unwrap();
        let m = crate::device::with_threads(2, || {
            VaeModel::fit_on_disk(
                &d,
                &scan,
                &s.counts.genes,
                &cov,
                VaeConfig::default(),
                tc.clone(),
                Device::Cpu,
                &|| false,
                &|_| {},
            )
        })
        .unwrap()
        .unwrap();
        (m, d)
    };
    let (disk, d) = fit_disk();
    let memory = crate::device::with_threads(2, || {
        VaeModel::fit(&s.counts, &cov, VaeConfig::default(), tc.clone(), Device::Cpu, &|| false, &|_| {})
    })
    .unwrap()
    .unwrap();
    // Both scored on every cell, in memory: the streamed order (blocks and
    // windows) trains as well as the full shuffle.
    let (e_disk, e_mem) = (score(&disk), score(&memory));
    assert!((e_disk - e_mem).abs() < 0.01 * e_mem.abs(), "-ELBO disk {e_disk} vs memory {e_mem}");
    // The held-out cells are whole blocks of the file.
    let v = &disk.meta.training.validation_cells;
    assert!(!v.is_empty() && v.iter().all(|&r| v.contains(&(r / d.block * d.block))));
    // Reproducible from the same seed, and the latent space read from disk
    // equals the one computed in memory.
    let (again, _) = fit_disk();
    assert_eq!(score(&again), e_disk);
    let z_disk = disk
        .latent_on_disk(
            DiskCells {
                disk: DiskCsr::open(&path, sparse(), 1_500, 150).unwrap(),
                genes: s.counts.genes.clone(),
                batch: None,
                categorical: vec![],
                continuous: vec![],
            },
            true,
            0,
            &|_, _| {},
            &|| false,
        )
        .unwrap();
    let z_mem = disk.training_latent(&s.counts.csr, &cov);
    let diff = z_disk.values.iter().zip(&z_mem.values).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-4, "latent differs by {diff}");
    // The training cells' latent space written as it is encoded: into a
    // column-major matrix, from memory, the same values as gathered; into
    // a file, from disk, those the matrix holds from disk.
    use crate::models::LatentOut;
    let k = VaeConfig::default().n_latent;
    let into = |data: &VaeData, out: &mut LatentOut| disk.training_latent_into(data, &|_, _| {}, &|| false, out);
    let mut z_cols = vec![0.0; 1_500 * k];
    into(&VaeData::new(&s.counts.csr, &cov), &mut LatentOut::Memory(&mut z_cols)).unwrap();
    assert!((0..1_500).all(|i| (0..k).all(|j| z_cols[j * 1_500 + i] == f64::from(z_mem.values[i * k + j]))));
    let scan = d.scan(&|_, _| {}, &|| false).unwrap();
    let from_disk = VaeData::on_disk(&d, &scan, &cov);
    into(&from_disk, &mut LatentOut::Memory(&mut z_cols)).unwrap();
    let file = crate::data::CellsH5::create(&tmp("vae_latent.h5"), "latent", 1_500, k, true).unwrap();
    into(&from_disk, &mut LatentOut::File(file.clone())).unwrap();
    let rows = file.read(0, 1_500).unwrap();
    assert!((0..1_500).all(|i| (0..k).all(|j| rows[i * k + j] == z_cols[j * 1_500 + i])));
    // Room for other than every cell is refused.
    let err = into(&from_disk, &mut LatentOut::Memory(&mut z_cols[..10])).unwrap_err().to_string();
    assert!(err.contains("room for 10 latent values"), "{err}");
}

#[test]
fn a_simulation_written_to_a_file_holds_the_cells_simulate_draws() {
    use crate::simulate::{simulate, simulate_to_h5ad, SimParams};
    // Past one block of cells drawn at once (16,384).
    let p = SimParams {
        n_cells: 20_000,
        n_genes: 30,
        group_prob: vec![0.7, 0.3],
        batch_prob: vec![0.5, 0.5],
        seed: 4,
        ..Default::default()
    };
    let path = tmp("sim.h5ad");
    let s = simulate_to_h5ad(&p, &path, None).unwrap();
    assert_eq!(s.counts.csr.n_rows, 0);
    let want = simulate(&p).unwrap();
    assert_eq!(s.library_size, want.library_size);
    assert_eq!(s.batch.codes, want.batch.codes);
    let d = DiskCsr::open(&path, sparse(), 20_000, 30).unwrap();
    assert_eq!(d.read_range(0, 20_000).unwrap(), want.counts.csr);
    let species = SimParams { species: Some(Default::default()), ..p.clone() };
    assert!(simulate_to_h5ad(&species, &tmp("sp.h5ad"), None).unwrap_err().to_string().contains("one species"));
    assert!(simulate_to_h5ad(&p, &tmp("r.h5ad"), Some(&tmp("a.h5ad"))).unwrap_err().to_string().contains("no ATAC"));
}

#[test]
fn a_paired_simulation_written_to_two_files_holds_the_cells_and_peaks_simulate_draws() {
    use crate::simulate::{simulate, simulate_to_h5ad, AtacParams, SimParams};
    // Past one block of cells, with ATAC: both files hold every cell, in order.
    let p = SimParams {
        n_cells: 17_000,
        n_genes: 20,
        group_prob: vec![0.6, 0.4],
        batch_prob: vec![0.5, 0.5],
        seed: 9,
        atac: Some(AtacParams { n_peaks: 40, ..Default::default() }),
        ..Default::default()
    };
    let (rna, peaks) = (tmp("paired_rna.h5ad"), tmp("paired_atac.h5ad"));
    let s = simulate_to_h5ad(&p, &rna, Some(&peaks)).unwrap();
    let a = s.atac.as_ref().unwrap();
    assert_eq!((s.counts.csr.n_rows, a.counts.n_rows), (0, 0));
    let want = simulate(&p).unwrap();
    let want_atac = want.atac.as_ref().unwrap();
    assert_eq!(a.linked_gene, want_atac.linked_gene);
    assert_eq!(a.group_factor, want_atac.group_factor);
    assert_eq!(DiskCsr::open(&rna, sparse(), 17_000, 20).unwrap().read_range(0, 17_000).unwrap(), want.counts.csr);
    let on_disk = DiskCsr::open(&peaks, sparse(), 17_000, 40).unwrap().read_range(0, 17_000).unwrap();
    assert!(want_atac.counts.nnz() > 17_000);
    assert_eq!(on_disk, want_atac.counts);
    assert!(simulate_to_h5ad(&p, &tmp("r2.h5ad"), None).unwrap_err().to_string().contains("second file"));
}

#[test]
fn de_of_cells_on_disk_equals_de_of_the_same_cells_in_memory() {
    use crate::data::Covariates;
    use crate::de::{DeSettings, Method};
    use crate::models::vae::{VaeConfig, VaeModel};
    use crate::models::{Cells, FittedModel};
    use crate::simulate::{simulate, SimParams};
    use crate::train::TrainConfig;
    let s = simulate(&SimParams {
        n_cells: 1_200,
        n_genes: 80,
        group_prob: vec![0.5, 0.5],
        batch_prob: vec![0.5, 0.5],
        de_prob: 0.3,
        de_fac_loc: 1.0,
        seed: 6,
        ..Default::default()
    })
    .unwrap();
    // Blocks smaller than the DE's chunks, so that a chunk spans blocks.
    let path = tmp("de.h5ad");
    write_h5ad(&path, &s.counts.csr, 300, &s.batch.codes);
    let cov = Covariates::new(s.batch.clone(), vec![], vec![]).unwrap();
    let tc = TrainConfig { max_epochs: 30, early_stopping: false, ..Default::default() };
    let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let model = crate::device::with_threads(2, || {
        VaeModel::fit(&s.counts, &cov, VaeConfig::default(), tc, Device::Cpu, &|| false, &|_| {})
    })
    .unwrap()
    .unwrap();
    let labels: Vec<String> = s.batch.codes.iter().map(|&c| s.batch.levels[c as usize].clone()).collect();
    let g1: Vec<usize> = (0..1_200).filter(|&c| s.group.codes[c] == 0).collect();
    let g2: Vec<usize> = (0..1_200).filter(|&c| s.group.codes[c] == 1).collect();
    // Three samples per group, by position.
    let sample_of: Vec<u32> = g1
        .iter()
        .enumerate()
        .map(|(i, _)| (i % 3) as u32)
        .chain(g2.iter().enumerate().map(|(i, _)| 3 + (i % 3) as u32))
        .collect();
    let batches = s.batch.levels.clone();
    let on_disk = |batch| DiskCells {
        disk: DiskCsr::open(&path, sparse(), 1_200, 80).unwrap(),
        genes: s.counts.genes.clone(),
        batch,
        categorical: vec![],
        continuous: vec![],
    };
    for (method, n_samples, sample_of) in
        [(Method::Change, 3_000, vec![]), (Method::McDropout, 7, vec![]), (Method::Samples, 3, sample_of)]
    {
        let settings = DeSettings { method, n_samples, n_pairs: 2_000, seed: 11, sample_of, ..Default::default() };
        let memory = model
            .differential_expression(
                Cells {
                    counts: vec![s.counts.clone()],
                    batch: Some(labels.clone()),
                    categorical: vec![],
                    continuous: vec![],
                },
                &g1,
                &g2,
                settings.clone(),
                &batches,
                &crate::de::Watch::quiet(),
            )
            .unwrap();
        // Progress counts the cells through the model, to the end.
        let reports = std::cell::RefCell::new(vec![]);
        let progress = |done: usize, total: usize| reports.borrow_mut().push((done, total));
        let disk = model
            .differential_expression_on_disk(
                on_disk(Some(labels.clone())),
                &g1,
                &g2,
                settings,
                &batches,
                &crate::de::Watch::new(&|| false, &progress),
            )
            .unwrap();
        let (done, total) = *reports.borrow().last().unwrap();
        let expected = match method {
            Method::Change => 3_000 / 2 * 2 * 2, // per decoding batch, two batches, two groups
            _ => 1_200 * n_samples,
        };
        assert_eq!((done, total), (expected, expected), "{method:?}");
        let json = |t: &crate::de::DeTable| serde_json::to_string(t).unwrap();
        assert_eq!(json(&disk), json(&memory), "{method:?}");
        // Not a comparison of empty tables: the groups differ.
        assert!(memory.lfc_mean.iter().any(|v| v.abs() > 0.5), "{method:?}: {:?}", &memory.lfc_mean[..5]);
    }
    // A group cell past the file's end is refused.
    let e = model.differential_expression_on_disk(
        on_disk(Some(labels)),
        &[0, 1_200],
        &g2,
        DeSettings::default(),
        &batches,
        &crate::de::Watch::quiet(),
    );
    assert!(e.unwrap_err().to_string().contains("outside the 1200 cells"));
}

#[test]
fn hvgs_and_pca_of_counts_on_disk_equal_those_computed_in_memory() {
    use crate::prep::{hvg_pca, hvg_pca_on_disk, hvg_pca_on_disk_into, PcaOf, PcaParams, ScoresOut};
    use crate::simulate::{simulate, SimParams};
    // Past one block of cells (16,384); two batches of unequal size.
    let s = simulate(&SimParams {
        n_cells: 20_000,
        n_genes: 150,
        group_prob: vec![0.5, 0.3, 0.15, 0.05],
        batch_prob: vec![0.7, 0.3],
        seed: 8,
        ..Default::default()
    })
    .unwrap();
    let path = tmp("pca.h5ad");
    write_h5ad(&path, &s.counts.csr, 5_000, &s.batch.codes);
    let d = DiskCsr::open(&path, sparse(), 20_000, 150).unwrap();
    let params = PcaParams { n_pcs: 8, ..Default::default() };
    let (h, r) = hvg_pca(&s.counts, 60, Some(&s.batch), PcaOf::Log(1e4), &params, &|| false).unwrap();
    let done = std::cell::Cell::new((0, 0));
    let got =
        hvg_pca_on_disk(&d, 60, Some(&s.batch), 0.3, Some(8), true, 1e4, &|a, b| done.set((a, b)), &|| false).unwrap();
    assert_eq!(done.get(), (80_000, 80_000));
    assert_eq!(got.hvg.selected, h.selected);
    assert_eq!(got.hvg.mean, h.mean);
    let close = |a: &[f64], b: &[f64], tol: f64| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()));
    assert!(close(&got.hvg.variance_norm, &h.variance_norm, 1e-9));
    assert_eq!(got.library, s.counts.library_sizes());
    let p = got.pca.unwrap();
    assert!(close(&p.sdev, &r.sdev, 1e-9), "{:?} vs {:?}", p.sdev, r.sdev);
    for j in 0..8 {
        for i in 0..60 {
            assert!((p.loadings[(i, j)] - r.loadings[(i, j)]).abs() < 1e-7);
        }
        for i in (0..20_000).step_by(7) {
            assert!((p.scores[(i, j)] - r.scores[(i, j)]).abs() < 1e-6);
        }
    }
    // Into a column-major buffer (R's matrix), with no matrix of its own:
    // the same scores; a buffer of the wrong size is refused before a pass.
    let mut buf = vec![f64::NAN; 20_000 * 8];
    let no_progress = |_, _| {};
    let into = |out: ScoresOut, stop: bool| {
        hvg_pca_on_disk_into(&d, 60, Some(&s.batch), 0.3, Some(8), true, 1e4, &no_progress, &|| stop, out)
    };
    let r = into(ScoresOut::Memory(&mut buf), false).unwrap();
    assert_eq!(r.pca.as_ref().unwrap().scores.nrows(), 0);
    assert!((0..8).all(|j| (0..20_000).all(|i| buf[j * 20_000 + i] == p.scores[(i, j)])));
    let e = into(ScoresOut::Memory(&mut buf[1..]), true).unwrap_err();
    assert!(e.to_string().contains("scores"), "{e}");
    // Into a file, a block at a time: the same scores, read back.
    let scores = tmp("scores.h5");
    let _ = std::fs::remove_file(&scores);
    let file = CellsH5::create(&scores, "pcs", 20_000, 8, false).unwrap();
    into(ScoresOut::File(&file), false).unwrap();
    let back = file.read(0, 20_000).unwrap();
    assert!((0..8).all(|j| (0..20_000).all(|i| back[i * 8 + j] == p.scores[(i, j)])));
    let wide = CellsH5::create(&scores, "wide", 20_000, 9, false).unwrap();
    let e = into(ScoresOut::File(&wide), true).unwrap_err();
    assert!(e.to_string().contains("dataset 'wide' holds 20000 cells x 9, not 20000 x 8"), "{e}");
    let _ = std::fs::remove_file(&scores);
    // Genes only: two passes.
    let only = hvg_pca_on_disk(&d, 60, None, 0.3, None, true, 1e4, &|a, b| done.set((a, b)), &|| false).unwrap();
    assert!(only.pca.is_none() && done.get() == (40_000, 40_000));
    let h1 = crate::prep::highly_variable_genes(&s.counts, 60, None, 0.3).unwrap();
    assert_eq!(only.hvg.selected, h1.selected);
    let e = hvg_pca_on_disk(&d, 60, None, 0.3, Some(60), true, 1e4, &|_, _| {}, &|| false).unwrap_err();
    assert!(e.to_string().contains("n_pcs"), "{e}");
    let e = hvg_pca_on_disk(&d, 60, None, 0.3, Some(8), true, 1e4, &|_, _| {}, &|| true).unwrap_err();
    assert!(matches!(e, crate::error::Error::Interrupted));
}

#[test]
fn a_student_distilled_from_disk_matches_one_distilled_in_memory() {
    use crate::models::distill::{DistillConfig, DistillCounts, DistillData, DistillModel, LatentOut, Teacher};
    use crate::prep::hvg_pca_on_disk;
    use crate::simulate::{simulate, SimParams};
    use crate::train::TrainConfig;
    let n = 2_000;
    let s = simulate(&SimParams {
        n_cells: n,
        n_genes: 150,
        group_prob: vec![0.5, 0.3, 0.2],
        batch_prob: vec![0.6, 0.4],
        seed: 9,
        ..Default::default()
    })
    .unwrap();
    let path = tmp("distill.h5ad");
    write_h5ad(&path, &s.counts.csr, 500, &s.batch.codes);
    let d = DiskCsr::open(&path, sparse(), n, 150).unwrap();
    // The teacher as distill() computes it from disk: HVGs and PCA in
    // blocks, Harmony on the scores.
    let t = hvg_pca_on_disk(&d, 100, Some(&s.batch), 0.3, Some(10), true, 1e4, &|_, _| {}, &|| false).unwrap();
    let z = crate::models::distill::tests::harmony_of(&t.pca.unwrap().scores, &s.batch);
    let all: Vec<usize> = (0..150).collect();
    let hvg = t.hvg.selected.clone();
    let tc = TrainConfig {
        max_epochs: 30,
        early_stopping: false,
        adam_eps: 1e-8,
        weight_decay: 0.0,
        kl_warmup: 0.0,
        seed: 1,
        ..Default::default()
    };
    let scan = d.scan(&|_, _| {}, &|| false).unwrap();
    let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
    // Z* in memory or in a file; Z into R's matrix or into a file (`out`).
    let in_memory = || Teacher::from(Embedding::row_major(&z, n, 10));
    let fit_to = |counts: DistillCounts,
                  decoder: &[usize],
                  tc: &TrainConfig,
                  teacher: Teacher,
                  out: Option<&CellsH5>,
                  stop: &(dyn Fn() -> bool + Sync)| {
        let data = DistillData {
            counts,
            input_genes: &hvg,
            decoder_genes: decoder,
            batch: &s.batch,
            teacher,
            teacher_name: "harmony".into(),
            teacher_protects: vec![],
        };
        let mut zc = vec![0.0; n * 10];
        let latent = match out {
            Some(f) => LatentOut::File(f.clone()),
            None => LatentOut::Memory(&mut zc),
        };
        let m = crate::device::with_threads(2, || {
            let cfg = DistillConfig::default();
            let (t1, t2) = (tc.clone(), tc.clone());
            DistillModel::fit_into(&data, cfg, t1, t2, Device::Cpu, stop, &|_, _| {}, &|_, _| {}, latent)
        })
        .unwrap()?;
        // Z comes column-major (R's layout), or from the file in single
        // precision; here row-major, as latent() gives it.
        let z = match out {
            Some(f) => f.read(0, n).unwrap().iter().map(|&v| v as f32).collect(),
            None => (0..n * 10).map(|k| zc[(k % 10) * n + k / 10] as f32).collect::<Vec<f32>>(),
        };
        Ok::<_, crate::error::Error>((m, z))
    };
    let fit = |counts: DistillCounts, decoder: &[usize], tc: &TrainConfig| {
        fit_to(counts, decoder, tc, in_memory(), None, &|| false).unwrap()
    };
    let on_disk = || DistillCounts::Disk { disk: &d, genes: &s.counts.genes, library: &scan.row_sums };
    let (disk, z_disk) = fit(on_disk(), &all, &tc);
    let (memory, z_mem) = fit((&s.counts).into(), &all, &tc);
    // The student's fit to its teacher (R²) and the decoder's loss: the
    // streamed order (blocks, windows) trains as well as the full shuffle.
    let r2 = |zs: &[f32]| {
        let mean: Vec<f64> = (0..10).map(|j| (0..n).map(|i| z[i * 10 + j]).sum::<f64>() / n as f64).collect();
        let ss_res: f64 = zs.iter().zip(&z).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
        let ss_tot: f64 = z.iter().enumerate().map(|(k, v)| (v - mean[k % 10]).powi(2)).sum();
        1.0 - ss_res / ss_tot
    };
    let (r_disk, r_mem) = (r2(&z_disk), r2(&z_mem));
    assert!(r_mem > 0.6 && r_disk > r_mem - 0.05, "R² disk {r_disk} vs memory {r_mem}");
    let last = |m: &DistillModel| m.meta.history_decoder.last().unwrap().train_loss;
    assert!((last(&disk) - last(&memory)).abs() < 0.02 * last(&memory), "{} vs {}", last(&disk), last(&memory));
    // Z from training is the model's Z of the cells; the held-out cells
    // are whole blocks; the same seed gives the same student.
    let again = disk.latent(&s.counts).unwrap();
    assert!(z_disk.iter().zip(&again).all(|(a, b)| (a - b).abs() < 1e-4));
    assert_eq!(z_mem, memory.latent(&s.counts).unwrap());
    let v = &disk.meta.validation_cells;
    assert!(!v.is_empty() && v.iter().all(|&r| v.contains(&(r / d.block * d.block))));
    assert_eq!(fit(on_disk(), &all, &tc).1, z_disk);
    // Z* read from a file a block at a time, and Z written to one: the same
    // student and the same Z, which the file keeps in single precision, as
    // the encoder gave it.
    let file = tmp("distill-results.h5");
    let _ = std::fs::remove_file(&file);
    let teacher = CellsH5::create(&file, "teacher_latent", n, 10, false).unwrap();
    for start in (0..n).step_by(700) {
        let end = (start + 700).min(n);
        teacher.write(start, &z[start * 10..end * 10]).unwrap();
    }
    assert_eq!(teacher.read(0, n).unwrap(), z);
    let out = CellsH5::create(&file, "latent", n, 10, true).unwrap();
    let (from_file, back) =
        fit_to(on_disk(), &all, &tc, Teacher::File(teacher.clone()), Some(&out), &|| false).unwrap();
    let losses = |m: &DistillModel| {
        let h = m.meta.history_encoder.iter().chain(&m.meta.history_decoder);
        h.map(|e| (e.train_loss, e.validation_elbo)).collect::<Vec<_>>()
    };
    assert_eq!(losses(&from_file), losses(&disk));
    assert_eq!(back, z_disk);
    // A value that is not finite in Z*'s file is named by its cell.
    let mut bad = z[1234 * 10..1235 * 10].to_vec();
    bad[3] = f64::INFINITY;
    teacher.write(1234, &bad).unwrap();
    let in_file = || Teacher::File(teacher.clone());
    let err = fit_to(on_disk(), &all, &tc, in_file(), None, &|| false).err().unwrap().to_string();
    assert!(err.contains("missing or infinite value (cell 1235)"), "{err}");
    // Counts in memory need Z* in memory.
    let err = fit_to((&s.counts).into(), &all, &tc, in_file(), None, &|| false).err().unwrap().to_string();
    assert!(err.contains("for counts on disk only"), "{err}");
    let _ = std::fs::remove_file(&file);
    // Ctrl-C in the encoder's phase: the model comes back with Z of every
    // cell, which the interrupt, still raised, does not stop.
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let stop = || calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 3;
    let (cut, z_cut) = fit_to(on_disk(), &all, &tc, in_memory(), None, &stop).unwrap();
    assert!(cut.meta.interrupted && cut.meta.history_decoder.is_empty());
    assert!(cut.meta.history_encoder.len() < 30, "{} epochs", cut.meta.history_encoder.len());
    let again = cut.latent(&s.counts).unwrap();
    assert!(z_cut.iter().zip(&again).all(|(a, b)| (a - b).abs() < 1e-4) && z_cut.iter().any(|&v| v != 0.0));
    // A decoder of the HVGs only: library sizes over those genes, as in memory.
    let short = TrainConfig { max_epochs: 2, ..tc.clone() };
    let (a, _) = fit(on_disk(), &hvg, &short);
    let (b, _) = fit((&s.counts).into(), &hvg, &short);
    assert_eq!(a.meta.genes, b.meta.genes);
    let first = |m: &DistillModel| m.meta.history_decoder[0].train_loss;
    assert!((first(&a) - first(&b)).abs() < 0.05 * first(&b), "{} vs {}", first(&a), first(&b));
}

#[test]
fn a_dense_result_written_in_blocks_reads_back_and_nothing_is_overwritten() {
    use crate::data::DenseH5;
    let path = tmp("dense.h5");
    let _ = std::fs::remove_file(&path);
    let (n, g) = (2500, 7);
    let values: Vec<f64> = (0..n * g).map(|i| (i as f64).sqrt() - 3.25).collect();
    DenseH5::create(&path, "normalized", n, g).unwrap();
    for start in (0..n).step_by(1000) {
        let end = (start + 1000).min(n);
        DenseH5::write_rows(&path, "normalized", start, &values[start * g..end * g]).unwrap();
    }
    let r = H5Reader::open(&path).unwrap();
    assert_eq!(r.shape("normalized").unwrap(), (vec![n as u64, g as u64], true));
    let back: Vec<f32> = r.read_rows_2d("normalized", 0, n as u64, g as u64).unwrap();
    assert!(back.iter().zip(&values).all(|(&b, &v)| b == v as f32));
    drop(r);
    // A second dataset joins the same file; the first cannot be made again.
    DenseH5::create(&path, "other", 3, 2).unwrap();
    let again = DenseH5::create(&path, "normalized", n, g).unwrap_err().to_string();
    assert!(again.contains("already has a dataset 'normalized'"), "{again}");
    let back2: Vec<f32> = H5Reader::open(&path).unwrap().read_rows_2d("normalized", 2499, 1, g as u64).unwrap();
    assert_eq!(back2, back[2499 * g..].to_vec());
    // A block past the end, or not whole rows, is refused.
    let past = DenseH5::write_rows(&path, "other", 2, &[1.0; 4]).unwrap_err().to_string();
    assert!(past.contains("do not fit dataset 'other' (3 x 2)"), "{past}");
    assert!(DenseH5::write_rows(&path, "other", 0, &[1.0; 3]).is_err());
    assert!(DenseH5::create(&path, "a/b", 1, 1).is_err());
    let _ = std::fs::remove_file(&path);
}

#[test]
fn cells_written_to_a_file_in_blocks_read_back_in_other_blocks() {
    let path = tmp("cells.h5");
    let _ = std::fs::remove_file(&path);
    let (n, d) = (3000, 5);
    let z: Vec<f64> = (0..n * d).map(|i| (i as f64 * 0.37).sin() * 1e3 + 1.0 / 3.0).collect();
    let f = CellsH5::create(&path, "teacher", n, d, false).unwrap();
    for start in (0..n).step_by(1024) {
        let end = (start + 1024).min(n);
        f.write(start, &z[start * d..end * d]).unwrap();
    }
    // Stored as R reads an HDF5Array: dimensions × cells.
    assert_eq!(H5Reader::open(&path).unwrap().shape("teacher").unwrap().0, vec![d as u64, n as u64]);
    assert_eq!(f.read(0, n).unwrap(), z);
    assert_eq!(f.read(1500, 7).unwrap(), z[1500 * d..1507 * d].to_vec());
    assert_eq!(CellsH5::open(&path, "teacher", n, d).unwrap(), f);
    let shape = CellsH5::open(&path, "teacher", n, d + 1).unwrap_err().to_string();
    assert!(shape.contains("not 3000 cells x 6 dimensions"), "{shape}");
    // Single precision keeps what f32 holds.
    let g = CellsH5::create(&path, "latent", n, d, true).unwrap();
    g.write(0, &z).unwrap();
    assert!(g.read(0, n).unwrap().iter().zip(&z).all(|(&b, &v)| b == f64::from(v as f32)));
    let past = f.write(n - 1, &z[..2 * d]).unwrap_err().to_string();
    assert!(past.contains("do not fit dataset 'teacher' (3000 cells x 5)"), "{past}");
    assert!(CellsH5::create(&path, "teacher", n, d, false).is_err());
    let _ = std::fs::remove_file(&path);
}
