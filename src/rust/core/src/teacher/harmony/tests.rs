use super::correction::solve;
use super::kmeans::SEED_POOL;
use super::*;
use crate::data::CellsH5;
use crate::error::Error;
use rand::Rng;

/// The fixture written by `bench/harmony_fixture.py`: inputs, harmonypy 2.1's
/// output, batch and label of 900 cells in 6 dimensions.
struct Fixture {
    x: Vec<f64>,
    reference: Vec<f64>,
    batch: Vec<u32>,
    label: Vec<u32>,
}

const D: usize = 6;

fn fixture() -> Fixture {
    let text = include_str!("fixture.csv");
    let mut f = Fixture { x: vec![], reference: vec![], batch: vec![], label: vec![] };
    for line in text.lines().skip(1) {
        let v: Vec<f64> = line.split(',').map(|s| s.parse().unwrap()).collect();
        f.x.extend_from_slice(&v[..D]);
        f.reference.extend_from_slice(&v[D..2 * D]);
        f.batch.push(v[2 * D] as u32);
        f.label.push(v[2 * D + 1] as u32);
    }
    f
}

fn batch_cov(codes: Vec<u32>, n_levels: usize) -> HarmonyCovariate {
    HarmonyCovariate { name: "batch".into(), codes, n_levels, theta: 2.0, lambda: None, protected: false }
}

fn run(x: &[f64], d: usize, covs: &[HarmonyCovariate], p: &HarmonyParams) -> HarmonyResult {
    harmony(Embedding::row_major(x, x.len() / d, d), covs, p, &|| false, &|_| {}).unwrap()
}

/// Mean over labels of the mean distance between batch centroids of that label.
fn batch_spread(z: &[f64], d: usize, batch: &[u32], label: &[u32]) -> f64 {
    let nb = *batch.iter().max().unwrap() as usize + 1;
    let nl = *label.iter().max().unwrap() as usize + 1;
    let mut total = 0.0;
    for l in 0..nl {
        let cents: Vec<Vec<f64>> = (0..nb)
            .map(|b| {
                let rows: Vec<usize> =
                    (0..batch.len()).filter(|&i| batch[i] == b as u32 && label[i] == l as u32).collect();
                (0..d).map(|j| rows.iter().map(|&i| z[i * d + j]).sum::<f64>() / rows.len() as f64).collect()
            })
            .collect();
        let mut s = 0.0;
        let mut m = 0;
        for a in 0..nb {
            for b in a + 1..nb {
                s += cents[a].iter().zip(&cents[b]).map(|(u, v)| (u - v) * (u - v)).sum::<f64>().sqrt();
                m += 1;
            }
        }
        total += s / m as f64;
    }
    total / nl as f64
}

fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma) * (x - ma)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb) * (y - mb)).sum();
    cov / (va * vb).sqrt()
}

#[test]
fn agrees_with_harmonypy_on_the_fixture() {
    let f = fixture();
    let res = run(&f.x, D, &[batch_cov(f.batch.clone(), 3)], &HarmonyParams::default());
    assert_eq!(res.n_clusters, 30);
    for j in 0..D {
        let ours: Vec<f64> = res.z_corr.iter().skip(j).step_by(D).copied().collect();
        let theirs: Vec<f64> = f.reference.iter().skip(j).step_by(D).copied().collect();
        let r = correlation(&ours, &theirs);
        assert!(r > 0.995, "dimension {}: correlation with harmonypy {r}", j + 1);
    }
    let before = batch_spread(&f.x, D, &f.batch, &f.label);
    let ours = batch_spread(&res.z_corr, D, &f.batch, &f.label);
    let theirs = batch_spread(&f.reference, D, &f.batch, &f.label);
    assert!(ours < before / 4.0, "batch spread {before} -> {ours}");
    assert!((ours - theirs).abs() < 0.25 * theirs.max(0.1), "batch spread: ours {ours}, harmonypy {theirs}");
    // The objective falls, and the run stops by convergence.
    assert!(res.converged && res.n_iter < 10);
    assert!(res.objective.last().unwrap() < &res.objective[0]);
    // Memberships are distributions (held in f32).
    for row in res.r.chunks(res.n_clusters) {
        assert!((row.iter().map(|&v| v as f64).sum::<f64>() - 1.0).abs() < 1e-5);
    }
}

