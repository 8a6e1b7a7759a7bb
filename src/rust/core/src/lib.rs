//! scdistill-core: deep generative models of single-cell counts on libtorch.
//!
//! Pure Rust + tch; knows nothing of R. The R package talks to it through the
//! thin `scdistill-r` glue crate.

pub mod data;
pub mod de;
pub mod device;
pub mod dist;
pub mod error;
pub mod io;
pub mod kernels;
pub mod likelihood;
pub mod mapping;
pub mod metrics;
pub mod models;
pub mod nn;
pub mod numeric;
pub mod prep;
pub mod simulate;
pub mod teacher;
pub mod train;

pub use error::{Error, Result};
