#' Fit an scVI-style variational autoencoder to counts
#'
#' Trains the model of scVI (Lopez et al. 2018) on raw counts: an encoder
#' maps log1p(counts) of each cell to a Gaussian latent space; a decoder,
#' given the latent position and the cell's batch (and any other
#' covariates, injected at every layer), gives the expected proportions of
#' each gene, which times the library size is the mean of a zero-inflated
#' negative binomial (or NB, or Poisson) distribution of the counts. The
#' latent space is batch-corrected: use [latent()] for clustering and UMAP,
#' and [normalized_expression()] for denoised, batch-corrected expression.
#'
#' Defaults are those of scvi-tools 1.4 `SCVI` with one exception: the KL
#' warm-up. scvi-tools raises the weight of the KL term over 400 *epochs*,
#' so with its default number of epochs the weight never reaches 1 above
#' about 20,000 cells. Here it rises linearly over the first `kl_warmup`
#' fraction of the planned optimiser steps (half of them by default),
#' whatever the size of the data.
#'
#' Training holds out `validation_fraction` of the cells and reports their
#' negative ELBO after every epoch. Once the warm-up is over, the best
#' epoch is tracked; with `early_stopping` training stops when the
#' validation loss has not improved for `patience` epochs, and the weights of
#' the best epoch are kept. Pressing Ctrl-C (Esc in RStudio) stops training
#' within about a second: in an interactive session the model keeps the best
#' weights so far and is returned with a warning; in a script (or with
#' `options(scdistill.on_interrupt = "stop")`) an error of class
#' `"interrupt"` stops the script, the model in its `model` field. A loss
#' that becomes infinite or NaN (a learning rate too large) stops training
#' with an error naming the epoch; the model with the weights of the epoch
#' before is in the error's `model` field.
#'
#' Select genes first (e.g. 2,000 highly variable genes with
#' [highly_variable_genes()]): the model uses every gene of `x`.
#'
#' On CPUs with native bf16 arithmetic, training runs its widest products in
#' bf16 (mixed precision, about 1.3 to 1.6 times faster per epoch at the same
#' held-out ELBO); `options(scdistill.bf16 = FALSE)` keeps f32. See the
#' section "Precision" of [scdistill].
#'
#' @param x Raw counts: a `SingleCellExperiment`, `Seurat` object,
#'   `dgCMatrix`, `matrix` or `DelayedMatrix` (see [as_counts()]); or
#'   counts on disk, which are streamed from the file in blocks rather than
#'   loaded: the path of an `.h5ad` or 10x `.h5` file, an [h5_counts()]
#'   object, or a `SingleCellExperiment` whose counts are an HDF5-backed
#'   `DelayedMatrix` (see [h5_counts()] for how training reads them; then
#'   `batch` and the covariates name cell columns of the experiment or of
#'   the file's `obs`).
#' @param batch `NULL`, a column of the cell metadata, or one value per cell.
#' @param n_latent,n_hidden,n_layers Latent dimensions, units per hidden
#'   layer, hidden layers of the encoder and of the decoder.
#' @param dropout Dropout rate of the encoder.
#' @param likelihood `"zinb"`, `"nb"` or `"poisson"`.
#' @param dispersion Negative binomial dispersion: one per gene (`"gene"`),
#'   per gene and batch (`"gene-batch"`), or per gene and cell
#'   (`"gene-cell"`, from the decoder).
#' @param library_size `"observed"` (log total counts of the cell) or
#'   `"learned"` (a library encoder with a log-normal prior per batch).
#' @param norm Normalisation of the hidden layers: `"batch"` (BatchNorm),
#'   `"layer"` (LayerNorm) or `"none"`.
#' @param categorical_covariates,continuous_covariates Further covariates
#'   given to the decoder: column names of the cell metadata, or a
#'   `data.frame` with one row per cell.
#' @param encode_covariates Give the covariates to the encoder too.
#' @param max_epochs Epochs; `NULL` means scvi-tools' rule
#'   `min(round(20000 / n_cells * 400), 400)`.
#' @param batch_size Cells per minibatch; for a larger one, raise `lr` with
#'   [scaled_lr()].
#' @param lr,weight_decay Adam learning rate and weight decay (Adam's eps is 0.01, as scvi-tools).
#' @param kl_warmup Fraction of the planned steps over which the KL weight rises from 0 to 1.
#' @param early_stopping,patience Early stopping on the validation loss.
#' @param min_delta Smallest improvement of the validation loss that resets
#'   early stopping; `NULL`: 0, or for `regularized = TRUE` 0.0002 per gene
#'   (as [fit_multimodal()]).
#' @param validation_fraction Fraction of the cells held out for validation.
#' @param seed Seed of the weights, minibatches and held-out cells: the same
#'   seed gives the same model on CPU.
#' @param device `"auto"` (CUDA when available), `"cpu"`, `"cuda"` or `"cuda:N"`.
#' @param threads CPU threads (default: `getOption("scdistill.threads")`, else all cores).
#' @param progress Show a progress bar.
#' @param regularized Fit the regularized model of [fit_multimodal()] on
#'   this one modality instead (regularizedvi's `AmbientRegularizedSCVI`):
#'   softplus decoder with an ambient background per batch, hierarchical
#'   dispersion per batch, learned library size, LayerNorm, batch-free
#'   decoder. `likelihood`, `dispersion`, the further covariates and
#'   `encode_covariates` do not apply (giving them is an error);
#'   `library_size` and `norm` default to `"learned"` and `"layer"` unless
#'   given. The result is a `scdistill_multimodal` model: [latent()],
#'   [normalized_expression()] (with `transform_batch`, `n_samples`,
#'   `ambient`), [elbo()] and [add_latent()] work; [sample_counts()] and
#'   Bayesian [differential_expression()] are not available for it (use
#'   `method = "pseudobulk"`).
#' @param train Training settings from [train_params()], instead of (not as
#'   well as) the arguments of the same names.
#' @param workers Train on this many processes on this machine, `threads`
#'   split between them (data-parallel, see [distributed]); 1 trains here.
#' @param h5_file `NULL` (default: the latent space in memory), or an HDF5
#'   file to write the training cells' latent space into as it is encoded:
#'   dataset `latent`, cells × `n_latent` 4-byte floats with the cells'
#'   names. [latent()] of the model then returns it as an HDF5-backed
#'   `DelayedMatrix` (package HDF5Array). A new file, or an HDF5 file without
#'   a dataset `latent` (nothing is overwritten; a failed fit takes out what
#'   it wrote). For atlases on disk: the latent space is then not held in
#'   memory (0.4 GB at 5·10^6 cells and 10 dimensions). The peak memory is
#'   training's either way (measured from disk at 5·10^6 cells: 2.19 GB with
#'   the file, 2.13 GB without); after the fit the process held 1.5 GB.
#' @param ... Passed to [as_counts()] (e.g. `assay.type`).
#' @return A `scdistill_vae` model (a `scdistill_model`): use [latent()], [normalized_expression()],
#'   [sample_counts()], [elbo()], `plot()` (training history), `summary()`,
#'   [save_model()].
#' @seealso [add_latent()] to store the latent space in a
#'   `SingleCellExperiment` or `Seurat` object.
#' @examples
#' sce <- example_cellbench()
#' hvg <- highly_variable_genes(sce, n_hvg = 1000, batch = "batch")
#' model <- fit_vae(sce[hvg$highly_variable, ], batch = "batch", max_epochs = 30, threads = 2)
#' model
#' z <- latent(model)
#' dim(z)
#' @export
fit_vae <- function(x, batch = NULL, n_latent = 10, n_hidden = 128, n_layers = 1, dropout = 0.1,
                    likelihood = c("zinb", "nb", "poisson"), dispersion = c("gene", "gene-batch", "gene-cell"),
                    library_size = c("observed", "learned"), norm = c("batch", "layer", "none"),
                    categorical_covariates = NULL, continuous_covariates = NULL, encode_covariates = FALSE,
                    max_epochs = NULL, batch_size = 128, lr = 1e-3, weight_decay = 1e-6, kl_warmup = 0.5,
                    early_stopping = TRUE, patience = 45, min_delta = NULL, validation_fraction = 0.1,
                    seed = 0, device = "auto", threads = NULL, progress = interactive(), regularized = FALSE,
                    train = NULL, workers = 1, h5_file = NULL, ...) {
  h5 <- results_h5_target(h5_file, "latent")
  if (check_count(workers, "workers") > 1) {
    if (!is.null(h5)) stop("`h5_file` is for one process (`workers = 1`)", call. = FALSE)
    return(run_workers("fit_vae", called_with(match.call(), parent.frame()), workers, threads))
  }
  apply_train_params(train, environment(), names(match.call())[-1], "fit_vae")
  if (check_flag(regularized, "regularized")) {
    given <- intersect(names(match.call())[-1], c("likelihood", "dispersion", "categorical_covariates",
                                                  "continuous_covariates", "encode_covariates"))
    if (length(given)) {
      stop("`", given[1], "` does not apply to `regularized = TRUE` (see ?fit_vae)", call. = FALSE)
    }
    if (!is.null(h5)) stop("`h5_file` does not apply to `regularized = TRUE`", call. = FALSE)
    return(fit_regularized(x, batch, n_latent, n_hidden, n_layers, dropout, library_size, norm, max_epochs,
                           batch_size, lr, weight_decay, kl_warmup, early_stopping, patience, min_delta,
                           validation_fraction, seed, device, threads, progress, ...))
  }
  likelihood <- choose_arg(likelihood, "likelihood")
  dispersion <- choose_arg(dispersion, "dispersion")
  library_size <- choose_arg(library_size, "library_size")
  norm <- choose_arg(norm, "norm")
  check_fraction(dropout, "dropout")
  config <- list(n_latent = check_count(n_latent, "n_latent"), n_hidden = check_count(n_hidden, "n_hidden"),
                 n_layers = check_count(n_layers, "n_layers"), dropout = dropout, norm = norm,
                 likelihood = likelihood, dispersion = dispersion,
                 learn_library = library_size == "learned",
                 encode_covariates = check_flag(encode_covariates, "encode_covariates"))
  d <- as_disk(x, ...)
  if (!is.null(d)) {
    return(fit_vae_disk(d, batch, categorical_covariates, continuous_covariates, config, max_epochs, batch_size, lr,
                        weight_decay, kl_warmup, early_stopping, patience, min_delta, validation_fraction, seed,
                        device, threads, progress, h5))
  }
  cnt <- as_counts(x, batch = batch, ...)
  n_cells <- ncol(cnt$counts)
  tc <- train_settings(n_cells, max_epochs, batch_size, lr, weight_decay, kl_warmup, early_stopping, patience,
                       min_delta %||% 0, validation_fraction, seed)
  tc$bf16 <- use_bf16()
  covs <- cell_covariates(cnt, categorical_covariates, continuous_covariates)
  batch_f <- cnt$batch %||% factor(rep("all", n_cells))
  # The batch's name: its metadata column, "batch" for a vector, "" for none.
  batch_name <- if (is.null(cnt$batch)) "" else if (is.character(batch) && length(batch) == 1 && n_cells != 1) batch else "batch"
  batch_arg <- factor_arg(batch_f, batch_name)

  join_group(cnt$counts, list(config, tc, covs$categorical_r, covs$continuous))
  bar <- if (check_flag(progress, "progress")) training_bar(tc$max_epochs) else NULL
  if (!is.null(bar)) on.exit(bar$done(), add = TRUE)
  cells <- colnames(cnt$counts)
  fit <- latent_into(h5, cells, config$n_latent, function(file) {
    rust(rs_fit_vae(slots(cnt), batch_arg, covs$categorical_r, covs$continuous, config, tc,
                    check_device(device), resolve_threads(threads), file, bar$update))
  })
  finish_fit(new_model(fit$ptr, cnt$counts), fit$latent, cells)
}

