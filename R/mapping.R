# Query-to-reference mapping (scArches architectural surgery).

#' Map new samples onto a trained reference model
#'
#' Adds the batches of `query` to a trained model as new batch levels and
#' trains only what belongs to them, the way scArches (and scvi-tools'
#' `load_query_data()`) map a query onto a reference: every weight of the
#' reference stays exactly as it was, so the reference cells' latent space
#' does not move and the query is placed in it. Labels, clusters and
#' embeddings computed on the reference carry over to the query.
#'
#' What is trained, by kind of model:
#' * `fit_vae()` models: the new columns of every layer that reads the
#'   batch (the decoder's; the encoder's too when the model was fitted with
#'   `encode_covariates = TRUE`), and the new batches' per-batch parameters
#'   (gene-batch dispersion, library-size prior). With the default
#'   `encode_covariates = FALSE` the encoder is batch-free: the query's
#'   latent space is the reference encoder's, and mapping teaches the
#'   decoder the query's batch effect (for `normalized_expression()`,
#'   `elbo()`, `sample_counts()` and DE of the query).
#' * `distill()` models: the encoder is batch-free, so mapping adds one row
#'   to the decoder's batch embedding and trains that row only.
#' * `fit_multimodal()` and cross-species models are not mapped yet (an
#'   error says so).
#'
#' New slots start at the average of the reference batches' (scvi-tools
#' starts them at random); `train_decoder_first_layer = TRUE` also trains
#' the decoder's first layer, as scvi-tools' `freeze_decoder_first_layer =
#' FALSE` (the reference cells then decode slightly differently, but their
#' latent space still does not move).
#'
#' Genes are matched by name. Reference genes missing from the query are
#' filled with zeros when they are at most `max_missing_genes` of the
#' model's genes (with a warning), as scvi-tools' `prepare_query_anndata()`
#' does; beyond that the query is refused, because an encoder reading many
#' zeroed genes places cells wrongly rather than failing visibly.
#'
#' @param model A model from [fit_vae()] or [distill()] (or an earlier
#'   `map_query()`).
#' @param query The query cells' counts (`SingleCellExperiment`, `Seurat`,
#'   `dgCMatrix`, ...).
#' @param batch The query's batch: a column of its cell metadata or one
#'   value per cell; defaults to the model's batch column when `query` has
#'   it. Every query batch must be new to the model.
#' @param max_epochs Epochs over the query; `NULL`: scvi-tools' rule for
#'   the query's size.
#' @param train_decoder_first_layer Also train the decoder's first layer.
#' @param max_missing_genes Largest fraction of the model's genes the query
#'   may lack (filled with zeros).
#' @param batch_size,lr,weight_decay,early_stopping,patience,validation_fraction,seed
#'   Training settings, as in [fit_vae()]; `weight_decay` defaults to 0 as
#'   scArches recommends for query training.
#' @param threads,progress As in [fit_vae()].
#' @param train A [train_params()] object instead of the settings above.
#' @param ... Passed to [as_counts()] (`assay.type`, `assay`).
#' @return A model of the same kind, whose batches are the reference's plus
#'   the query's (`model$info$query_batches`), holding the query's latent
#'   space (`latent(mapped)`) and, when known, the reference's
#'   (`mapped$reference_latent`).
#' @seealso [fit_labels()] to carry the reference's cell types to the query.
#' @examples
#' sim <- simulate_counts(n_cells = 900, n_genes = 300, n_batches = 3, seed = 1)
#' ref <- sim[, sim$batch != "Batch3"]
#' query <- sim[, sim$batch == "Batch3"]
#' model <- fit_vae(ref, batch = "batch", max_epochs = 20, threads = 2)
#' mapped <- map_query(model, query, batch = "batch", max_epochs = 20, threads = 2)
#' mapped
#' # The reference cells' latent space is unchanged:
#' identical(latent(mapped, ref), latent(model, ref))
#' @export
map_query <- function(model, query, batch = NULL, max_epochs = NULL, train_decoder_first_layer = FALSE,
                      max_missing_genes = 0.1, batch_size = 128, lr = 1e-3, weight_decay = 0,
                      early_stopping = TRUE, patience = 45, validation_fraction = 0.1, seed = 0, threads = NULL,
                      progress = interactive(), train = NULL, ...) {
  check_model(model)
  if (!inherits(model, c("scdistill_vae", "scdistill_distill"))) {
    stop("map_query() is not available for ", class(model)[1], " models yet: it maps fit_vae() and distill() ",
         "models", call. = FALSE)
  }
  apply_train_params(train, environment(), names(match.call())[-1], "map_query")
  check_fraction(max_missing_genes, "max_missing_genes", upper_open = FALSE)
  cnt <- as_counts(query, ...)
  cnt <- pad_missing_genes(cnt, model, max_missing_genes)
  batch_col <- model$covariates$batch
  if (is.null(batch) && !is.null(batch_col) && batch_col %in% colnames(cnt$cell_data)) batch <- batch_col
  if (is.null(batch)) {
    stop("give the query's batch (`batch =`): a column of its cell metadata or one value per cell; each query ",
         "batch becomes a new batch of the model", call. = FALSE)
  }
  cells <- model_cells(model, cnt, batch = batch)
  n_cells <- length(cells$cells)
  tc <- train_settings(n_cells, max_epochs, batch_size, lr, weight_decay, 0, early_stopping, patience, 0,
                       validation_fraction, seed)
  opts <- list(train_decoder_first_layer = check_flag(train_decoder_first_layer, "train_decoder_first_layer"))
  bar <- if (check_flag(progress, "progress")) training_bar(tc$max_epochs) else NULL
  if (!is.null(bar)) on.exit(bar$done(), add = TRUE)
  fit <- rust(rs_model_map_query(model_ptr(model), cells, opts,
                                 tc, resolve_threads(threads), bar$update))
  mapped <- finish_fit(new_model(fit$ptr, cnt$counts), fit$latent, cells$cells)
  mapped$reference_latent <- if (!is.null(model$reference_latent)) rbind(model$reference_latent, model$latent) else
    model$latent
  mapped
}

