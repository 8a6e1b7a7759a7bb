# Thin wrappers around the routines of the Rust glue crate (src/rust/r).
# Each `rs_*` function lives in src/rust/r/src/lib.rs under the same name.

rs_validate_counts <- function(p, i, x, genes, cells) .Call(wrap__rs_validate_counts, p, i, x, genes, cells)

rs_log2_cpm <- function(p, i, x, genes, cells, threads) .Call(wrap__rs_log2_cpm, p, i, x, genes, cells, threads)

rs_hvg <- function(p, i, x, genes, cells, batch, levels, n_hvg, span, threads) {
  .Call(wrap__rs_hvg, p, i, x, genes, cells, batch, levels, n_hvg, span, threads)
}

rs_run_pca <- function(p, i, x, genes, cells, batch, levels, n_pcs, n_hvg, scale, n_oversamples, max_iter, tol,
                       seed, threads) {
  .Call(wrap__rs_run_pca, p, i, x, genes, cells, batch, levels, n_pcs, n_hvg, scale, n_oversamples, max_iter, tol,
        seed, threads)
}

rs_dense_cells <- function(p, i, x, genes, cells, rows) .Call(wrap__rs_dense_cells, p, i, x, genes, cells, rows)

rs_torch_config <- function(device, threads) .Call(wrap__rs_torch_config, device, threads)

rs_available_threads <- function() .Call(wrap__rs_available_threads)

rs_panic_for_test <- function(on_worker) .Call(wrap__rs_panic_for_test, on_worker)

rs_wait_for_interrupt <- function(seconds) .Call(wrap__rs_wait_for_interrupt, seconds)
