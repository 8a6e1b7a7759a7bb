//! Splatter-style count simulator with known truth (Zappia et al. 2017,
//! Genome Biology 18:174): gamma gene means with outliers, log-normal library
//! sizes, log-normal cell-type DE factors, per-gene multiplicative batch
//! factors, a treatment condition with per-cell-type (or shared) effects, gamma–Poisson
//! counts whose extra variance follows the biological coefficient of
//! variation (BCV), and optional logistic dropout.
//!
//! Counts are generated cell by cell straight into CSR. Each cell draws from
//! its own random stream, so the result depends on the seed only, not on the
//! number of threads.

mod ambient;
mod atac;
mod params;

pub use ambient::{contaminate, AmbientParams, Contamination};
pub use atac::{AtacParams, AtacSimulation};
pub use params::{ConditionParams, SimParams, Species, SpeciesParams};

use crate::data::{Categorical, CountMatrix, Csr};
use crate::error::{invalid, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{ChiSquared, Distribution, Gamma, LogNormal, Poisson};
use rayon::prelude::*;

/// Simulated counts and the truth behind them.
#[derive(Debug, Clone)]
pub struct Simulation {
    pub counts: CountMatrix,
    pub group: Categorical,
    pub batch: Categorical,
    /// control/treated, when a condition was simulated.
    pub condition: Option<Categorical>,
    /// Samples nested in batch × condition, when a condition was simulated.
    pub sample: Option<Categorical>,
    /// young/old, a property of each sample, when an age effect was simulated.
    pub age_group: Option<Categorical>,
    /// The library-size factor each cell was drawn with.
    pub library_size: Vec<f64>,
    /// Base expression level of each gene.
    pub gene_mean: Vec<f64>,
    /// Cell-type DE factors, [group][gene].
    pub group_factor: Vec<Vec<f64>>,
    /// Batch factors, [batch][gene].
    pub batch_factor: Vec<Vec<f64>>,
    /// Condition effect factors, [group][gene] (all 1 without a condition).
    pub condition_factor: Vec<Vec<f64>>,
    /// Age effect factors per gene (all 1 without an age group).
    pub age_factor: Vec<f64>,
    /// True log2 fold change treated vs control of batch-free normalized
    /// expression, [group][gene].
    pub true_lfc: Vec<Vec<f64>>,
    /// The same for all cells together, [gene]: the log2 ratio of the
    /// cell-type mixture's (weights `group_prob`) batch-free normalized
    /// expression, treated over control.
    pub true_lfc_population: Vec<f64>,
    /// Peaks of the same cells, when an ATAC modality was simulated.
    pub atac: Option<AtacSimulation>,
    /// The second species, when one was simulated.
    pub species: Option<Box<SpeciesSimulation>>,
}

/// A second species: its simulation (same cell types, its own genes and
/// cells), for each of its genes the first species' homolog, and the truth
/// for homologs' expression differences.
#[derive(Debug, Clone)]
pub struct SpeciesSimulation {
    pub sim: Simulation,
    pub homolog: Vec<Option<u32>>,
    /// True log2 fold change, second species over first, of each homolog's
    /// share of batch-free expression among the homologous genes,
    /// [group][second-species gene]: log2(p2 / p1), where p is
    /// [`Simulation::batch_free_expression`] over its sum across the
    /// species' homologous genes. NaN for genes without a homolog and for
    /// cell types missing from either species.
    pub homolog_lfc: Vec<Vec<f64>>,
    /// Whether each cell type has cells in both species (where
    /// `homolog_lfc` is finite).
    pub shared_groups: Vec<bool>,
}

impl SpeciesSimulation {
    /// The homologs as a homolog table of gene names: (this species' gene,
    /// its homolog among `first`'s genes), as `align_species()` takes them
    /// (target, context).
    pub fn homolog_names(&self, first: &Simulation) -> Vec<(String, String)> {
        let (mine, theirs) = (&self.sim.counts.genes, &first.counts.genes);
        self.homolog
            .iter()
            .enumerate()
            .filter_map(|(g2, h)| h.map(|g1| (mine[g2].clone(), theirs[g1 as usize].clone())))
            .collect()
    }
}

impl Simulation {
    /// Expression of gene `g` in cell type `t` before batch, condition
    /// (control), age (young) and library size: base mean × cell-type factor.
    pub fn batch_free_expression(&self, t: usize, g: usize) -> f64 {
        self.gene_mean[g] * self.group_factor[t][g]
    }
}

/// Programs a second species inherits: base mean and cell-type factor per
/// gene, where set, and species-specific factors multiplying its cell-type
/// factors ([group][gene], 1 for none).
struct Inherited {
    gene_mean: Vec<Option<f64>>,
    group_factor: Vec<Vec<Option<f64>>>,
    species_factor: Vec<Vec<f64>>,
}

/// Simulates counts with the given parameters.
pub fn simulate(p: &SimParams) -> Result<Simulation> {
    p.validate()?;
    let p1 = SimParams { group_prob: p.species_group_prob(Species::First), ..p.clone() };
    let mut first = simulate_one(&p1, None, "", None)?;
    if let Some(sp) = &p.species {
        first.species = Some(Box::new(second_species(p, sp, &first)?));
    }
    Ok(first)
}

/// The second species, from its own random stream (the first species'
/// counts do not change when it is added).
fn second_species(p: &SimParams, sp: &SpeciesParams, first: &Simulation) -> Result<SpeciesSimulation> {
    let p2 = SimParams {
        n_cells: sp.n_cells,
        n_genes: sp.n_genes,
        seed: p.seed ^ 0x05be_c1e5,
        group_prob: p.species_group_prob(Species::Second),
        condition: None,
        atac: None,
        species: None,
        batch_lib_shift: Vec::new(),
        ..p.clone()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(p2.seed);
    rng.set_stream(HOMOLOG_STREAM);
    let pairs = pair_homologs(p.n_genes, sp, &mut rng);
    let inherited = inherit(sp, first, &pairs, &mut rng);
    let mut homolog = vec![None; sp.n_genes];
    for &(g1, g2) in &pairs {
        homolog[g2] = Some(g1);
    }
    let sim = simulate_one(&p2, Some(&inherited), "Sp2", None)?;
    let shared_groups = p.shared_groups();
    let homolog_lfc = homolog_truth(first, &sim, &homolog, &shared_groups);
    Ok(SpeciesSimulation { sim, homolog, homolog_lfc, shared_groups })
}

/// The random stream of the homolog draws: the second species' own programs
/// use stream 0 of the same seed, its cells streams 1 to n_cells, so the
/// homolog map and the inherited programs are independent of both.
const HOMOLOG_STREAM: u64 = u64::MAX;

/// One-to-one homolog pairs (first-species gene, second-species gene), in
/// random positions of both species.
fn pair_homologs(n_genes1: usize, sp: &SpeciesParams, rng: &mut ChaCha8Rng) -> Vec<(u32, usize)> {
    let n_hom = ((sp.homolog_fraction * sp.n_genes as f64).round() as usize).min(n_genes1);
    let mut from: Vec<u32> = (0..n_genes1 as u32).collect();
    from.shuffle(rng);
    let mut to: Vec<usize> = (0..sp.n_genes).collect();
    to.shuffle(rng);
    from.into_iter().zip(to).take(n_hom).collect()
}

/// What the homologs inherit: diverged base means, cell-type factors kept
/// with probability `de_conservation`, and (drawn after those, so that
/// they move no other draw) species-specific factors.
fn inherit(sp: &SpeciesParams, first: &Simulation, pairs: &[(u32, usize)], rng: &mut ChaCha8Rng) -> Inherited {
    let n_groups = first.group_factor.len();
    let mut inherited = Inherited {
        gene_mean: vec![None; sp.n_genes],
        group_factor: vec![vec![None; sp.n_genes]; n_groups],
        species_factor: vec![vec![1.0; sp.n_genes]; n_groups],
    };
    let divergence = LogNormal::new(0.0, sp.mean_divergence).expect("validated");
    for &(g1, g2) in pairs {
        inherited.gene_mean[g2] = Some(first.gene_mean[g1 as usize] * divergence.sample(rng));
        for t in 0..n_groups {
            if rng.random::<f64>() < sp.de_conservation {
                inherited.group_factor[t][g2] = Some(first.group_factor[t][g1 as usize]);
            }
        }
    }
    let species_de = lnorm(sp.species_de_fac_loc, sp.species_de_fac_scale);
    for &(_, g2) in pairs {
        for factors in inherited.species_factor.iter_mut() {
            if rng.random::<f64>() < sp.species_de_prob {
                factors[g2] = lognormal_factor(rng, &species_de, 0.5);
            }
        }
    }
    inherited
}

/// The truth of [`SpeciesSimulation::homolog_lfc`]: per cell type in both
/// species, log2 of each homolog's share of batch-free expression among the
/// homologous genes, second species over first (NaN elsewhere).
fn homolog_truth(first: &Simulation, second: &Simulation, homolog: &[Option<u32>], shared: &[bool]) -> Vec<Vec<f64>> {
    shared
        .iter()
        .enumerate()
        .map(|(t, &both)| {
            let m1 = |g1: u32| first.batch_free_expression(t, g1 as usize);
            let m2 = |g2: usize| second.batch_free_expression(t, g2);
            let pairs = || homolog.iter().enumerate().filter_map(|(g2, h)| h.map(|g1| (g1, g2)));
            let (s1, s2) = pairs().fold((0.0, 0.0), |(a, b), (g1, g2)| (a + m1(g1), b + m2(g2)));
            homolog
                .iter()
                .enumerate()
                .map(|(g2, h)| match h {
                    Some(g1) if both => ((m2(g2) / s2) / (m1(*g1) / s1)).log2(),
                    _ => f64::NAN,
                })
                .collect()
        })
        .collect()
}

/// One species; `inherited` overrides the base means and cell-type factors it sets.
/// `simulate`, writing the counts to an AnnData file at `path` in blocks of
/// cells instead of holding them: the same cells as `simulate` draws (each
/// cell has its own random stream), with the cell types, batches and (when
/// simulated) conditions and samples as categorical cell columns. With an
/// ATAC modality its peaks go to `atac_path`, a second file with the same
/// cells and columns (as `fit_multimodal` reads paired files). The returned
/// simulation has the truth and names but no counts (0 rows). One species.
pub fn simulate_to_h5ad(p: &SimParams, path: &str, atac_path: Option<&str>) -> Result<Simulation> {
    p.validate()?;
    if p.species.is_some() {
        return invalid!("a simulation written to a file has one species");
    }
    let mut atac = match (&p.atac, atac_path) {
        (Some(a), Some(f)) => Some(crate::data::H5adWriter::create(f, a.n_peaks)?),
        (None, None) => None,
        (Some(_), None) => {
            return invalid!("a simulation with ATAC written to a file needs a second file for the peaks")
        }
        (None, Some(_)) => return invalid!("a file for ATAC peaks, but the simulation has no ATAC modality"),
    };
    let mut w = crate::data::H5adWriter::create(path, p.n_genes)?;
    let s = simulate_one(p, None, "", Some(Files { rna: &mut w, atac: atac.as_mut() }))?;
    let mut cols: Vec<(String, Vec<u32>, Vec<String>)> = vec![];
    // The column names simulate_counts() gives its cell metadata.
    for c in [Some(&s.group), Some(&s.batch), s.condition.as_ref(), s.sample.as_ref()].into_iter().flatten() {
        let name = if c.name == "group" { "cell_type".to_string() } else { c.name.clone() };
        cols.push((name, c.codes.clone(), c.levels.clone()));
    }
    w.finish(&s.counts.cells, &s.counts.genes, &cols)?;
    if let (Some(w), Some(a)) = (atac, &s.atac) {
        w.finish(&s.counts.cells, &a.peaks, &cols)?;
    }
    Ok(s)
}

/// Where `simulate_one` writes its cells instead of holding them.
struct Files<'a> {
    rna: &'a mut crate::data::H5adWriter,
    atac: Option<&'a mut crate::data::H5adWriter>,
}

/// Cells drawn at once when a simulation is written to a file.
const FILE_BLOCK: usize = 16_384;

/// The rows `row` draws (as `Csr::build_rows`, with the value it keeps per
/// row), or, with a file, the same rows appended to it [`FILE_BLOCK`] at a
/// time and a matrix of no rows in their place.
fn rows_or_file<T: Send>(
    n_rows: usize,
    n_cols: usize,
    file: Option<&mut crate::data::H5adWriter>,
    row: impl Fn(usize, &mut Vec<u32>, &mut Vec<f32>) -> T + Sync,
) -> Result<(Csr, Vec<T>)> {
    let Some(w) = file else { return Ok(Csr::build_rows(n_rows, n_cols, row)) };
    let mut kept = Vec::with_capacity(n_rows);
    for start in (0..n_rows).step_by(FILE_BLOCK) {
        let len = FILE_BLOCK.min(n_rows - start);
        let (part, k) = Csr::build_rows(len, n_cols, |i, idx, val| row(start + i, idx, val));
        w.append(&part)?;
        kept.extend(k);
    }
    Ok((Csr { n_rows: 0, n_cols, indptr: vec![0], ..Default::default() }, kept))
}

fn simulate_one(
    p: &SimParams,
    inherited: Option<&Inherited>,
    prefix: &str,
    files: Option<Files<'_>>,
) -> Result<Simulation> {
    let (n_genes, n_groups, n_batches) = (p.n_genes, p.n_groups(), p.n_batches());
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
    // The draws below come from one stream in this order: moving one moves the rest.
    let programs = draw_programs(p, inherited, &mut rng);
    let n_age = programs.n_age;
    let cells = assign_cells(p, &mut rng);
    // One χ² draw per gene, shared by all cells (as Splatter's recycling does).
    let chi = ChiSquared::new(p.bcv_df).expect("validated");
    let bcv_scale: Vec<f64> = (0..n_genes).map(|_| (p.bcv_df / chi.sample(&mut rng)).sqrt()).collect();

    // Normalized expression profile of every (group, batch, condition, age).
    let n_cond = if p.condition.is_some() { 2 } else { 1 };
    let combos: Vec<(usize, usize, usize, usize)> = (0..n_groups)
        .flat_map(|t| {
            (0..n_batches).flat_map(move |b| (0..n_cond).flat_map(move |c| (0..n_age).map(move |a| (t, b, c, a))))
        })
        .collect();
    let profiles: Vec<Vec<f64>> = combos.par_iter().map(|&(t, b, c, a)| programs.profile(t, Some(b), c, a)).collect();
    let profile_of = |t: usize, b: usize, c: usize, a: usize| &profiles[((t * n_batches + b) * n_cond + c) * n_age + a];
    let (true_lfc, true_lfc_population) = de_truth(p, &programs, n_cond);
    // Biological variation between samples: after every other draw, so
    // that data without it are unchanged. Profiles per (sample, cell type).
    let sample_sd = p.condition.as_ref().map_or(0.0, |c| c.sample_sd);
    let per_sample: Option<Vec<Vec<f64>>> = (sample_sd > 0.0).then(|| {
        let n_samples = cells.sample.iter().map(|&s| s as usize + 1).max().unwrap_or(0);
        let dev = lnorm(0.0, sample_sd);
        let factors: Vec<Vec<f64>> =
            (0..n_samples).map(|_| (0..n_genes).map(|_| dev.sample(&mut rng)).collect()).collect();
        let mut first_cell = vec![usize::MAX; n_samples];
        for (i, &s) in cells.sample.iter().enumerate() {
            if first_cell[s as usize] == usize::MAX {
                first_cell[s as usize] = i;
            }
        }
        (0..n_samples * n_groups)
            .into_par_iter()
            .map(|k| {
                let (s, t) = (k / n_groups, k % n_groups);
                let i = first_cell[s];
                if i == usize::MAX {
                    return vec![];
                }
                let age = if n_age == 2 { s % 2 } else { 0 };
                let base = profile_of(t, cells.batch[i] as usize, cells.condition[i] as usize, age);
                let raw: Vec<f64> = base.iter().zip(&factors[s]).map(|(a, f)| a * f).collect();
                let total: f64 = raw.iter().sum();
                raw.into_iter().map(|v| v / total).collect()
            })
            .collect()
    });

    let cell = |i: usize, idx: &mut Vec<u32>, val: &mut Vec<f32>| {
        let mut r = ChaCha8Rng::seed_from_u64(p.seed);
        r.set_stream(i as u64 + 1);
        let b = cells.batch[i] as usize;
        let shift = p.batch_lib_shift.get(b).copied().unwrap_or(0.0);
        let lib = lnorm(p.lib_loc + shift, p.lib_scale).sample(&mut r);
        let age = if n_age == 2 { cells.sample[i] as usize % 2 } else { 0 };
        let prof = match &per_sample {
            Some(ps) => &ps[cells.sample[i] as usize * n_groups + cells.group[i] as usize],
            None => profile_of(cells.group[i] as usize, b, cells.condition[i] as usize, age),
        };
        cell_counts(p, prof, &bcv_scale, lib, &mut r, idx, val);
        lib
    };
    let (rna_file, atac_file) = match files {
        Some(f) => (Some(f.rna), f.atac),
        None => (None, None),
    };
    let (csr, library_size) = rows_or_file(p.n_cells, n_genes, rna_file, cell)?;
    let atac = match p.atac.as_ref() {
        Some(a) => Some(atac::simulate_atac(
            p,
            a,
            &cells.group,
            &cells.batch,
            &cells.condition,
            &programs.group_factor,
            &programs.condition_factor,
            p.seed,
            atac_file,
        )?),
        None => None,
    };

    let counts = CountMatrix {
        csr,
        genes: numbered(&format!("{prefix}Gene"), n_genes),
        cells: numbered(&format!("{prefix}Cell"), p.n_cells),
    };
    let (condition, sample, age_group) = cell_annotations(p, &cells, n_age);
    let Programs { gene_mean, group_factor, batch_factor, condition_factor, age_factor, .. } = programs;
    Ok(Simulation {
        counts,
        group: categorical("group", cells.group, numbered("Group", n_groups)),
        batch: categorical("batch", cells.batch, numbered("Batch", n_batches)),
        condition,
        sample,
        age_group,
        library_size,
        gene_mean,
        group_factor,
        batch_factor,
        condition_factor,
        age_factor,
        true_lfc,
        true_lfc_population,
        atac,
        species: None,
    })
}

/// A species' gene-level programs: base means and the factors of cell type,
/// batch, condition and age, each one value per gene.
struct Programs {
    gene_mean: Vec<f64>,
    /// [group][gene].
    group_factor: Vec<Vec<f64>>,
    /// [batch][gene].
    batch_factor: Vec<Vec<f64>>,
    /// [group][gene], all 1 without a condition.
    condition_factor: Vec<Vec<f64>>,
    /// All 1 without an age effect.
    age_factor: Vec<f64>,
    /// Age groups: 2 with an age effect, else 1.
    n_age: usize,
}

impl Programs {
    /// Normalized expression profile of cell type `t` in batch `b` (none:
    /// batch-free), condition `c` (1: treated) and age group `a` (1: old).
    fn profile(&self, t: usize, b: Option<usize>, c: usize, a: usize) -> Vec<f64> {
        let raw: Vec<f64> = (0..self.gene_mean.len())
            .map(|g| {
                let cond = if c == 1 { self.condition_factor[t][g] } else { 1.0 };
                let age = if a == 1 { self.age_factor[g] } else { 1.0 };
                self.gene_mean[g] * self.group_factor[t][g] * b.map_or(1.0, |b| self.batch_factor[b][g]) * cond * age
            })
            .collect();
        let total: f64 = raw.iter().sum();
        raw.into_iter().map(|v| v / total).collect()
    }
}

/// The programs, drawn from `rng` in a fixed order: base means, cell-type,
/// batch, condition and age factors.
fn draw_programs(p: &SimParams, inherited: Option<&Inherited>, rng: &mut ChaCha8Rng) -> Programs {
    let (n_genes, n_groups, n_batches) = (p.n_genes, p.n_groups(), p.n_batches());
    let mut gene_mean = gene_means(p, rng);
    let mut group_factor: Vec<Vec<f64>> = (0..n_groups)
        .map(|_| draw_factors(rng, n_genes, p.de_prob, p.de_down_prob, p.de_fac_loc, p.de_fac_scale))
        .collect();
    // Cell types that differ in ATAC only share the first type's RNA program.
    let atac_only = p.atac.as_ref().map_or(0, |a| a.atac_only_groups);
    for t in n_groups - atac_only..n_groups {
        group_factor[t] = group_factor[0].clone();
    }
    if let Some(inh) = inherited {
        for (m, i) in gene_mean.iter_mut().zip(&inh.gene_mean) {
            *m = i.unwrap_or(*m);
        }
        for ((factors, inh_factors), species) in group_factor.iter_mut().zip(&inh.group_factor).zip(&inh.species_factor)
        {
            for ((f, i), s) in factors.iter_mut().zip(inh_factors).zip(species) {
                *f = i.unwrap_or(*f) * s;
            }
        }
    }
    let batch_factor: Vec<Vec<f64>> =
        (0..n_batches).map(|_| draw_factors(rng, n_genes, 1.0, 0.5, p.batch_fac_loc, p.batch_fac_scale)).collect();
    let condition_factor: Vec<Vec<f64>> = match &p.condition {
        Some(c) if c.shared => {
            vec![draw_factors(rng, n_genes, c.de_prob, c.de_down_prob, c.de_fac_loc, c.de_fac_scale); n_groups]
        }
        Some(c) => (0..n_groups)
            .map(|_| draw_factors(rng, n_genes, c.de_prob, c.de_down_prob, c.de_fac_loc, c.de_fac_scale))
            .collect(),
        None => vec![vec![1.0; n_genes]; n_groups],
    };
    let age_prob = p.condition.as_ref().map_or(0.0, |c| c.age_de_prob);
    let age_factor = if age_prob > 0.0 {
        draw_factors(rng, n_genes, age_prob, 0.5, AGE_FAC_LOC, AGE_FAC_SCALE)
    } else {
        vec![1.0; n_genes]
    };
    let n_age = if age_prob > 0.0 { 2 } else { 1 };
    Programs { gene_mean, group_factor, batch_factor, condition_factor, age_factor, n_age }
}

fn lnorm(loc: f64, scale: f64) -> LogNormal<f64> {
    LogNormal::new(loc, scale).expect("validated scale")
}

/// Splatter's getLNormFactors: each gene, with probability `prob`, gets an
/// oriented log-normal factor (else 1).
fn draw_factors(rng: &mut ChaCha8Rng, n_genes: usize, prob: f64, down: f64, loc: f64, scale: f64) -> Vec<f64> {
    (0..n_genes)
        .map(|_| if rng.random::<f64>() < prob { lognormal_factor(rng, &lnorm(loc, scale), down) } else { 1.0 })
        .collect()
}

/// Truth for DE, from batch-free, age-free normalized expression, treated
/// vs control: the log2 fold change per cell type ([group][gene]) and of
/// the cell-type mixture in proportions `group_prob` ([gene]; their sum
/// cancels in the ratio).
fn de_truth(p: &SimParams, programs: &Programs, n_cond: usize) -> (Vec<Vec<f64>>, Vec<f64>) {
    let free: Vec<(Vec<f64>, Vec<f64>)> = (0..p.n_groups())
        .map(|t| (programs.profile(t, None, 0, 0), programs.profile(t, None, n_cond - 1, 0)))
        .collect();
    let true_lfc: Vec<Vec<f64>> = free
        .iter()
        .map(|(control, treated)| control.iter().zip(treated).map(|(a, b)| (b / a).log2()).collect())
        .collect();
    let true_lfc_population: Vec<f64> = (0..p.n_genes)
        .map(|g| {
            let (control, treated) =
                free.iter().zip(&p.group_prob).fold((0.0, 0.0), |(c, t), ((fc, ft), w)| (c + w * fc[g], t + w * ft[g]));
            (treated / control).log2()
        })
        .collect();
    (true_lfc, true_lfc_population)
}

/// The cells' condition, sample (nested in batch × condition) and age group,
/// where the parameters simulate them.
fn cell_annotations(
    p: &SimParams,
    cells: &CellAssignment,
    n_age: usize,
) -> (Option<Categorical>, Option<Categorical>, Option<Categorical>) {
    let n_batches = p.n_batches();
    let age_group = (n_age == 2).then(|| {
        let codes = cells.sample.iter().map(|&k| k % 2).collect();
        categorical("age_group", codes, vec!["young".into(), "old".into()])
    });
    let (condition, sample) = match &p.condition {
        Some(c) => {
            let samples = (0..n_batches)
                .flat_map(|b| {
                    ["control", "treated"].into_iter().flat_map(move |cond| {
                        (1..=c.samples_per_batch).map(move |k| format!("Batch{}_{cond}_{k}", b + 1))
                    })
                })
                .collect();
            (
                Some(categorical("condition", cells.condition.clone(), vec!["control".into(), "treated".into()])),
                Some(categorical("sample", cells.sample.clone(), samples)),
            )
        }
        None => (None, None),
    };
    (condition, sample, age_group)
}

/// `prefix`1, ..., `prefix`n.
fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|k| format!("{prefix}{k}")).collect()
}

