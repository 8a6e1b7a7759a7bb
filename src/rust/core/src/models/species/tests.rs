use super::analysis::{histogram_mode, Transfer};
use super::fitted::Species;
use super::*;
use crate::models::fitted::{Cells, FittedModel, LatentOptions};
use crate::models::TORCH;
use crate::simulate::tests::pearson;
use crate::simulate::{simulate, SimParams, Simulation, SpeciesParams};

fn never() -> bool {
    false
}

/// Two species, 4 shared cell types, 2 batches each.
fn two_species(n: usize, seed: u64) -> (Simulation, Simulation, Vec<(String, String)>) {
    let p = SimParams {
        n_cells: n,
        n_genes: 300,
        group_prob: vec![0.4, 0.3, 0.2, 0.1],
        // Types clearly apart: the test is of the alignment, not of a latent
        // space that a few hundred steps leave nearly unused.
        de_fac_loc: 1.0,
        batch_prob: vec![0.5, 0.5],
        seed,
        species: Some(SpeciesParams { n_cells: n, n_genes: 280, ..Default::default() }),
        ..Default::default()
    };
    let mut s = simulate(&p).unwrap();
    let two = *s.species.take().unwrap();
    let pairs = two.homolog_names(&s);
    (s, two.sim, pairs)
}

/// Trains on the two species; the caller holds libtorch's turn (`turn()`)
/// for the whole test, since the analyses draw from its generator too.
fn fit_on(c: &Simulation, t: &Simulation, pairs: &[(String, String)], epochs: usize, seed: u64) -> SpeciesModel {
    let tc = TrainConfig { max_epochs: epochs, seed, ..SpeciesConfig::default_training() };
    crate::device::with_threads(2, || fit_labelled(c, &c.group, t, pairs, tc)).unwrap().unwrap()
}

/// `SpeciesModel::fit` with the simulations' batches, labels `labels`.
fn fit_labelled(
    c: &Simulation,
    labels: &Categorical,
    t: &Simulation,
    pairs: &[(String, String)],
    tc: TrainConfig,
) -> crate::Result<SpeciesModel> {
    SpeciesModel::fit(
        SpeciesData { counts: &c.counts, batch: c.batch.clone() },
        labels,
        SpeciesData { counts: &t.counts, batch: t.batch.clone() },
        pairs,
        SpeciesConfig::default(),
        tc.clone(),
        tc,
        Device::Cpu,
        &never,
        &|_, _| {},
    )
}

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TORCH.lock().unwrap_or_else(|e| e.into_inner())
}

fn cells(s: &Simulation) -> Cells {
    let labels = s.batch.codes.iter().map(|&c| s.batch.levels[c as usize].clone()).collect();
    Cells { counts: vec![s.counts.clone()], batch: Some(labels), ..Default::default() }
}

fn latent(m: &SpeciesModel, s: &Simulation, species: &str) -> Vec<f32> {
    let opts = LatentOptions { species: species.into(), ..Default::default() };
    m.latent(cells(s), &opts).unwrap().joint.values
}

fn transfer(m: &SpeciesModel, t: &Simulation) -> Transfer {
    let (csr, cov) = m.prepare(Species::Target, cells(t)).unwrap();
    let tc = m.target_cells(&csr, &cov);
    m.transfer_labels(&tc, 250, 25, &never).unwrap()
}

#[test]
fn homolog_pairs_are_one_to_one_and_unknown_genes_are_counted() {
    let g = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (ctx, tgt) = (g(&["a", "b", "c"]), g(&["A", "B", "C", "D"]));
    let pairs: Vec<(String, String)> = [("A", "a"), ("A", "b"), ("B", "b"), ("D", "b"), ("C", "zz"), ("C", "c")]
        .iter()
        .map(|(t, c)| (t.to_string(), c.to_string()))
        .collect();
    // A–a first; A–b skipped (A taken); B–b; D–b skipped (b taken); C–zz unknown; C–c.
    assert_eq!(align::homolog_pairs(&pairs, &ctx, &tgt).unwrap(), vec![(0, 0), (1, 1), (2, 2)]);
    let none: Vec<(String, String)> = vec![("X".into(), "a".into()), ("A".into(), "y".into())];
    let e = align::homolog_pairs(&none, &ctx, &tgt).unwrap_err().to_string();
    assert!(
        e.contains("no homologous genes in common: of 2 homolog pairs, 1 name a gene of the target data and 1"),
        "{e}"
    );
}

