//! Validated parameters of the count simulator. Defaults follow Splatter's
//! `newSplatParams()` (Zappia et al. 2017) except the library size, set to a
//! droplet-like median of about 2,000 counts (Splatter: e^11), and cell-type
//! DE on 20% of genes with factors centred at e^0.5 (Splatter: 10%, e^0.1),
//! so that cell types separate as clearly as in real data.

use crate::error::{check_param, Result};

/// A treatment condition with known per-cell-type effects.
#[derive(Debug, Clone)]
pub struct ConditionParams {
    /// Fraction of each batch's cells that are treated (one entry per batch).
    pub treated_fraction: Vec<f64>,
    /// Fraction of genes with a condition effect, per cell type.
    pub de_prob: f64,
    /// One set of condition effects shared by every cell type (a
    /// population-level treatment response), instead of one per cell type.
    pub shared: bool,
    /// Probability that a condition effect is a decrease.
    pub de_down_prob: f64,
    /// Log-normal location and scale of the condition effect factor.
    pub de_fac_loc: f64,
    pub de_fac_scale: f64,
    /// Samples (e.g. donors) per batch × condition, for pseudobulk.
    pub samples_per_batch: usize,
    /// Fraction of genes affected by an age group (young/old, alternating
    /// over each batch × condition's samples); 0 means no age group.
    pub age_de_prob: f64,
    /// Biological variation between samples (donors): each sample's gene
    /// means are multiplied by LogNormal(0, sample_sd) factors, one per
    /// sample and gene; 0 for none.
    pub sample_sd: f64,
}

impl Default for ConditionParams {
    fn default() -> Self {
        ConditionParams {
            treated_fraction: vec![0.5],
            de_prob: 0.1,
            shared: false,
            de_down_prob: 0.5,
            de_fac_loc: 0.5,
            de_fac_scale: 0.4,
            samples_per_batch: 2,
            age_de_prob: 0.0,
            sample_sd: 0.0,
        }
    }
}

/// A second species for cross-species work: its own cells and genes, the
/// same cell types; a share of its genes are one-to-one homologs of the first
/// species' genes, whose base means diverge by a log-normal factor and whose
/// cell-type factors are kept with probability `de_conservation` (redrawn
/// otherwise). Its other genes, cells, batches and counts are drawn afresh.
/// The last `only_first` cell types exist in the first species only, the
/// `only_second` before them in the second species only.
#[derive(Debug, Clone)]
pub struct SpeciesParams {
    pub n_cells: usize,
    pub n_genes: usize,
    /// Fraction of the second species' genes with a homolog (at most all of
    /// the first species' genes).
    pub homolog_fraction: f64,
    /// Standard deviation of log(base mean ratio) between homologs.
    pub mean_divergence: f64,
    /// Probability that a homolog keeps its cell-type factor, per cell type.
    pub de_conservation: f64,
    /// Number of cell types, the last ones, absent from the second species.
    pub only_first: usize,
    /// Number of cell types, the ones before the `only_first`, absent from
    /// the first species.
    pub only_second: usize,
    /// Probability that a homolog gets a species-specific factor in a cell
    /// type (on top of its inherited or redrawn one), per cell type.
    pub species_de_prob: f64,
    /// Log-normal location and scale of that factor, up or down with equal
    /// odds.
    pub species_de_fac_loc: f64,
    pub species_de_fac_scale: f64,
}

impl Default for SpeciesParams {
    fn default() -> Self {
        SpeciesParams {
            n_cells: 2000,
            n_genes: 2000,
            homolog_fraction: 0.8,
            mean_divergence: 0.3,
            de_conservation: 0.8,
            only_first: 0,
            only_second: 0,
            species_de_prob: 0.05,
            species_de_fac_loc: 1.0,
            species_de_fac_scale: 0.4,
        }
    }
}

impl SpeciesParams {
    /// Whether cell type `t` of `n_groups` is absent from the second species.
    pub fn only_in_first(&self, t: usize, n_groups: usize) -> bool {
        t + self.only_first >= n_groups
    }

    /// Whether cell type `t` of `n_groups` is absent from the first species.
    pub fn only_in_second(&self, t: usize, n_groups: usize) -> bool {
        !self.only_in_first(t, n_groups) && t + self.only_first + self.only_second >= n_groups
    }
}

