#' Highly variable genes (seurat_v3 flavour)
#'
#' Selects genes by the variance of their raw counts relative to a LOESS
#' trend of variance on mean (Stuart et al. 2019; the "vst" method of Seurat
#' v3 and `flavor = "seurat_v3"` in scanpy). With `batch`, genes are ranked
#' within each batch and ordered by their median rank among the batches where
#' they are in the top `n_hvg`, ties broken by the number of such batches.
#'
#' Counts on disk (an `.h5ad` or 10x `.h5` path, an [h5_counts()] object,
#' or an experiment whose counts are an HDF5-backed `DelayedMatrix`) are
#' read in blocks of 16,384 cells, twice, never all at once; the genes
#' chosen are those of the same counts in memory (the sums are exact).
#' `batch` then names a cell column of the experiment or of the file's
#' `obs`.
#'
#' @inheritParams as_counts
#' @param n_hvg Number of genes to select.
#' @param span Span of the LOESS fit.
#' @param threads Number of threads (see [torch_config()]).
#' @return A `data.frame` with one row per gene, in the order of `x`: `gene`,
#'   `mean`, `variance` (of raw counts), `variance_norm` (standardized
#'   variance, averaged over batches), `rank` (median rank, `NA` when in no
#'   batch's top `n_hvg`), `n_batches`, and `highly_variable`.
#' @examples
#' sce <- example_cellbench()
#' hvg <- highly_variable_genes(sce, n_hvg = 500, batch = "batch")
#' head(hvg[order(hvg$rank), ])
#' @export
highly_variable_genes <- function(x, n_hvg = 2000, batch = NULL, span = 0.3, threads = NULL, ...) {
  n_hvg <- check_count(n_hvg, "n_hvg")
  if (!is.numeric(span) || length(span) != 1 || !(span > 0 && span <= 1)) {
    stop("`span` must be a number in (0, 1]", call. = FALSE)
  }
  d <- as_disk(x, ...)
  if (!is.null(d)) {
    h <- disk_hvg_pca(d, disk_batch(d, batch), n_hvg, span, 0L, TRUE, threads)
    return(hvg_frame(h$hvg, d$genes))
  }
  cnt <- as_counts(x, batch = batch, ...)
  s <- slots(cnt)
  b <- batch_args(cnt$batch)
  h <- rust(rs_hvg(s, b$codes, b$levels, n_hvg, span, resolve_threads(threads)))
  hvg_frame(h, s$genes)
}

hvg_frame <- function(h, genes) {
  rank <- h$rank
  rank[is.nan(rank)] <- NA
  data.frame(gene = genes, mean = h$mean, variance = h$variance,
             variance_norm = h$variance_norm, rank = rank, n_batches = h$n_batches,
             highly_variable = seq_along(genes) %in% h$selected,
             row.names = genes, stringsAsFactors = FALSE)
}
