# Trained models: the S3 class `scdistill_model`, its accessors, plots and files.
#
# A model is a list holding an environment with the Rust external pointer,
# the model file's bytes (so that saveRDS()/readRDS() and new sessions work:
# the pointer is restored from them when needed), and plain R metadata.

# The Rust functions describing, writing and reading each kind of model.
model_kinds <- list(
  scdistill_vae = list(info = function(p) rs_model_info(p), bytes = function(p) rs_model_bytes(p),
                       from = function(b, d) rs_model_from_bytes(b, d)),
  scdistill_distill = list(info = function(p) rs_distill_info(p), bytes = function(p) rs_distill_bytes(p),
                           from = function(b, d) rs_distill_from_bytes(b, d)),
  scdistill_multimodal = list(info = function(p) rs_multimodal_info(p), bytes = function(p) rs_multimodal_bytes(p),
                              from = function(b, d) rs_multimodal_from_bytes(b, d)))

new_model <- function(ptr, class) {
  kind <- model_kinds[[class]]
  info <- kind$info(ptr)
  state <- new.env(parent = emptyenv())
  state$ptr <- ptr
  model <- list(state = state, bytes = kind$bytes(ptr), info = info,
                history = as.data.frame(info$history),
                # The batch column of the training data (none when no batch
                # was given) and further covariates, looked up in new data.
                covariates = list(batch = if (nzchar(info$batch_name %||% "")) info$batch_name,
                                  batch_given = nzchar(info$batch_name %||% ""),
                                  categorical = names(info$categorical %||% list()), continuous = info$continuous),
                # Cells held out for validation (indices into the training data).
                validation_cells = info$validation_cells)
  class(model) <- c(class, "scdistill_model")
  model
}

# The live external pointer, rebuilt from the stored bytes after
# readRDS() or in a new session.
model_ptr <- function(model) {
  ptr <- model$state$ptr
  if (is.null(ptr) || identical(ptr, methods::new("externalptr"))) {
    ptr <- rust(model_kinds[[class(model)[1]]]$from(model$bytes, model$device %||% "auto"))
    model$state$ptr <- ptr
  }
  ptr
}

check_model <- function(model) {
  if (!inherits(model, "scdistill_model")) {
    stop("`model` must be a scdistill model (from fit_vae(), distill() or fit_multimodal()), not ", class(model)[1],
         call. = FALSE)
  }
}

#' @method print scdistill_model
#' @export
print.scdistill_model <- function(x, ...) {
  i <- x$info
  c <- i$config
  h <- x$history
  cat(sprintf("scdistill VAE: %s genes -> %d latent dimensions (%d x %d hidden), %s likelihood, %s dispersion\n",
              fmt_int(length(i$genes)), c$n_latent, c$n_layers, c$n_hidden, c$likelihood, c$dispersion))
  cat(sprintf("  trained on %s cells, %d batch(es)%s; library size %s\n", fmt_int(i$n_cells),
              length(i$batch_levels), if (length(i$categorical) + length(i$continuous)) " + covariates" else "",
              c$library))
  if (nrow(h)) {
    state <- if (isTRUE(i$interrupted)) "interrupted" else if (isTRUE(i$stopped_early)) "stopped early" else "done"
    cat(sprintf("  %d epochs (%s), weights of epoch %d; validation -ELBO %.2f per cell; %.1f s\n",
                nrow(h), state, i$best_epoch, h$validation_elbo[max(i$best_epoch, 1)], sum(h$seconds)))
  }
  invisible(x)
}

#' @method summary scdistill_model
#' @export
summary.scdistill_model <- function(object, ...) {
  i <- object$info
  h <- object$history
  best <- h[max(i$best_epoch, 1), , drop = FALSE]
  # A multimodal model counts the features of every modality; its batches are the ambient key's levels.
  n_features <- if (is.null(i$modalities)) length(i$genes) else sum(lengths(lapply(i$modalities, `[[`, "features")))
  structure(list(config = unlist(i$config), train = unlist(i$train), genes = n_features,
                 features = if (is.null(i$modalities)) "genes" else "features",
                 cells = i$n_cells, batches = i$batch_levels %||% i$covariates$ambient$levels, epochs = nrow(h),
                 best_epoch = i$best_epoch,
                 stopped_early = i$stopped_early, interrupted = i$interrupted,
                 best = best, seconds = sum(h$seconds)),
            class = "summary.scdistill_model")
}

