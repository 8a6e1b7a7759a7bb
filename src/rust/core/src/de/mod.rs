//! Bayesian differential expression between two groups of cells, from a
//! trained model's expression scales ρ.
//!
//! - `Method::Change` (scvi-tools' "change" mode, Boyeau et al. 2019):
//!   draws of ρ for random cells of each group (one posterior draw of z
//!   per cell), random pairs of draws across the groups, the LFC
//!   log2(ρ1 + ε) − log2(ρ2 + ε) per pair; a gene is DE with probability
//!   max(P(LFC ≥ δ), P(LFC ≤ −δ)).
//! - `Method::Vanilla`: P(ρ1 > ρ2) over the same pairs.
//! - `Method::McDropout` (scDistill's Bayesian mode): `n_samples` passes
//!   over every cell of each group with dropout on; per pass only the
//!   group's mean ρ and its variance across cells are kept, so memory is
//!   O(genes × passes). The LFC posterior is Gaussian: model variance
//!   (across passes) plus data variance (across cells, divided by their
//!   number), carried to the log scale by the delta method.
//!
//! - `Method::Samples` (replicate-aware): each sample's counts, corrected
//!   for batch by the model, summed; a linear model of the samples' log2
//!   levels with an empirical-Bayes between-sample variance and adaptive
//!   shrinkage of the fold changes (`samples`).
//!
//! Genes are called DE by the posterior expected FDR rule (`stats::fdr_calls`).

pub mod samples;
pub mod stats;

use crate::data::{rows_to_tensor, Csr, Rows};
use crate::error::{invalid, Result};
use crate::models::distill::Student;
use crate::models::vae::{Vae, VaeData};
use crate::nn::Pass;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Cells per forward pass.
pub(crate) const CHUNK: usize = 1024;
/// Cells read at once by passes over counts alone.
const READ_CHUNK: usize = 4_096;

/// How a long pass over cells (DE, a latent space) is watched: `interrupted()` stops it with an error
/// between chunks; `progress(done, total)` counts the cells passed through
/// the model (draws, or cells × passes), about every 16,000 and at the end.
pub struct Watch<'a> {
    interrupted: &'a dyn Fn() -> bool,
    progress: &'a dyn Fn(usize, usize),
    done: std::cell::Cell<usize>,
    total: std::cell::Cell<usize>,
}

impl<'a> Watch<'a> {
    pub fn new(interrupted: &'a dyn Fn() -> bool, progress: &'a dyn Fn(usize, usize)) -> Watch<'a> {
        Watch { interrupted, progress, done: Default::default(), total: Default::default() }
    }

    /// Neither interrupted nor reported.
    pub fn quiet() -> Watch<'static> {
        Watch::new(&|| false, &|_, _| {})
    }

    /// The work ahead: `total` cells through the model.
    pub(crate) fn expect(&self, total: usize) {
        self.total.set(total);
        self.done.set(0);
    }

    /// Before a chunk: an error when the user interrupted.
    pub(crate) fn check(&self) -> Result<()> {
        if (self.interrupted)() {
            return Err(crate::error::Error::Interrupted);
        }
        Ok(())
    }

    /// After a chunk of `k` cells.
    pub(crate) fn advance(&self, k: usize) {
        let (before, total) = (self.done.get(), self.total.get());
        let now = (before + k).min(total);
        self.done.set(now);
        if now / 16_384 > before / 16_384 || (now == total && before < total) {
            (self.progress)(now, total);
        }
    }
}

/// A trained model seen as a source of expression scales.
pub trait ScaleModel {
    fn n_genes(&self) -> usize;
    /// ρ (`[rows.len(), genes]`, on the model's device) of cells `rows`,
    /// decoded as if from batch `under` (each cell's own batch when None):
    /// one posterior draw per row (`Pass::Eval`), or one dropout draw of the
    /// network with the posterior mean (`Pass::McDropout`).
    fn scales(&self, rows: &[usize], under: Option<u32>, pass: Pass) -> Tensor;
    /// ρ of cells `rows` from one posterior draw of z per cell, decoded
    /// under each of `unders` (None: the cell's own batch).
    fn scales_under(&self, rows: &[usize], unders: &[Option<u32>]) -> Vec<Tensor> {
        unders.iter().map(|&u| self.scales(rows, u, Pass::Eval)).collect()
    }
    /// Whether two `Pass::Eval` draws of the same cells differ (false for a
    /// deterministic encoder: one draw is then all there is).
    fn draws_vary(&self) -> bool {
        true
    }
}

