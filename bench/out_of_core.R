# Training from disk against training in memory (issue 27, part 2).
#
#   Rscript bench/out_of_core.R [--cells 100000] [--genes 2000] [--epochs 3] [--threads 2] [--seed 1]
#                               [--modes disk,memory,disk_h5] [--model vae|distill] [--peer] [--de] [--expression] [--keep]
#
# One simulation (10 types in unequal proportions, 3 batches) is written
# straight to an .h5ad file with simulate_counts(file =) (never held in
# memory). Then, each in its own R process under /usr/bin/time:
#   disk   fit_vae(<file>) streaming minibatches from the file;
#   memory the file read into memory (as_counts()), then fit_vae() on it.
# Both at the package's defaults with `--epochs` epochs and no early
# stopping. Reported: seconds per epoch (mean of the epochs after the first
# and the first), wall seconds, peak RSS, validation -ELBO (each on its own
# held-out 10%), and the -ELBO of both models on the same 10,000 cells from
# the disk model's held-out blocks (held out for the disk model; about 90%
# of them were training cells of the memory model, so this comparison
# favours the memory model). With --peer, scvi-tools 1.4.2 SCVI trains on the
# same file opened in AnnData's backed mode (bench/backed_peer.py, peers'
# venv), same epochs and threads: its seconds per epoch, wall seconds, peak
# RSS and validation -ELBO (scvi's own held-out 10%) beside ours, and the
# end-to-end ratio. Appends to bench/results/out_of_core.csv.
# With --de, each mode's model (saved) is loaded in a further R process per
# mode that runs differential_expression() of the two largest cell types
# (Group1 vs Group2) on the file, or on the file read into memory: the
# change mode at its defaults and MC dropout with 20 passes. Reported:
# seconds of each, peak RSS of the process, and whether the tables from
# disk and memory are the same (bench/results/out_of_core_de.csv).
# With --expression, likewise normalized_expression() of every cell decoded
# to the first batch (library size 10^4): from the file written block by
# block to an HDF5 file (`h5_file =`), or from memory into a dense matrix.
# Reported: seconds, peak RSS of the process, the size of what was written,
# and the largest difference between the two results over 2,000 cells
# (bench/results/out_of_core_expression.csv).
# With --model distill, distill() instead (Harmony teacher at its defaults,
# `--epochs` epochs per phase, no early stopping): wall seconds and peak RSS
# of the whole job (teacher included), seconds per epoch of each phase,
# validation MSE and NLL, the student's R² on its teacher, how far the
# teacher computed from disk lies from the one computed in memory, and the
# student's integration metrics (batch and cell type) on the same 10,000
# cells (bench/results/out_of_core_distill.csv). Mode `disk_h5` trains from
# the file as `disk` does, with the latent space written to an HDF5 file
# (`fit_vae(h5_file =)`; for distill() Z and Z*, `distill(h5_file =)`).
args <- commandArgs(TRUE)
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE))), "common.R"))
root <- bench_root()
n_cells <- bench_option(args, "--cells", 100000)
n_genes <- bench_option(args, "--genes", 2000)
epochs <- bench_option(args, "--epochs", 3)
threads <- bench_option(args, "--threads", 2)
seed <- bench_option(args, "--seed", 1)
modes <- strsplit(bench_option(args, "--modes", "disk,memory", as = as.character), ",")[[1]]
model_kind <- bench_option(args, "--model", "vae", as = as.character)
stopifnot(model_kind %in% c("vae", "distill"))
work <- file.path(tempdir(), "out_of_core")
dir.create(work, showWarnings = FALSE)
h5ad <- simulate_h5ad(work, n_cells, n_genes, seed, threads)

