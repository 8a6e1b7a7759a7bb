#' Integration metrics (scIB family)
#'
#' Scores embeddings for batch mixing and conservation of biology, as the
#' scIB benchmark (Luecken et al. 2022) and scib-metrics 0.5 compute them, on
#' one kNN graph of 90 neighbours (the cell counted):
#' * batch correction: iLISI, scaled (median - 1)/(B - 1); kBET acceptance
#'   rate per label; graph connectivity (15 neighbours); PCR comparison
#'   (needs `pre`); batch silhouette (1 - |ASW| within each label).
#' * bio conservation: cLISI, scaled (L - median)/(L - 1), perplexity 30;
#'   label silhouette, (ASW + 1)/2; isolated labels; NMI and ARI of k-means
#'   clusters (k = number of labels). Also reported, outside the mean as in
#'   scib-metrics' default: NMI and ARI of Leiden clusters (modularity, on
#'   the UMAP connectivities of the 15-NN graph) at the resolution among
#'   0.2, 0.4, ..., 2 with the best NMI (`nmi_leiden`, `ari_leiden`).
#' * `bio_conservation` and `batch_correction` are the means of the available
#'   scores of each group, `total` = 0.6 bio + 0.4 batch. Scores are not
#'   min-max scaled across embeddings (scib-metrics >= 0.5.6 default).
#'
#' Scores agree with scib-metrics 0.5.10 to 1e-4 given the same neighbours;
#' k-means clusters may differ where clusters are not well separated. kBET is
#' the exception: scib-metrics tests neighbourhoods taken from a diffusion map
#' of the UMAP graph, this package those of the embedding itself (same k0
#' rule, same chi-squared test), so its values differ (0.36 here vs 0.25 on
#' the test fixture) and should be compared only among methods scored here.
#'
#' @section Large data:
#' Up to 50,000 cells the kNN graph is exact. Above, it comes from an
#' approximate inverted-file search (k-means of the cells into about
#' sqrt(n) lists; each cell's neighbours are searched in the lists of its 32
#' nearest centroids), where scib-metrics uses pynndescent; on clustered
#' embeddings it finds about 99.5% of the exact neighbours. The silhouette
#' scores (label ASW, isolated labels, batch ASW), which cost O(n^2), are
#' computed above 50,000 cells on a subsample of about 50,000 cells,
#' stratified by label (each label in proportion, at least 200 cells or all
#' it has), as scikit-learn's `silhouette_score(sample_size =)`. Both use
#' `seed`, so results are reproducible.
#'
#' @param x A cells x dimensions matrix, a named list of them, a
#'   `SingleCellExperiment` or a `Seurat` object.
#' @param batch,label One value per cell, or for a `SingleCellExperiment` or
#'   `Seurat` object, column names of the cell metadata.
#' @param reduction For a `SingleCellExperiment` or `Seurat` object: the
#'   names of the embeddings to score (default: all).
#' @param pre The embedding before integration (a matrix, or the name of a
#'   reduction), for the PCR comparison; `NULL` to skip it.
#' @param seed Seed of k-means and, above 50,000 cells, of the approximate
#'   kNN search and the silhouette subsample.
#' @param threads Number of threads (see [torch_config()]).
#' @return A `data.frame` of class `scdistill_metrics`, one row per
#'   embedding; `plot()` draws the scores as a table of dots.
#' @examples
#' sce <- run_pca(example_cellbench(), n_pcs = 20, batch = "batch")
#' m <- integration_metrics(sce, batch = "batch", label = "cell_line", reduction = "PCA")
#' m[, c("ilisi", "clisi", "silhouette_label", "total")]
#' plot(m)
#' @export
integration_metrics <- function(x, batch, label, reduction = NULL, pre = NULL, seed = 1, threads = NULL) {
  input <- metric_inputs(x, batch, label, reduction, pre)
  threads <- resolve_threads(threads)
  rows <- lapply(names(input$embeddings), function(name) {
    emb <- input$embeddings[[name]]
    if (!is.matrix(emb) || !is.numeric(emb) || nrow(emb) != length(input$batch)) {
      stop("embedding '", name, "' must be a numeric matrix with one row per cell (", length(input$batch), ")",
           call. = FALSE)
    }
    if (anyNA(emb)) stop("embedding '", name, "' contains NA", call. = FALSE)
    pre <- input$pre
    res <- rust(rs_integration_metrics(matrix(as.numeric(emb), nrow(emb)), nrow(emb), ncol(emb),
                                       as.integer(input$batch), as.integer(input$label),
                                       if (is.null(pre)) NULL else matrix(as.numeric(pre), nrow(pre)),
                                       if (is.null(pre)) 0L else ncol(pre), as.numeric(seed), threads))
    as.data.frame(lapply(res, function(v) if (is.nan(v)) NA_real_ else v))
  })
  out <- do.call(rbind, rows)
  rownames(out) <- names(input$embeddings)
  class(out) <- c("scdistill_metrics", "data.frame")
  out
}

