# Trained models: the S3 class `scdistill_model`, its generics and files.
#
# A model is a list holding an environment with the Rust external pointer,
# the model file's bytes (so that saveRDS()/readRDS() and new sessions work:
# the pointer is restored from them when needed), and the model's
# description from the core. Its class is c("scdistill_<kind>",
# "scdistill_model"); every accessor is an S3 generic with a method where a
# kind of model differs, and one pointer type and one set of `rs_model_*`
# routines serve every kind.

# A model object around a fitted model's pointer; `data` is the training
# data (its fingerprint lets add_latent() reuse the training latent space).
new_model <- function(ptr, data = NULL) {
  info <- rs_model_info(ptr)
  state <- new.env(parent = emptyenv())
  state$ptr <- ptr
  model <- list(state = state, bytes = rs_model_bytes(ptr), info = info,
                history = as.data.frame(info$history %||% list()),
                covariates = list(batch = if (nzchar(info$batch_name %||% "")) info$batch_name,
                                  batch_given = nzchar(info$batch_name %||% ""),
                                  categorical = vapply(info$categorical %||% list(), `[[`, "", 1),
                                  continuous = as.character(unlist(info$continuous))),
                # Cells held out for validation (indices into the training data).
                validation_cells = as.integer(unlist(info$validation_cells)) + 1L,
                fingerprint = if (!is.null(data)) data_fingerprint(data))
  class(model) <- c(paste0("scdistill_", info$kind), "scdistill_model")
  if (identical(info$kind, "species")) model <- species_fields(model)
  model
}