/// A VAE on its cells.
pub struct VaeScales<'a> {
    pub model: &'a Vae,
    pub data: &'a VaeData<'a>,
}

impl ScaleModel for VaeScales<'_> {
    fn n_genes(&self) -> usize {
        self.model.cfg.n_genes
    }

    fn scales(&self, rows: &[usize], under: Option<u32>, pass: Pass) -> Tensor {
        let dev = self.model.device();
        let own = self.data.inputs(rows, None, dev);
        let ((qm, qv), _) = self.model.encode(&own, pass);
        let z = if pass == Pass::McDropout { qm } else { &qm + qv.sqrt() * qm.randn_like() };
        let design = self.data.covariates.design(rows, under, dev);
        let batch = self.data.covariates.batch_codes(rows, under, dev);
        self.model.decode(&z, &own.log_library, &design, &batch, pass).scale
    }

    fn scales_under(&self, rows: &[usize], unders: &[Option<u32>]) -> Vec<Tensor> {
        let dev = self.model.device();
        let own = self.data.inputs(rows, None, dev);
        let ((qm, qv), _) = self.model.encode(&own, Pass::Eval);
        let z = &qm + qv.sqrt() * qm.randn_like();
        unders
            .iter()
            .map(|&under| {
                let design = self.data.covariates.design(rows, under, dev);
                let batch = self.data.covariates.batch_codes(rows, under, dev);
                self.model.decode(&z, &own.log_library, &design, &batch, Pass::Eval).scale
            })
            .collect()
    }
}

/// A distilled student on its cells: encoder input and own batch codes.
/// Its encoder is deterministic, so a "posterior draw" is the cell's ρ.
pub struct StudentScales<'a> {
    pub student: &'a Student,
    pub input: &'a Csr,
    pub batch: &'a [u32],
}

impl ScaleModel for StudentScales<'_> {
    fn n_genes(&self) -> usize {
        self.student.cfg.n_genes
    }

    fn scales(&self, rows: &[usize], under: Option<u32>, pass: Pass) -> Tensor {
        let dev = self.student.device();
        let z = self.student.encode(&rows_to_tensor(self.input, rows, dev), pass);
        let codes: Vec<i64> = rows.iter().map(|&r| under.unwrap_or(self.batch[r]) as i64).collect();
        self.student.decode_scale(&z, &Tensor::from_slice(&codes).to_device(dev), pass)
    }

    fn draws_vary(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Change,
    Vanilla,
    McDropout,
    Samples,
}

impl Method {
    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "change" => Some(Method::Change),
            "vanilla" => Some(Method::Vanilla),
            "mc_dropout" => Some(Method::McDropout),
            "samples" => Some(Method::Samples),
            _ => None,
        }
    }
}

/// DE settings; read from R by name, fields not given keep their defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeSettings {
    pub method: Method,
    /// Change/vanilla: scale draws per group, split evenly across the
    /// decoding batches. MC dropout: passes over the cells.
    pub n_samples: usize,
    /// Pairs of draws compared (change/vanilla), split across batches.
    pub n_pairs: usize,
    /// Batches every cell is decoded under (`batch_correction`); draws are
    /// paired within a batch. Empty: each cell in its own batch. Set by the
    /// model from batch labels, never read from R.
    #[serde(skip)]
    pub batches: Vec<u32>,
    /// δ; estimated from the mean LFCs when None.
    pub delta: Option<f64>,
    /// Lower bound of an estimated δ.
    pub delta_floor: f64,
    /// ε of log2(ρ + ε); estimated when None.
    pub pseudocount: Option<f64>,
    /// Genes with a mean count below this in a group count as absent from
    /// it when estimating ε.
    pub low_count: f64,
    pub fdr_target: f64,
    pub seed: u64,
    /// Samples method: the sample (0-based code) of each cell of group1,
    /// then of group2.
    pub sample_of: Vec<u32>,
    /// Samples method: the sample-level design, samples × `design_columns`,
    /// column-major, the group indicator last; empty for intercept + group.
    pub design: Vec<f64>,
    pub design_columns: usize,
    /// Samples method: degrees of freedom the model's batch correction took
    /// from the samples (batches among them − 1; 0 without correction, or
    /// when the design's covariates already span the batches).
    pub batch_df: usize,
    /// Samples method: after the model's batch correction, widen the
    /// z-scores by the empirical null's spread (`samples::empirical_null`).
    pub empirical_null: bool,
}