fn categorical(name: &str, codes: Vec<u32>, levels: Vec<String>) -> Categorical {
    Categorical { name: name.into(), codes, levels }
}

/// f ~ LogNormal(loc, scale) oriented so that increases are >= 1, inverted
/// (a decrease, <= 1) with probability `down` (Splatter's getLNormFactors).
fn lognormal_factor(rng: &mut ChaCha8Rng, dist: &LogNormal<f64>, down: f64) -> f64 {
    let f = dist.sample(rng);
    let up = if f < 1.0 { 1.0 / f } else { f };
    if rng.random::<f64>() < down {
        1.0 / up
    } else {
        up
    }
}

/// Log-normal location and scale of age effects (smaller than condition effects).
const AGE_FAC_LOC: f64 = 0.3;
const AGE_FAC_SCALE: f64 = 0.2;

/// Gene means ~ Gamma(shape, rate); outliers are set to the median times a
/// log-normal factor, as in Splatter.
fn gene_means(p: &SimParams, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let gamma = Gamma::new(p.mean_shape, 1.0 / p.mean_rate).expect("validated");
    let mut means: Vec<f64> = (0..p.n_genes).map(|_| gamma.sample(rng)).collect();
    let mut sorted = means.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let outlier = LogNormal::new(p.out_fac_loc, p.out_fac_scale).expect("validated");
    for m in means.iter_mut() {
        if rng.random::<f64>() < p.out_prob {
            *m = median * outlier.sample(rng);
        }
    }
    means
}

