# Data-parallel training on several processes (issue 28): epoch time and
# held-out ELBO of fit_vae() on 1, 2 and 4 processes of one machine (Gloo).
#
#   Rscript bench/distributed.R [--cells 100000] [--genes 2000] [--epochs 3] [--threads 2 | --threads-each 1]
#                               [--workers 1,2,4] [--batch-size 128] [--norm batch] [--data memory|disk] [--seed 1]
#
# One simulation (10 types in unequal proportions, 3 batches) is written to
# an .h5ad file by simulate_counts(file =). Then, for each number of
# processes W, in its own R process under /usr/bin/time: fit_vae(x, workers =
# W, threads = --threads) with --epochs epochs and no early stopping, the
# counts read into memory (--data memory; every process holds them) or
# streamed from the file (--data disk). `threads` is split between the
# processes (at least 1 each: W above the core count oversubscribes, which
# the table says); with --threads-each N every process gets N threads
# instead (W processes use W x N threads: the scaling where the cores are
# free). --batch-size is the global minibatch (each process computes its
# 1/W of it). Reported: seconds per epoch (mean of the epochs after the
# first), speed-up and scaling efficiency against W = 1, wall seconds and
# peak RSS of the first process, and the validation -ELBO of each model on
# the same held-out cells (the split does not depend on W), relative to W = 1.
# With --norm layer (or none) the models of every W are the same up to
# floating-point order; with batch norm each process normalises with its own
# cells' statistics, as PyTorch's DDP does. Appends to
# bench/results/distributed.csv.
args <- commandArgs(TRUE)
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE))), "common.R"))
root <- bench_root()
n_cells <- bench_option(args, "--cells", 100000)
n_genes <- bench_option(args, "--genes", 2000)
epochs <- bench_option(args, "--epochs", 3)
threads <- bench_option(args, "--threads", 2)
threads_each <- bench_option(args, "--threads-each", NA)
batch_size <- bench_option(args, "--batch-size", 128)
seed <- bench_option(args, "--seed", 1)
norm <- bench_option(args, "--norm", "batch", as = as.character)
data <- bench_option(args, "--data", "memory", as = as.character)
workers <- as.integer(strsplit(bench_option(args, "--workers", "1,2,4", as = as.character), ",")[[1]])
cores <- parallel::detectCores()
work <- file.path(tempdir(), "distributed")
dir.create(work, showWarnings = FALSE)
h5ad <- simulate_h5ad(work, n_cells, n_genes, seed, threads)

threads_of <- function(w) if (is.na(threads_each)) threads else w * threads_each
run_workers <- function(w) {
  out <- file.path(work, sprintf("w%d.rds", w))
  script <- file.path(work, sprintf("w%d.R", w))
  load <- if (data == "disk") sprintf("x <- h5_counts('%s')", h5ad) else sprintf("x <- as_counts('%s', batch = 'batch')", h5ad)
  writeLines(c(
    "suppressMessages(library(scdistill))",
    load,
    sprintf(paste0("m <- fit_vae(x, batch = 'batch', norm = '%s', max_epochs = %d, early_stopping = FALSE, ",
                   "batch_size = %d, seed = 0, threads = %d, workers = %d, progress = FALSE)"), norm, epochs,
            batch_size, threads_of(w), w),
    sprintf("saveRDS(list(history = m$history, model = m), '%s')", out)
  ), script)
  cat(sprintf("fit_vae(workers = %d) ...\n", w))
  t <- timed("Rscript", script, quiet = FALSE)
  r <- readRDS(out)
  s <- r$history$seconds
  list(workers = w, ok = t$ok, wall = t$wall, rss_mb = t$rss_mb, epoch_s = if (length(s) > 1) mean(s[-1]) else s[1],
       validation_elbo = utils::tail(r$history$validation_elbo, 1), model = r$model)
}

res <- lapply(workers, run_workers)
base <- res[[1]]
tab <- do.call(rbind, lapply(res, function(r) {
  each <- max(1L, threads_of(r$workers) %/% r$workers)
  data.frame(workers = r$workers, threads_each = each, cores = cores, oversubscribed = r$workers * each > cores,
             data = data, norm = norm, batch_size = batch_size,
             cells = n_cells, genes = n_genes, epochs = epochs, epoch_s = round(r$epoch_s, 2),
             speedup = round(base$epoch_s / r$epoch_s, 2),
             efficiency = round(base$epoch_s / r$epoch_s / (r$workers / base$workers), 2),
             wall_s = round(r$wall, 1), rank0_rss_mb = round(r$rss_mb), validation_elbo = round(r$validation_elbo, 3),
             elbo_vs_first = sprintf("%+.3f%%", 100 * (r$validation_elbo / base$validation_elbo - 1)))
}))
tab$date <- format(Sys.time(), "%Y-%m-%d %H:%M")
print(tab, row.names = FALSE)
append_csv(tab, file.path(root, "bench", "results", "distributed.csv"))
unlink(h5ad)