#[test]
fn same_seed_same_result_for_any_thread_count() {
    let f = fixture();
    let covs = [batch_cov(f.batch.clone(), 3)];
    let p = HarmonyParams { seed: 7, ..Default::default() };
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| run(&f.x, D, &covs, &p));
    let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap().install(|| run(&f.x, D, &covs, &p));
    assert_eq!(one.z_corr, three.z_corr);
    let other = run(&f.x, D, &covs, &HarmonyParams { seed: 8, ..Default::default() });
    assert_ne!(one.z_corr, other.z_corr);
}

/// Condition shifts dimension 0 by 3; treated cells are 80 % of batch 0 and
/// 20 % of batch 1, which is shifted by 2.5 in every dimension. Without
/// protection the batch terms absorb part of the condition effect and
/// correcting them shrinks it; protected, the effect survives.
#[test]
fn protected_condition_is_not_regressed_out() {
    let (n, d) = (1200, 5);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    use rand_distr::{Distribution, Normal};
    let noise = Normal::new(0.0, 1.0).unwrap();
    let mut x = vec![0.0; n * d];
    let (mut batch, mut cond, mut label) = (vec![0u32; n], vec![0u32; n], vec![0u32; n]);
    for i in 0..n {
        let b = (i % 2) as u32;
        let l = (i % 3) as u32;
        let treated = (i / 2) % 10 < if b == 0 { 8 } else { 2 };
        batch[i] = b;
        label[i] = l;
        cond[i] = treated as u32;
        for j in 0..d {
            let centre = if j == 1 + l as usize { 6.0 } else { 0.0 };
            x[i * d + j] = centre + 2.5 * b as f64 + if j == 0 && treated { 3.0 } else { 0.0 } + noise.sample(&mut rng);
        }
    }
    let effect = |z: &[f64]| {
        // Treated − control difference in dimension 0 within label, pooled
        // over batches: what a batch term that absorbed the condition erases.
        let mut s = 0.0;
        for l in 0..3 {
            let mean = |c: u32| {
                let v: Vec<f64> = (0..n).filter(|&i| label[i] == l && cond[i] == c).map(|i| z[i * d]).collect();
                v.iter().sum::<f64>() / v.len() as f64
            };
            s += mean(1) - mean(0);
        }
        s / 3.0
    };
    let p = HarmonyParams::default();
    let plain = run(&x, d, &[batch_cov(batch.clone(), 2)], &p);
    let protect = HarmonyCovariate {
        name: "condition".into(),
        codes: cond.clone(),
        n_levels: 2,
        theta: 0.0,
        lambda: None,
        protected: true,
    };
    let kept = run(&x, d, &[batch_cov(batch.clone(), 2), protect], &p);
    let (e_in, e_plain, e_kept) = (effect(&x), effect(&plain.z_corr), effect(&kept.z_corr));
    // Pooled over batches the input understates the true effect of 3:
    // treated cells sit mostly in the batch shifted the other way.
    let msg = format!("condition effect (true 3): input {e_in}, plain {e_plain}, protected {e_kept}");
    assert!(e_in < 2.0, "{msg}");
    // Harmony's correction is soft (ridge, soft clusters), so neither reaches
    // 3; protection recovers clearly more of it (measured: 1.45 → 1.82 plain,
    // 2.43 protected).
    assert!(e_kept > e_in + 0.7 && e_kept < 3.2, "{msg}");
    assert!(e_kept > e_plain + 0.4, "{msg}");
    // The batch is still removed.
    let spread_in = batch_spread(&x, d, &batch, &label);
    let spread_kept = batch_spread(&kept.z_corr, d, &batch, &label);
    assert!(spread_kept < spread_in / 2.0, "batch spread {spread_in} -> {spread_kept}");
}