struct CellAssignment {
    group: Vec<u32>,
    batch: Vec<u32>,
    condition: Vec<u32>,
    sample: Vec<u32>,
}

/// Batches get exact sizes (largest remainder) in consecutive blocks; cell
/// types are drawn per cell; within each batch exactly round(fraction × size)
/// cells are treated; samples are drawn within batch × condition.
fn assign_cells(p: &SimParams, rng: &mut ChaCha8Rng) -> CellAssignment {
    let n = p.n_cells;
    let sizes = exact_sizes(&p.batch_prob, n);
    let batch: Vec<u32> = sizes.iter().enumerate().flat_map(|(b, &s)| std::iter::repeat_n(b as u32, s)).collect();
    let group_cum = cumulative(&p.group_prob);
    // A uniform above the rounded total falls to the last type with cells.
    let last = p.group_prob.iter().rposition(|&v| v > 0.0).expect("validated");
    let group: Vec<u32> = (0..n)
        .map(|_| {
            let u = rng.random::<f64>();
            group_cum.iter().position(|&c| u < c).unwrap_or(last) as u32
        })
        .collect();
    let mut condition = vec![0u32; n];
    let mut sample = vec![0u32; n];
    if let Some(c) = &p.condition {
        let mut start = 0;
        for (b, &size) in sizes.iter().enumerate() {
            let n_treated = (c.treated_fraction[b] * size as f64).round() as usize;
            let mut idx: Vec<usize> = (start..start + size).collect();
            rand::seq::SliceRandom::shuffle(idx.as_mut_slice(), rng);
            for &i in &idx[..n_treated] {
                condition[i] = 1;
            }
            for i in start..start + size {
                let k = rng.random_range(0..c.samples_per_batch);
                sample[i] = ((b * 2 + condition[i] as usize) * c.samples_per_batch + k) as u32;
            }
            start += size;
        }
    }
    CellAssignment { group, batch, condition, sample }
}