impl Default for DeSettings {
    fn default() -> Self {
        DeSettings {
            method: Method::Change,
            n_samples: 5000,
            n_pairs: 10000,
            batches: vec![],
            delta: None,
            delta_floor: 0.1,
            pseudocount: None,
            low_count: 0.01,
            fdr_target: 0.05,
            seed: 0,
            sample_of: vec![],
            design: vec![],
            design_columns: 0,
            batch_df: 0,
            empirical_null: true,
        }
    }
}

/// One row per gene.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeTable {
    pub lfc_mean: Vec<f64>,
    pub lfc_median: Vec<f64>,
    pub lfc_sd: Vec<f64>,
    pub lfc_lower: Vec<f64>,
    pub lfc_upper: Vec<f64>,
    pub lfc_min: Vec<f64>,
    pub lfc_max: Vec<f64>,
    pub proba_de: Vec<f64>,
    /// Vanilla: P(ρ1 > ρ2); otherwise the same as `proba_de`.
    pub proba_up: Vec<f64>,
    pub bayes_factor: Vec<f64>,
    pub is_de: Vec<bool>,
    pub scale1: Vec<f64>,
    pub scale2: Vec<f64>,
    pub delta: f64,
    pub pseudocount: f64,
    /// Samples method: moderated t p-value of LFC = 0, and its BH adjustment.
    pub pvalue: Vec<f64>,
    pub padj: Vec<f64>,
    /// Samples method: the empirical-Bayes prior degrees of freedom (∞ as
    /// null) and the residual degrees of freedom of the sample-level model.
    pub prior_df: f64,
    pub residual_df: f64,
    /// Samples method: the prior weight of LFC = 0 (adaptive shrinkage).
    pub null_weight: f64,
    /// Samples method with batch correction: the empirical null's standard
    /// deviation of the z-scores per band of mean level (low to high);
    /// empty without correction.
    pub null_sd: Vec<f64>,
}

impl DeTable {
    fn push(&mut self, s: stats::LfcSummary) {
        self.lfc_mean.push(s.mean);
        self.lfc_median.push(s.median);
        self.lfc_sd.push(s.sd);
        self.lfc_lower.push(s.lower);
        self.lfc_upper.push(s.upper);
        self.lfc_min.push(s.min);
        self.lfc_max.push(s.max);
        self.proba_de.push(s.proba_de);
    }
}

/// Genes whose mean count over `cells` of `counts` is below `threshold`
/// (cells on disk are read a chunk at a time).
pub fn low_count_genes(counts: Rows<'_>, cells: &[usize], threshold: f64) -> Vec<bool> {
    let mut sum = vec![0f64; counts.n_cols()];
    for chunk in cells.chunks(READ_CHUNK) {
        counts.with_rows(chunk, false, |m, local| {
            for &c in local {
                let (idx, val) = m.row(c);
                for (&j, &v) in idx.iter().zip(val) {
                    sum[j as usize] += v as f64;
                }
            }
        });
    }
    let n = cells.len().max(1) as f64;
    sum.iter().map(|s| s / n < threshold).collect()
}

/// Differential expression of `group1` against `group2` (row indices of
/// the model's cells; `counts` holds the same cells on the model's genes,
/// in memory or on disk: every pass reads the groups' cells in order, a
/// chunk at a time, so memory does not grow with their number).
pub fn differential_expression(
    model: &dyn ScaleModel,
    counts: Rows<'_>,
    group1: &[usize],
    group2: &[usize],
    s: &DeSettings,
    watch: &Watch,
) -> Result<DeTable> {
    if group1.is_empty() || group2.is_empty() {
        return invalid!("both groups need at least one cell");
    }
    if s.n_samples == 0 || s.n_pairs == 0 {
        return invalid!("`n_samples` must be positive");
    }
    let low1 = low_count_genes(counts, group1, s.low_count);
    let low2 = low_count_genes(counts, group2, s.low_count);
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    let n = group1.len() + group2.len();
    let table = match s.method {
        Method::Samples => samples_de(model, counts, group1, group2, &low1, &low2, s, watch)?,
        Method::McDropout => {
            watch.expect(n * s.n_samples);
            let a = mc_moments(model, group1, s, watch)?;
            let b = mc_moments(model, group2, s, watch)?;
            mc_table(&a, &b, &low1, &low2, s)
        }
        _ => {
            let units = decoding_units(s).len();
            watch.expect(2 * units * (s.n_samples / units).max(1));
            let a = draw_scales(model, group1, s, &mut rng, watch)?;
            let b = draw_scales(model, group2, s, &mut rng, watch)?;
            let pairs = pair_draws(&a, &b, s, &mut rng);
            pairs_table(&a, &b, &pairs, &low1, &low2, s)
        }
    };
    watch.check()?;
    Ok(table)
}

