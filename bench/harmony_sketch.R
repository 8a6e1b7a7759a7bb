# Harmony on a sketch against Harmony on all cells (issue 27: the teacher's
# memory at atlas scale).
#
#   Rscript bench/harmony_sketch.R [--cells 1000000] [--genes 2000] [--sketch 200000] [--threads 2] [--seed 1]
#                                  [--h5ad FILE] [--design rare|confounded]
#
# One simulation (10 types in unequal proportions, 3 batches) is written to
# an .h5ad file (or --h5ad names one with `batch` and `cell_type` in obs);
# run_pca() reads it in blocks (50 PCs of 2,000 batch-aware HVGs, as
# distill()'s teacher). Then, each in its own R process under /usr/bin/time,
# run_harmony() of those PCs at its defaults on all cells, and with
# `sketch = --sketch`. Reported: wall seconds and peak RSS of each process
# (the PCs, read from an .rds file, are in both), how far the sketch's
# result lies from the full run's (mean squared difference over the
# variance; the smallest correlation of a dimension), and
# integration_metrics() of the PCs and both corrections on the same 10,000
# cells (bench/results/harmony_sketch.csv).
# With --design, the data are instead bench/quality.R's harder designs,
# simulated in memory at --cells before subsampling (about half are kept):
# `rare` (14 types down to 1%, 4 batches with their own type proportions, two
# types at a tenth in each) or `confounded` (12 types, 3 batches, each
# lacking three types); PCA in memory, same settings.
args <- commandArgs(TRUE)
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE))), "common.R"))
root <- bench_root()
n_cells <- bench_option(args, "--cells", 1e6)
n_genes <- bench_option(args, "--genes", 2000)
sketch <- bench_option(args, "--sketch", 2e5)
threads <- bench_option(args, "--threads", 2)
seed <- bench_option(args, "--seed", 1)
h5ad <- bench_option(args, "--h5ad", "", as = as.character)
design <- bench_option(args, "--design", "", as = as.character)
work <- file.path(tempdir(), "harmony_sketch")
dir.create(work, showWarnings = FALSE)
suppressMessages(library(scdistill))
options(scdistill.pass_bars = FALSE)
if (nzchar(design)) {
  stopifnot(design %in% c("rare", "confounded"))
  set.seed(seed + 1)
  if (design == "rare") {
    prob <- c(0.2, 0.15, 0.12, 0.1, 0.09, 0.08, 0.07, 0.05, 0.04, 0.03, 0.03, 0.02, 0.015, 0.01)
    n_batches <- 4
    low <- function(n, b) sample.int(n, 2)
    low_w <- 0.1
  } else {
    prob <- c(0.2, 0.15, 0.12, 0.1, 0.09, 0.08, 0.07, 0.05, 0.04, 0.04, 0.03, 0.03)
    n_batches <- 3
    missing <- split(sample.int(12, 9), rep(1:3, each = 3))
    low <- function(n, b) missing[[as.integer(sub("\\D+", "", b))]]
    low_w <- 0.02
  }
  sim <- simulate_counts(n_cells = n_cells, n_genes = n_genes, group_prob = prob, n_batches = n_batches,
                         batch_effect = "medium", format = "list", seed = seed, threads = threads)
  type <- as.character(sim$cell_data$cell_type)
  batch <- as.character(sim$cell_data$batch)
  keep <- integer()
  for (b in sort(unique(batch), method = "radix")) {
    w <- stats::runif(length(prob), 0.3, 1)
    w[low(length(prob), b)] <- low_w
    for (k in seq_along(prob)) {
      cells <- which(batch == b & type == sort(unique(type), method = "radix")[k])
      keep <- c(keep, cells[sample.int(length(cells), round(length(cells) * w[k] * 0.5))])
    }
  }
  keep <- sort(keep)
  cd <- data.frame(batch = batch[keep], cell_type = type[keep])
  n_cells <- nrow(cd)
  pcs_file <- file.path(work, "pcs.rds")
  pcs <- run_pca(sim$counts[, keep], n_pcs = 50, n_hvg = 2000, batch = cd$batch, seed = seed, threads = threads)
  rm(sim)
  attributes(pcs) <- list(dim = dim(pcs))
  saveRDS(list(pcs = pcs, batch = cd$batch), pcs_file)
  rm(pcs)
  cat(sprintf("%s design: %s cells kept, types at %s%% ... %s%%\n", design, format(n_cells, big.mark = ","),
              round(100 * max(table(cd$cell_type)) / n_cells, 1), round(100 * min(table(cd$cell_type)) / n_cells, 2)))
} else {
  if (!nzchar(h5ad)) h5ad <- simulate_h5ad(work, n_cells, n_genes, seed, threads)
  cd <- scdistill:::disk_cell_data(scdistill:::as_disk(h5ad))
  n_cells <- nrow(cd)
  # The PCs are kept beside the file and reused while it is unchanged.
  pcs_file <- paste0(h5ad, ".pcs.rds")
  if (!file.exists(pcs_file) || file.mtime(pcs_file) < file.mtime(h5ad)) {
    t_pca <- system.time(pcs <- run_pca(h5ad, n_pcs = 50, n_hvg = 2000, batch = cd$batch, seed = seed,
                                        threads = threads))[["elapsed"]]
    attributes(pcs) <- list(dim = dim(pcs))
    saveRDS(list(pcs = pcs, batch = cd$batch), pcs_file)
    rm(pcs)
    cat(sprintf("PCA of %s cells from the file: %.1f s\n", format(n_cells, big.mark = ","), t_pca))
  }
}