#' @method print summary.scdistill_model
#' @export
print.summary.scdistill_model <- function(x, ...) {
  cat("Architecture:\n")
  print(x$config, quote = FALSE)
  cat("\nTraining:\n")
  print(x$train, quote = FALSE)
  cat(sprintf("\n%s cells x %s %s, batches: %s\n", fmt_int(x$cells), fmt_int(x$genes), x$features %||% "genes",
              paste(utils_head(x$batches, 8), collapse = ", ")))
  cat(sprintf("%d epochs in %.1f s; kept epoch %d:\n", x$epochs, x$seconds, x$best_epoch))
  print(x$best, row.names = FALSE, digits = 5)
  invisible(x)
}

#' Training history of a model
#'
#' Draws the negative ELBO per cell on the training and validation cells
#' against the epoch, with the KL weight of the warm-up and the epoch whose
#' weights the model keeps.
#'
#' @param x A `scdistill_model`.
#' @param which `"elbo"` (default), `"reconstruction"` or `"kl"`.
#' @param ... Passed to [graphics::plot()].
#' @return `x`, invisibly.
#' @method plot scdistill_model
#' @examples
#' sce <- example_cellbench()
#' model <- fit_vae(sce[1:500, ], batch = "batch", max_epochs = 20, threads = 2)
#' plot(model)
#' @export
plot.scdistill_model <- function(x, which = c("elbo", "reconstruction", "kl"), ...) {
  which <- match.arg(which)
  h <- x$history
  if (!nrow(h)) stop("the model has no training history", call. = FALSE)
  train <- h[[paste0("train_", which)]]
  val <- h[[paste0("validation_", which)]]
  ylim <- range(c(train, val), finite = TRUE)
  old <- graphics::par(mar = c(4.5, 4.5, 2.5, 4.5))
  on.exit(graphics::par(old))
  graphics::plot(h$epoch, train, type = "l", col = "#1b6ca8", lwd = 2, ylim = ylim, xlab = "epoch",
                 ylab = switch(which, elbo = "-ELBO per cell", reconstruction = "reconstruction loss per cell",
                               kl = "KL divergence per cell"),
                 main = "Training history", ...)
  if (any(is.finite(val))) graphics::lines(h$epoch, val, col = "#d1495b", lwd = 2)
  graphics::abline(v = x$info$best_epoch, lty = 3, col = "grey40")
  # KL weight on the right axis.
  graphics::par(new = TRUE)
  graphics::plot(h$epoch, h$kl_weight, type = "l", lty = 2, col = "grey55", axes = FALSE, xlab = "", ylab = "",
                 ylim = c(0, 1))
  graphics::axis(4, col.axis = "grey40")
  graphics::mtext("KL weight", side = 4, line = 3, col = "grey40")
  graphics::legend("topright", c("training", "validation", "KL weight", "kept epoch"),
                   col = c("#1b6ca8", "#d1495b", "grey55", "grey40"), lty = c(1, 1, 2, 3), lwd = c(2, 2, 1, 1),
                   bty = "n", cex = 0.85)
  invisible(x)
}

# Counts of (new) cells for a model, with their covariate labels.
model_input <- function(model, x, batch, ...) {
  cnt <- as_counts(x, ...)
  cov <- model$covariates
  if (is.null(batch) && isTRUE(cov$batch_given) && !is.null(cov$batch) && cov$batch %in% colnames(cnt$cell_data)) {
    batch <- cov$batch
  }
  b <- if (is.null(batch)) NULL else as.character(resolve_cell_factor(batch, cnt$cell_data, colnames(cnt$counts), "batch"))
  if (is.null(b) && !isTRUE(cov$batch_given)) b <- rep("all", ncol(cnt$counts))
  column <- function(nm) {
    if (!nm %in% colnames(cnt$cell_data)) {
      stop("the model uses covariate `", nm, "`, which is not a column of the cell metadata of `x`", call. = FALSE)
    }
    cnt$cell_data[[nm]]
  }
  cats <- lapply(cov$categorical, function(nm) as.character(column(nm)))
  conts <- lapply(cov$continuous, function(nm) as.double(column(nm)))
  list(counts = slots(cnt), cells = colnames(cnt$counts), batch = b, categorical = cats, continuous = conts)
}