/// Which of the two species a setting is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Species {
    First,
    Second,
}

/// Parameters of [`super::simulate`].
#[derive(Debug, Clone)]
pub struct SimParams {
    pub n_cells: usize,
    pub n_genes: usize,
    pub seed: u64,
    /// Cell-type proportions (their number is the number of groups).
    pub group_prob: Vec<f64>,
    /// Batch proportions (their number is the number of batches).
    pub batch_prob: Vec<f64>,
    /// Log-normal per-gene, per-batch multiplicative factors.
    pub batch_fac_loc: f64,
    pub batch_fac_scale: f64,
    /// Shift of the log library-size location per batch (empty: none).
    pub batch_lib_shift: Vec<f64>,
    /// Gene means ~ Gamma(shape, rate).
    pub mean_shape: f64,
    pub mean_rate: f64,
    /// Library sizes ~ LogNormal(loc, scale).
    pub lib_loc: f64,
    pub lib_scale: f64,
    /// Expression outliers: probability and log-normal factor.
    pub out_prob: f64,
    pub out_fac_loc: f64,
    pub out_fac_scale: f64,
    /// Cell-type differential expression.
    pub de_prob: f64,
    pub de_down_prob: f64,
    pub de_fac_loc: f64,
    pub de_fac_scale: f64,
    /// Biological coefficient of variation: common part and degrees of freedom.
    pub bcv_common: f64,
    pub bcv_df: f64,
    /// Logistic dropout on log mean (midpoint, shape); None: no dropout.
    pub dropout: Option<(f64, f64)>,
    pub condition: Option<ConditionParams>,
    /// An ATAC modality for the same cells.
    pub atac: Option<super::AtacParams>,
    /// A second species (None: one species).
    pub species: Option<SpeciesParams>,
}

impl Default for SimParams {
    fn default() -> Self {
        SimParams {
            n_cells: 1000,
            n_genes: 2000,
            seed: 1,
            group_prob: vec![0.2; 5],
            batch_prob: vec![0.5, 0.5],
            batch_fac_loc: 0.1,
            batch_fac_scale: 0.1,
            batch_lib_shift: Vec::new(),
            mean_shape: 0.6,
            mean_rate: 0.3,
            lib_loc: 7.6,
            lib_scale: 0.25,
            out_prob: 0.05,
            out_fac_loc: 4.0,
            out_fac_scale: 0.5,
            de_prob: 0.2,
            de_down_prob: 0.5,
            de_fac_loc: 0.5,
            de_fac_scale: 0.4,
            bcv_common: 0.1,
            bcv_df: 60.0,
            dropout: None,
            condition: None,
            atac: None,
            species: None,
        }
    }
}

fn probabilities(p: &[f64], name: &'static str) -> Result<()> {
    check_param(!p.is_empty(), name, "needs at least one entry")?;
    check_param(p.iter().all(|&v| v.is_finite() && v >= 0.0), name, "must be non-negative numbers")?;
    check_param(p.iter().sum::<f64>() > 0.0, name, "must not all be zero")
}

impl SimParams {
    pub fn n_groups(&self) -> usize {
        self.group_prob.len()
    }

    pub fn n_batches(&self) -> usize {
        self.batch_prob.len()
    }

    /// Cell-type proportions in one species: `group_prob` with the types
    /// that species lacks set to 0 (the others renormalise when drawn).
    pub fn species_group_prob(&self, species: Species) -> Vec<f64> {
        let n = self.n_groups();
        let absent = |t: usize| match (&self.species, species) {
            (None, _) => false,
            (Some(sp), Species::First) => sp.only_in_second(t, n),
            (Some(sp), Species::Second) => sp.only_in_first(t, n),
        };
        self.group_prob.iter().enumerate().map(|(t, &v)| if absent(t) { 0.0 } else { v }).collect()
    }

    /// Whether each cell type has cells in both species (a positive
    /// proportion in each).
    pub fn shared_groups(&self) -> Vec<bool> {
        let (a, b) = (self.species_group_prob(Species::First), self.species_group_prob(Species::Second));
        a.iter().zip(&b).map(|(&x, &y)| x > 0.0 && y > 0.0).collect()
    }

