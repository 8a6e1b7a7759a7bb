//! Preprocessing: library sizes, log2(CPM+1), highly variable genes
//! (seurat_v3), and truncated PCA on the selected genes (of log2 CPM or of
//! analytic Pearson residuals).

mod hvg;
mod loess;
mod normalize;
mod pca;
mod pearson;

pub use hvg::{highly_variable_genes, HvgResult};
pub use loess::loess_quadratic;
pub(crate) use normalize::column_mean_var;
pub use normalize::log2_cpm;
pub use pca::{pca, PcaParams, PcaResult};
pub use pearson::pearson_residual_pca;