#[test]
fn the_most_agreeing_cells_of_each_majority_label_are_pulled() {
    // 10 target cells, k = 4 neighbours; context labels: cells 0..4 are 0, 4..8 are 1.
    let labels = [0u32, 0, 0, 0, 1, 1, 1, 1];
    let nb: Vec<u32> = vec![
        0, 1, 2, 3, // 4 votes for 0
        0, 1, 2, 4, // 3
        0, 1, 4, 5, // tie 2–2: the label met first (0)
        0, 1, 2, 3, // 4
        0, 4, 5, 6, // 3 votes for 1
        4, 5, 6, 7, // 4 for 1
        4, 5, 0, 1, // tie, 1 met first
        4, 5, 6, 0, // 3 for 1
        0, 1, 2, 4, // 3 for 0
        4, 5, 6, 7, // 4 for 1
    ];
    let pulled = align::agreement(&nb, &labels, 2, 4, 40.0);
    // Label 0 holds cells 0, 1, 2, 3, 8 (votes 4, 3, 2, 4, 3); ranked by
    // votes: 2, 1, 8, 0, 3 with scores 0.8, 0.6, 0.4, 0.2, 0: below 0.4 are 0 and 3.
    // Label 1 holds 4, 5, 6, 7, 9 (votes 3, 4, 2, 3, 4): ranked 6, 4, 7, 5, 9: 5 and 9.
    let want: Vec<usize> = vec![0, 3, 5, 9];
    let got: Vec<usize> = (0..10).filter(|&i| pulled[i]).collect();
    assert_eq!(got, want);
}

#[test]
fn the_histogram_mode_finds_the_peak() {
    // 900 values near 2 and 300 spread over [-10, 10]: the mode is near 2.
    let mut v: Vec<f64> = (0..900).map(|i| 2.0 + ((i as f64) / 900.0 - 0.5) * 0.2).collect();
    v.extend((0..300).map(|i| -10.0 + 20.0 * i as f64 / 300.0));
    let m = histogram_mode(&v);
    assert!((m - 2.0).abs() < 0.3, "mode {m}");
}