#[test]
fn refuses_bad_input() {
    let f = fixture();
    let n = f.batch.len();
    let err = |x: &[f64], covs: &[HarmonyCovariate]| {
        harmony(Embedding::row_major(x, n, D), covs, &HarmonyParams::default(), &|| false, &|_| {})
            .unwrap_err()
            .to_string()
    };
    let mut x = f.x.clone();
    x[7] = f64::NAN;
    assert!(err(&x, &[batch_cov(f.batch.clone(), 3)]).contains("cell 2, dimension 2"));
    let prot = HarmonyCovariate { protected: true, ..batch_cov(f.batch.clone(), 3) };
    assert!(err(&f.x, &[prot]).contains("at least one batch covariate"));
    assert!(err(&f.x, &[batch_cov(f.batch[1..].to_vec(), 3)]).contains("899 values for 900 cells"));
    let interrupted = harmony(
        Embedding::row_major(&f.x, n, D),
        &[batch_cov(f.batch.clone(), 3)],
        &HarmonyParams::default(),
        &|| true,
        &|_| {},
    );
    assert!(matches!(interrupted, Err(Error::Interrupted)));
}

#[test]
fn column_major_input_gives_the_same_result() {
    // R hands its matrices over column by column; the core reads them as
    // they are. Same cells, same seed: the same correction, bit for bit.
    let f = fixture();
    let n = f.batch.len();
    let mut cm = vec![0.0; n * D];
    for i in 0..n {
        for j in 0..D {
            cm[j * n + i] = f.x[i * D + j];
        }
    }
    let covs = [batch_cov(f.batch.clone(), 3)];
    let p = HarmonyParams::default();
    let a = run(&f.x, D, &covs, &p);
    let b = harmony(Embedding::column_major(&cm, n, D), &covs, &p, &|| false, &|_| {}).unwrap();
    assert_eq!(a.z_corr, b.z_corr);
    assert_eq!(a.r, b.r);
    // A missing value is named by cell and dimension in either layout.
    cm[D * n - 1] = f64::NAN;
    let err = harmony(Embedding::column_major(&cm, n, D), &covs, &p, &|| false, &|_| {}).unwrap_err().to_string();
    assert!(err.contains(&format!("cell {n}, dimension {D}")), "{err}");
    // Without memberships the correction is the same and r stays empty.
    let c = run(&f.x, D, &covs, &HarmonyParams { memberships: false, ..p });
    assert_eq!(c.z_corr, a.z_corr);
    assert!(c.r.is_empty() && a.r.len() == n * a.n_clusters);
}

#[test]
fn solves_small_systems() {
    let a = vec![4.0, 1.0, 2.0, 1.0, 3.0, 0.0, 2.0, 0.0, 5.0];
    let x = [1.0, -2.0, 0.5, 3.0, 0.0, 1.0];
    let mut b = vec![0.0; 6];
    for i in 0..3 {
        for j in 0..2 {
            b[i * 2 + j] = (0..3).map(|t| a[i * 3 + t] * x[t * 2 + j]).sum();
        }
    }
    let sol = solve(a, b, 3, 2);
    for (s, t) in sol.iter().zip(x) {
        assert!((s - t).abs() < 1e-12);
    }
}

/// The objective that a clustering round computes while it updates R (one
/// logarithm per cell) equals a full pass over R and the distances, with two
/// covariates (so that penalties multiply) and after a correction.
#[test]
fn objective_from_the_update_pass_equals_the_full_pass() {
    let f = fixture();
    let n = f.batch.len();
    let second: Vec<u32> = (0..n as u32).map(|i| (i * 7 / 5) % 3).collect();
    let covs = [batch_cov(f.batch.clone(), 3), HarmonyCovariate { theta: 1.0, ..batch_cov(second, 3) }];
    let p = HarmonyParams::default();
    let mut h = Harmony::new(Embedding::row_major(&f.x, n, D), &covs, &p).unwrap();
    h.init(&|| false).unwrap();
    let (first, full) = (h.obj_harmony[0], h.objective());
    assert!((first - full).abs() <= 1e-9 * full.abs(), "initial {first} vs full {full}");
    for _ in 0..2 {
        for _ in 0..3 {
            let fused = (h.update_r(&|| false).unwrap() + h.cross_term()) * 2000.0 / n as f64;
            let full = h.objective();
            // Equal up to the f32 rounding of R, which the full pass takes logarithms of.
            assert!((fused - full).abs() <= 1e-7 * full.abs(), "fused {fused} vs full {full}");
        }
        h.correct();
        h.compute_dist();
        h.to_scale();
        h.r.copy_from_slice(&h.dist);
        h.recount();
    }
}