run_mode <- function(mode) {
  out <- file.path(work, paste0(mode, ".rds"))
  script <- file.path(work, paste0(mode, ".R"))
  load <- if (mode %in% c("disk", "disk_h5")) sprintf("x <- '%s'", h5ad) else
    sprintf("x <- as_counts('%s', batch = 'batch')", h5ad)
  results <- file.path(work, "results.h5")
  if (mode == "disk_h5") unlink(results)
  fit <- if (model_kind == "vae") {
    sprintf(paste0("m <- fit_vae(x, batch = 'batch', max_epochs = %d, early_stopping = FALSE, seed = 0, ",
                   "threads = %d, progress = FALSE%s)"), epochs, threads,
            if (mode == "disk_h5") sprintf(", h5_file = '%s'", results) else "")
  } else {
    sprintf(paste0("m <- distill(x, batch = 'batch', max_epochs_encoder = %d, max_epochs_decoder = %d, ",
                   "early_stopping = FALSE, seed = 0, threads = %d, progress = FALSE%s)"), epochs, epochs, threads,
            if (mode == "disk_h5") sprintf(", h5_file = '%s'", results) else "")
  }
  writeLines(c(
    "suppressMessages(library(scdistill))",
    load,
    fit,
    if (model_kind == "distill") {
      sprintf(paste0("saveRDS(list(info = m$info, validation = m$validation_cells, latent = m$latent, ",
                     "teacher = teacher_latent(m), r2 = summary(m)$r2), '%s')"), out)
    } else {
      sprintf("saveRDS(list(history = m$history, validation = m$validation_cells, model = m), '%s')", out)
    },
    sprintf("save_model(m, '%s', overwrite = TRUE)", file.path(work, paste0(mode, ".scdistill")))
  ), script)
  t <- timed("Rscript", script, quiet = FALSE)
  r <- readRDS(out)
  if (model_kind == "distill") return(c(r, list(mode = mode, ok = t$ok, wall = t$wall, rss_mb = t$rss_mb)))
  s <- r$history$seconds
  list(mode = mode, ok = t$ok, wall = t$wall, rss_mb = t$rss_mb, first_epoch_s = s[1],
       epoch_s = if (length(s) > 1) mean(s[-1]) else s[1], validation_elbo = utils::tail(r$history$validation_elbo, 1),
       validation = r$validation, model = r$model)
}

res <- lapply(modes, run_mode)
names(res) <- modes

if (model_kind == "distill") {
  suppressMessages(library(scdistill))
  held <- res[[1]]$validation
  set.seed(seed)
  cells <- sort(sample(held, min(10000, length(held))))
  cd <- as_counts(h5_counts(h5ad), cells = cells)$cell_data
  per_epoch <- function(h) if (length(h$seconds) > 1) mean(unlist(h$seconds)[-1]) else unlist(h$seconds)[1]
  tab <- do.call(rbind, lapply(res, function(r) {
    m <- integration_metrics(as.matrix(r$latent[cells, ]), batch = cd$batch, label = cd$cell_type, threads = threads)
    e <- r$info$history_encoder
    d <- r$info$history_decoder
    data.frame(mode = r$mode, cells = n_cells, genes = n_genes, epochs = epochs, threads = threads,
               wall_s = round(r$wall, 1), peak_rss_mb = round(r$rss_mb), encoder_epoch_s = round(per_epoch(e), 1),
               decoder_epoch_s = round(per_epoch(d), 1),
               validation_mse = signif(utils::tail(unlist(e$validation_elbo), 1), 4),
               validation_nll = round(utils::tail(unlist(d$validation_elbo), 1), 2),
               r2_teacher = round(r$r2[["all"]], 4),
               teacher_vs_first = signif(max(abs(as.matrix(r$teacher[cells, ]) - as.matrix(res[[1]]$teacher[cells, ]))), 3),
               latent_vs_first = signif(max(abs(as.matrix(r$latent[cells, ]) - as.matrix(res[[1]]$latent[cells, ]))), 3),
               nmi_leiden = round(m$nmi_leiden, 3), asw_label = round(m$silhouette_label, 3),
               ilisi = round(m$ilisi, 3), total = round(m$total, 3))
  }))
  tab$date <- format(Sys.time(), "%Y-%m-%d %H:%M")
  print(tab, row.names = FALSE)
  if (all(c("disk", "memory") %in% modes)) {
    cat(sprintf("\ndisk / memory: wall %.2fx, peak RSS %.2fx, encoder epoch %.2fx, decoder epoch %.2fx\n",
                res$disk$wall / res$memory$wall, res$disk$rss_mb / res$memory$rss_mb,
                tab$encoder_epoch_s[1] / tab$encoder_epoch_s[2], tab$decoder_epoch_s[1] / tab$decoder_epoch_s[2]))
  }
  append_csv(tab, file.path(root, "bench", "results", "out_of_core_distill.csv"))
  if (!"--keep" %in% args) unlink(h5ad)
  quit(save = "no")
}

