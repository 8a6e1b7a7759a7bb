# Thin wrappers around the routines of the Rust glue crate (src/rust/r).
# Each `rs_*` function lives in src/rust/r/src/lib.rs under the same name.
# The shared object links libtorch and its CUDA libraries (about 0.4 s and
# 650 MB of mappings), so it is loaded on the first call, not by library().

native_env <- new.env(parent = emptyenv())

native <- function(name) {
  sym <- native_env[[name]]
  if (is.null(sym)) {
    if (is.null(native_env$dll)) {
      native_env$dll <- library.dynam("scdistill", "scdistill", lib.loc = dirname(system.file(package = "scdistill")))
    }
    sym <- getNativeSymbolInfo(name, native_env$dll)
    native_env[[name]] <- sym
  }
  sym
}

.onUnload <- function(libpath) {
  if (!is.null(native_env$dll)) library.dynam.unload("scdistill", libpath)
}

rs_validate_counts <- function(counts) .Call(native("wrap__rs_validate_counts"), counts)

rs_log2_cpm <- function(counts, threads) .Call(native("wrap__rs_log2_cpm"), counts, threads)

rs_hvg <- function(counts, batch, levels, n_hvg, span, threads) {
  .Call(native("wrap__rs_hvg"), counts, batch, levels, n_hvg, span, threads)
}

rs_run_pca <- function(counts, batch, levels, n_pcs, n_hvg, scale, n_oversamples, max_iter, tol,
                       max_genes_exact, seed, residual_theta, threads) {
  .Call(native("wrap__rs_run_pca"), counts, batch, levels, n_pcs, n_hvg, scale, n_oversamples, max_iter, tol,
        max_genes_exact, seed, residual_theta, threads)
}

rs_simulate <- function(params, threads) .Call(native("wrap__rs_simulate"), params, threads)

rs_integration_metrics <- function(x, n, d, batch, label, pre, pre_d, seed, threads) {
  .Call(native("wrap__rs_integration_metrics"), x, n, d, batch, label, pre, pre_d, seed, threads)
}

rs_dense_cells <- function(counts, rows) .Call(native("wrap__rs_dense_cells"), counts, rows)

rs_torch_config <- function(device, threads) .Call(native("wrap__rs_torch_config"), device, threads)

rs_available_threads <- function() .Call(native("wrap__rs_available_threads"))

rs_panic_for_test <- function(on_worker) .Call(native("wrap__rs_panic_for_test"), on_worker)

rs_wait_for_interrupt <- function(seconds) .Call(native("wrap__rs_wait_for_interrupt"), seconds)

rs_fit_vae <- function(counts, batch, categorical, continuous, config, train, device, threads, progress) {
  .Call(native("wrap__rs_fit_vae"), counts, batch, categorical, continuous, config, train, device, threads, progress)
}

rs_model_info <- function(ptr) .Call(native("wrap__rs_model_info"), ptr)

rs_model_bytes <- function(ptr) .Call(native("wrap__rs_model_bytes"), ptr)

rs_model_from_bytes <- function(bytes, device) .Call(native("wrap__rs_model_from_bytes"), bytes, device)

rs_vae_latent <- function(ptr, counts, batch, categorical, continuous, give_mean, seed, threads) {
  .Call(native("wrap__rs_vae_latent"), ptr, counts, batch, categorical, continuous, give_mean, seed, threads)
}

rs_vae_expression <- function(ptr, counts, batch, categorical, continuous, transform_batch, library_size,
                              n_samples, seed, threads) {
  .Call(native("wrap__rs_vae_expression"), ptr, counts, batch, categorical, continuous, transform_batch,
        library_size, n_samples, seed, threads)
}

rs_vae_sample <- function(ptr, counts, batch, categorical, continuous, n_samples, seed, threads) {
  .Call(native("wrap__rs_vae_sample"), ptr, counts, batch, categorical, continuous, n_samples, seed, threads)
}

rs_vae_elbo <- function(ptr, counts, batch, categorical, continuous, seed, threads) {
  .Call(native("wrap__rs_vae_elbo"), ptr, counts, batch, categorical, continuous, seed, threads)
}

rs_blas_library <- function() .Call(native("wrap__rs_blas_library"))

rs_run_harmony <- function(x, n, d, covariates, params, threads, progress) {
  .Call(native("wrap__rs_run_harmony"), x, n, d, covariates, params, threads, progress)
}

rs_fit_distill <- function(counts, batch, levels, input_genes, decoder_genes, teacher, teacher_dim, teacher_name,
                           config, train_encoder, train_decoder, device, threads, progress) {
  .Call(native("wrap__rs_fit_distill"), counts, batch, levels, input_genes, decoder_genes, teacher, teacher_dim,
        teacher_name, config, train_encoder, train_decoder, device, threads, progress)
}

rs_distill_info <- function(ptr) .Call(native("wrap__rs_distill_info"), ptr)

rs_distill_bytes <- function(ptr) .Call(native("wrap__rs_distill_bytes"), ptr)

rs_distill_from_bytes <- function(bytes, device) .Call(native("wrap__rs_distill_from_bytes"), bytes, device)

rs_model_kind <- function(bytes) .Call(native("wrap__rs_model_kind"), bytes)

rs_distill_latent <- function(ptr, counts, threads) .Call(native("wrap__rs_distill_latent"), ptr, counts, threads)

rs_distill_corrected <- function(ptr, counts, reference, threads) {
  .Call(native("wrap__rs_distill_corrected"), ptr, counts, reference, threads)
}

rs_distill_nll <- function(ptr, counts, batch, threads) .Call(native("wrap__rs_distill_nll"), ptr, counts, batch, threads)
rs_vae_de <- function(ptr, counts, batch, categorical, continuous, group1, group2, settings, threads) .Call(native("wrap__rs_vae_de"), ptr, counts, batch, categorical, continuous, group1, group2, settings, threads)
rs_distill_de <- function(ptr, counts, batch, group1, group2, settings, threads) .Call(native("wrap__rs_distill_de"), ptr, counts, batch, group1, group2, settings, threads)

rs_fit_multimodal <- function(counts, covariates, config, modalities, train, device, threads, progress) {
  .Call(native("wrap__rs_fit_multimodal"), counts, covariates, config, modalities, train, device, threads, progress)
}

rs_multimodal_info <- function(ptr) .Call(native("wrap__rs_multimodal_info"), ptr)

rs_multimodal_bytes <- function(ptr) .Call(native("wrap__rs_multimodal_bytes"), ptr)

rs_multimodal_from_bytes <- function(bytes, device) .Call(native("wrap__rs_multimodal_from_bytes"), bytes, device)

rs_multimodal_latent <- function(ptr, counts, labels, give_mean, seed, threads) {
  .Call(native("wrap__rs_multimodal_latent"), ptr, counts, labels, give_mean, seed, threads)
}

rs_multimodal_normalized <- function(ptr, counts, labels, modality, library_size, ambient, threads) {
  .Call(native("wrap__rs_multimodal_normalized"), ptr, counts, labels, modality, library_size, ambient, threads)
}

rs_multimodal_attribution <- function(ptr, counts, labels, threads) {
  .Call(native("wrap__rs_multimodal_attribution"), ptr, counts, labels, threads)
}

rs_multimodal_elbo <- function(ptr, counts, labels, seed, threads) {
  .Call(native("wrap__rs_multimodal_elbo"), ptr, counts, labels, seed, threads)
}