# Runs fit(latent_file), a glue call that trains and writes the training
# cells' latent space: into its matrix (`h5` NULL), or into dataset `latent`
# of `h5`, returned named and opened. A fit that fails takes out what it
# wrote there.
latent_into <- function(h5, cells, n_latent, fit) {
  if (is.null(h5)) return(fit(NULL))
  made <- !file.exists(h5$path)
  done <- FALSE
  on.exit(if (!done) h5_forget(h5$path, "latent", made), add = TRUE)
  res <- fit(list(path = h5$path, name = "latent"))
  res$latent <- h5_cells(h5$path, "latent", cells, paste0("latent_", seq_len(n_latent)))
  done <- TRUE
  res
}

# fit_vae(regularized = TRUE): the multimodal model on one modality. The
# batch keeps the name of its metadata column ("batch" for a vector), so
# that new cells find it there.
fit_regularized <- function(x, batch, n_latent, n_hidden, n_layers, dropout, library_size, norm, max_epochs,
                            batch_size, lr, weight_decay, kl_warmup, early_stopping, patience, min_delta,
                            validation_fraction, seed, device, threads, progress, ...) {
  cnt <- as_counts(x, batch = batch, ...)
  one <- function(v, default) if (length(v) > 1) default else v
  name <- if (is.character(batch) && length(batch) == 1 && ncol(cnt$counts) != 1) batch else "batch"
  cell_data <- data.frame(row.names = colnames(cnt$counts))
  if (!is.null(cnt$batch)) cell_data[[name]] <- cnt$batch
  fit_multimodal(structure(list(RNA = cnt$counts), cell_data = cell_data),
                 batch = if (!is.null(cnt$batch)) name,
                 n_latent = n_latent, n_hidden = n_hidden, n_layers = n_layers, dropout = dropout,
                 library_size = one(library_size, "learned"), norm = one(norm, "layer"),
                 max_epochs = max_epochs, batch_size = batch_size, lr = lr, weight_decay = weight_decay,
                 kl_warmup = kl_warmup, early_stopping = early_stopping, patience = patience,
                 min_delta = min_delta, validation_fraction = validation_fraction, seed = seed,
                 device = device, threads = threads, progress = progress)
}

