# fit_multimodal() against scvi-tools 1.4.2 MULTIVI on the same paired
# RNA + ATAC data, the same training cells and epochs, both on CPU with the
# same number of threads, each with its own defaults otherwise (ours: one
# layer of 128 units, 10 latent dimensions per modality concatenated, NB
# with the regularizedvi priors; MULTIVI: two layers, n_hidden = min(128,
# sqrt(n_peaks)), n_latent = sqrt(n_hidden), ZINB genes, Bernoulli peaks).
# Neither stops early. Each runs in its own process under /usr/bin/time.
#
#   Rscript bench/multimodal.R [--cells 20000] [--genes 2000] [--peaks 20000] [--epochs 20] [--threads 2] [--rounds 2]
#
# --rounds N (default 2) alternates our default model and MULTIVI N times and
# reports each round's ratio; the table shows the round with the median ratio
# (see bench/vae_vs_scvi.R for why: this VM's speed drifts over minutes). The
# feature-scaling variant of ours runs once, after the rounds.
#
# Data: simulate_counts(n_groups = 6, n_batches = 2, atac = TRUE,
# atac_only_groups = 1): the last cell type has the first one's RNA and
# differs in its peaks only. Prints seconds per epoch (median without the
# first), the ratio, and iLISI/cLISI/ARI of both joint latents (also on the
# ATAC-only twin pair of cell types); appends to bench/results/multimodal.csv.
suppressPackageStartupMessages({ library(scdistill); library(Matrix) })
args <- commandArgs(trailingOnly = TRUE)
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE))), "common.R"))
opt <- function(name, default) bench_option(args, name, default)
n_cells <- opt("--cells", 20000L)
n_genes <- opt("--genes", 2000L)
n_peaks <- opt("--peaks", 20000L)
epochs <- opt("--epochs", 20L)
threads <- opt("--threads", 2L)
rounds <- max(1L, opt("--rounds", 2L))
root <- bench_root()
python <- peers_python(root)

sce <- simulate_counts(n_cells = n_cells, n_genes = n_genes, n_groups = 6, n_batches = 2, atac = TRUE,
                       n_peaks = n_peaks, atac_only_groups = 1, seed = 1, threads = threads)
rna <- SingleCellExperiment::counts(sce)
atac <- SummarizedExperiment::assay(SingleCellExperiment::altExp(sce, "ATAC"), "counts")
keep <- Matrix::colSums(rna) > 0 & Matrix::colSums(atac) > 0
rna <- rna[, keep]
atac <- atac[, keep]
work <- file.path(tempdir(), "multimodal")
dir.create(work, showWarnings = FALSE)
n <- ncol(rna)
set.seed(1)
n_val <- ceiling(0.1 * n)
while ((n - n_val) %% 128 %in% 1:2) n_val <- n_val + 1
split <- ifelse(seq_len(n) %in% sample(n, n_val), "validation", "train")
obs <- data.frame(batch = sce$batch[keep], label = sce$cell_type[keep], split = split, row.names = colnames(rna))
invisible(writeMM(rna, file.path(work, "rna.mtx")))
invisible(writeMM(atac, file.path(work, "atac.mtx")))
writeLines(rownames(rna), file.path(work, "genes.txt"))
writeLines(rownames(atac), file.path(work, "peaks.txt"))
utils::write.csv(obs, file.path(work, "obs.csv"))
saveRDS(list(rna = rna, atac = atac, obs = obs), file.path(work, "data.rds"))
cat(sprintf("\n== %s cells (%s train) x %s genes + %s peaks, %d batches, %d epochs, %d threads\n",
            format(n, big.mark = ","), format(sum(split == "train"), big.mark = ","), format(nrow(rna), big.mark = ","),
            format(nrow(atac), big.mark = ","), length(unique(obs$batch)), epochs, threads))