    /// Rejects impossible parameters before any work starts.
    pub fn validate(&self) -> Result<()> {
        check_param(self.n_cells >= 2, "n_cells", "must be at least 2")?;
        check_param(self.n_genes >= 2, "n_genes", "must be at least 2")?;
        probabilities(&self.group_prob, "group_prob")?;
        probabilities(&self.batch_prob, "batch_prob")?;
        check_param(
            self.batch_lib_shift.is_empty() || self.batch_lib_shift.len() == self.n_batches(),
            "batch_lib_shift",
            "needs one entry per batch",
        )?;
        for (v, name) in [(self.mean_shape, "mean_shape"), (self.mean_rate, "mean_rate"), (self.bcv_df, "bcv_df")] {
            check_param(v.is_finite() && v > 0.0, name, "must be positive")?;
        }
        for (v, name) in [
            (self.batch_fac_scale, "batch_fac_scale"),
            (self.lib_scale, "lib_scale"),
            (self.out_fac_scale, "out_fac_scale"),
            (self.de_fac_scale, "de_fac_scale"),
            (self.bcv_common, "bcv_common"),
        ] {
            check_param(v.is_finite() && v >= 0.0, name, "must be >= 0")?;
        }
        for (v, name) in [(self.out_prob, "out_prob"), (self.de_prob, "de_prob"), (self.de_down_prob, "de_down_prob")] {
            check_param((0.0..=1.0).contains(&v), name, "must be in [0, 1]")?;
        }
        if let Some((_, shape)) = self.dropout {
            check_param(shape.is_finite(), "dropout_shape", "must be finite")?;
        }
        if let Some(a) = &self.atac {
            a.validate(self.n_groups())?;
        }
        if let Some(sp) = &self.species {
            check_param(sp.n_cells >= 2, "species_n_cells", "must be at least 2")?;
            check_param(sp.n_genes >= 2, "species_n_genes", "must be at least 2")?;
            check_param((0.0..=1.0).contains(&sp.homolog_fraction), "homolog_fraction", "must be in [0, 1]")?;
            check_param((0.0..=1.0).contains(&sp.de_conservation), "de_conservation", "must be in [0, 1]")?;
            check_param(
                sp.mean_divergence.is_finite() && sp.mean_divergence >= 0.0,
                "mean_divergence",
                "must be >= 0",
            )?;
            check_param((0.0..=1.0).contains(&sp.species_de_prob), "species_de_prob", "must be in [0, 1]")?;
            check_param(sp.species_de_fac_loc.is_finite(), "species_de_fac_loc", "must be finite")?;
            check_param(
                sp.species_de_fac_scale.is_finite() && sp.species_de_fac_scale >= 0.0,
                "species_de_fac_scale",
                "must be >= 0",
            )?;
            check_param(
                sp.only_first + sp.only_second <= self.n_groups(),
                "only_first",
                format!("and `only_second` together exceed the {} cell types", self.n_groups()),
            )?;
            let shared = self.shared_groups().iter().filter(|&&s| s).count();
            check_param(
                shared >= 2,
                "only_first",
                format!(
                    "and `only_second` ({} and {}) leave {shared} of the {} cell types (with a positive \
                     `group_prob`) in both species; at least 2 must be shared",
                    sp.only_first,
                    sp.only_second,
                    self.n_groups()
                ),
            )?;
        }
        if let Some(c) = &self.condition {
            check_param(
                c.treated_fraction.len() == self.n_batches(),
                "treated_fraction",
                format!("needs one entry per batch ({})", self.n_batches()),
            )?;
            check_param(
                c.treated_fraction.iter().all(|f| (0.0..=1.0).contains(f)),
                "treated_fraction",
                "must be in [0, 1]",
            )?;
            check_param((0.0..=1.0).contains(&c.de_prob), "condition_de_prob", "must be in [0, 1]")?;
            check_param(c.samples_per_batch >= 1, "samples_per_batch", "must be at least 1")?;
            check_param((0.0..=1.0).contains(&c.age_de_prob), "age_de_prob", "must be in [0, 1]")?;
            check_param((0.0..=3.0).contains(&c.sample_sd), "sample_sd", "must be in [0, 3]")?;
            check_param(
                c.age_de_prob == 0.0 || c.samples_per_batch >= 2,
                "samples_per_batch",
                "must be at least 2 with an age group (ages alternate over samples)",
            )?;
        }
        Ok(())
    }
}
