//! Data in memory: the count matrix (CSR, cells × genes), cell covariates,
//! the train/validation split, and minibatches cut straight into tensors
//! (dense, and sparse for the likelihoods).

mod counts;
mod embedding;
mod covariates;
mod csr;
mod resident;
mod sparse_batch;
mod split;

pub(crate) use counts::quote_some;
pub use counts::CountMatrix;
pub use embedding::Embedding;
pub use covariates::{Categorical, Covariates};
pub use csr::Csr;
pub(crate) use csr::{log1p_count, log1p_table};
pub use resident::DeviceCsr;
pub use sparse_batch::{HostRows, SparseBatch};
pub use split::{log1p_rows_to_tensor, rows_to_tensor, train_validation_split};
