//! Timings of the core without R, one subcommand per job:
//!
//!     cargo run --release --example bench -- vae [n_cells] [n_genes] [epochs] [threads] [device] [f32|bf16] [batch_size]
//!         (one rank of a data-parallel group when WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT are set;
//!         a batch_size other than 128 scales the learning rate linearly, as scaled_lr() in R)
//!     cargo run --release --example bench -- multimodal [n_cells] [n_genes] [n_peaks] [epochs] [threads] [device] [f32|bf16]
//!     cargo run --release --example bench -- distill [n_cells] [n_genes] [epochs] [threads] [device]
//!     cargo run --release --example bench -- harmony [n] [d] [batches] [threads] [out]
//!     cargo run --release --example bench -- knn [cells] [dims] [k] [centre_sd_x10]
//!     cargo run --release --example bench -- sim [n_cells] [n_genes] [threads]
//!     cargo run --release --example bench -- allreduce [world] [max_params] [reps]
//!     cargo run --release --example bench -- species [n_cells] [n_genes] [epochs] [threads] [bf16|f32]
//!
//! Arguments are positional; a missing or unreadable one takes its default.
//! `device` is `cpu` (default), `cuda` or `auto`. One binary for all of them,
//! so that a GPU machine needs one file copied (see DESIGN.md). Each
//! subcommand prints what the example of its name (`vae_speed`, ...) printed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use scdistill_core::data::{CountMatrix, Covariates};
use scdistill_core::device::{parse_device, thread_pool};
use scdistill_core::metrics::{knn, knn_approx, leiden, umap_connectivities, Embedding};
use scdistill_core::models::multimodal::{ModalitySpec, MultimodalConfig, MultimodalCovariates, MultimodalModel};
use scdistill_core::models::vae::{VaeConfig, VaeModel};
use scdistill_core::simulate::{simulate, AtacParams, SimParams};
use scdistill_core::teacher::{harmony, HarmonyCovariate, HarmonyParams};
use scdistill_core::train::TrainConfig;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::time::Instant;

const USAGE: &str =
    "usage: bench <vae|multimodal|distill|harmony|knn|sim|allreduce|species> [arguments]; see the top of examples/bench.rs";

fn main() {
    let mut a: Vec<String> = std::env::args().collect();
    if a.len() < 2 {
        eprintln!("{USAGE}");
        std::process::exit(2);
    }
    // Without the subcommand, `a[i]` is the i-th argument, as each job reads it.
    let job = a.remove(1);
    match job.as_str() {
        "vae" => vae(&a),
        "multimodal" => multimodal(&a),
        "distill" => distill(&a),
        "harmony" => harmony_job(&a),
        "knn" => knn_job(&a),
        "sim" => sim(&a),
        "allreduce" => allreduce(&a),
        "species" => species(&a),
        _ => {
            eprintln!("unknown job `{job}`; {USAGE}");
            std::process::exit(2);
        }
    }
}