run_mode <- function(mode) {
  out <- file.path(work, paste0(mode, ".rds"))
  script <- file.path(work, paste0(mode, ".R"))
  writeLines(c(
    "suppressMessages(library(scdistill))",
    sprintf("p <- readRDS('%s')", pcs_file),
    sprintf("t <- system.time(z <- run_harmony(p$pcs, batch = p$batch, seed = %d, threads = %d, progress = FALSE%s))",
            seed, threads, if (mode == "sketch") sprintf(", sketch = %d", as.integer(sketch)) else ""),
    sprintf("saveRDS(list(z = z, seconds = t[['elapsed']]), '%s')", out)
  ), script)
  t <- timed("Rscript", script)
  r <- readRDS(out)
  list(mode = mode, z = r$z, seconds = r$seconds, wall = t$wall, rss_mb = t$rss_mb)
}
res <- lapply(c("full", "sketch"), run_mode)
full <- res[[1]]$z
sk <- res[[2]]$z
rel <- mean((sk - full)^2) / mean(sweep(full, 2, colMeans(full))^2)
min_cor <- min(vapply(seq_len(ncol(full)), function(j) stats::cor(full[, j], sk[, j]), 0))

set.seed(seed)
cells <- sort(sample(n_cells, min(10000, n_cells)))
pcs <- readRDS(pcs_file)$pcs
metrics <- function(z) integration_metrics(z[cells, ], batch = cd$batch[cells], label = cd$cell_type[cells],
                                           threads = threads)
mt <- rbind(metrics(pcs), metrics(full), metrics(sk))
tab <- data.frame(data = if (nzchar(design)) design else "file", method = c("pca", "harmony", "harmony_sketch"),
                  cells = n_cells, sketch = c(NA, NA, sketch),
                  fitted_cells = c(NA, attr(full, "harmony")$fitted_cells, attr(sk, "harmony")$fitted_cells),
                  harmony_s = c(NA, round(res[[1]]$seconds, 1), round(res[[2]]$seconds, 1)),
                  process_s = c(NA, round(res[[1]]$wall, 1), round(res[[2]]$wall, 1)),
                  peak_rss_mb = c(NA, round(res[[1]]$rss_mb), round(res[[2]]$rss_mb)),
                  rel_sq_diff = c(NA, 0, signif(rel, 3)), min_dim_cor = c(NA, 1, round(min_cor, 5)),
                  round(mt[, vapply(mt, is.numeric, TRUE)], 4),
                  threads = threads, date = format(Sys.time(), "%Y-%m-%d %H:%M"))
print(tab, row.names = FALSE)
append_csv(tab, file.path(root, "bench", "results", "harmony_sketch.csv"))