/// Above the seeding pool's size the k-means++ seeds come from a random
/// subset: still distinct cells, one in each of K well-separated groups.
#[test]
fn seeds_from_a_pool_still_find_every_group() {
    let (n, d, k) = (SEED_POOL + 5_000, 3, 6);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut x = vec![0.0; n * d];
    for i in 0..n {
        let g = i % k;
        for j in 0..d {
            // Groups on distinct directions (the seeding sees cosine-normalized cells).
            x[i * d + j] =
                if j == g % d { 1.0 } else { 0.0 } * if g < d { 1.0 } else { -1.0 } + 0.01 * rng.random::<f64>();
        }
    }
    let codes: Vec<u32> = (0..n as u32).map(|i| i % 2).collect();
    let p = HarmonyParams { n_clusters: Some(k), ..Default::default() };
    let covs = [batch_cov(codes, 2)];
    let mut h = Harmony::new(Embedding::row_major(&x, n, d), &covs, &p).unwrap();
    let pool = h.kmeans_plus_plus();
    assert_eq!(pool.len(), SEED_POOL);
    assert!(pool.windows(2).all(|w| w[0] < w[1]) && *pool.last().unwrap() < n);
    let mut hit = vec![0; k];
    for c in 0..k {
        let y = &h.y[c * d..(c + 1) * d];
        let g = (0..k)
            .max_by(|&a, &b| {
                let dir = |g: usize| (if g < d { 1.0 } else { -1.0 }) * y[g % d];
                dir(a).total_cmp(&dir(b))
            })
            .unwrap();
        hit[g] += 1;
    }
    assert_eq!(hit, vec![1; k]);
}

/// The outer loop stops on a small fall of the objective, never on a rise.
#[test]
fn only_a_small_fall_of_the_objective_is_convergence() {
    assert!(objective_settled(100.0, 99.5, 0.01));
    assert!(!objective_settled(100.0, 98.0, 0.01));
    assert!(!objective_settled(100.0, 101.0, 0.01));
    assert!(!objective_settled(-100.0, -99.0, 0.01));
    assert!(objective_settled(-100.0, -100.5, 0.01));
    assert!(objective_settled(0.0, 0.0, 0.01) && !objective_settled(0.0, -1.0, 0.01));
    assert!(!objective_settled(f64::NAN, 1.0, 0.01) && !objective_settled(1.0, f64::INFINITY, 0.01));
}

/// Cells of 6 types (one 2% of cells) in 3 batches of unequal size, each
/// batch shifting every type its own way: x (n × d), batch, type.
fn typed_batches(n: usize, d: usize, seed: u64) -> (Vec<f64>, Vec<u32>, Vec<u32>) {
    use rand_distr::{Distribution, Normal};
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let noise = Normal::new(0.0, 1.0).unwrap();
    let shares = [0.3, 0.25, 0.2, 0.15, 0.08, 0.02];
    let mut centre = vec![0.0; 6 * d];
    centre.iter_mut().for_each(|v| *v = 8.0 * noise.sample(&mut rng));
    let mut shift = vec![0.0; 3 * 6 * d];
    shift.iter_mut().for_each(|v| *v = 1.5 * noise.sample(&mut rng));
    let (mut x, mut batch, mut label) = (vec![0.0; n * d], vec![0u32; n], vec![0u32; n]);
    for i in 0..n {
        let b = [0u32, 0, 0, 1, 1, 2][i % 6];
        let u: f64 = rng.random();
        let l = shares
            .iter()
            .scan(0.0, |s, &p| {
                *s += p;
                Some(*s)
            })
            .position(|c| u < c)
            .unwrap_or(5);
        (batch[i], label[i]) = (b, l as u32);
        for j in 0..d {
            x[i * d + j] = centre[l * d + j] + shift[(b as usize * 6 + l) * d + j] + noise.sample(&mut rng);
        }
    }
    (x, batch, label)
}