/// The samples method: levels per sample, then the sample-level model.
#[allow(clippy::too_many_arguments)]
fn samples_de(
    model: &dyn ScaleModel,
    counts: Rows<'_>,
    group1: &[usize],
    group2: &[usize],
    low1: &[bool],
    low2: &[bool],
    s: &DeSettings,
    watch: &Watch,
) -> Result<DeTable> {
    let cells: Vec<usize> = group1.iter().chain(group2).copied().collect();
    if s.sample_of.len() != cells.len() {
        return invalid!("internal: {} sample codes for {} cells", s.sample_of.len(), cells.len());
    }
    let n = s.sample_of.iter().map(|&c| c as usize + 1).max().unwrap_or(0);
    // Each sample wholly in one group.
    let mut side = vec![0u8; n];
    for (i, &c) in s.sample_of.iter().enumerate() {
        side[c as usize] |= if i < group1.len() { 1 } else { 2 };
    }
    if let Some(k) = side.iter().position(|&v| v == 3) {
        return invalid!("sample {} has cells in both groups: the samples method needs groups of whole samples", k + 1);
    }
    if side.contains(&0) {
        return invalid!("internal: a sample code without cells");
    }
    let group_of: Vec<bool> = side.iter().map(|&v| v == 1).collect();
    let (n1, n2) = (group_of.iter().filter(|&&v| v).count(), group_of.iter().filter(|&&v| !v).count());
    if n1 < 2 || n2 < 2 {
        return invalid!("the samples method needs at least 2 samples per group; found {n1} and {n2}");
    }
    let (design, p) = if s.design.is_empty() {
        let mut d = vec![1.0; n];
        d.extend(group_of.iter().map(|&v| v as u8 as f64));
        (d, 2)
    } else {
        if s.design_columns == 0 || s.design.len() != n * s.design_columns {
            return invalid!("internal: the design has {} values for {n} samples", s.design.len());
        }
        (s.design.clone(), s.design_columns)
    };
    let lv = samples::sample_levels(model, counts, &cells, &s.sample_of, s.n_samples, s, watch)?;
    samples::samples_table(&lv, &design, p, &group_of, low1, low2, s)
}

/// Scale draws of one group, gene-major (`values[g * n + i]`), with the
/// range of draws decoded under each batch.
struct Draws {
    n: usize,
    values: Vec<f32>,
    /// (start, end) of the draws of each decoding batch (one range when cells keep their own).
    units: Vec<(usize, usize)>,
}

pub(crate) fn decoding_units(s: &DeSettings) -> Vec<Option<u32>> {
    if s.batches.is_empty() {
        vec![None]
    } else {
        s.batches.iter().map(|&b| Some(b)).collect()
    }
}

fn to_cpu(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1)).unwrap_or_default()
}

/// `n_samples / batches` random cells (with replacement) of `cells` per
/// decoding batch, one draw of ρ each (scvi-tools' `scale_sampler`). The
/// picks are decoded in the cells' order (the draws are exchangeable), so
/// cells on disk are read front to back.
fn draw_scales(
    model: &dyn ScaleModel,
    cells: &[usize],
    s: &DeSettings,
    rng: &mut ChaCha8Rng,
    watch: &Watch,
) -> Result<Draws> {
    let g = model.n_genes();
    let units = decoding_units(s);
    let per = (s.n_samples / units.len()).max(1);
    let n = per * units.len();
    let mut rows_major = Vec::with_capacity(n * g);
    let mut ranges = Vec::with_capacity(units.len());
    tch::no_grad(|| -> Result<()> {
        for (u, &under) in units.iter().enumerate() {
            let mut picked: Vec<usize> = (0..per).map(|_| cells[rng.random_range(0..cells.len())]).collect();
            picked.sort_unstable();
            for chunk in picked.chunks(CHUNK) {
                watch.check()?;
                rows_major.extend(to_cpu(&model.scales(chunk, under, Pass::Eval)));
                watch.advance(chunk.len());
            }
            ranges.push((u * per, (u + 1) * per));
        }
        Ok(())
    })?;
    let mut values = vec![0f32; n * g];
    values.par_chunks_mut(n).enumerate().for_each(|(j, col)| {
        for (i, v) in col.iter_mut().enumerate() {
            *v = rows_major[i * g + j];
        }
    });
    Ok(Draws { n, values, units: ranges })
}

