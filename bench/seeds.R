# A model of this package against its Python peer over several model seeds,
# both at their defaults, on the data sets of bench/quality.R (issue 23:
# point 3 for fit_vae() against scvi-tools 1.4.2 SCVI, point 2 for distill()
# against scDistill 0.3.1). One seed per method, as bench/quality.R runs,
# cannot tell a difference of 0.01-0.02 in a score from the spread of the
# seeds; this script measures that spread.
#
#   Rscript bench/seeds.R [--model vae|distill] [--data sim_confounded,sim_rare] [--seeds 1,2,3]
#                         [--norms layer,batch] [--input-scales 1e4,1e6] [--n-pcs 30,50] [--scib] [--threads 2] [--seed 3] [--sim-cells 12000]
#
# --seed and --sim-cells make the data as bench/quality.R does (--data may
# also name cellbench). For each data set and model seed s:
#   --model vae (default): fit_vae(seed = s) in this process and
#     bench/peers.py scvi --seed s (scvi.settings.seed) in the peers' venv;
#   --model distill: distill(seed = s) once per --norms value (the encoder's
#     norm; default the package's default only) and per --input-scales
#     value (distill(input_scale_factor =); default the package's) and per
#     --n-pcs value (harmony_teacher(n_pcs =); default the package's), its
#     teacher (teacher_s, or teacher_pcsN_s per --n-pcs value), and
#     bench/peers.py scdistill_py --seed s (torch and numpy seeds).
# Everything is scored in one integration_metrics() call (pre: run_pca() of
# the same genes); with --scib also by scib-metrics' Benchmarker
# (bench/scib_score.py, the independent scorer). Prints the scores per seed,
# and per method their mean and spread (max - min) over seeds.
suppressPackageStartupMessages({ library(scdistill); library(Matrix) })
args <- commandArgs(trailingOnly = TRUE)
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE))), "common.R"))
model <- bench_option(args, "--model", "vae", as = identity)
if (!model %in% c("vae", "distill")) stop("--model must be vae or distill")
data_sets <- strsplit(bench_option(args, "--data", "sim_confounded,sim_rare", as = identity), ",")[[1]]
seeds <- as.integer(strsplit(bench_option(args, "--seeds", "1,2,3", as = identity), ",")[[1]])
norms <- strsplit(bench_option(args, "--norms", NA_character_, as = identity), ",")[[1]]
input_scales <- strsplit(bench_option(args, "--input-scales", NA_character_, as = identity), ",")[[1]]
n_pcs <- as.integer(strsplit(bench_option(args, "--n-pcs", NA_character_, as = identity), ",")[[1]])
with_scib <- "--scib" %in% args
threads <- bench_option(args, "--threads", 2L)
seed <- bench_option(args, "--seed", 3L)
sim_cells <- bench_option(args, "--sim-cells", 12000L)
root <- bench_root()
python <- peers_python(root)
cols <- c("total", "bio_conservation", "batch_correction", "ilisi", "kbet", "pcr_comparison", "isolated_labels",
          "silhouette_label", "ari_kmeans", "nmi_kmeans")

# The peer's embedding for seed s, from bench/peers.py in the peers' venv.
peer <- function(method, work, s) {
  out <- paste0(method, "_", s)
  status <- system2(python, c(file.path(root, "bench", "peers.py"), method, work, "--seed", s, "--out", out,
                              "--threads", threads), stdout = FALSE, stderr = FALSE)
  if (status != 0) stop(method, " failed for seed ", s)
  as.matrix(utils::read.csv(file.path(work, paste0(out, ".csv")), row.names = 1))
}

report <- function(m, scorer) {
  cat(sprintf("\n-- %s\n", scorer))
  print(m[, intersect(cols, colnames(m))], digits = 3)
  method <- sub("_[0-9]+$", "", rownames(m))
  for (k in unique(method)) {
    part <- m[method == k, intersect(cols, colnames(m)), drop = FALSE]
    cat(sprintf("%-13s mean   %s\n              spread %s\n", k,
                paste(sprintf("%s %.3f", colnames(part), colMeans(part)), collapse = ", "),
                paste(sprintf("%.3f", apply(part, 2, function(v) max(v) - min(v))), collapse = ", ")))
  }
}

for (name in data_sets) {
  d <- quality_data(name, root, threads, seed, sim_cells)
  work <- file.path(tempdir(), paste0("seeds_", model, "_", name))
  obs <- data.frame(batch = d$batch, label = d$label)
  write_peer_input(work, d$counts, obs)
  pre <- run_pca(d$counts, n_pcs = 50, n_hvg = nrow(d$counts), batch = d$batch, threads = threads)
  embs <- list()
  for (s in seeds) {
    if (model == "vae") {
      m <- fit_vae(d$counts, batch = d$batch, seed = s, threads = threads, progress = FALSE)
      embs[[paste0("fit_vae_", s)]] <- latent(m, d$counts)
      embs[[paste0("scvi_", s)]] <- peer("scvi", work, s)
    } else {
      for (np in n_pcs) {
        pcs <- if (!is.na(np)) paste0("_pcs", np) else ""
        for (nm in norms) for (sf in input_scales) {
          m <- do.call(distill, c(list(d$counts, batch = d$batch, seed = s, threads = threads, progress = FALSE),
                                  if (!is.na(nm)) list(norm = nm),
                                  if (!is.na(sf)) list(input_scale_factor = as.numeric(sf)),
                                  if (!is.na(np)) list(teacher = harmony_teacher(n_pcs = np))))
          embs[[paste0("distill", if (!is.na(nm)) paste0("_", nm), if (!is.na(sf)) paste0("_sf", sf), pcs, "_", s)]] <-
            m$latent
        }
        embs[[paste0("teacher", pcs, "_", s)]] <- teacher_latent(m)
      }
      embs[[paste0("scdistill_py_", s)]] <- peer("scdistill_py", work, s)
    }
  }
  cat(sprintf("\n== %s: %s cells, %d batches; seeds %s\n", name, format(ncol(d$counts), big.mark = ","),
              length(unique(d$batch)), paste(seeds, collapse = ", ")))
  report(integration_metrics(embs, d$batch, d$label, pre = pre, threads = threads), "integration_metrics()")
  if (with_scib) {
    s <- scib_scores(python, file.path(work, "scib"), obs, colnames(d$counts), pre, embs, threads, root)
    report(as.matrix(s), "scib-metrics")
  }
}