/// Mean squared difference over the variance of `b`.
fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    let n = b.len() as f64;
    let mb = b.iter().sum::<f64>() / n;
    let var = b.iter().map(|v| (v - mb) * (v - mb)).sum::<f64>() / n;
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>() / n / var
}

#[test]
fn the_map_of_a_fit_corrects_its_cells_as_the_fit_did() {
    let d = 8;
    let (x, batch, label) = typed_batches(3000, d, 5);
    let covs = [batch_cov(batch.clone(), 3)];
    let p = HarmonyParams { memberships: false, ..Default::default() };
    let fit = run(&x, d, &covs, &p);
    let mut mapped = vec![0.0; x.len()];
    fit.map.correct(Embedding::row_major(&x, 3000, d), &covs, &mut mapped).unwrap();
    let err = relative_error(&mapped, &fit.z_corr);
    let (s_in, s_fit, s_map) = (
        batch_spread(&x, d, &batch, &label),
        batch_spread(&fit.z_corr, d, &batch, &label),
        batch_spread(&mapped, d, &batch, &label),
    );
    eprintln!("map of the fit: relative error {err:.2e}; batch spread {s_in:.3} -> fit {s_fit:.3}, map {s_map:.3}");
    assert!(err < 1e-6, "relative error {err}");
    assert!(s_map < s_fit * 1.1 + 0.02, "batch spread: fit {s_fit}, map {s_map}");
    // Wrong shapes are refused.
    let short = [batch_cov(batch[..10].to_vec(), 3)];
    assert!(fit.map.correct(Embedding::row_major(&x, 3000, d), &short, &mut mapped).is_err());
    assert!(fit.map.correct(Embedding::row_major(&x[..3000 * 4], 3000, 4), &covs, &mut mapped[..12000]).is_err());
}

#[test]
fn harmony_on_a_sketch_corrects_the_other_cells_like_the_full_run() {
    let (n, d, m) = (12_000, 8, 3000);
    let (x, batch, label) = typed_batches(n, d, 9);
    let covs = [batch_cov(batch.clone(), 3)];
    let p = HarmonyParams { memberships: false, seed: 4, ..Default::default() };
    let full = run(&x, d, &covs, &p);
    let ps = HarmonyParams { sketch: Some(m), ..p.clone() };
    let sk = run(&x, d, &covs, &ps);
    // Every batch in proportion, the smallest (1/6 of the cells) above its floor.
    let cells = map::sketch_cells(&covs[0], m, ps.seed);
    assert_eq!(sk.fitted_cells, cells.len());
    assert!((m..m + 3).contains(&cells.len()), "{} cells", cells.len());
    let in_b2 = cells.iter().filter(|&&i| batch[i] == 2).count();
    assert!((450..=550).contains(&in_b2), "{in_b2} of batch 3");
    // The sketch's cells keep Harmony's fit on them.
    let sub: Vec<f64> = cells.iter().flat_map(|&i| x[i * d..(i + 1) * d].to_vec()).collect();
    let sub_cov = [batch_cov(cells.iter().map(|&i| batch[i]).collect(), 3)];
    let alone = run(&sub, d, &sub_cov, &p);
    for (o, &i) in cells.iter().enumerate() {
        assert_eq!(&sk.z_corr[i * d..(i + 1) * d], &alone.z_corr[o * d..(o + 1) * d]);
    }
    // The other cells are corrected as well as by the full run.
    let err = relative_error(&sk.z_corr, &full.z_corr);
    let (s_in, s_full, s_sk) = (
        batch_spread(&x, d, &batch, &label),
        batch_spread(&full.z_corr, d, &batch, &label),
        batch_spread(&sk.z_corr, d, &batch, &label),
    );
    eprintln!("sketch of {m}: relative error to the full run {err:.2e}; batch spread {s_in:.3} -> full {s_full:.3}, sketch {s_sk:.3}");
    assert!(err < 1e-3, "relative error {err}");
    assert!(s_sk < s_full * 1.15 + 0.02 && s_sk < s_in / 3.0, "batch spread: full {s_full}, sketch {s_sk}");
    // Reproducible; a sketch as large as the data is the full run.
    assert_eq!(run(&x, d, &covs, &ps).z_corr, sk.z_corr);
    let whole = run(&x, d, &covs, &HarmonyParams { sketch: Some(n), ..p.clone() });
    assert_eq!(whole.z_corr, full.z_corr);
    assert_eq!(whole.fitted_cells, n);
    // Memberships of the mapped cells are not computed: asking is an error.
    let both = HarmonyParams { memberships: true, ..ps };
    let e = harmony(Embedding::row_major(&x, n, d), &covs, &both, &|| false, &|_| {}).unwrap_err();
    assert!(e.to_string().contains("sketch"), "{e}");
}