/// The i-th argument as a number, or `default`.
fn arg(a: &[String], i: usize, default: usize) -> usize {
    a.get(i).and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Seconds per epoch of the VAE on simulated counts. Under `WORLD_SIZE`,
/// `RANK`, `MASTER_ADDR` and `MASTER_PORT` the run is one rank of a
/// data-parallel group (world size 1 exercises the path on one device).
fn vae(a: &[String]) {
    let (n_cells, n_genes, epochs, threads) = (arg(a, 1, 20_000), arg(a, 2, 2_000), arg(a, 3, 3), arg(a, 4, 2));
    let device = parse_device(a.get(5).map(String::as_str).unwrap_or("cpu")).unwrap();
    if let Some(g) = scdistill_core::dist::Group::from_env(std::time::Duration::from_secs(120)).unwrap() {
        eprintln!("rank {} of {}", g.rank(), g.world());
        scdistill_core::dist::install(g);
    }
    let pool = thread_pool(threads).unwrap();
    pool.install(|| {
        let p = SimParams { n_cells, n_genes, batch_prob: vec![1.0; 4], ..Default::default() };
        let s = simulate(&p).unwrap();
        let cov = Covariates::new(s.batch.clone(), vec![], vec![]).unwrap();
        // "bf16": mixed-precision training (TrainConfig::bf16), where the CPU has it.
        let bf16 = a.get(6).map(String::as_str) == Some("bf16");
        let defaults = TrainConfig::default();
        let batch_size = arg(a, 7, defaults.batch_size);
        let lr = defaults.lr * batch_size as f64 / defaults.batch_size as f64;
        let tc = TrainConfig { max_epochs: epochs, early_stopping: false, bf16, batch_size, lr, ..defaults };
        let t0 = Instant::now();
        let m = VaeModel::fit(&s.counts, &cov, VaeConfig::default(), tc, device, &|| false, &|r| {
            eprintln!("epoch {} {:.3} s  train {:.2}  validation {:.2}", r.epoch, r.seconds, r.train_elbo, r.validation_elbo)
        })
        .unwrap();
        let secs: Vec<f64> = m.meta.training.history.iter().map(|r| r.seconds).collect();
        let held_out = m.meta.training.history.last().map_or(f64::NAN, |r| r.validation_elbo);
        println!(
            "{n_cells} cells x {n_genes} genes, {threads} threads, {:?}, minibatch {batch_size} (lr {lr}): {:.3} s/epoch \
             (median), {:.0} training cells/s, held-out -ELBO {held_out:.2}, total {:.1} s",
            device,
            median(&secs),
            n_cells as f64 * 0.9 / median(&secs),
            t0.elapsed().as_secs_f64()
        );
    });
}

/// Seconds per epoch of both phases of `distill()`'s student on simulated
/// counts, with 50 PCs of log2 CPM (scaled) as the teacher: the teacher's
/// quality does not matter for the timing, and its computation is not timed.
fn distill(a: &[String]) {
    use scdistill_core::data::Embedding;
    use scdistill_core::models::distill::{encoder_input, DistillConfig, DistillCounts, DistillData, DistillModel};
    use scdistill_core::prep::{pca, PcaParams};
    let (n_cells, n_genes, epochs, threads) = (arg(a, 1, 20_000), arg(a, 2, 2_000), arg(a, 3, 3), arg(a, 4, 2));
    let device = parse_device(a.get(5).map(String::as_str).unwrap_or("cpu")).unwrap();
    let pool = thread_pool(threads).unwrap();
    pool.install(|| {
        let p = SimParams { n_cells, n_genes, batch_prob: vec![1.0; 4], ..Default::default() };
        let s = simulate(&p).unwrap();
        let genes: Vec<usize> = (0..n_genes).collect();
        let t0 = Instant::now();
        let r = pca(&encoder_input(&s.counts, &genes, 1e6), &PcaParams::default(), &|| false).unwrap();
        let d = r.scores.ncols();
        let z: Vec<f64> = (0..n_cells).flat_map(|i| (0..d).map(move |j| (i, j))).map(|(i, j)| r.scores[(i, j)]).collect();
        let teacher_s = t0.elapsed().as_secs_f64();
        let data = DistillData {
            counts: DistillCounts::Memory(&s.counts),
            input_genes: &genes,
            decoder_genes: &genes,
            batch: &s.batch,
            teacher: Embedding::row_major(&z, n_cells, d).into(),
            teacher_name: "PCA".into(),
            teacher_protects: vec![],
        };
        let tc = TrainConfig { max_epochs: epochs, early_stopping: false, ..Default::default() };
        let t1 = Instant::now();
        let m = DistillModel::fit(&data, DistillConfig::default(), tc.clone(), tc, device, &|| false, &|phase, r| {
            eprintln!("{phase:?} epoch {} {:.3} s  train {:.3}  validation {:.3}", r.epoch, r.seconds, r.train_elbo, r.validation_elbo)
        })
        .unwrap();
        for (name, h) in [("encoder", &m.meta.history_encoder), ("decoder", &m.meta.history_decoder)] {
            let secs: Vec<f64> = h.iter().map(|r| r.seconds).collect();
            let held_out = h.last().map_or(f64::NAN, |r| r.validation_elbo);
            println!(
                "{name}: {:.3} s/epoch (median), {:.0} training cells/s, held-out loss {held_out:.3}",
                median(&secs),
                n_cells as f64 * 0.9 / median(&secs)
            );
        }
        println!(
            "{n_cells} cells x {n_genes} genes, {threads} threads, {device:?}: teacher (PCA) {teacher_s:.1} s, both phases {:.1} s",
            t1.elapsed().as_secs_f64()
        );
    });
}

/// Milliseconds per step of both phases of `align_species()`'s model on two
/// simulated species (7 types, 3 batches each, as bench/species_vs_scspecies.R),
/// at scSpecies' defaults.
fn species(a: &[String]) {
    use scdistill_core::models::species::fitted::Species;
    use scdistill_core::models::species::{SpeciesConfig, SpeciesData, SpeciesModel};
    use scdistill_core::models::Cells;
    use scdistill_core::simulate::SpeciesParams;
    let (n_cells, n_genes, epochs, threads) = (arg(a, 1, 20_000), arg(a, 2, 2_000), arg(a, 3, 2), arg(a, 4, 2));
    // "f32": train without bf16 products (TrainConfig::bf16);
    // 10% of each species' cells are held out to compare the ELBO.
    let f32_only = a.get(5).map(String::as_str) == Some("f32");
    let pool = thread_pool(threads).unwrap();
    pool.install(|| {
        let p = SimParams {
            n_cells,
            n_genes,
            group_prob: vec![0.25, 0.20, 0.15, 0.13, 0.12, 0.09, 0.06],
            batch_prob: vec![1.0; 3],
            species: Some(SpeciesParams { n_cells, n_genes, only_first: 1, only_second: 1, ..Default::default() }),
            ..Default::default()
        };
        let mut s = simulate(&p).unwrap();
        let two = *s.species.take().unwrap();
        let pairs = two.homolog_names(&s);
        let tc = TrainConfig {
            max_epochs: epochs,
            validation_fraction: 0.1,
            bf16: !f32_only,
            ..SpeciesConfig::default_training()
        };
        let config = SpeciesConfig::default();
        let t0 = Instant::now();
        let m = SpeciesModel::fit(
            SpeciesData { counts: &s.counts, batch: s.batch.clone() },
            &s.group,
            SpeciesData { counts: &two.sim.counts, batch: two.sim.batch.clone() },
            &pairs,
            config,
            tc.clone(),
            tc,
            scdistill_core::device::Device::Cpu,
            &|| false,
            &|phase, r| {
                eprintln!(
                    "phase {phase} epoch {} {:.3} s  train {:.2}  held-out {:.3}",
                    r.epoch, r.seconds, r.train_elbo, r.validation_elbo
                )
            },
        )
        .unwrap();
        let steps = (n_cells as f64 / 128.0).ceil();
        for (name, rec) in [("context", &m.meta.context_training), ("target", &m.meta.target_training)] {
            let secs: Vec<f64> = rec.history.iter().map(|r| r.seconds).collect();
            println!("{name}: {:.3} s/epoch (median), {:.2} ms/step", median(&secs), 1e3 * median(&secs) / steps);
        }
        let fitted = t0.elapsed().as_secs_f64();
        let labels = two.sim.batch.codes.iter().map(|&c| two.sim.batch.levels[c as usize].clone()).collect();
        let cells = Cells { counts: vec![two.sim.counts.clone()], batch: Some(labels), ..Default::default() };
        let (csr, cov) = m.prepare(Species::Target, cells).unwrap();
        let t1 = Instant::now();
        let tc = m.target_cells(&csr, &cov);
        let tr = m.transfer_labels(&tc, 250, 25, &|| false).unwrap();
        let agree = tr.label.iter().zip(&two.sim.group.codes).filter(|(a, b)| a == b).count();
        println!(
            "transfer_labels (250 candidates, top 25): {:.1} s, {:.3} ms/cell ({agree} labels equal to the codes of the truth)",
            t1.elapsed().as_secs_f64(),
            1e3 * t1.elapsed().as_secs_f64() / n_cells as f64
        );
        let nnz = s.counts.csr.indices.len() as f64 / (n_cells * n_genes) as f64;
        println!(
            "{n_cells} + {n_cells} cells x {n_genes} genes (density {nnz:.3}), {threads} threads: fit {fitted:.1} s, total {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    });
}

/// Seconds per epoch of the multimodal model on simulated RNA + ATAC.
fn multimodal(a: &[String]) {
    let (n_cells, n_genes, n_peaks, epochs, threads) =
        (arg(a, 1, 20_000), arg(a, 2, 2_000), arg(a, 3, 20_000), arg(a, 4, 3), arg(a, 5, 2));
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
        // "bf16": mixed-precision training (TrainConfig::bf16), where the CPU has it.
        let bf16 = a.get(7).map(String::as_str) == Some("bf16");
        let tc = TrainConfig { max_epochs: epochs, early_stopping: false, bf16, ..Default::default() };
        let t0 = Instant::now();
        let m = MultimodalModel::fit(&[&s.counts, &peaks], &cov, cfg, tc, device, &|| false, &|r| {
            eprintln!("epoch {} {:.3} s  train {:.2}  validation {:.2}", r.epoch, r.seconds, r.train_elbo, r.validation_elbo)
        })
        .unwrap();
        let secs: Vec<f64> = m.meta.training.history.iter().map(|r| r.seconds).collect();
        let held_out = m.meta.training.history.last().map_or(f64::NAN, |r| r.validation_elbo);
        println!(
            "{n_cells} cells x {n_genes} genes + {n_peaks} peaks, {threads} threads, {device:?}: {:.3} s/epoch (median), \
             {:.0} training cells/s, held-out -ELBO {held_out:.2}, total {:.1} s",
            median(&secs),
            n_cells as f64 * 0.9 / median(&secs),
            t0.elapsed().as_secs_f64()
        );
    });
}

/// Harmony on synthetic PCs: cells from 12 Gaussian clusters with a
/// per-batch shift. With OUT the input (f64, cells × D row-major) and batch
/// codes (u32) are written to OUT.x and OUT.batch for the same run in another
/// tool; OUT naming a folder with pcs.f64 and batch.i32 (bench/harmony_peer.py's
/// input) runs on those instead. HARMONY_SEED and HARMONY_ITER in the
/// environment set the seed and the iterations at most.
fn harmony_job(a: &[String]) {
    let (n, d, nb, threads) = (arg(a, 1, 100_000), arg(a, 2, 50), arg(a, 3, 10), arg(a, 4, 2));
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
    let z = scdistill_core::teacher::Embedding::row_major(&x, n, d);
    let r = pool.install(|| harmony(z, &[cov], &params, &|| false, &|_| {})).unwrap();
    println!(
        "harmony n={n} d={d} batches={nb} threads={threads}: {:.2} s, {} iterations, rounds {:?}",
        t.elapsed().as_secs_f64(),
        r.n_iter,
        r.cluster_rounds
    );
    println!("objective {:?}", r.objective.iter().map(|v| (v * 10.0).round() / 10.0).collect::<Vec<_>>());
}

/// Speed and recall of the approximate kNN search against the exact one, on
/// clustered Gaussian embeddings (40 clusters of unequal size and spread).
/// `centre_sd_x10` sets how far apart the clusters are (default 20: sd 2.0;
/// 5 makes them overlap, the harder case). Recall is measured on 2,000
/// random query cells against brute force. With `SCDISTILL_KNN_INPUT=file.bin`
/// the embedding is read from that file instead (row-major f64, `dims` values
/// per cell; e.g. written from R with `writeBin(as.vector(t(pcs)), "file.bin")`).
fn knn_job(a: &[String]) {
    // Unreadable arguments are skipped, not defaulted in place (as before).
    let args: Vec<usize> = a.iter().skip(1).filter_map(|a| a.parse().ok()).collect();
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
    let e = Embedding::row_major(&values, n, d);
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

/// Seconds to simulate counts, and a digest of them (to check that a change
/// leaves seeded output identical).
fn sim(a: &[String]) {
    let (n_cells, n_genes, threads) = (arg(a, 1, 1_000_000), arg(a, 2, 2_000), arg(a, 3, 2));
    thread_pool(threads).unwrap().install(|| {
        let t0 = Instant::now();
        let s = simulate(&SimParams { n_cells, n_genes, batch_prob: vec![1.0; 4], ..Default::default() }).unwrap();
        let secs = t0.elapsed().as_secs_f64();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        s.counts.csr.indptr.hash(&mut h);
        s.counts.csr.indices.hash(&mut h);
        s.counts.csr.values.iter().map(|v| v.to_bits()).collect::<Vec<_>>().hash(&mut h);
        println!(
            "{n_cells} cells x {n_genes} genes, {threads} threads: {secs:.1} s, {} non-zeros, digest {:016x}",
            s.counts.csr.nnz(),
            h.finish()
        );
    });
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[s.len() / 2]
}

/// Milliseconds per all-reduce (sum) of a float buffer over `world` ranks of
/// one Gloo group on this machine (threads of this process, loopback TCP),
/// for buffers of 10^4 up to `max_params` floats: the gradient exchange of a
/// data-parallel step for models of that many parameters.
fn allreduce(a: &[String]) {
    use scdistill_core::dist::{Group, Op};
    let (world, max_params, reps, pieces) = (arg(a, 1, 2), arg(a, 2, 10_000_000), arg(a, 3, 20), arg(a, 4, 1));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let sizes: Vec<usize> = [10_000, 100_000, 1_000_000, 10_000_000].into_iter().filter(|&p| p <= max_params).collect();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let sizes = sizes.clone();
            std::thread::spawn(move || {
                let g = Group::connect("127.0.0.1", port, rank, world, std::time::Duration::from_secs(60)).unwrap();
                let mut out = Vec::new();
                for &p in &sizes {
                    let mut t = tch::Tensor::ones([p as i64], (tch::Kind::Float, tch::Device::Cpu));
                    g.all_reduce(&mut t, Op::Sum).unwrap();
                    let mut ms: Vec<f64> = (0..reps)
                        .map(|_| {
                            let t0 = Instant::now();
                            g.all_reduce_pieces(&mut t, Op::Sum, pieces).unwrap();
                            t0.elapsed().as_secs_f64() * 1e3
                        })
                        .collect();
                    ms.sort_by(|x, y| x.total_cmp(y));
                    out.push((p, ms[ms.len() / 2]));
                }
                out
            })
        })
        .collect();
    let results: Vec<Vec<(usize, f64)>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    println!("world {world}, {reps} all-reduces per size, median over reps, slowest rank");
    println!("params\tMB\tms\tbus GB/s");
    for (i, &p) in sizes.iter().enumerate() {
        let ms = results.iter().map(|r| r[i].1).fold(0.0, f64::max);
        let mb = p as f64 * 4.0 / 1e6;
        // A ring all-reduce moves 2 (W - 1) / W of the buffer through each link.
        let bus = 2.0 * (world as f64 - 1.0) / world as f64 * mb / 1e3 / (ms / 1e3);
        println!("{p}\t{mb:.2}\t{ms:.3}\t{bus:.2}");
    }
}