# The live external pointer, rebuilt from the stored bytes after
# readRDS() or in a new session.
model_ptr <- function(model) {
  ptr <- model$state$ptr
  if (is.null(ptr) || identical(ptr, methods::new("externalptr"))) {
    ptr <- rust(rs_model_from_bytes(model$bytes, model$device %||% "auto"))
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

# What a freshly trained model's R object needs after training: the
# training latent space, a warning or an error for an interrupted or
# diverged run.
finish_fit <- function(model, latent, cells) {
  # A multimodal model's latent comes as list(joint, parts).
  # One on disk (distill(h5_file =)) comes named.
  model$latent <- if (is.matrix(latent)) latent_matrix(latent, cells, ncol(latent)) else
    if (is(latent, "DelayedMatrix")) latent else multimodal_latents(latent, cells, model)
  i <- model$info
  diverged <- unlist(i$diverged_at)
  if (length(diverged)) {
    where <- if (length(diverged) == 2) paste0("epoch ", diverged[2], " of the ", diverged[1]) else
      paste("epoch", diverged)
    stop(errorCondition(
      paste0("the training loss became infinite or NaN at ", where, "; try a smaller `lr` (it was ",
             format(i$train$lr %||% i$train_encoder$lr), "). The model with the weights of the epoch before is in ",
             "the error's `model` field: tryCatch(..., scdistill_diverged = function(e) e$model)"),
      class = "scdistill_diverged", model = model, call = NULL))
  }
  if (isTRUE(i$interrupted)) {
    msg <- paste0("training was interrupted; the model keeps the weights of epoch ",
                  i$best_epoch %||% i$best_epoch_encoder)
    if (identical(on_interrupt(), "stop")) {
      stop(errorCondition(paste0(msg, ". (In a script an interrupt stops it; with ",
                                 "options(scdistill.on_interrupt = \"keep\") the model would be returned.)"),
                          class = c("scdistill_interrupted", "interrupt"), model = model, call = NULL))
    }
    warning(msg, call. = FALSE)
  }
  model
}

# "keep" (return the partly trained model with a warning; the default in
# interactive sessions) or "stop" (an error of class "interrupt", so a
# batch script stops; the default otherwise).
on_interrupt <- function() {
  v <- getOption("scdistill.on_interrupt", if (interactive()) "keep" else "stop")
  if (!identical(v, "keep") && !identical(v, "stop")) {
    stop("options(scdistill.on_interrupt) must be \"keep\" or \"stop\"", call. = FALSE)
  }
  v
}

# A cheap identity of a count matrix (or of a list of them): dimensions,
# names, and two sums over its values. Two data sets with the same cell
# names (10x barcodes repeat across samples) differ here.
data_fingerprint <- function(m) {
  if (is.list(m) && !is(m, "Matrix")) return(lapply(m, data_fingerprint))
  # The weighted sum in chunks of 2^22 counts: over the whole matrix its
  # temporaries took 28 bytes per stored count (5 GB for 2*10^8) at the
  # end of every fit.
  n <- length(m@x)
  weighted <- 0
  for (from in seq_len(ceiling(n / 2^22)) * 2^22 - 2^22 + 1) {
    k <- from:min(n, from + 2^22 - 1)
    weighted <- weighted + sum(m@x[k] * (as.numeric(m@i[k] %% 7919L) + 1))
  }
  list(dim = dim(m), cells = colnames(m), genes = rownames(m), nnz = n, sum = sum(m@x), weighted = weighted,
       p = sum(as.numeric(m@p)))
}

# The training latent space when `data` is the training data itself (in
# memory: one in a file, from distill(h5_file =), is read).
cached_latent <- function(model, data) {
  if (!is.null(model$latent) && !is.null(model$fingerprint) && identical(data_fingerprint(data), model$fingerprint)) {
    if (is(model$latent, "DelayedMatrix")) as.matrix(model$latent) else model$latent
  }
}

# The cells a model reads, as the glue takes them: list(counts = list of
# count slot lists, batch, categorical, continuous, cells).
model_cells <- function(model, x, batch = NULL, ...) UseMethod("model_cells")

#' @export
model_cells.scdistill_model <- function(model, x, batch = NULL, ...) {
  if (is.null(x)) stop("pass `x`, the counts of the cells", call. = FALSE)
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
  list(counts = list(slots(cnt)), batch = b,
       categorical = lapply(cov$categorical, function(nm) as.character(column(nm))),
       continuous = stats::setNames(lapply(cov$continuous, function(nm) as.double(column(nm))), cov$continuous),
       cells = colnames(cnt$counts))
}

# The features a model decodes (of one modality for a multimodal model).
model_features <- function(model, modality = NULL) UseMethod("model_features")

#' @export
model_features.scdistill_model <- function(model, modality = NULL) model$info$genes

#' Latent representation of cells
#'
#' The posterior mean (or a draw) of each cell's latent position. Without
#' `x`, the latent space of the cells the model was trained on; with `x`,
#' of new cells measured on the same genes (matched by name; extra genes are
#' ignored, missing ones are an error).
#'
#' @param model A `scdistill_model`.
#' @param x `NULL` or counts of cells to place (see [as_counts()]); for
#'   a VAE or a distilled model also counts on disk (see [h5_counts()]):
#'   a VAE streams them in blocks, a distilled model reads blocks of 20,000
#'   cells in turn.
#' @param batch Batch of the cells of `x` (a column of the cell metadata or
#'   one value per cell), needed only by models that encode covariates; by
#'   default the column the model was trained with.
#' @param give_mean The posterior mean (default) or one draw from q(z | x).
#'   A distilled model's encoder is deterministic: it refuses draws.
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
latent <- function(model, x = NULL, ...) {
  check_model(model)
  UseMethod("latent")
}

#' @rdname latent
#' @export
latent.scdistill_model <- function(model, x = NULL, batch = NULL, give_mean = TRUE, seed = 0, threads = NULL, ...) {
  give_mean <- check_flag(give_mean, "give_mean")
  if (is.null(x) && give_mean && !is.null(model$latent)) return(model$latent)
  if (is.null(x)) {
    stop("pass `x`, the counts of the cells (the model keeps the latent space of its training cells only ",
         "in the session it was trained in, and draws always need the counts)", call. = FALSE)
  }
  d <- as_disk(x, ...)
  if (!is.null(d)) return(latent_disk(model, d, batch, give_mean, seed, threads))
  cells <- model_cells(model, x, batch, ...)
  z <- rust(rs_model_latent(model_ptr(model), cells, list(give_mean = give_mean, seed = check_seed(seed)),
                            resolve_threads(threads)))
  latent_matrix(z$joint, cells$cells, ncol(z$joint))
}

#' Normalized and batch-corrected expression
#'
#' The model's expected expression of every gene in every cell of `x`:
#' the decoded proportions ρ times `library_size`. With `transform_batch`,
#' each cell is decoded as if it had been measured in that batch
#' (counterfactual decoding), averaged over the batches when several are
#' given: this is batch-corrected expression. Without it, each cell is
#' decoded in its own batch (given by `batch`, or the model's batch column
#' in the cell metadata of `x`).
#'
#' `transform_batch` is scvi-tools' name; [corrected_expression()]'s
#' `reference_batch` is the same idea for a distilled model (it calls this
#' function with `transform_batch = reference_batch`, on the log2 CPM scale
#' by default).
#'
#' Counts on disk (see [h5_counts()]; for a multimodal model, paired files
#' as [fit_multimodal()] takes them) are read in blocks of 20,000 cells,
#' so they are never all in memory. The result is a dense matrix in memory
#' (8 bytes a value), and a call whose result would pass
#' `options(scdistill.max_dense_gb)` (default 16 GB) stops and says so,
#' unless it goes to a file: with `h5_file`, each block is written to that
#' HDF5 file as it is decoded (4 bytes a value) and the result is an
#' HDF5-backed `DelayedMatrix` (package HDF5Array) that can be used, or
#' put in an assay, like a matrix without ever being in memory; later,
#' `HDF5Array::HDF5Array(h5_file, h5_name)` opens it again, names included.
#' With `n_samples > 1`, block k draws from `seed + k - 1`.
#'
#' (Named `normalized_expression()` rather than `expression()`, which would
#' mask base R's `expression()` used in plot labels.)
#'
#' @inheritParams latent
#' @param x Counts of the cells (see [as_counts()]; or counts on disk, see
#'   [h5_counts()]), usually the data the model was trained on.
#' @param batch Batch of the cells of `x`: a column of the cell metadata or
#'   one value per cell; by default the column the model was trained with.
#' @param transform_batch `NULL` (each cell's own batch) or one or more
#'   batch levels to decode every cell to. For a multimodal model, the
#'   levels of its batch (ambient) covariate.
#' @param library_size Scale of the output: 1 gives proportions, 1e4 counts
#'   per 10,000.
#' @param n_samples Draws from q(z | x) to average (1: the posterior mean).
#'   A distilled model is deterministic and refuses more than 1.
#' @param log1p Return log1p of the values.
#' @param genes Genes (features) to return, as names or positions; default
#'   all. With many cells, a subset keeps the dense result small: counts on
#'   disk are decoded block by block and only these rows kept.
#' @param seed Seed of the draws when `n_samples > 1`.
#' @param modality For a multimodal model: the modality to decode (default:
#'   the first, RNA); its normalized accessibility for ATAC.
#' @param ambient For a multimodal model: include the ambient background
#'   (default `FALSE`: what the cell itself expresses).
#' @param h5_file `NULL` (the result in memory) or an HDF5 file to write the
#'   result to, block by block: a new file, or an existing HDF5 file that
#'   gets one more dataset (an existing dataset is never overwritten).
#' @param h5_name The dataset's name in `h5_file`.
#' @return A genes × cells dense matrix; with `h5_file`, an HDF5-backed
#'   `DelayedMatrix` of the same values (stored as 4-byte floats).
#' @examples
#' sce <- example_cellbench()
#' model <- fit_vae(sce[1:500, ], batch = "batch", max_epochs = 20, threads = 2)
#' rho <- normalized_expression(model, sce[1:500, ], transform_batch = "p1", library_size = 1e4)
#' rho[1:3, 1:3]
#' # The same written to an HDF5 file as it is decoded, kept out of memory:
#' if (requireNamespace("HDF5Array", quietly = TRUE)) {
#'   file <- tempfile(fileext = ".h5")
#'   on_disk <- normalized_expression(model, sce[1:500, ], transform_batch = "p1", library_size = 1e4,
#'                                    h5_file = file)
#'   print(on_disk[1:3, 1:3])
#' }
#' @export
normalized_expression <- function(model, x, ...) {
  check_model(model)
  UseMethod("normalized_expression")
}

#' @rdname normalized_expression
#' @export
normalized_expression.scdistill_model <- function(model, x, batch = NULL, transform_batch = NULL, library_size = 1,
                                                  n_samples = 1, log1p = FALSE, seed = 0, threads = NULL,
                                                  genes = NULL, h5_file = NULL, h5_name = "normalized", ...) {
  expression_of(model, x, batch, list(transform_batch = transform_batch, library_size = library_size,
                                      n_samples = n_samples, seed = seed), log1p, threads, genes = genes,
                h5 = h5_target(h5_file, h5_name), ...)
}

# The decoded expression of `cells` under `opts` (checked here), features x cells.
# With `h5` (from h5_target()), the result goes to that HDF5 dataset block by
# block and comes back as an HDF5-backed DelayedMatrix.
expression_of <- function(model, x, batch, opts, log1p, threads, modality = NULL, genes = NULL, h5 = NULL, ...) {
  check_positive(opts$library_size, "library_size")
  opts$n_samples <- check_count(opts$n_samples, "n_samples")
  opts$seed <- check_seed(opts$seed)
  if (!is.null(opts$transform_batch)) opts$transform_batch <- as.character(opts$transform_batch)
  log1p <- check_flag(log1p, "log1p")
  threads <- resolve_threads(threads)
  features <- model_features(model, modality)
  keep <- if (!is.null(genes)) feature_index(genes, features) else seq_along(features)
  decode <- function(cells, opts) {
    # Named in place: `dimnames<-` would copy all of it (the call still holds it).
    out <- shape_in_place(rust(rs_model_expression(model_ptr(model), cells, opts, threads)),
                          dimnames = list(features, cells$cells))
    if (length(keep) < length(features)) out <- out[keep, , drop = FALSE]
    if (log1p) log1p(out) else out
  }
  src <- disk_source(model, x, ...)
  if (is.null(src)) {
    m <- decode(model_cells(model, x, batch, ...), opts)
    return(if (is.null(h5)) m else h5_write_matrix(h5, m))
  }
  if (is.null(h5)) {
    check_dense_size(length(keep), src$n_cells)
  } else {
    sink <- h5_sink(h5, length(keep), src$n_cells)
    on.exit(sink$abandon(), add = TRUE)
  }
  # Counts on disk: blocks of cells read in turn, block k drawing from seed + k - 1.
  parts <- src$blocks(batch, "Decoding the cells", function(part, b, at, k) {
    m <- decode(model_cells(model, part, b), utils::modifyList(opts, list(seed = opts$seed + k - 1)))
    if (is.null(h5)) return(m)
    sink$write(m, at[1])
    colnames(m)
  })
  if (is.null(h5)) do.call(cbind, parts) else sink$finish(features[keep], unlist(parts))
}

# Counts on disk as the block readers take them: `n_cells`, and
# `blocks(batch, label, f)`, which calls f(part, batch, at, k) on blocks of
# cells read in turn, k = 1, 2, ... the block's number (for_blocks(); for a
# multimodal model, its paired modalities read in step, multimodal_blocks()).
# NULL when `x` is in memory.
disk_source <- function(model, x, ...) {
  if (inherits(model, "scdistill_multimodal")) {
    mo <- multimodal_disk(x, modality_names(model))
    if (is.null(mo)) return(NULL)
    return(list(n_cells = length(mo$cells),
                blocks = function(batch, label, f) multimodal_blocks(mo, batch, label, numbered(f))))
  }
  d <- as_disk(x, ...)
  if (is.null(d)) return(NULL)
  list(n_cells = d$n_cells, blocks = function(batch, label, f) for_blocks(d, batch, label, numbered(f)))
}

# `f` with the number of the call (1, 2, ...) as one more, last argument:
# the readers call it on their blocks in order.
numbered <- function(f) {
  k <- 0L
  function(...) {
    k <<- k + 1L
    f(..., k)
  }
}

# The positions of `genes` (names or positions) among `features`; unknown
# ones are an error naming them.
feature_index <- function(genes, features) {
  if (is.numeric(genes)) {
    bad <- genes[is.na(genes) | genes != round(genes) | genes < 1 | genes > length(features)]
    if (length(bad)) stop("`genes`: positions must be 1 to ", length(features), "; got ", bad[1], call. = FALSE)
    return(as.integer(genes))
  }
  if (!is.character(genes) || !length(genes)) stop("`genes` must be gene names or positions", call. = FALSE)
  idx <- match(genes, features)
  if (anyNA(idx)) {
    missing <- genes[is.na(idx)]
    stop("`genes`: ", length(missing), " not among the model's ", length(features), " genes (first: '", missing[1],
         "')", call. = FALSE)
  }
  idx
}

# Stops before a dense features x cells result that would take more than
# `getOption("scdistill.max_dense_gb", 16)` GB (8 bytes a value).
check_dense_size <- function(n_features, n_cells) {
  gb <- 8 * as.numeric(n_features) * n_cells / 1e9
  limit <- getOption("scdistill.max_dense_gb", 16)
  if (gb > limit) {
    stop(sprintf(paste("the result would be a dense %s x %s matrix (%.1f GB, more than",
                       "options(scdistill.max_dense_gb = %s)): write it to a file with `h5_file =`,",
                       "ask for fewer genes (`genes =`) or cells, e.g. as_counts(h5_counts(file), cells = ...),",
                       "or raise the option"),
                 fmt_int(n_features), fmt_int(n_cells), gb, format(limit)), call. = FALSE)
  }
}

#' Posterior predictive counts
#'
#' Draws counts from the model for the cells of `x`: a latent position from
#' q(z | x), then counts from the observation model (NB as a Gamma-Poisson
#' mixture, zeros added for ZINB). Useful for posterior predictive checks.
#' Available for VAEs from [fit_vae()] (not `regularized = TRUE`); other
#' models say so. Counts on disk (see [h5_counts()]) are read in blocks of
#' 20,000 cells, block k drawing from `seed + k - 1`.
#'
#' The draws of an atlas do not fit in memory any more than its counts do:
#' with `h5ad_file`, each block's draws are appended to AnnData `.h5ad`
#' files (one per draw, cells × genes CSR, as [write_h5ad()] writes) as they
#' are made, and only the current block is ever held. The files read back
#' like any counts on disk, with the same draws as in memory for the same
#' seed.
#'
#' @inheritParams normalized_expression
#' @param n_samples Number of count matrices to draw.
#' @param h5ad_file `NULL` (the draws in memory) or new `.h5ad` files to
#'   write them to, one per draw (`n_samples` paths); existing files are
#'   never overwritten, and a file left unfinished by an error is removed.
#' @return A genes × cells `dgCMatrix`, or a list of them when `n_samples >
#'   1`; with `h5ad_file`, [h5_counts()] descriptions of the files (a list
#'   of them when `n_samples > 1`).
#' @examples
#' sce <- example_cellbench()
#' model <- fit_vae(sce[1:500, ], batch = "batch", likelihood = "nb", max_epochs = 20, threads = 2)
#' sim <- sample_counts(model, sce[1:500, ])
#' summary(Matrix::colSums(sim) / Matrix::colSums(SingleCellExperiment::counts(sce[1:500, ])))
#' # Written to a file as they are drawn, and read back:
#' f <- tempfile(fileext = ".h5ad")
#' on_disk <- sample_counts(model, sce[1:500, ], h5ad_file = f)
#' all.equal(as_counts(on_disk)$counts, sim)
#' @export
sample_counts <- function(model, x, ...) {
  check_model(model)
  UseMethod("sample_counts")
}

#' @rdname sample_counts
#' @export
sample_counts.scdistill_model <- function(model, x, batch = NULL, n_samples = 1, seed = 0, threads = NULL,
                                          h5ad_file = NULL, ...) {
  n_samples <- check_count(n_samples, "n_samples")
  seed <- check_seed(seed)
  threads <- resolve_threads(threads)
  files <- h5ad_targets(h5ad_file, n_samples)
  features <- model_features(model)
  if (!is.null(files)) {
    done <- FALSE
    on.exit(if (!done) unlink(files), add = TRUE)
    for (f in files) rust(rs_h5ad_create(f, length(features)))
  }
  # One block's draws: kept as matrices, or appended to the files and
  # dropped (then only the cells' names are kept).
  draw <- function(cells, seed) {
    draws <- rust(rs_model_sample(model_ptr(model), cells, n_samples, seed, threads))
    if (is.null(files)) return(lapply(draws, csr_to_dgc, features = features, cells = cells$cells))
    for (s in seq_along(files)) rust(rs_h5ad_append(files[s], length(features), draws[[s]]))
    cells$cells
  }
  src <- disk_source(model, x, ...)
  parts <- if (is.null(src)) {
    list(draw(model_cells(model, x, batch, ...), seed))
  } else {
    # Blocks of cells read in turn, block k drawing from seed + k - 1.
    src$blocks(batch, "Drawing counts", function(part, b, at, k) draw(model_cells(model, part, b), seed + k - 1))
  }
  out <- if (!is.null(files)) {
    for (f in files) rust(rs_h5ad_finish(f, length(features), unlist(parts), features))
    done <- TRUE
    lapply(files, h5_counts)
  } else if (length(parts) == 1) {
    parts[[1]]
  } else {
    lapply(seq_len(n_samples), function(s) do.call(cbind, lapply(parts, `[[`, s)))
  }
  if (n_samples == 1) out[[1]] else out
}

#' Evidence lower bound on (held-out) cells
#'
#' `elbo()` is the mean negative ELBO per cell (lower is better) of the
#' cells of `x` under the model, with one draw from q(z | x) per cell as in
#' scvi-tools' `get_elbo()`; `reconstruction_error()` is its reconstruction
#' part, -log p(x | z). Use them on held-out cells, e.g.
#' `x[, model$validation_cells]`, the cells held out during training.
#' Counts on disk (see [h5_counts()]; for a multimodal model, paired files
#' as [fit_multimodal()] takes them) are read in blocks of 20,000 cells,
#' block k drawing z from `seed + k - 1`, so the value equals the one in
#' memory up to the Monte Carlo error of those draws.
#' A distilled model has no ELBO (its encoder is not variational) and says so.
#'
#' @inheritParams normalized_expression
#' @return A number.
#' @examples
#' sce <- example_cellbench()
#' model <- fit_vae(sce[1:500, ], batch = "batch", max_epochs = 20, threads = 2)
#' elbo(model, sce[1:500, model$validation_cells])
#' @export
elbo <- function(model, x, ...) {
  check_model(model)
  UseMethod("elbo")
}

#' @rdname elbo
#' @export
elbo.scdistill_model <- function(model, x, batch = NULL, seed = 0, threads = NULL, ...) {
  elbo_parts(model, x, batch, seed, threads, ...)[["elbo"]]
}

#' @rdname elbo
#' @export
reconstruction_error <- function(model, x, batch = NULL, seed = 0, threads = NULL, ...) {
  check_model(model)
  elbo_parts(model, x, batch, seed, threads, ...)[["reconstruction"]]
}

elbo_parts <- function(model, x, batch, seed, threads, ...) {
  src <- disk_source(model, x, ...)
  if (!is.null(src)) return(elbo_blocks(model, src, batch, seed, threads))
  cells <- model_cells(model, x, batch, ...)
  v <- rust(rs_model_elbo(model_ptr(model), cells, check_seed(seed), resolve_threads(threads)))
  c(elbo = v[1], reconstruction = v[2], kl = v[3])
}

#' Store a model's latent space in a SingleCellExperiment or Seurat object
#'
#' The training latent space is reused when `x` is the training data itself
#' (same counts, not merely the same cell names); otherwise the cells of `x`
#' are placed with [latent()].
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
  UseMethod("add_latent", model)
}

#' @rdname add_latent
#' @export
add_latent.scdistill_vae <- function(x, model, name = NULL, ...) {
  write_back(x, latent_of_object(model, x, ...), name %||% "scVI")
}

#' @rdname add_latent
#' @export
add_latent.scdistill_distill <- function(x, model, name = NULL, ...) {
  write_back(x, latent_of_object(model, x, ...), name %||% "scDistill")
}

# The latent space of the cells of `x`: the training one when `x` is the training data.
latent_of_object <- function(model, x, ...) {
  d <- as_disk(x)
  if (!is.null(d)) {
    if (!is.null(model$latent) && identical(disk_fingerprint(d), model$fingerprint)) return(model$latent)
    return(latent(model, d, ...))
  }
  cnt <- as_counts(x)
  cached_latent(model, cnt$counts) %||% latent(model, cnt, ...)
}

#' Save and load models
#'
#' `save_model()` writes a single file: the weights in safetensors format
#' (readable with Python's `safetensors`), with the architecture, genes,
#' covariate levels and training history in its header. `load_model()`
#' reads it back, whatever the kind of model. Models also survive
#' `saveRDS()`/`readRDS()`.
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
  UseMethod("save_model")
}