/// Pairs (i, j) of draws of the two groups: uniformly at random, or within
/// the same decoding batch when every cell was decoded under each batch.
fn pair_draws(a: &Draws, b: &Draws, s: &DeSettings, rng: &mut ChaCha8Rng) -> Vec<(u32, u32)> {
    let per_unit = (s.n_pairs / a.units.len()).max(1);
    let mut pairs = Vec::with_capacity(per_unit * a.units.len());
    for (&(a0, a1), &(b0, b1)) in a.units.iter().zip(&b.units) {
        for _ in 0..per_unit {
            pairs.push((rng.random_range(a0..a1) as u32, rng.random_range(b0..b1) as u32));
        }
    }
    pairs
}

fn pairs_table(a: &Draws, b: &Draws, pairs: &[(u32, u32)], low1: &[bool], low2: &[bool], s: &DeSettings) -> DeTable {
    let g = low1.len();
    fn col(d: &Draws, j: usize) -> &[f32] {
        &d.values[j * d.n..(j + 1) * d.n]
    }
    let colmax =
        |d: &Draws| -> Vec<f64> { (0..g).map(|j| col(d, j).iter().copied().fold(0f32, f32::max) as f64).collect() };
    let colmean = |d: &Draws| -> Vec<f64> {
        (0..g).map(|j| col(d, j).iter().map(|&v| v as f64).sum::<f64>() / d.n as f64).collect()
    };
    let eps = s.pseudocount.unwrap_or_else(|| stats::pseudocount(&colmax(a), low1, &colmax(b), low2));
    // LFC draws of gene j (the logs once per draw, not once per pair).
    let lfc = |j: usize| -> Vec<f64> {
        let log = |d: &Draws| -> Vec<f64> { col(d, j).iter().map(|&v| (v as f64 + eps).log2()).collect() };
        let (x, y) = (log(a), log(b));
        pairs.iter().map(|&(p, q)| x[p as usize] - y[q as usize]).collect()
    };
    let means: Vec<f64> = (0..g).into_par_iter().map(|j| lfc(j).iter().sum::<f64>() / pairs.len() as f64).collect();
    let delta = s.delta.unwrap_or_else(|| stats::estimate_delta(&means, s.delta_floor));
    let rows: Vec<(stats::LfcSummary, f64)> = (0..g)
        .into_par_iter()
        .map(|j| {
            let up = match s.method {
                Method::Vanilla => {
                    let (x, y) = (col(a, j), col(b, j));
                    pairs.iter().filter(|&&(p, q)| x[p as usize] > y[q as usize]).count() as f64 / pairs.len() as f64
                }
                _ => f64::NAN,
            };
            (stats::summarize_draws(&mut lfc(j), delta), up)
        })
        .collect();
    let mut t = DeTable { delta, pseudocount: eps, scale1: colmean(a), scale2: colmean(b), ..Default::default() };
    for (summary, up) in rows {
        t.push(summary);
        if s.method == Method::Vanilla {
            // P(ρ1 > ρ2) against P(ρ1 ≤ ρ2), as scvi-tools' vanilla mode.
            t.proba_up.push(up);
            t.bayes_factor.push((up + 1e-8).ln() - (1.0 - up + 1e-8).ln());
            *t.proba_de.last_mut().expect("pushed") = up.max(1.0 - up);
        } else {
            let p = summary.proba_de;
            t.proba_up.push(p);
            t.bayes_factor.push(stats::bayes_factor(p));
        }
    }
    t.is_de = stats::fdr_calls(&t.proba_de, s.fdr_target);
    t
}

/// Per pass of MC dropout: the group's mean ρ and its variance across
/// cells, passes × genes; and the largest ρ of each gene over everything.
struct Moments {
    mean: Vec<Vec<f64>>,
    var: Vec<Vec<f64>>,
    max: Vec<f64>,
    n_cells: usize,
}