#[test]
fn harmony_into_fills_a_column_major_matrix_with_the_same_result() {
    // Past one block of the sketch's mapping (POLL_CELLS), and a full run.
    for (n, sketch) in [(70_000, Some(2000)), (3000, None)] {
        let d = 4;
        let (x, batch, _) = typed_batches(n, d, 5);
        let covs = [batch_cov(batch, 3)];
        let p = HarmonyParams { memberships: false, sketch, seed: 2, ..Default::default() };
        let rows = run(&x, d, &covs, &p);
        let same = |out: &[f64]| (0..n * d).all(|k| out[(k % d) * n + k / d] == rows.z_corr[k]);
        let mut out = vec![f64::NAN; n * d];
        let apart = HarmonyCells::Apart { z: Embedding::row_major(&x, n, d), out: &mut out };
        let r = harmony_into(apart, &covs, &p, &|| false, &|_| {}).unwrap();
        assert!(r.z_corr.is_empty());
        assert_eq!(r.fitted_cells, rows.fitted_cells);
        assert!(same(&out), "n = {n}");
        // Corrected where they are: the cells column-major, overwritten.
        let mut values: Vec<f64> = (0..n * d).map(|k| x[(k % n) * d + k / n]).collect();
        let r = harmony_into(HarmonyCells::InPlace { values: &mut values, n, d }, &covs, &p, &|| false, &|_| {});
        assert_eq!(r.unwrap().fitted_cells, rows.fitted_cells);
        assert!(same(&values), "in place, n = {n}");
        // Corrected where they are in a file: the same values, read back.
        let dir = std::env::temp_dir().join(format!("scdistill-harmony-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("z{n}.h5")).to_string_lossy().into_owned();
        let _ = std::fs::remove_file(&path);
        let file = CellsH5::create(&path, "z", n, d, false).unwrap();
        file.write(0, &x).unwrap();
        let r = harmony_into(HarmonyCells::File(file.clone()), &covs, &p, &|| false, &|_| {}).unwrap();
        assert_eq!(r.fitted_cells, rows.fitted_cells);
        assert_eq!(file.read(0, n).unwrap(), rows.z_corr, "in a file, n = {n}");
        // A value that is not finite is named by its cell, whether all cells
        // are read for the fit or a block at a time around a sketch.
        let mut bad = x.clone();
        bad[(n - 1) * d + 2] = f64::NAN;
        file.write(0, &bad).unwrap();
        let e = harmony_into(HarmonyCells::File(file), &covs, &p, &|| false, &|_| {}).unwrap_err().to_string();
        assert!(e.contains(&format!("missing or infinite value (cell {n}, dimension 3)")), "{e}");
        let _ = std::fs::remove_file(&path);
        let mut short = vec![0.0; n * d - 1];
        let apart = HarmonyCells::Apart { z: Embedding::row_major(&x, n, d), out: &mut short };
        let e = harmony_into(apart, &covs, &p, &|| false, &|_| {}).unwrap_err();
        assert!(e.to_string().contains("room for"), "{e}");
        let e = harmony_into(HarmonyCells::InPlace { values: &mut short, n, d }, &covs, &p, &|| false, &|_| {});
        assert!(e.unwrap_err().to_string().contains("not cells"));
    }
}
