# fit_vae() against scvi-tools 1.4.2 SCVI over several model seeds, both at
# their defaults, on the data sets of bench/quality.R (issue 23 point 3:
# "mixes batches at least as well as scvi-tools at equal biology"). One seed
# per method, as bench/quality.R runs, cannot tell a difference of 0.01-0.02
# in iLISI from the spread of the seeds; this script measures that spread.
#
#   Rscript bench/vae_seeds.R [--data sim_confounded,sim_rare] [--seeds 1,2,3] [--threads 2]
#                             [--seed 3] [--sim-cells 12000]
#
# --seed and --sim-cells make the data as bench/quality.R does. For each
# data set and model seed s: fit_vae(seed = s) in this process and
# bench/peers.py scvi --seed s (scvi.settings.seed) in the peers' venv.
# Everything is scored in one integration_metrics() call (pre: run_pca() of
# the same genes). Prints the scores per seed, and per method their mean
# and the spread (max - min) over seeds.
suppressPackageStartupMessages({ library(scdistill); library(Matrix) })
args <- commandArgs(trailingOnly = TRUE)
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE))), "common.R"))
data_sets <- strsplit(bench_option(args, "--data", "sim_confounded,sim_rare", as = identity), ",")[[1]]
seeds <- as.integer(strsplit(bench_option(args, "--seeds", "1,2,3", as = identity), ",")[[1]])
threads <- bench_option(args, "--threads", 2L)
seed <- bench_option(args, "--seed", 3L)
sim_cells <- bench_option(args, "--sim-cells", 12000L)
root <- bench_root()
python <- peers_python(root)
cols <- c("total", "bio_conservation", "batch_correction", "ilisi", "kbet", "pcr_comparison", "isolated_labels")
for (name in data_sets) {
  d <- quality_data(name, root, threads, seed, sim_cells)
  work <- file.path(tempdir(), paste0("vae_seeds_", name))
  dir.create(work, showWarnings = FALSE)
  Matrix::writeMM(d$counts, file.path(work, "counts.mtx"))
  utils::write.csv(data.frame(cell = colnames(d$counts), batch = d$batch, label = d$label),
                   file.path(work, "obs.csv"), row.names = FALSE)
  pre <- run_pca(d$counts, n_pcs = 50, n_hvg = nrow(d$counts), batch = d$batch, threads = threads)
  embs <- list()
  for (s in seeds) {
    m <- fit_vae(d$counts, batch = d$batch, seed = s, threads = threads, progress = FALSE)
    embs[[paste0("fit_vae_", s)]] <- latent(m, d$counts)
    out <- paste0("scvi_", s)
    status <- system2(python, c(file.path(root, "bench", "peers.py"), "scvi", work, "--seed", s, "--out", out,
                                "--threads", threads), stdout = FALSE, stderr = FALSE)
    if (status != 0) stop("scvi-tools failed for seed ", s)
    embs[[out]] <- as.matrix(utils::read.csv(file.path(work, paste0(out, ".csv")), row.names = 1))
  }
  m <- integration_metrics(embs, d$batch, d$label, pre = pre, threads = threads)
  cat(sprintf("\n== %s: %s cells, %d batches; seeds %s\n", name, format(ncol(d$counts), big.mark = ","),
              length(unique(d$batch)), paste(seeds, collapse = ", ")))
  print(m[, cols], digits = 3)
  method <- sub("_[0-9]+$", "", rownames(m))
  for (k in unique(method)) {
    part <- m[method == k, cols]
    cat(sprintf("%-8s mean %s\n         spread %s\n", k, paste(sprintf("%s %.3f", cols, colMeans(part)), collapse = ", "),
                paste(sprintf("%.3f", apply(part, 2, function(v) max(v) - min(v))), collapse = ", ")))
  }
}