#' Latent representation of cells
#'
#' The posterior mean (or a draw) of each cell's latent position. Without
#' `x`, the latent space of the cells the model was trained on; with `x`,
#' of new cells measured on the same genes (matched by name; extra genes are
#' ignored, missing ones are an error).
#'
#' @param model A `scdistill_model`.
#' @param x `NULL` or counts of cells to place (see [as_counts()]).
#' @param batch Batch of the cells of `x`, needed only by models that encode
#'   covariates (see [normalized_expression()]).
#' @param give_mean The posterior mean (default) or one draw from q(z | x).
#' @param seed Seed of the draw when `give_mean = FALSE`.
#' @param threads CPU threads.
#' @param modality For a multimodal model: `NULL` for the joint latent
#'   space, or a modality name for that modality's own latent space.
#' @param ... Passed to [as_counts()].
#' @return A cells × latent dimensions matrix.
#' @examples
#' sce <- example_cellbench()
#' model <- fit_vae(sce[1:500, ], batch = "batch", max_epochs = 20, threads = 2)
#' head(latent(model))
#' @export
latent <- function(model, x = NULL, batch = NULL, give_mean = TRUE, seed = 0, threads = NULL, modality = NULL, ...) {
  check_model(model)
  give_mean <- check_flag(give_mean, "give_mean")
  if (inherits(model, "scdistill_multimodal")) {
    return(multimodal_latent(model, x, give_mean, seed, threads, modality))
  }
  if (is.null(x) && give_mean && !is.null(model$latent)) return(model$latent)
  if (is.null(x)) {
    stop("pass `x`, the counts of the cells (the model keeps the latent space of its training cells only ",
         "in the session it was trained in, and draws always need the counts)", call. = FALSE)
  }
  if (inherits(model, "scdistill_distill")) {
    cnt <- as_counts(x, ...)
    z <- rust(rs_distill_latent(model_ptr(model), slots(cnt), resolve_threads(threads)))
    return(latent_matrix(z, colnames(cnt$counts), model$info$config$n_latent))
  }
  needs_covariates <- isTRUE(model$info$config$encode_covariates)
  inp <- if (needs_covariates) model_input(model, x, batch, ...) else list(counts = slots(cnt <- as_counts(x, ...)))
  z <- rust(rs_vae_latent(model_ptr(model), inp$counts, inp$batch, inp$categorical %||% list(),
                          inp$continuous %||% list(), give_mean, as.numeric(seed), resolve_threads(threads)))
  latent_matrix(z, inp$counts$cells, model$info$config$n_latent)
}

#' Normalized and batch-corrected expression
#'
#' The model's expected expression of every gene in every cell of `x`:
#' the decoded proportions ρ times `library_size`. With `transform_batch`,
#' each cell is decoded as if it had been measured in that batch
#' (counterfactual decoding), averaged over the batches when several are
#' given: this is batch-corrected expression.
#'
#' (Named `normalized_expression()` rather than `expression()`, which would
#' mask base R's `expression()` used in plot labels.)
#'
#' @inheritParams latent
#' @param x Counts of the cells (see [as_counts()]), usually the data the
#'   model was trained on.
#' @param batch Batch of the cells of `x`: a column of the cell metadata or
#'   one value per cell; by default the column the model was trained with.
#' @param transform_batch `NULL` (each cell's own batch) or one or more
#'   batch levels to decode every cell to.
#' @param library_size Scale of the output: 1 gives proportions, 1e4 counts
#'   per 10,000.
#' @param n_samples Draws from q(z | x) to average (1: the posterior mean).
#' @param log1p Return log1p of the values.
#' @param modality For a multimodal model: the modality to decode (default:
#'   the first, RNA); its normalized accessibility for ATAC.
#' @param ambient For a multimodal model: include the ambient background
#'   (default `FALSE`: what the cell itself expresses).
#' @return A genes × cells dense matrix.
#' @examples
#' sce <- example_cellbench()
#' model <- fit_vae(sce[1:500, ], batch = "batch", max_epochs = 20, threads = 2)
#' rho <- normalized_expression(model, sce[1:500, ], transform_batch = "p1", library_size = 1e4)
#' rho[1:3, 1:3]
#' @export
normalized_expression <- function(model, x, batch = NULL, transform_batch = NULL, library_size = 1,
                                  n_samples = 1, log1p = FALSE, seed = 0, threads = NULL, modality = NULL,
                                  ambient = FALSE, ...) {
  check_model(model)
  check_positive(library_size, "library_size")
  if (inherits(model, "scdistill_multimodal")) {
    out <- multimodal_normalized(model, x, modality, library_size, check_flag(ambient, "ambient"), threads)
    return(if (check_flag(log1p, "log1p")) log1p(out) else out)
  }
  n_samples <- check_count(n_samples, "n_samples")
  if (inherits(model, "scdistill_distill")) {
    # A distilled decoder is deterministic given Z: decode to the reference batch(es).
    out <- library_size * corrected_expression(model, x, reference_batch = transform_batch %||% model$info$batch_levels,
                                               type = "scale", threads = threads, ...)
    return(if (check_flag(log1p, "log1p")) log1p(out) else out)
  }
  inp <- model_input(model, x, batch, ...)
  if (!is.null(transform_batch)) transform_batch <- as.character(transform_batch)
  v <- rust(rs_vae_expression(model_ptr(model), inp$counts, inp$batch, inp$categorical, inp$continuous,
                              transform_batch, as.numeric(library_size), n_samples, as.numeric(seed),
                              resolve_threads(threads)))
  out <- matrix(v, nrow = length(model$info$genes), dimnames = list(model$info$genes, inp$cells))
  if (check_flag(log1p, "log1p")) out <- log1p(out)
  out
}

