# The teacher's normalization before its PCA (issue 23): log2(CPM + 1), the
# default of run_pca() and harmony_teacher() until stop 62 (now
# method = "log2cpm"; a pseudocount of one count per million), against the log
# of counts per 10^4 + 1 of Seurat's NormalizeData() and scanpy's
# normalize_total(target_sum = 1e4) + log1p, their default since (in base 2,
# the same PCs once each gene is scaled): a pseudocount 100 times larger
# relative to the counts, so one read against none weighs less.
# Everything else as harmony_teacher() at its defaults: the genes of
# bench/quality.R's data (2,000, all highly variable), each scaled to unit
# variance and clipped at 10, 50 exact PCs (prcomp), run_harmony() at its
# defaults; the student is distill(teacher = given_teacher(Z*), seed = s),
# so it reads log2 CPM either way. Each row reproduces distill()'s own
# teacher with harmony_teacher(method =) "log2cpm" or "log" (the default).
#
#   Rscript bench/normalization.R [--data cellbench,sim_rare,sim_confounded] [--seeds 1,2,3]
#                                 [--threads 2] [--seed 3] [--sim-cells 12000] [--out FILE.csv]
#
# Scored by integration_metrics() (pre: run_pca() of the same genes). Prints
# each normalization's teacher and its students' mean, and per data set the
# students' spread (min, max) over seeds; --out keeps every row.
suppressPackageStartupMessages({ library(scdistill); library(Matrix) })
args <- commandArgs(trailingOnly = TRUE)
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE))), "common.R"))
data_sets <- strsplit(bench_option(args, "--data", "cellbench,sim_rare,sim_confounded", as = identity), ",")[[1]]
seeds <- as.integer(strsplit(bench_option(args, "--seeds", "1,2,3", as = identity), ",")[[1]])
threads <- bench_option(args, "--threads", 2L)
seed <- bench_option(args, "--seed", 3L)
sim_cells <- bench_option(args, "--sim-cells", 12000L)
out_file <- bench_option(args, "--out", NA_character_, as = identity)
root <- bench_root()
cols <- c("total", "bio_conservation", "batch_correction", "silhouette_label", "isolated_labels", "ari_kmeans",
          "nmi_kmeans", "ilisi", "kbet", "pcr_comparison", "graph_connectivity")

normalized <- list(
  log2cpm = function(cnt, lib) log2(t(t(cnt) / lib) * 1e6 + 1),
  log_cp10k = function(cnt, lib) log1p(t(t(cnt) / lib) * 1e4)
)
# harmony_teacher()'s PCA of genes × cells values: genes scaled, clipped at 10.
pcs_of <- function(y) {
  y <- t(scale(t(y)))
  y[is.na(y)] <- 0
  y[y > 10] <- 10
  stats::prcomp(t(y), rank. = 50, center = TRUE, scale. = FALSE)$x
}

rows <- list()
for (name in data_sets) {
  d <- quality_data(name, root, threads, seed, sim_cells)
  pre <- run_pca(d$counts, n_hvg = nrow(d$counts), batch = d$batch, threads = threads)
  cnt <- as.matrix(d$counts)
  lib <- colSums(cnt)
  score <- function(z, what) {
    m <- as.data.frame(integration_metrics(as.matrix(z), batch = d$batch, label = d$label, threads = threads,
                                           pre = pre))[cols]
    cbind(data = name, what, m)
  }
  for (v in names(normalized)) {
    z_star <- run_harmony(pcs_of(normalized[[v]](cnt, lib)), batch = d$batch, threads = threads, progress = FALSE)
    rows[[length(rows) + 1]] <- score(z_star, data.frame(normalization = v, embedding = "teacher", seed = NA))
    for (s in seeds) {
      m <- distill(d$counts, batch = d$batch, teacher = given_teacher(z_star), threads = threads, progress = FALSE,
                   seed = s)
      rows[[length(rows) + 1]] <- score(latent(m), data.frame(normalization = v, embedding = "student", seed = s))
    }
    message(name, " ", v, " done")
  }
}
all <- do.call(rbind, rows)
if (!is.na(out_file)) utils::write.csv(all, out_file, row.names = FALSE)
options(width = 200)
mean_of <- stats::aggregate(all[cols], all[c("data", "normalization", "embedding")], mean)
print(mean_of[order(mean_of$data, mean_of$embedding, mean_of$normalization), ], digits = 3, row.names = FALSE)
students <- all[all$embedding == "student", ]
spread <- stats::aggregate(total ~ data + normalization, students, function(x) round(range(x), 3))
cat("\nStudents' total over seeds (min, max):\n")
print(spread, row.names = FALSE)
