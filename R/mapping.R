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
#' * `fit_multimodal()` models (and `fit_vae(regularized = TRUE)`): every
#'   covariate key made from the batch (by default the ambient profile, the
#'   dispersion and the library-size prior; the decoder's or encoders'
#'   inputs too when the batch was given there) gains the query's batches;
#'   the new ambient profiles and library priors start from the query's own
#'   data, as training starts them. Features are matched by name in every
#'   modality, and none may be missing.
#' * Cross-species models are not mapped (an error says so).
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
#' @param model A model from [fit_vae()], [distill()] or [fit_multimodal()]
#'   (or an earlier `map_query()`).
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
  if (!inherits(model, c("scdistill_vae", "scdistill_distill", "scdistill_multimodal"))) {
    stop("map_query() is not available for ", class(model)[1], " models yet: it maps fit_vae(), distill() and ",
         "fit_multimodal() models", call. = FALSE)
  }
  apply_train_params(train, environment(), names(match.call())[-1], "map_query")
  check_fraction(max_missing_genes, "max_missing_genes", upper_open = FALSE)
  q <- if (inherits(model, "scdistill_multimodal")) multimodal_query(model, query, batch) else
    single_query(model, query, batch, max_missing_genes, ...)
  cells <- q$cells
  n_cells <- length(cells$cells)
  tc <- train_settings(n_cells, max_epochs, batch_size, lr, weight_decay, 0, early_stopping, patience, 0,
                       validation_fraction, seed)
  # The multimodal model trains in f32 (see ?scdistill, "Precision").
  tc$bf16 <- use_bf16() && !inherits(model, "scdistill_multimodal")
  opts <- list(train_decoder_first_layer = check_flag(train_decoder_first_layer, "train_decoder_first_layer"))
  bar <- if (check_flag(progress, "progress")) training_bar(tc$max_epochs) else NULL
  if (!is.null(bar)) on.exit(bar$done(), add = TRUE)
  fit <- rust(rs_model_map_query(model_ptr(model), cells, opts,
                                 tc, resolve_threads(threads), bar$update))
  mapped <- new_model(fit$ptr, q$data)
  mapped$covariates$batch <- model$covariates$batch
  mapped <- finish_fit(mapped, fit$latent, cells$cells)
  mapped$reference_latent <- if (!is.null(model$reference_latent)) rbind(model$reference_latent, model$latent) else
    model$latent
  mapped
}

# The query's cells as the glue takes them, and its counts (for the
# fingerprint that lets latent() reuse the query's latent space).
single_query <- function(model, query, batch, max_missing_genes, ...) {
  cnt <- pad_missing_genes(as_counts(query, ...), model, max_missing_genes)
  batch <- query_batch(batch, model$covariates$batch, cnt$cell_data)
  list(cells = model_cells(model, cnt, batch = batch), data = cnt$counts)
}

# As single_query() for a multimodal model: every key made from the batch
# (named as the ambient key) gets the query's batches, even where the
# reference had one level (latent() leaves such keys out).
multimodal_query <- function(model, query, batch) {
  mo <- multimodal_counts(query, modality_names(model))
  cells <- colnames(mo$counts[[1]])
  batch <- query_batch(batch, multimodal_batch_name(model), mo$cell_data)
  values <- as.character(resolve_cell_factor(batch, mo$cell_data, cells, "batch"))
  i <- model$info
  keys <- c(list(i$ambient, i$scaling, i$dispersion, i$library), i$decoder, i$encoder)
  labels <- multimodal_labels(model, mo$cell_data, cells, batch)
  for (j in seq_along(keys)) if (identical(keys[[j]]$name, i$ambient$name)) labels[j] <- list(values)
  list(cells = list(counts = unname(mo$slots), categorical = labels, cells = cells), data = mo$counts)
}

