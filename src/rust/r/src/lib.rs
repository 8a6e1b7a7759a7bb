//! extendr glue: R vectors ⇄ core types, core errors and panics → R errors,
//! interrupts. No numerics here.

use extendr_api::prelude::*;
use extendr_api::Result;

mod ambient;
mod clusters;
mod convert;
mod disk;
mod dist;
mod distill;
mod doublets;
mod harmony;
mod labels;
mod metrics;
mod model;
mod multimodal;
mod prep;
mod simulate;
mod species;
mod torch;
mod umap;
mod vae;
mod worker;

pub(crate) use convert::{counts_from_r, csr_to_r, from_column_major, r_matrix};

/// Core errors become R errors carrying the core's message.
fn fail(msg: impl ToString) -> Error {
    Error::Other(msg.to_string())
}

fn int_slice<'a>(x: &'a Robj, what: &str) -> Result<&'a [i32]> {
    x.as_integer_slice().ok_or_else(|| fail(format!("internal: `{what}` must be an integer vector")))
}

fn strings(x: &Robj, what: &str) -> Result<Vec<String>> {
    x.as_str_vector()
        .map(|v| v.into_iter().map(String::from).collect())
        .ok_or_else(|| fail(format!("internal: `{what}` must be a character vector")))
}

/// The thread count asked for, at most the cores this process may use
/// (libtorch's thread pool hangs creating 10^6 threads; R says so first).
fn threads_from_r(threads: i32) -> Result<usize> {
    if threads < 1 {
        return Err(fail("`threads` must be at least 1"));
    }
    Ok((threads as usize).min(available_threads()))
}

fn available_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Runs core work on a worker thread, turning interrupts, core errors and panics into R errors.
fn run<T: Send>(threads: i32, work: impl FnOnce(&dyn Fn() -> bool) -> scdistill_core::Result<T> + Send) -> Result<T> {
    worker::run(threads_from_r(threads)?, work).map_err(fail)?.map_err(fail)
}

extendr_module! {
    mod scdistill;
    use convert;
    use prep;
    use simulate;
    use metrics;
    use torch;
    use model;
    use vae;
    use disk;
    use dist;
    use distill;
    use harmony;
    use multimodal;
    use species;
    use labels;
    use clusters;
    use ambient;
    use umap;
    use doublets;
}
