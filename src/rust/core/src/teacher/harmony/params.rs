//! Harmony's inputs besides the embedding: the design's covariates and the
//! settings, with their validation (invalid values are rejected before any
//! work starts).

use super::Embedding;
use crate::error::{check_param, invalid, Result};

/// One variable of the design: batch (regressed out) or protected.
#[derive(Debug, Clone)]
pub struct HarmonyCovariate {
    pub name: String,
    /// Level of every cell, 0-based.
    pub codes: Vec<u32>,
    pub n_levels: usize,
    /// Diversity penalty of each level (harmony's θ).
    pub theta: f64,
    /// Ridge penalty of each level; `None` estimates it per cluster as
    /// `alpha` × the expected number of the level's cells in the cluster.
    pub lambda: Option<f64>,
    /// Kept in the design but never subtracted.
    pub protected: bool,
}

/// Settings; defaults are harmonypy 2.1's. Read from R by name.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HarmonyParams {
    pub sigma: f64,
    /// Number of clusters; `None`: min(round(N / 30), 100).
    pub n_clusters: Option<usize>,
    pub max_iter: usize,
    pub max_iter_cluster: usize,
    pub epsilon_cluster: f64,
    pub epsilon_harmony: f64,
    pub block_size: f64,
    pub alpha: f64,
    /// Protection of small batches against over-correction (0: off).
    pub tau: f64,
    /// Batches holding less than this share of a cluster are not corrected in it.
    pub batch_prop_cutoff: f64,
    pub seed: u64,
    /// Return the soft memberships (N × K single-precision values; 400 MB
    /// at 10^6 cells). Without them `HarmonyResult::r` is empty.
    pub memberships: bool,
    /// Fit on a sample of this many cells (each batch of the first
    /// covariate in proportion, at least `SKETCH_FLOOR` of its cells), and
    /// correct the others with the fitted clusters and batch terms
    /// (`HarmonyMap`); `None` or at least the number of cells: fit on all.
    pub sketch: Option<usize>,
}

impl Default for HarmonyParams {
    fn default() -> Self {
        HarmonyParams {
            sigma: 0.1,
            n_clusters: None,
            max_iter: 10,
            max_iter_cluster: 4,
            epsilon_cluster: 1e-3,
            epsilon_harmony: 1e-2,
            block_size: 0.05,
            alpha: 0.2,
            tau: 0.0,
            batch_prop_cutoff: 1e-5,
            seed: 0,
            memberships: true,
            sketch: None,
        }
    }
}

/// Rejects inputs Harmony cannot run on, naming the argument.
pub(super) fn check_inputs(z: Embedding, covs: &[HarmonyCovariate], p: &HarmonyParams) -> Result<()> {
    let (n, d) = (z.n, z.d);
    if z.values.len() != n * d {
        return invalid!("the embedding has {} values, not cells × dimensions = {}", z.values.len(), n * d);
    }
    if let Some(i) = z.values.iter().position(|v| !v.is_finite()) {
        let (cell, dim) = z.at(i);
        return invalid!("the embedding has a missing or infinite value (cell {}, dimension {})", cell + 1, dim + 1);
    }
    check_design(n, d, covs, p)
}

/// `check_inputs` less the cells' values (those of cells in a file are
/// checked as they are read).
pub(super) fn check_design(n: usize, d: usize, covs: &[HarmonyCovariate], p: &HarmonyParams) -> Result<()> {
    if n < 2 || d < 1 {
        return invalid!("Harmony needs at least 2 cells and 1 dimension (got {n} × {d})");
    }
    if !covs.iter().any(|c| !c.protected) {
        return invalid!("Harmony needs at least one batch covariate to correct for");
    }
    for c in covs {
        if c.codes.len() != n {
            return invalid!("covariate `{}` has {} values for {} cells", c.name, c.codes.len(), n);
        }
        if c.codes.iter().any(|&v| v as usize >= c.n_levels) {
            return invalid!("covariate `{}` has codes outside its {} levels", c.name, c.n_levels);
        }
        check_param(c.theta >= 0.0 && c.theta.is_finite(), "theta", "must be finite and non-negative")?;
        if let Some(l) = c.lambda {
            check_param(l >= 0.0 && l.is_finite(), "lambda", "must be finite and non-negative")?;
        }
    }
    check_param(p.sigma > 0.0 && p.sigma.is_finite(), "sigma", "must be positive")?;
    check_param(p.block_size > 0.0 && p.block_size <= 1.0, "block_size", "must be in (0, 1]")?;
    check_param(p.max_iter >= 1, "max_iter", "must be at least 1")?;
    check_param(p.max_iter_cluster >= 1, "max_iter_cluster", "must be at least 1")?;
    check_param(p.alpha > 0.0 && p.alpha.is_finite(), "alpha", "must be positive")?;
    check_param(p.tau >= 0.0, "tau", "must be non-negative")?;
    if let Some(m) = p.sketch {
        check_param(m >= 2, "sketch", "must be at least 2 cells")?;
        if m < n && p.memberships {
            return invalid!(
                "`memberships = TRUE` needs Harmony fitted on all cells; drop `sketch` ({m} of {n} cells) or the memberships"
            );
        }
    }
    if let Some(k) = p.n_clusters {
        check_param(k >= 1 && k <= n, "n_clusters", format!("must be between 1 and the number of cells ({n})"))?;
    }
    Ok(())
}
