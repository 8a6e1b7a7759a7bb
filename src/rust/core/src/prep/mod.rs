//! Preprocessing: library sizes, log-normalization (log2 of counts per
//! 10^4 or 10^6 + 1), highly variable genes (seurat_v3), and truncated PCA
//! on the selected genes (log-normalized or analytic Pearson residuals).

mod disk;
mod hvg;
mod loess;
mod normalize;
mod pca;
mod pearson;

pub use disk::{hvg_pca_on_disk, hvg_pca_on_disk_into, DiskPca, ScoresOut};
pub use hvg::{highly_variable_genes, HvgResult};
pub use loess::loess_quadratic;
pub(crate) use normalize::column_mean_var;
pub use normalize::{log2_cpm, log_normalized};
pub use pca::{pca, PcaParams, PcaResult};
pub use pearson::pearson_residual_pca;

use crate::data::{Categorical, CountMatrix};
use crate::error::Result;

/// What a PCA is of.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PcaOf {
    /// log2(counts per this many + 1), library sizes over all genes
    /// ([`log_normalized`]).
    Log(f64),
    /// Analytic Pearson residuals with this NB overdispersion θ.
    PearsonResiduals(f64),
}

/// The preprocessing chain of `run_pca()`: `n_hvg` seurat_v3 highly
/// variable genes (batch-aware), then the PCA of those genes.
pub fn hvg_pca(
    counts: &CountMatrix,
    n_hvg: usize,
    batch: Option<&Categorical>,
    of: PcaOf,
    params: &PcaParams,
    interrupted: &dyn Fn() -> bool,
) -> Result<(HvgResult, PcaResult)> {
    let h = highly_variable_genes(counts, n_hvg, batch, 0.3)?;
    let r = match of {
        PcaOf::PearsonResiduals(theta) => pearson_residual_pca(counts, &h.selected, params.n_pcs, theta, interrupted)?,
        PcaOf::Log(scale_factor) => {
            pca(&log_normalized(counts, scale_factor).select_columns(&h.selected), params, interrupted)?
        }
    };
    Ok((h, r))
}
