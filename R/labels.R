# Cell-type labels from a model's latent space (scANVI-style, z fixed).

#' Learn cell-type labels on a model's latent space
#'
#' Trains a semi-supervised label model on the latent space of a fitted
#' model: a classifier q(y | z) and, as scANVI has, a label-conditioned
#' prior p(z | y) (one Gaussian per label). Labelled cells teach both;
#' unlabelled cells (`unlabeled`) contribute through the prior, as in
#' scANVI's unlabelled ELBO. Unlike scANVI the latent space is the model's
#' own and stays fixed, so the label model applies unchanged to a query
#' mapped with [map_query()]: fit it on the reference, predict on the query.
#'
#' @param model A model from [fit_vae()], [distill()], [fit_multimodal()]
#'   or [map_query()].
#' @param x The labelled (and unlabelled) cells' counts; the model's training
#'   data reuses its latent space without recomputing it.
#' @param labels A column of the cell metadata of `x`, or one label per cell.
#' @param unlabeled Values of `labels` that mean "no label" (`NA` always does).
#' @param n_hidden,n_layers,dropout The classifier's architecture (scANVI's).
#' @param classification_ratio Weight of the labelled cells' cross-entropy
#'   (scANVI's 50).
#' @param max_epochs Epochs; `NULL`: scvi-tools' rule for the number of
#'   cells, at most 100.
#' @param batch_size,lr,early_stopping,patience,validation_fraction,seed,threads,progress
#'   Training settings, as in [fit_vae()].
#' @param ... Passed to [latent()] (e.g. `batch`).
#' @return A `scdistill_labels` object for [predict_labels()].
#' @examples
#' sim <- simulate_counts(n_cells = 900, n_genes = 300, n_batches = 3, seed = 1)
#' ref <- sim[, sim$batch != "Batch3"]
#' query <- sim[, sim$batch == "Batch3"]
#' model <- fit_vae(ref, batch = "batch", max_epochs = 20, threads = 2)
#' lab <- fit_labels(model, ref, labels = "cell_type", max_epochs = 20, threads = 2)
#' mapped <- map_query(model, query, batch = "batch", max_epochs = 20, threads = 2)
#' pred <- predict_labels(lab, query, model = mapped)
#' confusion_matrix(pred$predicted_label, query$cell_type)
#' @export
fit_labels <- function(model, x, labels, unlabeled = NA, n_hidden = 128, n_layers = 1, dropout = 0.1,
                       classification_ratio = 50, max_epochs = NULL, batch_size = 128, lr = 1e-3,
                       early_stopping = TRUE, patience = 10, validation_fraction = 0.1, seed = 0, threads = NULL,
                       progress = interactive(), ...) {
  check_model(model)
  lc <- label_cells(model, x)
  cells <- lc$cells
  y <- if (is.character(labels) && length(labels) == 1 && length(cells) != 1) {
    if (!labels %in% colnames(lc$cell_data)) {
      stop("`labels`: '", labels, "' is not a column of the cell metadata of `x`", call. = FALSE)
    }
    lc$cell_data[[labels]]
  } else labels
  if (length(y) != length(cells)) {
    stop("`labels` has ", length(y), " values but `x` has ", length(cells), " cells", call. = FALSE)
  }
  y <- as.character(y)
  y[y %in% as.character(unlabeled[!is.na(unlabeled)])] <- NA
  levels <- sort(unique(y[!is.na(y)]))
  if (!length(levels)) stop("every cell is unlabelled: give the labels of at least some cells", call. = FALSE)
  if (length(levels) < 2) {
    stop("the labels have one class only ('", levels, "'): a classifier needs at least two", call. = FALSE)
  }
  z <- cached_latent(model, lc$counts) %||% latent(model, x, threads = threads, ...)
  check_fraction(dropout, "dropout")
  check_positive(classification_ratio, "classification_ratio", zero_ok = TRUE)
  tc <- train_settings(length(cells), max_epochs %||% min(round(20000 / length(cells) * 400), 100), batch_size, lr,
                       0, 0, early_stopping, patience, 0, validation_fraction, seed)
  config <- list(n_hidden = check_count(n_hidden, "n_hidden"), n_layers = check_count(n_layers, "n_layers"),
                 dropout = dropout, classification_ratio = classification_ratio)
  bar <- if (check_flag(progress, "progress")) training_bar(tc$max_epochs) else NULL
  if (!is.null(bar)) on.exit(bar$done(), add = TRUE)
  fit <- rust(rs_fit_labels(unclass_matrix(z), ncol(z), match(y, levels), levels, config, tc,
                            resolve_threads(threads), bar$update))
  structure(list(bytes = fit$bytes, info = fit$info, levels = levels, model = model,
                 history = as.data.frame(fit$info$history %||% list())),
            class = "scdistill_labels")
}

#' @method print scdistill_labels
#' @export
print.scdistill_labels <- function(x, ...) {
  i <- x$info
  cat(sprintf("scdistill label model: %d labels (%s) on a %d-dimensional latent space\n", length(x$levels),
              paste(utils_head(x$levels, 6), collapse = ", "), i$config$n_latent))
  cat(sprintf("  trained on %s cells, %s labelled; %d epochs, weights of epoch %d\n", fmt_int(i$n_cells),
              fmt_int(i$n_labelled), nrow(x$history), i$best_epoch))
  invisible(x)
}