# The training settings of the core's TrainConfig, checked; `max_epochs = NULL`
# is scvi-tools' rule min(round(20000 / n_cells * 400), 400).
train_settings <- function(n_cells, max_epochs, batch_size, lr, weight_decay, kl_warmup, early_stopping, patience,
                           min_delta, validation_fraction, seed) {
  check_fraction(kl_warmup, "kl_warmup", upper_open = FALSE)
  check_fraction(validation_fraction, "validation_fraction")
  check_positive(lr, "lr")
  check_positive(weight_decay, "weight_decay", zero_ok = TRUE)
  check_positive(min_delta, "min_delta", zero_ok = TRUE)
  max_epochs <- if (is.null(max_epochs)) min(round(20000 / n_cells * 400), 400) else check_count(max_epochs, "max_epochs")
  list(max_epochs = max_epochs, batch_size = check_count(batch_size, "batch_size", min = 2), lr = lr,
       weight_decay = weight_decay, kl_warmup = kl_warmup, early_stopping = check_flag(early_stopping, "early_stopping"),
       patience = check_count(patience, "patience"), min_delta = min_delta,
       validation_fraction = validation_fraction, seed = check_seed(seed))
}

# Mixed-precision training (the core's `TrainConfig::bf16`, used only on CPUs
# with native bf16): on unless options(scdistill.bf16 = FALSE). Set in the
# training settings of the models that implement it (VAE, query mapping,
# distiller, cross-species), so that the others' records do not claim it.
use_bf16 <- function() !isFALSE(getOption("scdistill.bf16"))

