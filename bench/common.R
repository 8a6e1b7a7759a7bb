# Helpers shared by the benchmark scripts (sourced by them; not part of the package).

# The repository root, from the running script's path.
bench_root <- function() {
  normalizePath(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE))), ".."))
}

# The value after `flag` among the script's arguments `args`, converted by
# `as`; `default` when the flag is absent.
bench_option <- function(args, flag, default, as = as.integer) {
  i <- match(flag, args)
  if (is.na(i)) default else as(args[i + 1])
}

# The input of a Python peer in `dir` (created if needed), as the peer
# scripts read it: counts.mtx (genes x cells, Matrix Market) and obs.csv
# (one row per cell, indexed by the cell names `cells`, with the columns of
# data frame `obs`); with `counts = NULL` only obs.csv. Returns `dir`, invisibly.
write_peer_input <- function(dir, counts, obs, cells = colnames(counts)) {
  dir.create(dir, showWarnings = FALSE, recursive = TRUE)
  if (!is.null(counts)) invisible(Matrix::writeMM(counts, file.path(dir, "counts.mtx")))
  utils::write.csv(data.frame(cell = cells, obs, check.names = FALSE), file.path(dir, "obs.csv"), row.names = FALSE)
  invisible(dir)
}

# The input of bench/scib_score.py in `dir` (emptied first): obs.csv (the
# cells' batch and label in `obs`, indexed by `cells`), pre.csv (`pre`, the
# unintegrated PCA) and one emb_<name>.csv per embedding of the named list
# `embs` (cells x dims matrices, rows in the order of `cells`).
write_scib_input <- function(dir, obs, cells, pre, embs) {
  unlink(dir, recursive = TRUE)
  write_peer_input(dir, NULL, obs, cells = cells)
  utils::write.csv(data.frame(pre, row.names = cells), file.path(dir, "pre.csv"))
  for (e in names(embs)) utils::write.csv(data.frame(embs[[e]], row.names = cells), file.path(dir, paste0("emb_", e, ".csv")))
}

# scib_score.py's scores in `dir`, one row per embedding named in `embs`, in that order.
read_scib <- function(dir, embs) {
  utils::read.csv(file.path(dir, "scib.csv"), row.names = 1, check.names = FALSE)[names(embs), , drop = FALSE]
}

# scib-metrics' scores of the embeddings `embs` (see write_scib_input()),
# from bench/scib_score.py in the peers' venv `python`, working in `dir`.
# `root`: the repository.
scib_scores <- function(python, dir, obs, cells, pre, embs, threads, root = bench_root()) {
  write_scib_input(dir, obs, cells, pre, embs)
  status <- system2(python, c(file.path(root, "bench", "scib_score.py"), dir, "--threads", threads),
                    stdout = FALSE, stderr = file.path(dirname(dir), "scib.log"))
  if (status != 0) stop("scib-metrics failed; see ", file.path(dirname(dir), "scib.log"))
  read_scib(dir, embs)
}

# The Python of the peers' venv, created by bench/setup_peers.sh on first use
# (the script prints its path last).
peers_python <- function(root) {
  utils::tail(system2("bash", file.path(root, "bench", "setup_peers.sh"), stdout = TRUE), 1)
}

# CellBench, 5 cell lines on 3 plates (../shared/data/cellbench_5cl_3plates):
# the singlets with counts, as list(counts = genes x cells, batch, label).
load_cellbench <- function(root) {
  dir <- file.path(root, "..", "shared", "data", "cellbench_5cl_3plates")
  counts <- methods::as(Matrix::readMM(gzfile(file.path(dir, "counts.mtx.gz"))), "CsparseMatrix")
  genes <- utils::read.csv(gzfile(file.path(dir, "genes.csv.gz")), row.names = 1)
  cells <- utils::read.csv(gzfile(file.path(dir, "cells.csv.gz")), row.names = 1)
  dimnames(counts) <- list(rownames(genes), rownames(cells))
  keep <- cells$demuxlet_cls == "SNG" & Matrix::colSums(counts) > 0
  list(counts = counts[, keep], batch = cells$batch[keep], label = cells$cell_line[keep])
}

# The 2,000 most variable genes (seurat_v3, batch-aware) of d = list(counts,
# batch, label), cells with no counts there dropped; batch and label as
# character.
hvg_subset <- function(d, threads) {
  hvg <- scdistill::highly_variable_genes(d$counts, n_hvg = 2000, batch = d$batch, threads = threads)
  counts <- d$counts[hvg$highly_variable, ]
  keep <- Matrix::colSums(counts) > 0
  list(counts = counts[, keep], batch = as.character(d$batch[keep]), label = as.character(d$label[keep]))
}

# CellBench singlets on their 2,000 most variable genes: list(counts, batch, label).
load_cellbench_hvg <- function(root, threads) hvg_subset(load_cellbench(root), threads)