#[test]
fn aligned_species_share_a_latent_space_labels_transfer_and_files_round_trip() {
    let _turn = turn();
    let (c, t, pairs) = two_species(1200, 3);
    let m = fit_on(&c, &t, &pairs, 40, 0);
    assert_eq!(m.meta.homologs.len(), pairs.len());
    // About top_percent of the target cells are pulled.
    let share = m.meta.n_aligned as f64 / 1200.0;
    assert!((0.12..0.3).contains(&share), "pulled {share}");
    assert_eq!(m.meta.context_training.history.len(), 40);
    assert_eq!(m.meta.target_training.history.len(), 40);

    // Labels carried across by likelihood: the simulator's cell types are the truth.
    let tr = transfer(&m, &t);
    let names: Vec<&str> = tr.label.iter().map(|&l| m.meta.label_levels[l as usize].as_str()).collect();
    let truth: Vec<&str> = t.group.codes.iter().map(|&c| t.group.levels[c as usize].as_str()).collect();
    let acc = names.iter().zip(&truth).filter(|(a, b)| a == b).count() as f64 / 1200.0;
    assert!(acc > 0.9, "label transfer accuracy {acc}");
    assert!(tr.confidence.iter().all(|&c| (0.0..=1.0).contains(&c)));

    // The two species mix in the latent space: a target cell's nearest
    // context cells (latent) are of its own type.
    let (zc, zt) = (latent(&m, &c, "context"), latent(&m, &t, "target"));
    let zc_t = Tensor::from_slice(&zc).view([1200, 10]);
    let zt_t = Tensor::from_slice(&zt).view([1200, 10]);
    let nb = analysis::latent_neighbours(&zt_t, &zc_t, 1);
    let same = (0..1200).filter(|&i| c.group.levels[c.group.codes[nb[i] as usize] as usize] == truth[i]).count();
    assert!(same as f64 / 1200.0 > 0.85, "nearest context cell of the same type: {same} of 1200");

    // Cell-type similarity: each target type is most similar to its own context type.
    let (csr, cov) = m.prepare(Species::Target, cells(&t)).unwrap();
    let tc = m.target_cells(&csr, &cov);
    let table = m.similarity_table(&tc, &t.group.codes, 4, 100, 20, 1).unwrap();
    for r in 0..4 {
        let row = &table[r * 4..(r + 1) * 4];
        let best = (0..4).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
        assert_eq!(m.meta.label_levels[best], t.group.levels[r], "row {r}: {row:?}");
    }

    // Homologous-gene fold changes against the simulator's programs: the
    // truth is log2 of each species' type expression normalised over its
    // homologous genes, target over context.
    let fc = m.fold_changes(&tc, &t.group.codes, &t.group.levels, 4000, 1.0, 2).unwrap();
    assert_eq!(fc.len(), 4);
    let (mut est, mut truth_lfc) = (vec![], vec![]);
    for f in &fc {
        let ty = t.group.levels.iter().position(|l| *l == f.cell_type).unwrap();
        let expr = |sim: &Simulation, g: usize| sim.gene_mean[g] * sim.group_factor[ty][g];
        let tot_c: f64 = m.meta.homologs.iter().map(|p| expr(&c, p.0 as usize)).sum();
        let tot_t: f64 = m.meta.homologs.iter().map(|p| expr(&t, p.1 as usize)).sum();
        for (k, p) in m.meta.homologs.iter().enumerate() {
            let truth = (expr(&t, p.1 as usize) / tot_t / (expr(&c, p.0 as usize) / tot_c)).log2();
            // Genes expressed well enough to be measured in both species.
            if expr(&c, p.0 as usize) / tot_c > 1e-3 && expr(&t, p.1 as usize) / tot_t > 1e-3 {
                est.push(f.lfc[k]);
                truth_lfc.push(truth);
            }
        }
        assert!(f.p.iter().chain(&f.p_rand).all(|&v| (0.0..=1.0).contains(&v)));
    }
    let r = pearson(&est, &truth_lfc);
    let null: Vec<f64> = fc.iter().flat_map(|f| f.lfc_rand.clone()).collect();
    eprintln!(
        "fold-change r {r} over {} genes; null sd {}",
        est.len(),
        (null.iter().map(|v| v * v).sum::<f64>() / null.len() as f64).sqrt()
    );
    assert!(r > 0.8, "fold-change r {r}");

    // One file holds both species; reading it back gives the same latents.
    let bytes = m.to_bytes().unwrap();
    let back = SpeciesModel::from_bytes(&bytes, Device::Cpu).unwrap();
    assert_eq!(latent(&back, &t, "target"), zt);
    assert_eq!(latent(&back, &c, "context"), zc);
    assert!(back.context_latent.equal(&m.context_latent));
    let e = crate::models::vae::VaeModel::from_bytes(&bytes, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("not a VAE"), "{e}");
    // Asking without the species is an error that says what to give.
    let e = m.latent(cells(&t), &LatentOptions::default()).unwrap_err().to_string();
    assert!(e.contains("say which species"), "{e}");
    // Context cells read as target cells: their genes are not the target's.
    let e = m.latent(cells(&c), &LatentOptions { species: "target".into(), ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("target species"), "{e}");
}

#[test]
fn the_same_seed_gives_the_same_model() {
    let _turn = turn();
    let (c, t, pairs) = two_species(400, 5);
    let a = fit_on(&c, &t, &pairs, 3, 7);
    let b = fit_on(&c, &t, &pairs, 3, 7);
    assert_eq!(latent(&a, &t, "target"), latent(&b, &t, "target"));
    assert_eq!(latent(&a, &c, "context"), latent(&b, &c, "context"));
    assert!(a.context_latent.equal(&b.context_latent));
    let other = fit_on(&c, &t, &pairs, 3, 8);
    assert_ne!(latent(&a, &t, "target"), latent(&other, &t, "target"));
}

#[test]
fn a_context_of_one_cell_type_is_refused() {
    let (c, t, pairs) = two_species(200, 2);
    let one = Categorical::constant("cell_type", 200);
    let tc = TrainConfig { max_epochs: 1, ..SpeciesConfig::default_training() };
    let e = fit_labelled(&c, &one, &t, &pairs, tc).unwrap_err();
    assert!(e.to_string().contains("single cell type"), "{e}");
}

#[test]
fn draw_summaries_are_per_gene_lower_medians_and_shares() {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    // 3 genes x 7 draws, gene-major; the permutation pairs gene g with 2 - g.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (n, g) = (7usize, 3usize);
    let rt: Vec<f32> = (0..n * g).map(|_| rng.random::<f32>() * 1e-2).collect();
    let rc: Vec<f32> = (0..n * g).map(|_| rng.random::<f32>() * 1e-2).collect();
    let lib_t: Vec<f32> = (0..n).map(|i| 1000.0 + 100.0 * i as f32).collect();
    let lib_c: Vec<f32> = (0..n).map(|i| 3000.0 - 50.0 * i as f32).collect();
    let perm = [2usize, 1, 0];
    let s = analysis::summarise_draws(&rt, &rc, &lib_t, &lib_c, &perm, 1.0);
    assert_eq!(s.len(), g);
    // Reference: sort and take element (n - 1) / 2, as torch's median.
    let lower_median = |mut v: Vec<f32>| -> f64 {
        v.sort_by(f32::total_cmp);
        f64::from(v[(v.len() - 1) / 2])
    };
    let log2 = |x: f32| (x + 1e-6f32).log2();
    for k in 0..g {
        let col = |x: &[f32], j: usize| x[j * n..(j + 1) * n].to_vec();
        let lfc: Vec<f32> = (0..n).map(|i| log2(rt[k * n + i]) - log2(rc[k * n + i])).collect();
        let rand: Vec<f32> = (0..n).map(|i| log2(rt[k * n + i]) - log2(rc[perm[k] * n + i])).collect();
        let share = |v: &[f32]| v.iter().filter(|x| x.abs() > 1.0).count() as f64 / n as f64;
        assert_eq!(s[k].rho_target, lower_median(col(&rt, k)));
        assert_eq!(s[k].rho_context, lower_median(col(&rc, k)));
        assert_eq!(s[k].mu_target, lower_median((0..n).map(|i| rt[k * n + i] * lib_t[i]).collect()));
        assert_eq!(s[k].mu_context, lower_median((0..n).map(|i| rc[k * n + i] * lib_c[i]).collect()));
        assert_eq!(s[k].lfc, lower_median(lfc.clone()));
        assert_eq!(s[k].p, share(&lfc));
        assert_eq!(s[k].lfc_rand, lower_median(rand.clone()));
        assert_eq!(s[k].p_rand, share(&rand));
    }
    // Gene 1 is its own permutation partner: the null equals the estimate there.
    assert_eq!(s[1].lfc, s[1].lfc_rand);
}

#[test]
fn decoding_a_gene_subset_equals_cutting_the_full_softmax() {
    let _turn = turn();
    let (c, t, pairs) = two_species(200, 4);
    let m = fit_on(&c, &t, &pairs, 1, 1);
    let genes = Tensor::from_slice(&[5i64, 0, 17, 42, 99]);
    let z = Tensor::randn([6, m.meta.config.n_latent as i64], (Kind::Float, Device::Cpu));
    let batch = Tensor::from_slice(&[1i64, 0, 1, 1, 0, 0]);
    let design = batch.one_hot(m.target.shape.n_batch as i64).to_kind(Kind::Float);
    let dec = &m.target.decoder;
    let full = dec.heads(&z, &design, &batch, Pass::Eval);
    let mut want = full.logits.index_select(1, &genes).softmax(-1, Kind::Float);
    if let Some(pi) = &full.pi_logits {
        want = want * pi.index_select(1, &genes).neg().sigmoid();
    }
    let got = dec.gene_scale(&dec.gene_heads(&genes), &z, &design, Pass::Eval);
    assert_eq!(got.size(), vec![6, 5]);
    let gap = (got - &want).abs().max().double_value(&[]);
    assert!(gap < 1e-6, "subset decoding differs by {gap}");
}

/// The bf16 search (bf16 candidates, exact re-ranking) finds the f32
/// search's neighbours, in the same order, but for rare near ties; and
/// without fast bf16 it is the f32 search itself.
#[test]
fn the_bf16_neighbour_search_finds_the_f32_neighbours() {
    let _turn = turn();
    let (c, t, pairs) = two_species(600, 5);
    let at = align::homolog_pairs(&pairs, &c.counts.genes, &t.counts.genes).unwrap();
    let k = 25;
    let exact = align::data_neighbours(&c.counts.csr, &t.counts.csr, &at, k, Device::Cpu, false);
    let fast = align::data_neighbours(&c.counts.csr, &t.counts.csr, &at, k, Device::Cpu, true);
    assert_eq!(exact.len(), t.counts.csr.n_rows * k);
    let (mut same_set, mut same_place) = (0usize, 0usize);
    for (a, b) in exact.chunks(k).zip(fast.chunks(k)) {
        let sa: std::collections::HashSet<_> = a.iter().collect();
        same_set += b.iter().filter(|j| sa.contains(j)).count();
        same_place += a.iter().zip(b).filter(|(x, y)| x == y).count();
    }
    let n = exact.len() as f64;
    assert!(same_set as f64 / n > 0.995, "shared neighbours {}", same_set as f64 / n);
    assert!(same_place as f64 / n > 0.98, "same rank {}", same_place as f64 / n);
    // Every cell's first neighbour by the exact similarity is kept.
    let first = exact.chunks(k).zip(fast.chunks(k)).filter(|(a, b)| b.contains(&a[0])).count();
    assert_eq!(first, t.counts.csr.n_rows);
    // The re-ranking read in place (the CPU's) and the one of gathered rows
    // (any device's) agree but for the order of near ties.
    let gathered = align::neighbours_with(&c.counts.csr, &t.counts.csr, &at, k, Device::Cpu, true, false);
    let same = fast.iter().zip(&gathered).filter(|(a, b)| a == b).count();
    assert!(same as f64 / n > 0.999, "same rank in both re-rankings {}", same as f64 / n);
}

/// Decoder heads with bf16 output products stay within bf16's rounding of
/// the f32 heads.
#[test]
fn bf16_heads_round_the_f32_heads() {
    let _turn = turn();
    let (c, t, pairs) = two_species(200, 4);
    let m = fit_on(&c, &t, &pairs, 1, 1);
    let z = Tensor::randn([64, m.meta.config.n_latent as i64], (Kind::Float, Device::Cpu));
    let batch = Tensor::from_slice(&[0i64, 1]).repeat([32]);
    let design = batch.one_hot(m.target.shape.n_batch as i64).to_kind(Kind::Float);
    let dec = &m.target.decoder;
    let full = dec.heads_with(&z, &design, &batch, Pass::Eval, false);
    let low = dec.heads_with(&z, &design, &batch, Pass::Eval, true);
    for (a, b) in [(&full.logits, &low.logits), (full.pi_logits.as_ref().unwrap(), low.pi_logits.as_ref().unwrap())] {
        let gap = (a - b).abs().max().double_value(&[]);
        let scale = a.abs().max().double_value(&[]);
        assert!(gap > 0.0 && gap < 0.02 * scale.max(1.0), "bf16 heads differ by {gap} at scale {scale}");
    }
}

/// The scoring order of label transfer is a permutation of the cells that
/// puts latent neighbours together: consecutive cells are far closer than
/// in the given order.
#[test]
fn locality_order_permutes_the_cells_and_keeps_neighbours_together() {
    use super::analysis::locality_order;
    let (n, d) = (2_000usize, 3usize);
    // Points on a line through 3-d space, given in a scrambled order.
    let latent: Vec<f32> = (0..n)
        .flat_map(|i| {
            let t = ((i * 7_919) % n) as f32 / n as f32;
            [t, 2.0 * t, -t]
        })
        .collect();
    let cells: Vec<usize> = (0..n).rev().collect();
    let order = locality_order(&latent, d, &cells);
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..n).collect::<Vec<_>>());
    let step = |o: &[usize]| -> f32 {
        o.windows(2)
            .map(|w| (0..d).map(|j| (latent[w[0] * d + j] - latent[w[1] * d + j]).powi(2)).sum::<f32>().sqrt())
            .sum::<f32>()
    };
    // Sorted along the line, the path is its length (√6); leaves of 32
    // cells in any inner order stay within a few times that.
    assert!(step(&order) < 0.1 * step(&cells), "{} vs {}", step(&order), step(&cells));
}