#' Posterior predictive counts
#'
#' Draws counts from the model for the cells of `x`: a latent position from
#' q(z | x), then counts from the observation model (NB as a Gamma-Poisson
#' mixture, zeros added for ZINB). Useful for posterior predictive checks.
#'
#' @inheritParams normalized_expression
#' @param n_samples Number of count matrices to draw.
#' @return A genes × cells `dgCMatrix`, or a list of them when `n_samples > 1`.
#' @examples
#' sce <- example_cellbench()
#' model <- fit_vae(sce[1:500, ], batch = "batch", likelihood = "nb", max_epochs = 20, threads = 2)
#' sim <- sample_counts(model, sce[1:500, ])
#' summary(Matrix::colSums(sim) / Matrix::colSums(SingleCellExperiment::counts(sce[1:500, ])))
#' @export
sample_counts <- function(model, x, batch = NULL, n_samples = 1, seed = 0, threads = NULL, ...) {
  check_vae(model, "sample_counts()")
  n_samples <- check_count(n_samples, "n_samples")
  inp <- model_input(model, x, batch, ...)
  draws <- rust(rs_vae_sample(model_ptr(model), inp$counts, inp$batch, inp$categorical, inp$continuous,
                              n_samples, as.numeric(seed), resolve_threads(threads)))
  out <- lapply(draws, csr_to_dgc, features = model$info$genes, cells = inp$cells)
  if (n_samples == 1) out[[1]] else out
}

#' Evidence lower bound on (held-out) cells
#'
#' `elbo()` is the mean negative ELBO per cell (lower is better) of the
#' cells of `x` under the model, with one draw from q(z | x) per cell as in
#' scvi-tools' `get_elbo()`; `reconstruction_error()` is its reconstruction
#' part, -log p(x | z). Use them on held-out cells, e.g.
#' `x[, model$validation_cells]`, the cells held out during training.
#'
#' @inheritParams normalized_expression
#' @return A number.
#' @examples
#' sce <- example_cellbench()
#' model <- fit_vae(sce[1:500, ], batch = "batch", max_epochs = 20, threads = 2)
#' elbo(model, sce[1:500, model$validation_cells])
#' @export
elbo <- function(model, x, batch = NULL, seed = 0, threads = NULL, ...) {
  elbo_parts(model, x, batch, seed, threads, ...)[["elbo"]]
}

#' @rdname elbo
#' @export
reconstruction_error <- function(model, x, batch = NULL, seed = 0, threads = NULL, ...) {
  elbo_parts(model, x, batch, seed, threads, ...)[["reconstruction"]]
}

