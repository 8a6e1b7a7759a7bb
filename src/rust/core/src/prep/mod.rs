//! Preprocessing: library sizes, log2(CPM+1), highly variable genes
//! (seurat_v3), and truncated PCA on the selected genes (of log2 CPM or of
//! analytic Pearson residuals).

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
pub use normalize::log2_cpm;
pub use pca::{pca, PcaParams, PcaResult};
pub use pearson::pearson_residual_pca;

use crate::data::{Categorical, CountMatrix};
use crate::error::Result;

/// What a PCA is of.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PcaOf {
    /// log2(CPM + 1), library sizes over all genes.
    Log2Cpm,
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
        PcaOf::Log2Cpm => pca(&log2_cpm(counts).select_columns(&h.selected), params, interrupted)?,
    };
    Ok((h, r))
}
