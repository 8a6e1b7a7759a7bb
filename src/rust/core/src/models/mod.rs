//! The models. A model is a module of tensors and its loss; the training
//! loop lives in `train`. Each model's batched inference sits beside it,
//! and every fitted model implements [`FittedModel`], the one shape the
//! glue and R see.

pub mod ambient;
pub mod clusters;
pub mod count_decoder;
pub mod distill;
pub mod doublets;
mod fitted;
pub mod joint;
pub mod labels;
pub mod multimodal;
pub mod species;
pub mod umap;
pub mod vae;

pub use fitted::{
    after_fit, codes_of, from_bytes, kind_name, levels_list, one_or_many, Cells, Elbo, ExpressionOptions, FittedModel,
    Latent, LatentOptions, LatentOut, Matrix,
};

/// libtorch's generator and thread count are global: tests that train, or
/// that switch the thread count, take turns, so that each sees only its own
/// draws and a model is not trained half on one thread count, half on another.
#[cfg(test)]
pub(crate) static TORCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

use crate::data::Csr;
use rayon::prelude::*;
use statrs::function::gamma::ln_gamma;

/// Σ_g log Γ(x_g + 1) per cell, from the stored (non-zero) counts only.
pub fn log_factorial(counts: &Csr) -> Vec<f32> {
    (0..counts.n_rows)
        .into_par_iter()
        .map(|r| counts.row(r).1.iter().map(|&v| ln_gamma(v as f64 + 1.0)).sum::<f64>() as f32)
        .collect()
}
