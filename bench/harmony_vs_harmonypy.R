# run_harmony() against harmonypy 2.1.0 (its C++ backend) on the same 50 PCs.
#
#   Rscript bench/harmony_vs_harmonypy.R [n_cells ...] [--threads 1,2]
#
# For each size (default 1e4 1e5 1e6): simulate_counts() with 10 batches and 8
# cell types, run_pca() (50 PCs of 2,000 HVGs), then both Harmonies with
# their defaults (theta 2, sigma 0.1, dynamic lambda, K = min(N/30, 100)) on 1
# and 2 threads, each in its own process; the seconds are those of the
# Harmony call itself. iLISI/cLISI of both outputs (and of the PCs) are
# computed on the same 20,000 random cells when there are more (the kNN
# graph of the metrics is exact). Prints a table with the ratio
# harmonypy / ours and appends it to bench/results/harmony_vs_harmonypy.csv.
suppressPackageStartupMessages({ library(scdistill) })
args <- commandArgs(trailingOnly = TRUE)
ti <- which(args == "--threads")
thread_set <- if (length(ti)) as.integer(strsplit(args[ti + 1], ",")[[1]]) else c(1L, 2L)
sizes <- as.numeric(args[!startsWith(args, "--") & !seq_along(args) %in% (ti + 1)])
if (!length(sizes)) sizes <- c(1e4, 1e5, 1e6)
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE))), "common.R"))
root <- bench_root()
python <- peers_python(root)

for (n in sizes) {
  work <- file.path(tempdir(), sprintf("harmony_%d", as.integer(n)))
  dir.create(work, showWarnings = FALSE)
  cat(sprintf("\n== %s cells: simulating and computing 50 PCs ...\n", format(n, big.mark = ",")))
  s <- simulate_counts(n_cells = n, n_genes = 2000, n_groups = 8, n_batches = 10, batch_effect = "strong",
                       format = "list", threads = 2, seed = 1)
  pcs <- run_pca(s$counts, n_pcs = 50, n_hvg = 2000, batch = s$cell_data$batch, threads = 2)
  batch <- s$cell_data$batch
  label <- s$cell_data$cell_type
  writeBin(as.vector(t(unclass_pcs <- matrix(as.numeric(pcs), nrow(pcs)))), file.path(work, "pcs.f64"), endian = "little")
  writeBin(as.integer(batch) - 1L, file.path(work, "batch.i32"), endian = "little")
  rm(s)
  saveRDS(list(pcs = unclass_pcs, batch = batch), file.path(work, "input.rds"))
  ours_script <- file.path(work, "ours.R")
  rows <- list()
  outs <- list()
  for (th in thread_set) {
    writeLines(c(
      "suppressPackageStartupMessages(library(scdistill))",
      sprintf("d <- readRDS('%s')", file.path(work, "input.rds")),
      "invisible(torch_config()) # loads the native library first, as Python's import is not timed",
      "t0 <- proc.time()[['elapsed']]",
      sprintf("z <- run_harmony(d$pcs, batch = d$batch, threads = %d, progress = FALSE)", th),
      "s <- proc.time()[['elapsed']] - t0",
      sprintf("writeBin(as.vector(t(unclass(z)[, ])), '%s', endian = 'little')", file.path(work, "ours.f64")),
      sprintf("writeLines(sprintf('%%.4f %%d', s, attr(z, 'harmony')$n_iter), '%s')", file.path(work, "ours.txt"))),
      ours_script)
    r1 <- timed(file.path(R.home("bin"), "Rscript"), ours_script, quiet = FALSE)
    v <- strsplit(readLines(file.path(work, "ours.txt")), " ")[[1]]
    r2 <- timed(python, c(file.path(root, "bench", "harmony_peer.py"), work, format(n, scientific = FALSE), 50, th), quiet = FALSE)
    js <- paste(readLines(file.path(work, "harmonypy.json"), warn = FALSE), collapse = " ")
    num <- function(key) as.numeric(sub(sprintf('.*"%s": *([0-9.eE+-]+).*', key), "\\1", js))
    rows[[length(rows) + 1]] <- data.frame(
      n_cells = n, threads = th, ours_s = as.numeric(v[1]), harmonypy_s = num("seconds"),
      ratio = num("seconds") / as.numeric(v[1]), ours_iter = as.integer(v[2]), harmonypy_iter = num("iterations"),
      ours_rss_mb = r1$rss_mb, harmonypy_rss_mb = r2$rss_mb)
    read_emb <- function(f) matrix(readBin(f, "double", n = n * 50, endian = "little"), ncol = 50, byrow = TRUE)
    if (th == thread_set[1]) outs <- list(ours = read_emb(file.path(work, "ours.f64")),
                                          harmonypy = read_emb(file.path(work, "harmonypy.f64")))
  }
  tab <- do.call(rbind, rows)
  set.seed(1)
  sub <- if (n > 20000) sort(sample(n, 20000)) else seq_len(n)
  embs <- list(pca = unclass_pcs[sub, ], ours = outs$ours[sub, ], harmonypy = outs$harmonypy[sub, ])
  m <- integration_metrics(embs, batch = batch[sub], label = label[sub], threads = 2)
  tab$ours_ilisi <- m["ours", "ilisi"]
  tab$harmonypy_ilisi <- m["harmonypy", "ilisi"]
  tab$ours_clisi <- m["ours", "clisi"]
  tab$harmonypy_clisi <- m["harmonypy", "clisi"]
  tab$pca_ilisi <- m["pca", "ilisi"]
  print(tab, row.names = FALSE, digits = 4)
  tab$date <- format(Sys.time(), "%Y-%m-%d %H:%M")
  out <- file.path(root, "bench", "results", "harmony_vs_harmonypy.csv")
  append_csv(tab, out)
}
