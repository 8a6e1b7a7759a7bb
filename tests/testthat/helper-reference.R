# Independent R implementations used as references.

# seurat_v3 standardized variance of one batch (Stuart et al. 2019), with R's
# exact local regression (surface = "direct") for the mean-variance trend.
ref_standardized_variance <- function(m) {
  m <- as.matrix(m)
  n <- ncol(m)
  mu <- rowMeans(m)
  v <- apply(m, 1, stats::var)
  keep <- v > 0
  fit <- stats::loess(log10(v[keep]) ~ log10(mu[keep]), span = 0.3, degree = 2,
                      control = stats::loess.control(surface = "direct"))
  expected <- rep(0, nrow(m))
  expected[keep] <- stats::fitted(fit)
  sd_exp <- sqrt(10^expected)
  clipped <- pmin(m, sd_exp * sqrt(n) + mu)
  rowSums((clipped - mu)^2) / ((n - 1) * sd_exp^2)
}

ref_log2_cpm <- function(m) ref_log_norm(m, 1e6)

# log2(counts / cell total * scale_factor + 1): run_pca()'s default values.
ref_log_norm <- function(m, scale_factor = 1e4) {
  m <- as.matrix(m)
  log2(t(t(m) / colSums(m)) * scale_factor + 1)
}

read_cellbench <- function() {
  dir <- shared_data("cellbench_5cl_3plates")
  counts <- Matrix::readMM(gzfile(file.path(dir, "counts.mtx.gz")))
  genes <- utils::read.csv(gzfile(file.path(dir, "genes.csv.gz")), row.names = 1)
  cells <- utils::read.csv(gzfile(file.path(dir, "cells.csv.gz")), row.names = 1)
  counts <- as(counts, "CsparseMatrix")
  dimnames(counts) <- list(rownames(genes), rownames(cells))
  keep <- cells$demuxlet_cls == "SNG" & Matrix::colSums(counts) > 0
  list(counts = counts[, keep], cells = cells[keep, ])
}