fn cumulative(p: &[f64]) -> Vec<f64> {
    let total: f64 = p.iter().sum();
    p.iter()
        .scan(0.0, |acc, v| {
            *acc += v / total;
            Some(*acc)
        })
        .collect()
}

/// Sizes proportional to `p` summing to `n` (largest-remainder rounding).
fn exact_sizes(p: &[f64], n: usize) -> Vec<usize> {
    let total: f64 = p.iter().sum();
    let raw: Vec<f64> = p.iter().map(|v| v / total * n as f64).collect();
    let mut sizes: Vec<usize> = raw.iter().map(|v| v.floor() as usize).collect();
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| (raw[b] - raw[b].floor()).total_cmp(&(raw[a] - raw[a].floor())));
    let missing = n - sizes.iter().sum::<usize>();
    for &k in order.iter().take(missing) {
        sizes[k] += 1;
    }
    sizes
}

/// One cell, appended to `idx`/`val`: gamma–Poisson counts around library ×
/// profile, with the BCV trend of Splatter:
/// bcv = (bcv_common + 1/sqrt(mean)) · sqrt(df / χ²_df).
fn cell_counts(
    p: &SimParams,
    profile: &[f64],
    bcv_scale: &[f64],
    lib: f64,
    r: &mut ChaCha8Rng,
    idx: &mut Vec<u32>,
    val: &mut Vec<f32>,
) {
    for (g, &share) in profile.iter().enumerate() {
        let mean = lib * share;
        if mean <= 0.0 {
            continue;
        }
        let shape = || {
            let bcv = (p.bcv_common + 1.0 / mean.sqrt()) * bcv_scale[g];
            1.0 / (bcv * bcv)
        };
        let count = match p.dropout {
            // Dropout acts on the gamma-distributed cell mean, so draw it.
            Some((mid, dshape)) => {
                let shape = shape();
                let true_mean = Gamma::new(shape, mean / shape).map(|d| d.sample(r)).unwrap_or(mean);
                let drop = 1.0 / (1.0 + (-dshape * (true_mean.max(1e-300).ln() - mid)).exp());
                if r.random::<f64>() < drop {
                    continue;
                }
                poisson(true_mean, r)
            }
            // P(0) = (1 + mean/shape)^−shape ≥ e^−mean ≥ 1 − m + m²/2 − m³/6
            // (an alternating series cut after a negative term), so a uniform
            // below that bound is a zero without evaluating the pmf: the same
            // draw, far cheaper. Useful for means below ~1.6.
            None if mean < NB_INVERSION_BELOW => {
                let u: f64 = r.random();
                if u <= 1.0 - mean * (1.0 - mean * (0.5 - mean / 6.0)) {
                    continue;
                }
                nb_inversion(mean, shape(), u)
            }
            None => negative_binomial(mean, shape(), r),
        };
        if count > 0.0 {
            idx.push(g as u32);
            val.push(count as f32);
        }
    }
}