# Both models on the same cells: 10,000 of the disk model's held-out cells.
held <- res[[1]]$validation
set.seed(seed)
cells <- sort(sample(held, min(10000, length(held))))
suppressMessages(library(scdistill))
same <- as_counts(h5_counts(h5ad), cells = cells, batch = "batch")
for (m in modes) {
  res[[m]]$heldout_elbo <- elbo(res[[m]]$model, same, seed = 1, threads = threads)
}

if ("--peer" %in% args) {
  py <- peers_python(root)
  out <- file.path(work, "backed.json")
  cat("scvi-tools SCVI on the backed file ...\n")
  t <- timed(py, c(file.path(root, "bench", "backed_peer.py"), h5ad, out, "--epochs", epochs, "--threads", threads),
             quiet = FALSE)
  j <- jsonlite::fromJSON(out)
  res$scvi_backed <- list(mode = "scvi-tools backed", ok = t$ok, wall = t$wall, rss_mb = t$rss_mb,
                          first_epoch_s = NA, epoch_s = j$epoch_s, validation_elbo = j$validation_elbo,
                          heldout_elbo = NA)
}

tab <- do.call(rbind, lapply(res, function(r) {
  data.frame(mode = r$mode, cells = n_cells, genes = n_genes, epochs = epochs, threads = threads,
             first_epoch_s = round(r$first_epoch_s, 1), epoch_s = round(r$epoch_s, 1), wall_s = round(r$wall, 1),
             peak_rss_mb = round(r$rss_mb), validation_elbo = round(r$validation_elbo, 2),
             same_cells_elbo = round(r$heldout_elbo, 2))
}))
tab$date <- format(Sys.time(), "%Y-%m-%d %H:%M")
print(tab, row.names = FALSE)
if (all(c("disk", "memory") %in% modes)) {
  cat(sprintf("\ndisk / memory: epoch %.2fx, peak RSS %.2fx, same-cells -ELBO %+.2f%%\n",
              res$disk$epoch_s / res$memory$epoch_s, res$disk$rss_mb / res$memory$rss_mb,
              100 * (res$disk$heldout_elbo / res$memory$heldout_elbo - 1)))
}
if (!is.null(res$scvi_backed) && !is.null(res$disk)) {
  cat(sprintf("scvi-tools backed / ours from disk: epoch %.2fx, wall %.2fx, peak RSS %.2fx\n",
              res$scvi_backed$epoch_s / res$disk$epoch_s, res$scvi_backed$wall / res$disk$wall,
              res$scvi_backed$rss_mb / res$disk$rss_mb))
}
append_csv(tab, file.path(root, "bench", "results", "out_of_core.csv"))