# The query's counts with the model's missing genes added as zero rows, when
# they are few enough; an error naming them otherwise.
pad_missing_genes <- function(cnt, model, max_missing) {
  needed <- unique(c(unlist(model$info$input_genes), model_features(model)))
  missing <- setdiff(needed, rownames(cnt$counts))
  if (!length(missing)) return(cnt)
  frac <- length(missing) / length(needed)
  shown <- paste0("'", utils_head(missing, 5), "'", collapse = ", ")
  if (frac > max_missing) {
    stop(sprintf("the query lacks %s of the model's %s genes (%.0f%%, more than `max_missing_genes` = %.0f%%): %s",
                 fmt_int(length(missing)), fmt_int(length(needed)), 100 * frac, 100 * max_missing, shown),
         call. = FALSE)
  }
  warning(sprintf("the query lacks %s of the model's %s genes (%.1f%%); they are read as zeros: %s",
                  fmt_int(length(missing)), fmt_int(length(needed)), 100 * frac, shown), call. = FALSE)
  zeros <- Matrix::sparseMatrix(i = integer(), j = integer(), x = numeric(), dims = c(length(missing), ncol(cnt$counts)),
                                dimnames = list(missing, colnames(cnt$counts)))
  cnt$counts <- rbind(cnt$counts, zeros)
  cnt
}

# The line print() adds for a mapped model.
print_query_batches <- function(info) {
  q <- unlist(info$query_batches)
  if (length(q)) {
    cat(sprintf("  mapped onto the reference (map_query()): query batch%s %s; the training record is the query's\n",
                if (length(q) > 1) "es" else "", paste(utils_head(q, 5), collapse = ", ")))
  }
}