#' @rdname save_model
#' @export
save_model.scdistill_model <- function(model, path, overwrite = FALSE) {
  if (!is.character(path) || length(path) != 1 || is.na(path) || !nzchar(path)) {
    stop("`path` must be one file name", call. = FALSE)
  }
  if (dir.exists(path)) stop("'", path, "' is a folder; give a file name inside it", call. = FALSE)
  if (file.exists(path) && !check_flag(overwrite, "overwrite")) {
    stop("'", path, "' exists; use `overwrite = TRUE` to replace it", call. = FALSE)
  }
  folder <- dirname(path)
  if (!dir.exists(folder)) stop("cannot write '", path, "': the folder '", folder, "' does not exist", call. = FALSE)
  if (file.access(folder, 2) != 0) stop("cannot write '", path, "': the folder '", folder, "' is not writable", call. = FALSE)
  ok <- tryCatch({ writeBin(model$bytes, path); TRUE }, error = function(e) conditionMessage(e))
  if (!isTRUE(ok)) stop("cannot write '", path, "': ", ok, call. = FALSE)
  invisible(path)
}

#' @rdname save_model
#' @export
load_model <- function(path, device = "auto") {
  if (!is.character(path) || length(path) != 1 || is.na(path)) stop("`path` must be one file name", call. = FALSE)
  if (dir.exists(path)) stop("'", path, "' is a folder, not a model file", call. = FALSE)
  if (!file.exists(path)) stop("no file '", path, "'", call. = FALSE)
  if (file.access(path, 4) != 0) stop("cannot read '", path, "': permission denied", call. = FALSE)
  bytes <- readBin(path, "raw", n = file.size(path))
  ptr <- tryCatch(rs_model_from_bytes(bytes, check_device(device)),
                  error = function(e) stop("cannot load '", path, "': ", conditionMessage(e), call. = FALSE))
  model <- new_model(ptr)
  model$device <- device
  model
}

#' @method summary scdistill_model
#' @export
summary.scdistill_model <- function(object, ...) {
  i <- object$info
  h <- object$history
  best <- h[max(i$best_epoch, 1), , drop = FALSE]
  # A multimodal model counts the features of every modality; its batches are the ambient key's levels.
  multi <- identical(i$kind, "multimodal")
  n_features <- if (multi) sum(lengths(i$features)) else length(i$genes)
  config <- i$config
  config$modalities <- NULL
  structure(list(config = unlist(config), train = unlist(i$train), genes = n_features,
                 features = if (multi) "features" else "genes",
                 cells = i$n_cells, batches = i$batch_levels %||% i$ambient$levels, epochs = nrow(h),
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
  which <- choose_arg(which, "which")
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

# The glue's latent of the cells `cells` named (and given the attributes in
# `...`) in place: a copy would take 400 MB at 10^6 cells and 50
# dimensions, at the end of every fit.
latent_matrix <- function(values, cells, n_latent, ...) {
  shape_in_place(values, if (!is.matrix(values)) c(length(values) %/% n_latent, n_latent),
                 list(cells, paste0("latent_", seq_len(n_latent))), ...)
}