fn poisson(mean: f64, r: &mut ChaCha8Rng) -> f64 {
    if mean <= 0.0 {
        return 0.0;
    }
    Poisson::new(mean).map(|d| d.sample(r)).unwrap_or(0.0)
}

/// Means below which a negative binomial count is drawn by inversion.
const NB_INVERSION_BELOW: f64 = 16.0;

/// A gamma–Poisson (negative binomial) draw with the given mean and gamma
/// shape. Small means, most entries of a count matrix, are drawn by inversion
/// from one uniform, walking the pmf recursion
/// P(k+1) = P(k) · (k + shape)/(k + 1) · mean/(mean + shape); large means by
/// drawing the gamma mean and then the Poisson count.
fn negative_binomial(mean: f64, shape: f64, r: &mut ChaCha8Rng) -> f64 {
    if mean < NB_INVERSION_BELOW {
        return nb_inversion(mean, shape, r.random());
    }
    let true_mean = Gamma::new(shape, mean / shape).map(|d| d.sample(r)).unwrap_or(mean);
    poisson(true_mean, r)
}

/// The negative binomial count whose cumulative distribution first exceeds
/// the uniform `u`.
fn nb_inversion(mean: f64, shape: f64, mut u: f64) -> f64 {
    let q = mean / (mean + shape);
    let mut pk = (shape * (shape / (mean + shape)).ln()).exp(); // P(0)
    let mut k = 0.0;
    while u > pk {
        u -= pk;
        pk *= (k + shape) / (k + 1.0) * q;
        k += 1.0;
        if pk < 1e-300 && k > mean * 50.0 + 100.0 {
            break; // the tail is exhausted numerically
        }
    }
    k
}

#[cfg(test)]
pub(crate) mod tests;