#' Predict cell-type labels
#'
#' Labels of new cells from a label model ([fit_labels()]), with the
#' probability of each label and an "unknown" call. A cell is called
#' unknown when its most probable label has probability below `threshold`,
#' or when it lies far from that label's class in the latent space (its
#' squared Mahalanobis distance to the class above the `distance_quantile`
#' quantile of a chi-squared distribution with as many degrees of freedom
#' as latent dimensions): a cell of a type absent from the labels is often
#' confidently assigned to the nearest label, yet lies far from all of them.
#'
#' @param object A `scdistill_labels` object.
#' @param x The cells' counts.
#' @param model The model whose latent space places the cells: the one the
#'   labels were fitted on, or a model mapped from it with [map_query()]
#'   (for query cells).
#' @param threshold Smallest probability of a call.
#' @param distance_quantile Chi-squared quantile beyond which a cell is too
#'   far from its label's class (`1`: never).
#' @param threads Threads.
#' @param ... Passed to [latent()] (e.g. `batch`).
#' @return For a `SingleCellExperiment` or `Seurat` object, `x` with cell
#'   metadata columns `predicted_label` (the label, or `"unknown"`),
#'   `predicted_best` (the most probable label), `predicted_confidence`,
#'   `predicted_distance` and `predicted_unknown`. Otherwise a data.frame
#'   with those columns (without the prefix), one row per cell, and the
#'   label probabilities (cells x labels) in its `"probabilities"` attribute.
#' @examples
#' sim <- simulate_counts(n_cells = 600, n_genes = 300, seed = 1)
#' model <- fit_vae(sim, batch = "batch", max_epochs = 20, threads = 2)
#' lab <- fit_labels(model, sim, labels = "cell_type", max_epochs = 20, threads = 2)
#' head(predict_labels(lab, SingleCellExperiment::counts(sim)[, 1:10]))
#' @export
predict_labels <- function(object, x, model = object$model, threshold = 0.5, distance_quantile = 0.999,
                           threads = NULL, ...) {
  if (!inherits(object, "scdistill_labels")) {
    stop("`object` must come from fit_labels(), not ", class(object)[1], call. = FALSE)
  }
  check_model(model)
  check_fraction(threshold, "threshold", upper_open = FALSE)
  check_fraction(distance_quantile, "distance_quantile", upper_open = FALSE)
  z <- cached_latent(model, label_cells(model, x)$counts) %||% latent(model, x, threads = threads, ...)
  if (ncol(z) != object$info$config$n_latent) {
    stop("the model's latent space has ", ncol(z), " dimensions where the label model's has ",
         object$info$config$n_latent, ": predict with the model the labels were fitted on, or one mapped from it",
         call. = FALSE)
  }
  p <- rust(rs_predict_labels(object$bytes, unclass_matrix(z), ncol(z), resolve_threads(threads)))
  probs <- p$probabilities
  dimnames(probs) <- list(rownames(z), object$levels)
  best <- max.col(probs, ties.method = "first")
  confidence <- probs[cbind(seq_len(nrow(probs)), best)]
  far <- if (distance_quantile >= 1) rep(FALSE, nrow(probs)) else p$distance > stats::qchisq(distance_quantile, ncol(z))
  unknown <- confidence < threshold | far
  best_label <- object$levels[best]
  out <- data.frame(label = ifelse(unknown, "unknown", best_label), best = best_label, confidence = confidence,
                    distance = p$distance, unknown = unknown, row.names = rownames(z), stringsAsFactors = FALSE)
  if (inherits(x, "SummarizedExperiment") || inherits(x, "Seurat")) {
    names(out) <- paste0("predicted_", names(out))
    return(add_cell_columns(x, out))
  }
  attr(out, "probabilities") <- probs
  out
}

# The counts of `x` as the model reads them (one matrix, or one per
# modality: what identifies its training data), its cells and cell metadata.
label_cells <- function(model, x) {
  if (inherits(model, "scdistill_multimodal")) {
    mo <- multimodal_counts(x, modality_names(model))
    return(list(counts = mo$counts, cells = colnames(mo$counts[[1]]), cell_data = mo$cell_data))
  }
  cnt <- as_counts(x)
  list(counts = cnt$counts, cells = colnames(cnt$counts), cell_data = cnt$cell_data)
}

# `x` with the columns of `df` (one row per cell, in order) added to its cell metadata.
add_cell_columns <- function(x, df) {
  if (inherits(x, "Seurat")) {
    for (nm in names(df)) x[[nm]] <- stats::setNames(df[[nm]], colnames(x))
    return(x)
  }
  cd <- SummarizedExperiment::colData(x)
  for (nm in names(df)) cd[[nm]] <- df[[nm]]
  SummarizedExperiment::colData(x) <- cd
  x
}

#' Confusion matrix of predicted against known labels
#'
#' @param predicted Predicted labels (e.g. `predict_labels()$label`).
#' @param truth Known labels, one per cell.
#' @return A table, known labels in rows and predicted in columns, with the
#'   balanced accuracy (mean over known labels of the fraction predicted
#'   right) in its `"balanced_accuracy"` attribute.
#' @examples
#' confusion_matrix(c("a", "a", "b", "unknown"), c("a", "b", "b", "b"))
#' @export
confusion_matrix <- function(predicted, truth) {
  if (length(predicted) != length(truth)) {
    stop("`predicted` has ", length(predicted), " labels and `truth` ", length(truth), call. = FALSE)
  }
  tab <- table(truth = as.character(truth), predicted = as.character(predicted))
  right <- vapply(rownames(tab), function(l) if (l %in% colnames(tab)) tab[l, l] / sum(tab[l, ]) else 0, 0)
  attr(tab, "balanced_accuracy") <- mean(right)
  tab
}