# The scores plot() draws, in groups: every score of the table. kBET counts
# in the batch score; Leiden's NMI and ARI are reported beside the bio
# score (outside its mean, as in scib-metrics' default).
metric_groups <- function(x) {
  all <- list(bio = c("clisi", "silhouette_label", "isolated_labels", "nmi_kmeans", "ari_kmeans"),
              batch = c("ilisi", "kbet", "silhouette_batch", "graph_connectivity", "pcr_comparison"),
              extra = c("nmi_leiden", "ari_leiden"),
              agg = c("bio_conservation", "batch_correction", "total"))
  lapply(all, intersect, names(x))
}

metric_inputs <- function(x, batch, label, reduction, pre) {
  cell_data <- NULL
  if (is(x, "SingleCellExperiment")) {
    all <- SingleCellExperiment::reducedDims(x)
    cell_data <- as.data.frame(SummarizedExperiment::colData(x))
    embeddings <- as.list(all)
  } else if (is(x, "Seurat")) {
    need("SeuratObject")
    cell_data <- x[[]]
    embeddings <- sapply(SeuratObject::Reductions(x), function(r) SeuratObject::Embeddings(x, r), simplify = FALSE)
  } else if (is.matrix(x)) {
    embeddings <- list(embedding = x)
  } else if (is.list(x) && length(x) && !is.null(names(x)) && all(names(x) != "")) {
    embeddings <- x
  } else {
    stop("`x` must be a matrix, a named list of matrices, a SingleCellExperiment or a Seurat object", call. = FALSE)
  }
  if (!is.null(reduction)) {
    unknown <- setdiff(reduction, names(embeddings))
    if (length(unknown)) {
      stop("`reduction` '", unknown[1], "' not found; available: ",
           paste(names(embeddings), collapse = ", "), call. = FALSE)
    }
    embeddings <- embeddings[reduction]
  }
  if (!length(embeddings)) stop("`x` has no embeddings to score", call. = FALSE)
  n <- nrow(embeddings[[1]])
  cells <- rownames(embeddings[[1]]) %||% paste0("cell_", seq_len(n))
  if (is.character(pre) && length(pre) == 1) {
    if (is.null(cell_data) || !pre %in% names(embeddings_all(x))) {
      stop("`pre` = '", pre, "' is not a reduction of `x`", call. = FALSE)
    }
    pre <- embeddings_all(x)[[pre]]
  }
  list(embeddings = embeddings,
       batch = resolve_batch(batch, cell_data, cells, arg = "batch"),
       label = resolve_cell_factor(label, cell_data, cells, arg = "label"),
       pre = pre)
}

embeddings_all <- function(x) {
  if (is(x, "SingleCellExperiment")) return(as.list(SingleCellExperiment::reducedDims(x)))
  sapply(SeuratObject::Reductions(x), function(r) SeuratObject::Embeddings(x, r), simplify = FALSE)
}

#' @method plot scdistill_metrics
#' @export
plot.scdistill_metrics <- function(x, ...) {
  groups <- metric_groups(x)
  cols <- unlist(groups, use.names = FALSE)
  m <- as.matrix(as.data.frame(x)[, cols, drop = FALSE])
  nr <- nrow(m)
  op <- graphics::par(mar = c(8, 8, 2, 1))
  on.exit(graphics::par(op))
  graphics::plot(NA, xlim = c(0.5, ncol(m) + 0.5), ylim = c(0.5, nr + 0.5), axes = FALSE, xlab = "", ylab = "",
                 main = "Integration metrics (larger is better)")
  graphics::axis(1, at = seq_len(ncol(m)), labels = colnames(m), las = 2, cex.axis = 0.8, tick = FALSE)
  graphics::axis(2, at = rev(seq_len(nr)), labels = rownames(m), las = 1, tick = FALSE)
  ends <- cumsum(lengths(groups))
  graphics::abline(v = ends[-length(ends)] + 0.5, col = "grey80")
  mids <- (c(0, ends[-length(ends)]) + ends) / 2 + 0.5
  graphics::mtext(c("bio conservation", "batch correction", "Leiden", "aggregate")[lengths(groups) > 0],
                  side = 3, at = mids[lengths(groups) > 0], line = 0, cex = 0.8, col = "grey30")
  pal <- grDevices::colorRampPalette(c("#d7301f", "#fdd49e", "#2b8cbe"))(101)
  for (i in seq_len(nr)) for (j in seq_len(ncol(m))) {
    v <- m[i, j]
    if (is.na(v)) next
    graphics::points(j, nr + 1 - i, pch = 21, cex = 1 + 3 * max(0, min(1, v)), bg = pal[1 + round(100 * max(0, min(1, v)))])
    graphics::text(j, nr + 1 - i - 0.3, sprintf("%.2f", v), cex = 0.6)
  }
  invisible(x)
}