elbo_parts <- function(model, x, batch, seed, threads, ...) {
  if (inherits(model, "scdistill_multimodal")) {
    inp <- multimodal_input(model, x)
    v <- rust(rs_multimodal_elbo(model_ptr(model), inp$slots, inp$labels, as.numeric(seed), resolve_threads(threads)))
    return(c(elbo = v[1], reconstruction = v[2], kl = v[3]))
  }
  check_vae(model, "elbo() and reconstruction_error()")
  inp <- model_input(model, x, batch, ...)
  v <- rust(rs_vae_elbo(model_ptr(model), inp$counts, inp$batch, inp$categorical, inp$continuous,
                        as.numeric(seed), resolve_threads(threads)))
  c(elbo = v[1], reconstruction = v[2], kl = v[3])
}

#' Store a model's latent space in a SingleCellExperiment or Seurat object
#'
#' @param x The object the model was trained on (or new cells, placed with
#'   [latent()]).
#' @param model A `scdistill_model`.
#' @param name Name of the `reducedDim` (SingleCellExperiment) or reduction
#'   (Seurat); by default `"scVI"` for a VAE, `"scDistill"` for a distilled
#'   model and `"multimodal"` for a multimodal one, whose per-modality latent
#'   spaces are added as well (`"multimodal_RNA"`, `"multimodal_ATAC"`).
#' @param ... Passed to [latent()].
#' @return `x` with the latent space added.
#' @examples
#' sce <- example_cellbench()
#' model <- fit_vae(sce[1:500, ], batch = "batch", max_epochs = 20, threads = 2)
#' sce <- add_latent(sce, model)
#' SingleCellExperiment::reducedDimNames(sce)
#' @export
add_latent <- function(x, model, name = NULL, ...) {
  check_model(model)
  if (inherits(model, "scdistill_multimodal")) return(add_multimodal_latent(x, model, name %||% "multimodal", ...))
  name <- name %||% if (inherits(model, "scdistill_distill")) "scDistill" else "scVI"
  z <- model$latent
  if (is.null(z) || !identical(rownames(z), colnames(x))) z <- latent(model, x, ...)
  write_back(x, z, name)
}

#' Save and load models
#'
#' `save_model()` writes a single file: the weights in safetensors format
#' (readable with Python's `safetensors`), with the architecture, genes,
#' covariate levels and training history in its header. `load_model()`
#' reads it back. Models also survive `saveRDS()`/`readRDS()`.
#'
#' @param model A `scdistill_model`.
#' @param path File to write or read.
#' @param overwrite Replace an existing file.
#' @param device Where to load the model: `"auto"`, `"cpu"`, `"cuda"`, `"cuda:N"`.
#' @return `save_model()`: `path`, invisibly. `load_model()`: the model.
#' @examples
#' sce <- example_cellbench()
#' model <- fit_vae(sce[1:500, ], batch = "batch", max_epochs = 10, threads = 2)
#' f <- tempfile(fileext = ".safetensors")
#' save_model(model, f)
#' same <- load_model(f)
#' all.equal(latent(same, sce[1:500, ]), latent(model))
#' @export
save_model <- function(model, path, overwrite = FALSE) {
  check_model(model)
  if (file.exists(path) && !check_flag(overwrite, "overwrite")) {
    stop("'", path, "' exists; use `overwrite = TRUE` to replace it", call. = FALSE)
  }
  writeBin(model$bytes, path)
  invisible(path)
}

#' @rdname save_model
#' @export
load_model <- function(path, device = "auto") {
  if (!file.exists(path)) stop("no file '", path, "'", call. = FALSE)
  bytes <- readBin(path, "raw", n = file.size(path))
  kind <- rust(rs_model_kind(bytes))
  class <- switch(kind, distill = "scdistill_distill", multimodal = "scdistill_multimodal", "scdistill_vae")
  model <- new_model(rust(model_kinds[[class]]$from(bytes, device)), class)
  model$device <- device
  model
}

check_vae <- function(model, what) {
  check_model(model)
  if (inherits(model, "scdistill_distill")) {
    stop(what, " needs a VAE (fit_vae()); a distilled model has no posterior to draw from", call. = FALSE)
  }
  check_not_multimodal(model, what)
}

check_not_multimodal <- function(model, what) {
  if (inherits(model, "scdistill_multimodal")) {
    stop(what, " is not available for multimodal models yet; use latent(), normalized_expression(), elbo() ",
         "and modality_attribution()", call. = FALSE)
  }
}