# Runs a command under /usr/bin/time: success, wall seconds, peak RSS (MB).
timed <- function(cmd, args, quiet = TRUE) {
  log <- tempfile()
  status <- if (quiet) {
    system2("/usr/bin/time", c("-f", "'%e %M'", "-o", log, cmd, args), stdout = FALSE, stderr = FALSE)
  } else {
    system2("/usr/bin/time", c("-f", "'%e %M'", "-o", log, cmd, args))
  }
  # A failing command adds a "Command exited with non-zero status" line first.
  lines <- readLines(log)
  v <- scan(text = lines[length(lines)], quiet = TRUE)
  list(ok = status == 0, wall = v[1], rss_mb = v[2] / 1024)
}

# Appends the rows of `tab` to the CSV `out`; when the file's columns differ
# (a script gained a column), the file is rewritten with the union of both,
# missing values left empty.
append_csv <- function(tab, out) {
  dir.create(dirname(out), showWarnings = FALSE, recursive = TRUE)
  if (file.exists(out)) {
    old <- utils::read.csv(out, check.names = FALSE)
    if (!identical(names(old), names(tab))) {
      cols <- union(names(old), names(tab))
      fill <- function(d) {
        for (col in setdiff(cols, names(d))) d[[col]] <- NA
        d[cols]
      }
      utils::write.csv(rbind(fill(old), fill(tab)), out, row.names = FALSE, na = "")
      return(invisible(out))
    }
  }
  utils::write.table(tab, out, sep = ",", append = file.exists(out), col.names = !file.exists(out), row.names = FALSE)
  invisible(out)
}

# Writes the atlas-style simulation of the scaling benchmarks (10 types in
# unequal proportions, 3 batches) straight to `work`/sim_<cells>_<genes>.h5ad
# with simulate_counts(file =), in its own R process (timed); returns the path.
simulate_h5ad <- function(work, n_cells, n_genes, seed, threads) {
  h5ad <- file.path(work, sprintf("sim_%d_%d.h5ad", n_cells, n_genes))
  cat(sprintf("simulating %s cells x %d genes to %s\n", format(n_cells, big.mark = ","), n_genes, h5ad))
  sim_script <- file.path(work, "simulate.R")
  writeLines(c(
    "suppressMessages(library(scdistill))",
    sprintf(paste0("s <- simulate_counts(n_cells = %d, n_genes = %d, n_groups = 10, n_batches = 3, ",
                   "group_prob = c(20, 15, 12, 10, 10, 8, 8, 7, 6, 4), seed = %d, threads = %d, file = '%s')"),
            n_cells, n_genes, seed, threads, h5ad)
  ), sim_script)
  sim <- timed("Rscript", sim_script, quiet = FALSE)
  cat(sprintf("  %.1f s, peak RSS %.0f MB, file %.0f MB\n", sim$wall, sim$rss_mb, file.info(h5ad)$size / 2^20))
  h5ad
}

# The data sets of bench/quality.R (and bench/vae_seeds.R), as described there.
# Simulated counts, subsampled per batch to batch-specific type proportions:
# `low(n_types, b)` gives the types of batch b whose weight is `low_w`.
simulate_subsampled <- function(group_prob, n_batches, low, low_w, sim_cells, seed, threads) {
  s <- simulate_counts(n_cells = sim_cells, n_genes = 3000, group_prob = group_prob, n_batches = n_batches,
                       batch_effect = "medium", format = "list", seed = seed, threads = threads)
  type <- as.character(s$cell_data$cell_type)
  batch <- as.character(s$cell_data$batch)
  types <- sort(unique(type), method = "radix")
  set.seed(seed)
  keep <- integer()
  for (b in sort(unique(batch), method = "radix")) {
    w <- stats::runif(length(types), 0.3, 1)
    w[low(length(types), b)] <- low_w
    for (k in seq_along(types)) {
      cells <- which(batch == b & type == types[k])
      n <- round(length(cells) * w[k] * 0.5)
      keep <- c(keep, cells[sample.int(length(cells), n)])
    }
  }
  keep <- sort(keep)
  hvg_subset(list(counts = s$counts[, keep], batch = batch[keep], label = type[keep]), threads)
}

quality_data <- function(name, root, threads, seed = 3L, sim_cells = 12000L) {
  if (name == "cellbench") {
    return(load_cellbench_hvg(root, threads))
  }
  if (name == "sim_rare") {
    return(simulate_subsampled(c(0.2, 0.15, 0.12, 0.1, 0.09, 0.08, 0.07, 0.05, 0.04, 0.03, 0.03, 0.02, 0.015, 0.01),
                               n_batches = 4, low = function(n, b) sample.int(n, 2), low_w = 0.1,
                               sim_cells = sim_cells, seed = seed, threads = threads))
  }
  # sim_confounded: 9 of the 12 types drawn once, three missing from each batch.
  set.seed(seed + 1)
  missing <- split(sample.int(12, 9), rep(1:3, each = 3))
  simulate_subsampled(c(0.2, 0.15, 0.12, 0.1, 0.09, 0.08, 0.07, 0.05, 0.04, 0.04, 0.03, 0.03), n_batches = 3,
                      low = function(n, b) missing[[as.integer(sub("\\D+", "", b))]], low_w = 0.02,
                      sim_cells = sim_cells, seed = seed, threads = threads)
}