# Categorical and continuous covariates of the cells: column names of the
# cell metadata or a data.frame with one row per cell.
cell_covariates <- function(cnt, categorical, continuous) {
  cells <- cnt$cells %||% colnames(cnt$counts)
  take <- function(spec, arg) {
    if (is.null(spec)) return(list())
    if (is.data.frame(spec)) {
      if (nrow(spec) != length(cells)) {
        stop("`", arg, "` has ", nrow(spec), " rows but `x` has ", length(cells), " cells", call. = FALSE)
      }
      return(as.list(spec))
    }
    if (!is.character(spec)) stop("`", arg, "` must be column names or a data.frame", call. = FALSE)
    missing <- setdiff(spec, colnames(cnt$cell_data))
    if (length(missing)) {
      stop("`", arg, "`: ", paste0("'", missing, "'", collapse = ", "), " not among the cell metadata columns (",
           paste(utils_head(colnames(cnt$cell_data), 10), collapse = ", "), ")", call. = FALSE)
    }
    as.list(cnt$cell_data[spec])
  }
  cats <- take(categorical, "categorical_covariates")
  conts <- take(continuous, "continuous_covariates")
  categorical_r <- lapply(names(cats), function(nm) {
    f <- resolve_cell_factor(cats[[nm]], NULL, cells, nm)
    list(name = nm, codes = as.integer(f), levels = levels(f))
  })
  names(categorical_r) <- names(cats)
  continuous <- lapply(names(conts), function(nm) {
    v <- conts[[nm]]
    if (!is.numeric(v)) stop("continuous covariate `", nm, "` is not numeric", call. = FALSE)
    if (anyNA(v) || any(!is.finite(v))) {
      stop("continuous covariate `", nm, "` has missing or infinite values", call. = FALSE)
    }
    as.double(v)
  })
  names(continuous) <- names(conts)
  list(categorical_r = categorical_r, continuous = continuous)
}