/// The latent neighbours are the k nearest by a full sort (nearest first,
/// ties by index), on the thresholded path (many references) and the
/// plain one (few).
#[test]
fn latent_neighbours_are_the_nearest_by_a_full_sort() {
    let _t = turn();
    tch::manual_seed(5);
    for (n_ref, k) in [(6_000i64, 40usize), (300, 40), (50, 80)] {
        let q = tch::Tensor::randn([37, 4], (tch::Kind::Float, tch::Device::Cpu));
        let r = tch::Tensor::randn([n_ref, 4], (tch::Kind::Float, tch::Device::Cpu));
        let got = analysis::latent_neighbours(&q, &r, k);
        let k = k.min(n_ref as usize);
        assert_eq!(got.len(), 37 * k);
        let qv: Vec<f32> = Vec::try_from(q.flatten(0, -1)).unwrap();
        let rv: Vec<f32> = Vec::try_from(r.flatten(0, -1)).unwrap();
        for i in 0..37 {
            let d: Vec<f32> =
                (0..n_ref as usize).map(|j| (0..4).map(|c| (qv[i * 4 + c] - rv[j * 4 + c]).powi(2)).sum()).collect();
            let mut order: Vec<usize> = (0..n_ref as usize).collect();
            order.sort_by(|&a, &b| d[a].total_cmp(&d[b]).then(a.cmp(&b)));
            let mine: Vec<usize> = got[i * k..(i + 1) * k].iter().map(|&j| j as usize).collect();
            // The same set, in increasing distance (rounding of the two
            // formulas may swap near ties).
            let mut a = mine.clone();
            let mut b = order[..k].to_vec();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b, "query {i}, {n_ref} references");
            assert!(mine.windows(2).all(|w| d[w[0]] <= d[w[1]] + 1e-5));
        }
    }
}
