#' PCA on highly variable genes
#'
#' The standard first step of single-cell analysis, computed by the Rust core
#' without densifying the data: seurat_v3 highly variable genes on raw counts
#' (batch-aware when `batch` is given), their log-normalized expression
#' (log2 of counts per `scale_factor` = 10^4 + 1, Seurat's `NormalizeData()`
#' and scanpy's `normalize_total()` + `log1p()` in base 2), centering and (by
#' default) scaling each gene, then a truncated PCA by randomized SVD with
#' power iterations.
#'
#' With up to `getOption("scdistill.pca_exact_max_genes", 3000)` selected
#' genes and at least as many cells as genes, the PCA is exact: the covariance matrix is accumulated from the sparse
#' data (products of co-occurring non-zeros only) and decomposed once. With
#' more genes (or fewer cells), a randomized SVD iterates until the top
#' `n_pcs` singular values change
#' by less than `getOption("scdistill.pca_tol", 1e-7)` (relative), at most
#' `getOption("scdistill.pca_max_iterations", 100)` times, with
#' `getOption("scdistill.pca_oversamples", max(20, n_pcs))` extra directions.
#' With these defaults both agree with `prcomp()` to a correlation above
#' 0.99999 on real data; a larger tolerance trades accuracy of the trailing
#' components for speed.
#'
#' Counts on disk (see [highly_variable_genes()]) are read in blocks, four
#' times: twice for the genes, once for the covariance matrix, once for the
#' scores. The PCA is then always the exact one (its cost grows with the
#' square of `n_hvg`, not with the cells), and only of log-normalized
#' counts; the scores (cells × `n_pcs`) are in memory.
#'
#' @inheritParams highly_variable_genes
#' @param n_pcs Number of principal components.
#' @param scale Scale each gene to unit variance before PCA (log-normalized
#'   counts only).
#' @param method `"log"` (default): log2(counts / cell total ×
#'   `scale_factor` + 1). `"log2cpm"`: the same per 10^6 (log2 CPM, the
#'   default of earlier versions; it ignores `scale_factor`).
#'   Per million, in a cell of 5,000 counts, one read against none is 7.6
#'   log2 units (per 10^4: 1.6), as much as a 200-fold change of a gene the
#'   cell expresses, so the zeros of shallow cells carry much of the variance
#'   the PCA keeps: on three data sets Harmony integrated as well or better on
#'   the PCs per 10^4 (`bench/normalization.R`).
#'   `"pearson_residuals"`: analytic
#'   Pearson residuals of the counts (Lause, Berens & Kobak 2021, as scanpy's
#'   `normalize_pearson_residuals()`): μ = cell total × gene share,
#'   (x − μ) / √(μ + μ²/θ) clipped to ±√N, centred, not scaled. The residuals
#'   are dense; they are formed a chunk of cells at a time and the PCA is
#'   exact (covariance of the selected genes).
#' @param scale_factor Counts per cell the log-normalization scales to
#'   (Seurat's `scale.factor`, scanpy's `target_sum`).
#' @param residual_theta θ of the Pearson residuals' negative binomial.
#' @param name Name of the reduction written back: `"PCA"` for a
#'   `SingleCellExperiment`, `"pca"` for a `Seurat` object.
#' @param seed Seed of the random start; the same seed gives the same result.
#' @return For a `SingleCellExperiment` (or `SummarizedExperiment`), `x` with
#'   `reducedDim(x, name)`; for a `Seurat` object, `x` with the `DimReduc`
#'   `name`; otherwise the cells × `n_pcs` matrix of scores. The scores carry
#'   attributes `rotation` (loadings, highly variable genes × PCs), `sdev`,
#'   `percentVar` (percentage of variance explained), `varExplained` and
#'   `iterations` (power iterations done; 0 for the exact method).
#' @examples
#' sce <- example_cellbench()
#' sce <- run_pca(sce, n_pcs = 10, n_hvg = 1000, batch = "batch")
#' pcs <- SingleCellExperiment::reducedDim(sce, "PCA")
#' round(attr(pcs, "percentVar"), 1)
#' plot(pcs[, 1:2], col = factor(sce$cell_line), pch = 19, cex = 0.5)
#' @export
run_pca <- function(x, n_pcs = 50, n_hvg = 2000, batch = NULL, scale = TRUE, name = NULL,
                    method = c("log", "pearson_residuals", "log2cpm"), scale_factor = 1e4,
                    residual_theta = 100, seed = 1, threads = NULL, ...) {
  method <- choose_arg(method, "method")
  scale_factor <- if (method == "log2cpm") 1e6 else check_positive(scale_factor, "scale_factor")
  if (method == "log2cpm") method <- "log"
  if (method == "pearson_residuals") check_positive(residual_theta, "residual_theta")
  n_pcs <- check_count(n_pcs, "n_pcs")
  n_hvg <- check_count(n_hvg, "n_hvg")
  scale <- check_flag(scale, "scale")
  seed <- check_seed(seed)
  d <- as_disk(x, ...)
  if (!is.null(d)) {
    return(write_back(x, disk_pca(d, batch, n_pcs, n_hvg, scale, method, scale_factor, threads)$scores,
                      name %||% reduction_name(x, "PCA")))
  }
  cnt <- as_counts(x, batch = batch, ...)
  s <- slots(cnt)
  b <- batch_args(cnt$batch)
  oversamples <- check_count(getOption("scdistill.pca_oversamples", max(20L, n_pcs)),
                             "options(scdistill.pca_oversamples)", min = 0)
  max_iter <- check_count(getOption("scdistill.pca_max_iterations", 100L),
                          "options(scdistill.pca_max_iterations)", min = 0)
  tol <- getOption("scdistill.pca_tol", 1e-7)
  max_exact <- check_count(getOption("scdistill.pca_exact_max_genes", 3000L),
                           "options(scdistill.pca_exact_max_genes)", min = 0)
  res <- rust(rs_run_pca(s, b$codes, b$levels, n_pcs, n_hvg, scale,
                         oversamples, max_iter, as.numeric(tol), max_exact, as.numeric(seed),
                         if (method == "pearson_residuals") as.numeric(residual_theta) else 0,
                         as.numeric(scale_factor), resolve_threads(threads)))
  write_back(x, pca_scores(res, n_pcs, s$cells, s$genes), name %||% reduction_name(x, "PCA"))
}