# The query's batch: as given, else the model's batch column when the
# query's metadata has it.
query_batch <- function(batch, column, cell_data) {
  if (is.null(batch) && !is.null(column) && nzchar(column) && column %in% colnames(cell_data)) batch <- column
  if (is.null(batch)) {
    stop("give the query's batch (`batch =`): a column of its cell metadata or one value per cell; each query ",
         "batch becomes a new batch of the model", call. = FALSE)
  }
  batch
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

#' Draw a mapped query on the reference
#'
#' A UMAP of the reference's and the query's cells in the mapped model's
#' latent space: one panel shows where the query lands among the reference
#' cells, one the labels (the reference's known labels and the query's
#' predicted ones, "unknown" in grey), one the query's confidence.
#'
#' @param model A mapped model ([map_query()]).
#' @param predictions The query's predictions from [predict_labels()] (a
#'   data.frame, or the object it returned with `predicted_*` columns).
#' @param reference_labels Labels of the reference cells, in the order of
#'   their latent space (the reference's training cells).
#' @param reference,query The cells' counts, needed when the mapped model no
#'   longer holds their latent spaces (after [load_model()] or in a new session).
#' @param umap Coordinates to draw instead of a fresh UMAP (reference cells
#'   first, then the query's).
#' @param ... Passed to [graphics::plot()].
#' @return The UMAP coordinates, invisibly.
#' @examples
#' sim <- simulate_counts(n_cells = 900, n_genes = 300, n_batches = 3, seed = 1)
#' ref <- sim[, sim$batch != "Batch3"]
#' query <- sim[, sim$batch == "Batch3"]
#' model <- fit_vae(ref, batch = "batch", max_epochs = 20, threads = 2)
#' lab <- fit_labels(model, ref, labels = "cell_type", max_epochs = 20, threads = 2)
#' mapped <- map_query(model, query, batch = "batch", max_epochs = 20, threads = 2)
#' pred <- predict_labels(lab, SingleCellExperiment::counts(query), model = mapped)
#' plot_mapping(mapped, pred, reference_labels = ref$cell_type)
#' @export
plot_mapping <- function(model, predictions = NULL, reference_labels = NULL, reference = NULL, query = NULL,
                         umap = NULL, ...) {
  check_model(model)
  if (!length(unlist(model$info$query_batches))) {
    stop("`model` is not a mapped model: map a query onto it with map_query() first", call. = FALSE)
  }
  zr <- if (!is.null(reference)) latent(model, reference) else model$reference_latent
  zq <- if (!is.null(query)) latent(model, query) else model$latent
  if (is.null(zr) || is.null(zq)) {
    stop("give `reference` and `query`, the cells' counts: the mapped model keeps their latent spaces only in ",
         "the session it was mapped in", call. = FALSE)
  }
  n_ref <- nrow(zr)
  n_q <- nrow(zq)
  if (!is.null(reference_labels) && length(reference_labels) != n_ref) {
    stop("`reference_labels` has ", length(reference_labels), " values for ", n_ref, " reference cells", call. = FALSE)
  }
  pred <- mapping_predictions(predictions, n_q)
  if (is.null(umap)) {
    need("uwot")
    z <- rbind(as.matrix(zr), as.matrix(zq))  # either may be in a file (distill(h5_file =))
    umap <- withr_seed(1, uwot::umap(z, n_neighbors = min(15, nrow(z) - 1), n_threads = 1))
  }
  if (nrow(umap) != n_ref + n_q) stop("`umap` has ", nrow(umap), " rows for ", n_ref + n_q, " cells", call. = FALSE)
  is_q <- rep(c(FALSE, TRUE), c(n_ref, n_q))
  panels <- 1 + !is.null(pred) + !is.null(pred)
  old <- graphics::par(mfrow = c(1, panels), mar = c(4, 4, 2.5, 1))
  on.exit(graphics::par(old))
  draw <- function(col, main, order = seq_along(col)) {
    graphics::plot(umap[order, 1], umap[order, 2], col = col[order], pch = 16, cex = 0.5, xlab = "UMAP 1",
                   ylab = "UMAP 2", main = main, ...)
  }
  draw(ifelse(is_q, "#d1495b", "grey80"), "Query on the reference", order(is_q))
  graphics::legend("topright", c("reference", "query"), col = c("grey80", "#d1495b"), pch = 16, bty = "n", cex = 0.8)
  if (!is.null(pred)) {
    labels <- c(if (is.null(reference_labels)) rep(NA, n_ref) else as.character(reference_labels), pred$label)
    known <- sort(setdiff(unique(labels[!is.na(labels)]), "unknown"))
    pal <- stats::setNames(grDevices::hcl.colors(max(length(known), 2), "Dark 3")[seq_along(known)], known)
    col <- ifelse(is.na(labels), "grey90", ifelse(labels == "unknown", "grey45", pal[labels]))
    draw(col, if (is.null(reference_labels)) "Predicted labels (query)" else "Labels: reference and predicted")
    graphics::legend("topright", c(known, "unknown"), col = c(pal, "grey45"), pch = 16, bty = "n", cex = 0.7)
    v <- pred$confidence
    ramp <- grDevices::hcl.colors(100, "Viridis")
    col <- c(rep("grey90", n_ref), ramp[pmax(1, pmin(100, round(99 * v) + 1))])
    draw(col, "Confidence of the query's labels", order(is_q))
    graphics::legend("topright", c("1.0", "0.5", "0.0"), col = ramp[c(100, 50, 1)], pch = 16, bty = "n", cex = 0.8)
  }
  invisible(umap)
}

# The query's predicted labels and confidences from predict_labels()'s
# data.frame or from the object it returned.
mapping_predictions <- function(predictions, n) {
  if (is.null(predictions)) return(NULL)
  df <- if (is.data.frame(predictions)) predictions else if (inherits(predictions, "Seurat")) predictions[[]] else
    if (inherits(predictions, "SummarizedExperiment")) as.data.frame(SummarizedExperiment::colData(predictions)) else
      stop("`predictions` must come from predict_labels()", call. = FALSE)
  names(df) <- sub("^predicted_", "", names(df))
  if (!all(c("label", "confidence") %in% names(df))) {
    stop("`predictions` must come from predict_labels() (no label and confidence columns)", call. = FALSE)
  }
  if (nrow(df) != n) stop("`predictions` has ", nrow(df), " cells where the query has ", n, call. = FALSE)
  list(label = as.character(df$label), confidence = df$confidence)
}