#' @method print scdistill_vae
#' @export
print.scdistill_vae <- function(x, ...) {
  i <- x$info
  c <- i$config
  h <- x$history
  cat(sprintf("scdistill VAE: %s genes -> %d latent dimensions (%d x %d hidden), %s likelihood, %s dispersion\n",
              fmt_int(length(i$genes)), c$n_latent, c$n_layers, c$n_hidden, c$likelihood, c$dispersion))
  cat(sprintf("  trained on %s cells, %d batch(es)%s; library size %s\n", fmt_int(i$n_cells),
              length(i$batch_levels), if (length(i$categorical) + length(i$continuous)) " + covariates" else "",
              if (isTRUE(c$learn_library)) "learned" else "observed"))
  print_query_batches(i)
  if (nrow(h)) {
    state <- if (isTRUE(i$interrupted)) "interrupted" else if (isTRUE(i$stopped_early)) "stopped early" else "done"
    cat(sprintf("  %d epochs (%s), weights of epoch %d; validation -ELBO %.2f per cell; %.1f s\n",
                nrow(h), state, i$best_epoch, h$validation_elbo[max(i$best_epoch, 1)], sum(h$seconds)))
  }
  invisible(x)
}

# A cli progress bar over epochs; `update` is handed to Rust, which calls it
# on the R thread as epochs finish.
training_bar <- function(max_epochs) {
  state <- new.env()
  state$loss <- NA_real_
  state$val <- NA_real_
  id <- cli::cli_progress_bar(
    total = max_epochs, clear = FALSE, .envir = state,
    format = paste("Training {cli::pb_bar} epoch {cli::pb_current}/{cli::pb_total}",
                   "| loss {format(loss, digits = 5)} | validation -ELBO {format(val, digits = 5)} | {cli::pb_eta}"))
  list(update = function(phase, epoch, loss, val) {
         if (phase %in% names(pass_labels)) return(pass_progress(state, phase, epoch, loss))
         state$loss <- loss
         state$val <- val
         cli::cli_progress_update(id = id, set = epoch, .envir = state)
       },
       done = function() {
         if (!is.null(state$pass)) cli::cli_progress_done(id = state$pass$id, .envir = state$pass)
         cli::cli_progress_done(id = id, .envir = state)
       })
}

# Passes over the cells of counts on disk, as the core reports them: before
# training (library sizes, checks) and the latent space after it (or of
# latent()).
pass_labels <- c(scan = "Reading the counts", latent = "Encoding the cells", de = "Differential expression",
                 teacher = "Genes and PCA")

# A progress callback for the core's passes over cells (`update`, handed to
# Rust), and the end of its bar (`done`, for on.exit()).
# With options(scdistill.pass_bars = FALSE) (set by callers whose user
# asked for no progress) it shows nothing.
pass_bar <- function() {
  state <- new.env()
  if (isFALSE(getOption("scdistill.pass_bars"))) return(list(update = function(...) NULL, done = function() NULL))
  list(update = function(phase, done, total, ...) pass_progress(state, phase, done, total),
       done = function() if (!is.null(state$pass)) cli::cli_progress_done(id = state$pass$id, .envir = state$pass))
}

# A pass's progress: `done` of `total` cells, in a bar of its own (in an
# environment of its own: cli keeps one bar per environment), ended when
# the pass ends.
pass_progress <- function(state, phase, done, total) {
  if (is.null(state$pass)) {
    pass <- new.env()
    # A whole number, so that cli writes 1000000 rather than 1e+06.
    pass$id <- cli::cli_progress_bar(total = as.integer(round(total)), clear = TRUE, .envir = pass,
                                     format = paste(pass_labels[[phase]], "{cli::pb_bar} {cli::pb_current}/{cli::pb_total}",
                                                    "cells | {cli::pb_eta}"))
    state$pass <- pass
  }
  cli::cli_progress_update(id = state$pass$id, set = as.integer(round(done)), .envir = state$pass)
  if (done >= total) {
    cli::cli_progress_done(id = state$pass$id, .envir = state$pass)
    state$pass <- NULL
  }
  invisible(NULL)
}
