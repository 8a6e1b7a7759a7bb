//! Data: the count matrix (CSR, cells × genes) in memory or on disk (HDF5),
//! cell covariates, the train/validation split, and minibatches cut
//! straight into tensors (dense, and sparse for the likelihoods).

mod counts;
mod covariates;
mod csr;
mod disk;
mod embedding;
mod h5;
mod resident;
mod sparse_batch;
mod split;

pub(crate) use counts::quote_some;
pub use counts::{columns_of, csr_from_csc_slots, CountMatrix};
pub use covariates::{Categorical, Covariates};
pub use csr::Csr;
pub(crate) use csr::{log1p_count, log1p_table};
pub use disk::{log_libraries, DiskCells, DiskCsr, Layout, Scan};
pub use embedding::Embedding;
pub use h5::{CellsH5, DenseH5, H5Reader, H5adWriter};
pub use resident::DeviceCsr;
pub use sparse_batch::{HostRows, SparseBatch};
pub use split::{log1p_rows_to_tensor, rows_to_tensor, train_validation_split};

/// The cells a model reads: a matrix in memory, or one on disk read in
/// blocks (`DiskCsr`).
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    Memory(&'a Csr),
    Disk(&'a DiskCsr),
}

impl<'a> Rows<'a> {
    pub fn n_rows(&self) -> usize {
        match self {
            Rows::Memory(m) => m.n_rows,
            Rows::Disk(d) => d.n_rows(),
        }
    }

    pub fn n_cols(&self) -> usize {
        match self {
            Rows::Memory(m) => m.n_cols,
            Rows::Disk(d) => d.n_cols(),
        }
    }

    /// The matrix in memory (None for one on disk).
    pub fn memory(&self) -> Option<&'a Csr> {
        match self {
            Rows::Memory(m) => Some(m),
            Rows::Disk(_) => None,
        }
    }

    /// Calls `f` with a matrix and the row indices in it of `rows`: the
    /// matrix itself in memory; for one on disk, the rows read (from the
    /// epoch's stream when `streamed`, else directly, the last rows read
    /// kept for the next call), at `0..rows.len()`.
    /// A read error is a panic that names the file (the loss functions
    /// that call this return no `Result`); R turns it into an error.
    pub fn with_rows<T>(&self, rows: &[usize], streamed: bool, f: impl FnOnce(&Csr, &[usize]) -> T) -> T {
        match self {
            Rows::Memory(m) => f(m, rows),
            Rows::Disk(d) => {
                let got = if streamed { d.fetch(rows).map(std::sync::Arc::new) } else { d.read_rows_cached(rows) };
                let m = got.unwrap_or_else(|e| panic!("{e}"));
                let local: Vec<usize> = (0..rows.len()).collect();
                f(&m, &local)
            }
        }
    }
}