if ("--de" %in% args) {
  model_file <- file.path(work, paste0(modes[1], ".scdistill"))
  de_mode <- function(mode) {
    out <- file.path(work, paste0("de_", mode, ".rds"))
    script <- file.path(work, paste0("de_", mode, ".R"))
    load <- if (mode == "disk") sprintf("x <- '%s'", h5ad) else sprintf("x <- as_counts('%s', batch = 'batch')", h5ad)
    writeLines(c(
      "suppressMessages(library(scdistill))",
      sprintf("m <- load_model('%s')", model_file),
      load,
      "t0 <- proc.time()[['elapsed']]",
      sprintf("a <- differential_expression(m, x, 'cell_type', 'Group1', 'Group2', threads = %d)", threads),
      "t1 <- proc.time()[['elapsed']]",
      sprintf(paste0("b <- differential_expression(m, x, 'cell_type', 'Group1', 'Group2', method = 'mc_dropout', ",
                     "n_samples = 20, threads = %d)"), threads),
      "t2 <- proc.time()[['elapsed']]",
      sprintf("saveRDS(list(change = a, mc = b, change_s = t1 - t0, mc_s = t2 - t1), '%s')", out)
    ), script)
    t <- timed("Rscript", script, quiet = FALSE)
    c(readRDS(out), list(ok = t$ok, wall = t$wall, rss_mb = t$rss_mb))
  }
  de <- lapply(modes, de_mode)
  names(de) <- modes
  same <- if (all(c("disk", "memory") %in% modes)) {
    isTRUE(all.equal(as.data.frame(de$disk$change), as.data.frame(de$memory$change))) &&
      isTRUE(all.equal(as.data.frame(de$disk$mc), as.data.frame(de$memory$mc)))
  } else {
    NA
  }
  de_tab <- do.call(rbind, lapply(modes, function(m) {
    r <- de[[m]]
    data.frame(mode = m, cells = n_cells, genes = n_genes, threads = threads,
               cells_group1 = attr(r$change, "params")$n_cells1, cells_group2 = attr(r$change, "params")$n_cells2,
               change_s = round(r$change_s, 1), mc_dropout_20_s = round(r$mc_s, 1), wall_s = round(r$wall, 1),
               peak_rss_mb = round(r$rss_mb), called_change = sum(r$change$is_de), called_mc = sum(r$mc$is_de),
               same_tables = same)
  }))
  de_tab$date <- format(Sys.time(), "%Y-%m-%d %H:%M")
  cat("\ndifferential_expression(), Group1 vs Group2:\n")
  print(de_tab, row.names = FALSE)
  append_csv(de_tab, file.path(root, "bench", "results", "out_of_core_de.csv"))
}
if ("--expression" %in% args) {
  model_file <- file.path(work, paste0(modes[1], ".scdistill"))
  expr_mode <- function(mode) {
    out <- file.path(work, paste0("expr_", mode, ".rds"))
    script <- file.path(work, paste0("expr_", mode, ".R"))
    h5 <- file.path(work, "expression.h5")
    unlink(h5)
    call <- if (mode == "disk") {
      sprintf(paste0("e <- normalized_expression(m, '%s', transform_batch = 'Batch1', library_size = 1e4, ",
                     "h5_file = '%s', threads = %d)"), h5ad, h5, threads)
    } else {
      sprintf(paste0("x <- as_counts('%s', batch = 'batch'); t0 <- proc.time()[['elapsed']]; ",
                     "e <- normalized_expression(m, x, transform_batch = 'Batch1', library_size = 1e4, threads = %d)"),
              h5ad, threads)
    }
    writeLines(c(
      "suppressMessages(library(scdistill))",
      sprintf("m <- load_model('%s')", model_file),
      "t0 <- proc.time()[['elapsed']]",
      call,
      "s <- proc.time()[['elapsed']] - t0",
      sprintf("set.seed(1); at <- sort(sample(ncol(e), min(2000, ncol(e))))"),
      sprintf("saveRDS(list(s = s, some = as.matrix(e[, at]), bytes = if ('%s' == 'disk') file.size('%s') else 8 * length(e)), '%s')",
              mode, h5, out)
    ), script)
    t <- timed("Rscript", script, quiet = FALSE)
    c(readRDS(out), list(ok = t$ok, wall = t$wall, rss_mb = t$rss_mb))
  }
  ex <- lapply(modes, expr_mode)
  names(ex) <- modes
  diff <- if (all(c("disk", "memory") %in% modes)) max(abs(ex$disk$some - ex$memory$some)) else NA
  ex_tab <- do.call(rbind, lapply(modes, function(m) {
    r <- ex[[m]]
    data.frame(mode = m, cells = n_cells, genes = n_genes, threads = threads, seconds = round(r$s, 1),
               wall_s = round(r$wall, 1), peak_rss_mb = round(r$rss_mb), result_mb = round(r$bytes / 1e6),
               max_abs_diff = signif(diff, 3))
  }))
  ex_tab$date <- format(Sys.time(), "%Y-%m-%d %H:%M")
  cat("\nnormalized_expression(), every cell decoded to Batch1:\n")
  print(ex_tab, row.names = FALSE)
  append_csv(ex_tab, file.path(root, "bench", "results", "out_of_core_expression.csv"))
}
if (!"--keep" %in% args) unlink(h5ad)