# Ours twice: at the defaults (batch -> ambient, dispersion, library), and with
# a per-batch feature scaling on both modalities as well (the simulator's batch
# effects are multiplicative per gene and per peak, what feature scaling models).
run_ours <- function(tag, extra) {
  script <- file.path(work, paste0("ours_", tag, ".R"))
  writeLines(c(
    "suppressPackageStartupMessages({library(scdistill); library(Matrix)})",
    sprintf("d <- readRDS('%s'); tr <- d$obs$split == 'train'", file.path(work, "data.rds")),
    "x <- list(RNA = d$rna[, tr], ATAC = d$atac[, tr])",
    "t0 <- proc.time()[['elapsed']]",
    sprintf(paste("m <- fit_multimodal(x, batch = d$obs$batch[tr], max_epochs = %d, early_stopping = FALSE,",
                  "validation_fraction = 0, threads = %d, device = 'cpu', progress = FALSE, seed = 0%s)"),
            epochs, threads, extra),
    "total <- proc.time()[['elapsed']] - t0",
    "z <- latent(m, list(RNA = d$rna, ATAC = d$atac))",
    "s <- m$history$seconds",
    sprintf("write.csv(z, '%s')", file.path(work, paste0("ours_", tag, "_latent.csv"))),
    sprintf("writeLines(sprintf('%%.6f %%.6f %%.4f', median(s[-1]), mean(s), total), '%s')",
            file.path(work, paste0("ours_", tag, ".txt")))), script)
  r <- timed(file.path(R.home("bin"), "Rscript"), script, quiet = FALSE)
  list(r = r, v = scan(file.path(work, paste0("ours_", tag, ".txt")), quiet = TRUE),
       latent = file.path(work, paste0("ours_", tag, "_latent.csv")))
}
js_num <- function(js, key) as.numeric(sub(sprintf('.*"%s": *([0-9.eE+-]+).*', key), "\\1", js))
per_round <- lapply(seq_len(rounds), function(k) {
  o1 <- run_ours("default", "")
  r_peer <- timed(python, c(file.path(root, "bench", "multimodal_peer.py"), work, "--epochs", epochs,
                            "--threads", threads), quiet = FALSE)
  js <- paste(readLines(file.path(work, "multivi.json"), warn = FALSE), collapse = " ")
  ratio <- js_num(js, "seconds_per_epoch_median") / o1$v[1]
  cat(sprintf("round %d: ours %.3f s/epoch, MULTIVI %.3f s/epoch, ratio %.2fx\n", k, o1$v[1],
              js_num(js, "seconds_per_epoch_median"), ratio))
  list(o1 = o1, r_peer = r_peer, js = js, ratio = ratio)
})
ratios <- vapply(per_round, `[[`, 0, "ratio")
pick <- per_round[[order(ratios)[ceiling(length(ratios) / 2)]]]
o1 <- pick$o1
r_peer <- pick$r_peer
js <- pick$js
num <- function(key) js_num(js, key)
o2 <- run_ours("scaled", ", feature_scaling_covariates = d$obs$batch[tr], feature_scaling_modalities = c('RNA', 'ATAC')")

score <- function(file, rows = rep(TRUE, nrow(obs))) {
  z <- as.matrix(utils::read.csv(file, row.names = 1))
  z <- z[rownames(obs), , drop = FALSE][rows, , drop = FALSE]
  integration_metrics(z, batch = obs$batch[rows], label = obs$label[rows], threads = threads)
}
types <- sort(unique(obs$label))
twins <- obs$label %in% c(types[1], types[length(types)])
files <- c(o1$latent, o2$latent, file.path(work, "multivi_latent.csv"))
m <- lapply(files, score)
t <- lapply(files, score, rows = twins)
pick <- function(l, f) vapply(l, function(x) x[[f]], numeric(1))
tab <- data.frame(
  method = c("scdistill fit_multimodal", "  + batch feature scaling", "scvi-tools MULTIVI"),
  s_per_epoch = c(o1$v[1], o2$v[1], num("seconds_per_epoch_median")),
  train_s = c(o1$v[3], o2$v[3], num("train_seconds")),
  process_s = c(o1$r$wall, o2$r$wall, r_peer$wall), peak_rss_mb = c(o1$r$rss_mb, o2$r$rss_mb, r_peer$rss_mb),
  ilisi = pick(m, "ilisi"), clisi = pick(m, "clisi"), ari = pick(m, "ari_kmeans"), nmi = pick(m, "nmi_kmeans"),
  twins_ari = pick(t, "ari_kmeans"))
print(tab, row.names = FALSE, digits = 4)
cat(sprintf("speed-up (MULTIVI s/epoch / ours): %.2fx (rounds: %s)\n", tab$s_per_epoch[3] / tab$s_per_epoch[1],
            paste(sprintf("%.2fx", ratios), collapse = ", ")))
tab$date <- format(Sys.time(), "%Y-%m-%d %H:%M")
tab$cells <- n
tab$genes <- nrow(rna)
tab$peaks <- nrow(atac)
tab$epochs <- epochs
tab$threads <- threads
tab$rounds <- rounds
tab$round_ratios <- paste(sprintf("%.2f", ratios), collapse = " ")
out <- file.path(root, "bench", "results", "multimodal.csv")
append_csv(tab, out)