# PCA of counts on disk (log-normalized, per `scale_factor`, only): the
# scores, the highly variable genes, and each cell's total count from the
# same pass over the file (distill()'s student reuses them).
disk_pca <- function(d, batch, n_pcs, n_hvg, scale, method, scale_factor, threads, scores_file = NULL) {
  if (method != "log") {
    stop("run_pca(method = \"pearson_residuals\") needs the counts in memory; counts on disk take ",
         "method = \"log\"", call. = FALSE)
  }
  res <- disk_hvg_pca(d, disk_batch(d, batch), n_hvg, 0.3, n_pcs, scale, threads, scores_file, scale_factor)
  # With `scores_file` the scores are only in the file (see distill(h5_file =)).
  scores <- if (is.null(scores_file)) pca_scores(res, n_pcs, d$cells, d$genes)
  list(scores = scores, hvg = d$genes[res$hvg$selected], library = res$library)
}

# The scores matrix of the glue's PCA result, its attributes as prcomp's.
pca_scores <- function(res, n_pcs, cells, genes) {
  pcs <- paste0("PC", seq_len(n_pcs))
  rotation <- matrix(res$loadings, ncol = n_pcs, dimnames = list(genes[res$hvg$selected], pcs))
  # Shaped and given its attributes in place: matrix() or attr<- would copy
  # all cells' scores.
  shape_in_place(res$scores, c(length(cells), n_pcs), list(cells, pcs), rotation = rotation,
                 sdev = res$sdev, percentVar = 100 * res$variance_ratio, varExplained = res$sdev^2,
                 iterations = res$n_iter)
}


# Seurat names reductions in lower case, Bioconductor in upper case.
reduction_name <- function(x, name) if (is(x, "Seurat")) tolower(name) else name
