# How many PCs the teacher corrects (issue 23 point 2): harmony_teacher()
# keeps 50 (n_pcs), as scanpy and scDistill 0.3.1 do; Seurat's integration
# and neighbour steps use 30. Here the teacher as harmony_teacher() makes it
# at its defaults (run_pca() of bench/quality.R's genes, log2 CP10k, scaled,
# batch-aware HVGs), then run_harmony() on its first k PCs for each k of
# --pcs, and on the "elbow" PC (the one farthest below the straight line from
# the first PC's variance to the 50th's), all scored in one call.
#
#   Rscript bench/teacher_pcs.R [--data cellbench,sim_rare,sim_confounded] [--pcs 10,20,30,50]
#                               [--scib] [--threads 2] [--seed 3] [--sim-cells 12000]
#
# Teacher embeddings only: a student has the teacher's dimensions, so it is
# to be measured with the n_pcs this points to (bench/seeds.R). Scored by
# integration_metrics() (pre: the 50-PC run_pca()) and, with --scib, by
# scib-metrics (bench/scib_score.py in the peers' venv).
suppressPackageStartupMessages({ library(scdistill); library(Matrix) })
args <- commandArgs(trailingOnly = TRUE)
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE))), "common.R"))
data_sets <- strsplit(bench_option(args, "--data", "cellbench,sim_rare,sim_confounded", as = identity), ",")[[1]]
pcs <- as.integer(strsplit(bench_option(args, "--pcs", "10,20,30,50", as = identity), ",")[[1]])
with_scib <- "--scib" %in% args
threads <- bench_option(args, "--threads", 2L)
seed <- bench_option(args, "--seed", 3L)
sim_cells <- bench_option(args, "--sim-cells", 12000L)
root <- bench_root()
if (max(pcs) > 50) stop("--pcs: at most 50")
python <- if (with_scib) peers_python(root)
cols <- c("total", "bio_conservation", "batch_correction", "silhouette_label", "isolated_labels", "ari_kmeans",
          "nmi_kmeans", "ilisi", "kbet", "pcr_comparison")

for (name in data_sets) {
  d <- quality_data(name, root, threads, seed, sim_cells)
  pre <- run_pca(d$counts, n_pcs = 50, n_hvg = nrow(d$counts), batch = d$batch, threads = threads)
  p50 <- run_pca(d$counts, n_pcs = 50, batch = d$batch, threads = threads, seed = 1)
  v <- apply(p50, 2, stats::var)
  v <- v / sum(v)
  k <- seq_along(v)
  elbow <- which.max(v[1] + (v[50] - v[1]) * (k - 1) / 49 - v)
  embs <- list()
  for (np in unique(c(pcs, elbow))) {
    embs[[sprintf("pcs_%d%s", np, if (np == elbow) "_elbow" else "")]] <-
      run_harmony(p50[, seq_len(np)], batch = d$batch, threads = threads, progress = FALSE)
  }
  cat(sprintf("\n== %s: %s cells, %d batches, %d types; elbow at PC %d; PCs 1-5 hold %s of the 50 PCs' variance\n",
              name, format(ncol(d$counts), big.mark = ","), length(unique(d$batch)), length(unique(d$label)), elbow,
              paste(sprintf("%.3f", v[1:5]), collapse = ", ")))
  cat("-- integration_metrics()\n")
  print(round(as.data.frame(integration_metrics(embs, d$batch, d$label, pre = pre, threads = threads))[, cols], 3))
  if (with_scib) {
    work <- file.path(tempdir(), paste0("teacher_pcs_", name))
    s <- scib_scores(python, file.path(work, "scib"), data.frame(batch = d$batch, label = d$label),
                     colnames(d$counts), pre, embs, threads, root)
    cat("-- scib-metrics\n")
    print(round(as.matrix(s)[, intersect(cols, colnames(s))], 3))
  }
}
