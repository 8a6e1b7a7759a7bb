//! The hand-written CPU kernels: loops that libtorch runs as many separate
//! passes (or as dense work on sparse data), written here as one pass over
//! plain slices. Each has a tensor-level (or library) reference it is tested
//! against; `README.md` lists them. The modules that use a kernel wrap it in
//! tensors: `likelihood` (fused), `nn` (sparse), `train` (adam).

pub mod adam;
pub mod flush;
pub mod fused;
pub mod omp;
pub mod pool;
pub(crate) mod simd;
pub mod sparse;
pub mod vmath;
