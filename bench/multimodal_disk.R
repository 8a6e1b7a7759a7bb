# fit_multimodal() from disk against the same cells in memory (issue 27, part 2).
#
#   Rscript bench/multimodal_disk.R [--cells 50000] [--genes 2000] [--peaks 10000] [--epochs 3]
#                                   [--threads 2] [--seed 1] [--modes disk,memory]
#
# One paired RNA + ATAC simulation (10 types in unequal proportions, 3
# batches) is drawn in its own R process and written to two .h5ad files
# (RNA and ATAC, each with the cell columns) block by block. Then, each in its own R process under
# /usr/bin/time:
#   disk   fit_multimodal(list(RNA = <file>, ATAC = <file>)), both modalities
#          streamed from the files in step;
#   memory both files read into memory (as_counts()), then fit_multimodal().
# Both at the package's defaults (batch = "batch") with `--epochs` epochs
# and no early stopping. Reported: seconds per epoch (mean of the epochs
# after the first, and the first), wall seconds, peak RSS, validation -ELBO
# (each on its own held-out 10%: whole blocks on disk, cells in memory), the
# -ELBO of both models on the same 5,000 cells held out by the disk model
# (scored in memory), and the integration metrics of both joint latent
# spaces on 10,000 cells. Appends to bench/results/out_of_core_multimodal.csv.
args <- commandArgs(TRUE)
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE))), "common.R"))
root <- bench_root()
n_cells <- bench_option(args, "--cells", 50000)
n_genes <- bench_option(args, "--genes", 2000)
n_peaks <- bench_option(args, "--peaks", 10000)
epochs <- bench_option(args, "--epochs", 3)
threads <- bench_option(args, "--threads", 2)
seed <- bench_option(args, "--seed", 1)
modes <- strsplit(bench_option(args, "--modes", "disk,memory", as = as.character), ",")[[1]]
work <- file.path(tempdir(), "multimodal_disk")
dir.create(work, showWarnings = FALSE)
rna <- file.path(work, "rna.h5ad")
atac <- file.path(work, "atac.h5ad")

cat(sprintf("simulating %s cells x (%d genes + %d peaks)\n", format(n_cells, big.mark = ","), n_genes, n_peaks))
sim_script <- file.path(work, "simulate.R")
# Written block by block (simulate_counts(file =)): the pair is never held,
# so the simulation's size is not bounded by memory.
writeLines(c(
  "suppressMessages(library(scdistill))",
  sprintf(paste0("s <- simulate_counts(n_cells = %d, n_genes = %d, n_groups = 10, n_batches = 3, ",
                 "group_prob = c(20, 15, 12, 10, 10, 8, 8, 7, 6, 4), atac = TRUE, n_peaks = %d, seed = %d, ",
                 "file = c(RNA = '%s', ATAC = '%s'), threads = %d)"),
          n_cells, n_genes, n_peaks, seed, rna, atac, threads)
), sim_script)
sim <- timed("Rscript", sim_script, quiet = FALSE)
cat(sprintf("  %.1f s, peak RSS %.0f MB; files %.0f + %.0f MB\n", sim$wall, sim$rss_mb,
            file.info(rna)$size / 2^20, file.info(atac)$size / 2^20))

run_mode <- function(mode) {
  out <- file.path(work, paste0(mode, ".rds"))
  script <- file.path(work, paste0(mode, ".R"))
  load <- if (mode == "disk") {
    sprintf("x <- list(RNA = '%s', ATAC = '%s')", rna, atac)
  } else {
    sprintf(paste0("r <- as_counts('%s'); x <- list(RNA = r$counts, ATAC = as_counts('%s')$counts); ",
                   "attr(x, 'cell_data') <- r$cell_data; rm(r)"), rna, atac)
  }
  writeLines(c(
    "suppressMessages(library(scdistill))",
    load,
    sprintf(paste0("m <- fit_multimodal(x, batch = 'batch', max_epochs = %d, early_stopping = FALSE, seed = 0, ",
                   "threads = %d, progress = FALSE)"), epochs, threads),
    sprintf("saveRDS(list(history = m$history, validation = m$validation_cells, latent = latent(m)), '%s')", out),
    sprintf("save_model(m, '%s', overwrite = TRUE)", file.path(work, paste0(mode, ".scdistill")))
  ), script)
  t <- timed("Rscript", script, quiet = FALSE)
  r <- readRDS(out)
  s <- r$history$seconds
  list(mode = mode, ok = t$ok, wall = t$wall, rss_mb = t$rss_mb, first_epoch_s = s[1],
       epoch_s = if (length(s) > 1) mean(s[-1]) else s[1], validation_elbo = utils::tail(r$history$validation_elbo, 1),
       validation = r$validation, latent = r$latent)
}

res <- lapply(modes, run_mode)
names(res) <- modes

suppressMessages(library(scdistill))
set.seed(seed)
held <- sort(sample(res[[1]]$validation, min(5000, length(res[[1]]$validation))))
sample_cells <- sort(sample(n_cells, min(10000, n_cells)))
r <- as_counts(rna, cells = held)
x_held <- list(RNA = r$counts, ATAC = as_counts(atac, cells = held)$counts)
attr(x_held, "cell_data") <- r$cell_data
cd <- as_counts(rna, cells = sample_cells)$cell_data
tab <- do.call(rbind, lapply(res, function(r) {
  m <- load_model(file.path(work, paste0(r$mode, ".scdistill")))
  im <- integration_metrics(r$latent[sample_cells, ], batch = cd$batch, label = cd$cell_type, threads = threads)
  data.frame(mode = r$mode, ok = r$ok, cells = n_cells, genes = n_genes, peaks = n_peaks, epochs = epochs,
             threads = threads, wall_s = round(r$wall, 1), peak_rss_mb = round(r$rss_mb),
             first_epoch_s = round(r$first_epoch_s, 2), epoch_s = round(r$epoch_s, 2),
             validation_elbo = round(r$validation_elbo, 2),
             elbo_same_cells = round(elbo(m, x_held, threads = threads), 2),
             nmi_leiden = round(im$nmi_leiden, 3), ilisi = round(im$ilisi, 3), total = round(im$total, 3))
}))
tab$date <- format(Sys.time(), "%Y-%m-%d %H:%M")
print(tab, row.names = FALSE)
if (all(c("disk", "memory") %in% modes)) {
  d <- tab[tab$mode == "disk", ]
  m <- tab[tab$mode == "memory", ]
  cat(sprintf("\ndisk / memory: epoch %.2fx, wall %.2fx, peak RSS %.2fx, -ELBO on the same cells %+.2f%%\n",
              d$epoch_s / m$epoch_s, d$wall_s / m$wall_s, d$peak_rss_mb / m$peak_rss_mb,
              100 * (d$elbo_same_cells / m$elbo_same_cells - 1)))
}
append_csv(tab, file.path(root, "bench", "results", "out_of_core_multimodal.csv"))