fn mc_moments(model: &dyn ScaleModel, cells: &[usize], s: &DeSettings, watch: &Watch) -> Result<Moments> {
    let g = model.n_genes();
    let units = decoding_units(s);
    let n = cells.len() as f64;
    let passes = s.n_samples;
    // Per pass and gene: sum and sum of squares of ρ over the cells; per
    // gene its maximum. Chunks outside, passes inside: each chunk of cells
    // is read once.
    let (mut sum, mut sq) = (vec![vec![0f64; g]; passes], vec![vec![0f64; g]; passes]);
    let mut max = vec![0f64; g];
    tch::no_grad(|| -> Result<()> {
        for chunk in cells.chunks(CHUNK) {
            for p in 0..passes {
                watch.check()?;
                // A cell's ρ under batch correction is its mean over the decoding batches.
                let rho = units
                    .iter()
                    .map(|&under| model.scales(chunk, under, Pass::McDropout).to_kind(Kind::Double))
                    .reduce(|a, b| a + b)
                    .expect("at least one decoding batch")
                    / units.len() as f64;
                let cpu = |t: Tensor| Vec::<f64>::try_from(t.to_device(Device::Cpu)).unwrap_or_default();
                for (acc, v) in sum[p].iter_mut().zip(cpu(rho.sum_dim_intlist(0, false, Kind::Double))) {
                    *acc += v;
                }
                for (acc, v) in sq[p].iter_mut().zip(cpu(rho.square().sum_dim_intlist(0, false, Kind::Double))) {
                    *acc += v;
                }
                for (acc, v) in max.iter_mut().zip(cpu(rho.amax(0, false))) {
                    *acc = acc.max(v);
                }
                watch.advance(chunk.len());
            }
        }
        Ok(())
    })?;
    let mean: Vec<Vec<f64>> = sum.iter().map(|s| s.iter().map(|v| v / n).collect()).collect();
    let var =
        mean.iter().zip(&sq).map(|(m, q)| m.iter().zip(q).map(|(a, b)| (b / n - a * a).max(0.0)).collect()).collect();
    Ok(Moments { mean, var, max, n_cells: cells.len() })
}

fn mc_table(a: &Moments, b: &Moments, low1: &[bool], low2: &[bool], s: &DeSettings) -> DeTable {
    let g = low1.len();
    let eps = s.pseudocount.unwrap_or_else(|| stats::pseudocount(&a.max, low1, &b.max, low2));
    // Mean over passes of the group mean, total variance of that mean:
    // variance across passes (model) + mean within-pass variance / cells (data).
    let moments = |m: &Moments, j: usize| {
        let p = m.mean.len() as f64;
        let mu = m.mean.iter().map(|r| r[j]).sum::<f64>() / p;
        let model_var = m.mean.iter().map(|r| (r[j] - mu).powi(2)).sum::<f64>() / p;
        let data_var = m.var.iter().map(|r| r[j]).sum::<f64>() / p / m.n_cells as f64;
        (mu, model_var + data_var)
    };
    let ln2 = std::f64::consts::LN_2;
    let gauss: Vec<(f64, f64, f64, f64)> = (0..g)
        .map(|j| {
            let ((m1, v1), (m2, v2)) = (moments(a, j), moments(b, j));
            // Delta method: Var log2(X + ε) ≈ Var X / ((E X + ε) ln 2)².
            let lfc = (m1 + eps).log2() - (m2 + eps).log2();
            let sd = (v1 / ((m1 + eps) * ln2).powi(2) + v2 / ((m2 + eps) * ln2).powi(2)).sqrt();
            (lfc, sd, m1, m2)
        })
        .collect();
    let means: Vec<f64> = gauss.iter().map(|r| r.0).collect();
    let delta = s.delta.unwrap_or_else(|| stats::estimate_delta(&means, s.delta_floor));
    let mut t = DeTable { delta, pseudocount: eps, ..Default::default() };
    for &(lfc, sd, m1, m2) in &gauss {
        let summary = stats::summarize_normal(lfc, sd, delta);
        t.push(summary);
        t.proba_up.push(summary.proba_de);
        t.bayes_factor.push(stats::bayes_factor(summary.proba_de));
        t.scale1.push(m1);
        t.scale2.push(m2);
    }
    t.is_de = stats::fdr_calls(&t.proba_de, s.fdr_target);
    t
}

#[cfg(test)]
mod tests;
