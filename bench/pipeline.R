# The package's pipeline stages against their reference tools, on the same
# data in one run (one R process; the doublet and ambient peers in their own process).
#
#   Rscript bench/pipeline.R [--stages clusters,umap,doublets,ambient,joint,whole] [--sim-cells 20000]
#                            [--umap-cells 10000,100000] [--umap-genes 2000] [--umap-project-max 200000]
#                            [--umap-methods ours,uwot]
#                            [--threads 2] [--seed 1]
#                            [--doublet-epochs N] [--peer-methods scrublet,solo] [--no-peers]
#                            [--ambient-cells 5000] [--ambient-genes 2000] [--ambient-epochs 150]
#                            [--joint-cells 6000] [--joint-weights 0,1,10,50]
#                            [--whole-cells 100000] [--no-seurat]
#
# clusters: CellBench (the singlets of the 3 plates, all genes; truth =
#   cell_line; embedding run_pca(n_pcs = 30, n_hvg = 2000), "PCA") and the
#   simulator (simulate_counts(--sim-cells, 2000 genes, 3 batches, 10 types in
#   unequal proportions, seed 1); truth = cell_type; the same PCA, then
#   run_harmony(batch = "batch"), "HARMONY"), and weakly separated types
#   (simulate_counts(6,000 cells, 2000 genes, 3 batches, 12 types of which
#   four are 2-3%, de_fac_loc 0.3, seed 1); run_pca(30, batch-aware HVGs),
#   run_harmony(), "HARMONY"). On that embedding, NMI
#   (arithmetic normalisation) and ARI against the truth, clusters found and
#   seconds of:
#     soft_clusters(n_clusters = number of true types), the same with one
#     shared temperature (per_cluster = FALSE), the same with Euclidean
#     distances (covariance = "spherical"), and soft_clusters()
#     (Leiden-initialised, resolution 1);
#     the package's Leiden (no exported function: integration_metrics()'
#     nmi_leiden / ari_leiden, the best NMI over resolutions 0.2..2) and its
#     k-means (nmi_kmeans / ari_kmeans, k = number of types); their seconds
#     are those of the whole integration_metrics() call (all scores), printed
#     below the table, not in it;
#     bluster::clusterRows() with NNGraphParam(k = 15, louvain), with
#     NNGraphParam(k = 15, leiden) (where the installed igraph has it) and
#     KmeansParam(centers = number of types); without bluster, the call
#     KmeansParam makes, stats::kmeans(z, centers) with its defaults;
#     Seurat::FindNeighbors() + FindClusters() (defaults: k.param 20,
#     Louvain, resolution 0.8) on the same embedding.
#   bluster and Seurat are skipped, with a message, where not installed.
#   seconds_vs_soft = the method's seconds / soft_clusters(n_clusters)'s.
#
# umap: simulate_counts(N, --umap-genes genes, 10 types, seed 1) for each N in
#   --umap-cells, run_pca(n_pcs = 30, n_hvg = 1000); and 2,000 real PBMCs
#   (../shared/data/pbmc_stim/pbmc_stim.RData: pbmc.ctrl + pbmc.stim),
#   run_pca(n_pcs = 20). On all cells: run_umap(z) (parametric, defaults)
#   against uwot::umap(z, n_neighbors = 15) (its defaults: min_dist 0.01,
#   200 / 500 epochs; seeded with withr::with_seed), the same threads; seconds,
#   neighbor_preservation(z, map, k = 15) of both, their difference and the
#   speed-up (uwot s / ours). Projection: both refitted on a random 90% of the
#   cells (uwot with ret_model = TRUE), then the other 10% placed by
#   project_umap() and uwot::umap_transform(), timing the placement only;
#   also the held-out cells' neighbour preservation among themselves. The
#   projection part (two more fits) runs up to --umap-project-max cells.
#   --umap-methods ours or uwot times one of the two (the other's columns are
#   NA): at 10^6 cells, run each alone so a stopped run still reports one.
#   Each method's seconds are printed as soon as it finishes.
#
# doublets: CellBench, every cell (singlets and doublets, plate = batch, all
#   genes), truth demuxlet_cls == "DBL". find_doublets() with method "both",
#   "classifier" (SOLO-like) and "neighbors" (Scrublet-like) on one VAE
#   (fit_vae() as find_doublets() fits it: on the 2,000 most variable genes,
#   batch-aware; --doublet-epochs N caps its epochs, default the package's
#   rule), where the package exports find_doublets()
#   (see bench_doublets()); and the peers (bench/doublets_peer.py: scrublet
#   0.2.3 and scvi-tools 1.4.2 SOLO, each at its defaults per plate, in their
#   own process under /usr/bin/time) unless --no-peers; --peer-methods picks
#   them. AUROC (Mann-Whitney) and AUPRC (average precision, as
#   scikit-learn's average_precision_score) overall and per plate, and seconds.
#
# ambient: simulate_counts(--ambient-cells, --ambient-genes, 8 types in unequal
#   proportions (30% down to 3%), 1 batch, ambient = list(fraction = 0.1,
#   n_empty = 5000), seed 1), with the truth: the clean counts (assay
#   "true_counts"), each cell's ambient share (colData ambient_fraction, saved
#   before remove_ambient() overwrites that column with its estimate) and the
#   5,000 empty droplets. Methods: remove_ambient(empty_droplets = the empty
#   droplets) (defaults; its estimated share is colData ambient_fraction);
#   DropletUtils::removeAmbience(counts, ambient = rowSums(empty droplets),
#   groups) with groups = soft_clusters() (Leiden start, resolution 1) on
#   run_pca(n_pcs = 30) of the observed counts (the clustering's seconds are
#   printed, not counted), and with the true cell types (an oracle); CellBender
#   0.4.0 remove-background on the CPU (bench/ambient_peer.py, in the peers'
#   venv; --expected-cells = the cells, --total-droplets-included = the cells +
#   half the empty droplets, since CellBender needs "surely empty" droplets
#   ranked past it; --epochs = --ambient-epochs, default CellBender's 150; its
#   seconds exclude Python's start-up and its HTML report) unless --no-peers.
#   Per method: count error sum |estimate - clean| / sum clean (and of the
#   observed counts, the baseline), the share of all counts removed, the
#   per-cell share's mean absolute error and Pearson r against the truth (the
#   method's own estimate where it has one, remove_ambient() and CellBender;
#   else 1 - colSums(estimate) / colSums(observed); that removed share is also
#   scored for every method), seconds and seconds / remove_ambient()'s.
#   DropletUtils is skipped, with a message, where not installed (setup_peers.sh
#   installs r-bioc-dropletutils), CellBender where the venv cannot import it.
#
# joint: does fine-tuning the VAE jointly with its soft clusters help on
#   labelled data? CellBench (the singlets of the 3 plates, plate = batch) and
#   simulate_counts(--joint-cells, 2000 genes, 3 batches, 12 types of which
#   four are 2-3% of cells, weaker type effects (de_fac_loc 0.3), seed 1).
#   fit_vae() (defaults) on the 2,000 most variable genes, soft_clusters(latent,
#   n_clusters = number of types), then fine_tune_clusters() from that model
#   and clustering at each of --joint-weights (20 epochs; weight 0 is the same
#   further training without the clustering term, the control). Per row:
#   NMI / ARI of the hard clusters against the truth, the within-type share of
#   the latent variance (lower: more compact types), the last validation
#   -ELBO per cell (the VAE's own, or the fine-tuning's), seconds.
#
# whole: the whole pipeline's time. simulate_counts(--whole-cells, 2000 genes,
#   3 batches, 10 types in unequal proportions (25% down to 2%), ambient =
#   list(fraction = 0.1, n_empty = 10000), seed 1); run_pipeline() with all six
#   stages at their defaults (empty_droplets = the simulated ones, batch),
#   each stage's wall seconds (the fit's $seconds) and the total; the ARI / NMI
#   of the clusters against the true types, the count error of the
#   decontaminated counts (as the ambient stage). For scale, not as a peer
#   (it has no ambient, doublet or batch stage): Seurat's standard workflow on
#   the same observed counts (NormalizeData, FindVariableFeatures,
#   ScaleData, RunPCA, FindNeighbors, FindClusters, RunUMAP at their
#   defaults; uwot under RunUMAP), its seconds per step, unless --no-seurat or
#   Seurat is not installed.
#
# Every stage prints Markdown tables and appends to
# bench/results/pipeline_<stage>.csv. --seed seeds the methods (soft
# clusters, UMAPs, splits, the peers); the simulations keep seed 1.
suppressPackageStartupMessages({ library(scdistill); library(Matrix) })
args <- commandArgs(trailingOnly = TRUE)
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE))), "common.R"))
as_list <- function(as) function(x) as(strsplit(x, ",", fixed = TRUE)[[1]])
all_stages <- c("clusters", "umap", "doublets", "ambient", "joint", "whole")
stages <- bench_option(args, "--stages", c("clusters", "umap", "doublets", "ambient"), as_list(trimws))
sim_cells <- bench_option(args, "--sim-cells", 20000L)
umap_cells <- bench_option(args, "--umap-cells", c(10000L, 100000L), as_list(as.integer))
umap_genes <- bench_option(args, "--umap-genes", 2000L)
umap_project_max <- bench_option(args, "--umap-project-max", 200000L)
umap_methods <- bench_option(args, "--umap-methods", c("ours", "uwot"), as_list(trimws))
if (!length(umap_methods) || length(setdiff(umap_methods, c("ours", "uwot"))))
  stop("--umap-methods: choose from ours,uwot")
threads <- bench_option(args, "--threads", 2L)
seed <- bench_option(args, "--seed", 1L)
peer_methods <- bench_option(args, "--peer-methods", "scrublet,solo", as.character)
no_peers <- "--no-peers" %in% args
doublet_epochs <- bench_option(args, "--doublet-epochs", NULL)
ambient_cells <- bench_option(args, "--ambient-cells", 5000L)
ambient_genes <- bench_option(args, "--ambient-genes", 2000L)
ambient_epochs <- bench_option(args, "--ambient-epochs", 150L)
joint_cells <- bench_option(args, "--joint-cells", 6000L)
joint_weights <- bench_option(args, "--joint-weights", c(0, 1, 10, 50), as_list(as.numeric))
whole_cells <- bench_option(args, "--whole-cells", 100000L)
no_seurat <- "--no-seurat" %in% args
bad <- setdiff(stages, all_stages)
if (length(bad)) stop("--stages: unknown ", paste(bad, collapse = ", "), "; choose from ", paste(all_stages, collapse = ","))
root <- bench_root()
stamp <- format(Sys.time(), "%Y-%m-%d %H:%M")

# ---- helpers -----------------------------------------------------------------

# The value of `expr` and the wall seconds it took.
el <- function(expr) {
  t0 <- proc.time()[["elapsed"]]
  v <- expr
  list(value = v, s = proc.time()[["elapsed"]] - t0)
}

# NMI with arithmetic normalisation, MI / ((H(a) + H(b)) / 2) (scikit-learn's default).
nmi <- function(a, b) {
  p <- table(a, b) / length(a)
  pa <- rowSums(p)
  pb <- colSums(p)
  nz <- p > 0
  mi <- sum(p[nz] * log(p[nz] / outer(pa, pb)[nz]))
  h <- function(q) -sum(q[q > 0] * log(q[q > 0]))
  if (h(pa) + h(pb) == 0) return(1)
  mi / ((h(pa) + h(pb)) / 2)
}

# Adjusted Rand index (Hubert & Arabie).
ari <- function(a, b) {
  t <- table(a, b)
  pairs <- function(x) sum(as.numeric(x) * (as.numeric(x) - 1) / 2)
  index <- pairs(t)
  ra <- pairs(rowSums(t))
  rb <- pairs(colSums(t))
  expected <- ra * rb / pairs(length(a))
  top <- (ra + rb) / 2
  if (top == expected) return(1)
  (index - expected) / (top - expected)
}

# AUROC: the Mann-Whitney U of the positives' scores over the negatives' (ties count half).
auroc <- function(score, truth) {
  keep <- !is.na(score)
  score <- score[keep]
  truth <- truth[keep]
  n1 <- sum(truth)
  n0 <- sum(!truth)
  if (n1 == 0 || n0 == 0) return(NA_real_)
  (sum(rank(score)[truth]) - n1 * (n1 + 1) / 2) / (n1 * n0)
}

# AUPRC as scikit-learn's average_precision_score: sum over the distinct score
# thresholds, highest first, of (recall gained) x (precision there).
auprc <- function(score, truth) {
  keep <- !is.na(score)
  score <- score[keep]
  truth <- truth[keep]
  if (!any(truth)) return(NA_real_)
  o <- order(score, decreasing = TRUE)
  score <- score[o]
  truth <- truth[o]
  last <- c(which(diff(score) != 0), length(score))  # the last cell of each tie group
  tp <- cumsum(truth)[last]
  fp <- last - tp
  recall <- tp / sum(truth)
  sum(diff(c(0, recall)) * tp / (tp + fp))
}

markdown <- function(d) {
  f <- vapply(d, function(v) if (is.numeric(v)) trimws(formatC(v, digits = 4, format = "g")) else as.character(v),
              character(nrow(d)))
  f <- matrix(f, nrow = nrow(d))
  f[is.na(f) | f == "NA"] <- ""
  c(paste("|", paste(names(d), collapse = " | "), "|"), paste0(paste(rep("|---", ncol(d)), collapse = ""), "|"),
    apply(f, 1, function(r) paste("|", paste(r, collapse = " | "), "|")))
}
show_table <- function(tab) cat("", markdown(tab), "", sep = "\n")
save_table <- function(tab, stage) {
  tab$date <- stamp
  tab$threads <- threads
  tab$seed <- seed
  append_csv(tab, file.path(root, "bench", "results", paste0("pipeline_", stage, ".csv")))
}
fmt <- function(n) format(n, big.mark = ",")
has <- function(pkg) requireNamespace(pkg, quietly = TRUE)
# A method that may fail: its value, or NULL after a message.
try_method <- function(label, expr) {
  tryCatch(expr, error = function(e) {
    message(sprintf("  %s skipped: %s", label, conditionMessage(e)))
    NULL
  })
}

# ---- clusters ------------------------------------------------------------------

cluster_data <- function(name) {
  if (name == "cellbench") {
    d <- load_cellbench(root)
    sce <- SingleCellExperiment::SingleCellExperiment(list(counts = d$counts),
                                                      colData = S4Vectors::DataFrame(batch = d$batch,
                                                                                     truth = d$label))
    sce <- run_pca(sce, n_pcs = 30, n_hvg = 2000, seed = seed, threads = threads)
    return(list(sce = sce, reduction = "PCA"))
  }
  if (name == "weak") {
    # Twelve weakly separated types (de_fac_loc 0.3), four of them 2-3%.
    sce <- simulate_counts(n_cells = 6000, n_genes = 2000, n_batches = 3,
                           group_prob = c(0.2, 0.15, 0.12, 0.11, 0.1, 0.08, 0.07, 0.06, 0.03, 0.03, 0.025, 0.025),
                           de_fac_loc = 0.3, seed = 1, threads = threads)
    sce$truth <- as.character(sce$cell_type)
    sce <- run_pca(sce, n_pcs = 30, batch = "batch", seed = seed, threads = threads)
    sce <- run_harmony(sce, batch = "batch", seed = seed, threads = threads, progress = FALSE)
    return(list(sce = sce, reduction = "HARMONY"))
  }
  # Ten types in unequal proportions, 25% down to 3.5%.
  sce <- simulate_counts(n_cells = sim_cells, n_genes = 2000, n_batches = 3, n_groups = 10,
                         group_prob = c(0.25, 0.18, 0.13, 0.1, 0.08, 0.07, 0.06, 0.05, 0.045, 0.035),
                         seed = 1, threads = threads)
  sce$truth <- as.character(sce$cell_type)
  sce <- run_pca(sce, n_pcs = 30, n_hvg = 2000, seed = seed, threads = threads)
  sce <- run_harmony(sce, batch = "batch", seed = seed, threads = threads, progress = FALSE)
  list(sce = sce, reduction = "HARMONY")
}

bench_clusters_one <- function(name) {
  d <- cluster_data(name)
  sce <- d$sce
  red <- d$reduction
  z <- SingleCellExperiment::reducedDim(sce, red)
  truth <- sce$truth
  k <- length(unique(truth))
  cat(sprintf("\n== clusters, %s: %s cells, %d types, embedding %s (%d dims); %d threads\n", name, fmt(nrow(z)), k,
              red, ncol(z), threads))
  rows <- list()
  add <- function(method, cl, s) {
    rows[[length(rows) + 1]] <<- data.frame(method = method, n_clusters = length(unique(cl)), nmi = nmi(cl, truth),
                                            ari = ari(cl, truth), seconds = s)
  }
  add_values <- function(method, nmi_v, ari_v) {
    rows[[length(rows) + 1]] <<- data.frame(method = method, n_clusters = NA, nmi = nmi_v, ari = ari_v,
                                            seconds = NA)
  }

  r <- el(soft_clusters(sce, reduction = red, n_clusters = k, seed = seed, threads = threads, progress = FALSE))
  add(sprintf("scdistill soft_clusters(n_clusters = %d)", k), r$value$soft_cluster, r$s)
  r <- el(soft_clusters(sce, reduction = red, n_clusters = k, per_cluster = FALSE, seed = seed, threads = threads,
                        progress = FALSE))
  add(sprintf("scdistill soft_clusters(n_clusters = %d, per_cluster = FALSE) (one T)", k), r$value$soft_cluster, r$s)
  r <- el(soft_clusters(sce, reduction = red, n_clusters = k, covariance = "spherical", seed = seed, threads = threads,
                        progress = FALSE))
  add(sprintf("scdistill soft_clusters(n_clusters = %d, covariance = \"spherical\") (Euclidean)", k),
      r$value$soft_cluster, r$s)
  r <- el(soft_clusters(sce, reduction = red, seed = seed, threads = threads, progress = FALSE))
  add("scdistill soft_clusters() (Leiden start, resolution 1)", r$value$soft_cluster, r$s)

  m <- el(integration_metrics(z, batch = sce$batch, label = truth, seed = seed, threads = threads))
  add_values("scdistill Leiden (integration_metrics, best resolution)", m$value$nmi_leiden, m$value$ari_leiden)
  add_values(sprintf("scdistill k-means (integration_metrics, k = %d)", k), m$value$nmi_kmeans, m$value$ari_kmeans)

  if (has("bluster")) {
    for (fun in c("louvain", "leiden")) {
      r <- try_method(sprintf("bluster %s", fun), withr::with_seed(seed, el(
        bluster::clusterRows(z, bluster::NNGraphParam(k = 15, cluster.fun = fun)))))
      if (!is.null(r)) add(sprintf("bluster NNGraphParam(k = 15, %s)", fun), r$value, r$s)
    }
    r <- withr::with_seed(seed, el(bluster::clusterRows(z, bluster::KmeansParam(centers = k))))
    add(sprintf("bluster KmeansParam(centers = %d)", k), r$value, r$s)
  } else {
    message("  bluster not installed: its graph clusterings skipped; k-means run as KmeansParam would (stats::kmeans)")
    r <- withr::with_seed(seed, el(stats::kmeans(z, centers = k)$cluster))
    add(sprintf("stats::kmeans(centers = %d) (bluster KmeansParam's call)", k), r$value, r$s)
  }

  if (has("Seurat")) {
    zs <- z
    if (is.null(rownames(zs))) rownames(zs) <- paste0("cell", seq_len(nrow(zs)))
    r <- try_method("Seurat", el({
      g <- Seurat::FindNeighbors(zs, verbose = FALSE)
      Seurat::FindClusters(g$snn, resolution = 0.8, verbose = FALSE)[[1]]
    }))
    if (!is.null(r)) add("Seurat FindNeighbors + FindClusters (k 20, Louvain, resolution 0.8)", r$value, r$s)
  } else {
    message("  Seurat not installed: skipped")
  }

  tab <- do.call(rbind, rows)
  tab$seconds_vs_soft <- tab$seconds / tab$seconds[1]
  tab <- cbind(data = name, cells = nrow(z), embedding = red, tab)
  show_table(tab)
  cat(sprintf("integration_metrics() (every score, Leiden over 10 resolutions and k-means included): %.2f s\n", m$s))
  save_table(tab, "clusters")
  invisible(tab)
}

bench_clusters <- function() {
  for (name in c("cellbench", "sim", "weak")) bench_clusters_one(name)
}

# ---- umap ----------------------------------------------------------------------

umap_data <- function(name, n) {
  if (name == "pbmc") {
    e <- new.env()
    load(file.path(root, "..", "shared", "data", "pbmc_stim", "pbmc_stim.RData"), envir = e)
    stopifnot(identical(rownames(e$pbmc.ctrl), rownames(e$pbmc.stim)))
    counts <- cbind(e$pbmc.ctrl, e$pbmc.stim)
    return(run_pca(counts, n_pcs = 20, seed = seed, threads = threads))
  }
  s <- simulate_counts(n_cells = n, n_genes = umap_genes, n_groups = 10, seed = 1, format = "list", threads = threads)
  counts <- s$counts
  rm(s)
  gc()
  run_pca(counts, n_pcs = 30, n_hvg = min(1000L, umap_genes), seed = seed, threads = threads)
}

bench_umap_one <- function(name, n = NA) {
  z <- unclass(umap_data(name, n))
  attributes(z) <- attributes(z)[c("dim", "dimnames")]
  cat(sprintf("\n== umap, %s: %s cells x %d dims; %d threads\n", name, fmt(nrow(z)), ncol(z), threads))
  np <- function(x, y) neighbor_preservation(x, y, k = 15, seed = seed, threads = threads)

  skipped <- list(value = NULL, s = NA_real_)
  said <- function(what, r) {
    cat(sprintf("  %s: %.1f s\n", what, r$s))
    r
  }
  ours <- if ("ours" %in% umap_methods) {
    said("run_umap()", el(run_umap(z, seed = seed, threads = threads, progress = FALSE)))
  } else skipped
  theirs <- if ("uwot" %in% umap_methods) {
    said("uwot::umap()", el(withr::with_seed(seed, uwot::umap(z, n_neighbors = 15, n_threads = threads))))
  } else skipped
  np_ours <- if (is.null(ours$value)) NA_real_ else np(z, ours$value$embedding)
  np_uwot <- if (is.null(theirs$value)) NA_real_ else np(z, theirs$value)

  tab <- data.frame(
    data = name, cells = nrow(z), dims = ncol(z),
    epochs_ours = if (is.null(ours$value)) NA_integer_ else nrow(ours$value$history),
    ours_s = ours$s, uwot_s = theirs$s, speedup = theirs$s / ours$s,
    np_ours = np_ours, np_uwot = np_uwot, np_diff = np_ours - np_uwot,
    projected_cells = NA, project_ours_s = NA, transform_uwot_s = NA, project_speedup = NA,
    projected_np_ours = NA, projected_np_uwot = NA)
  if (nrow(z) > umap_project_max || length(umap_methods) < 2) return(tab)
  # Projection: both refitted on 90% of the cells; the other 10% placed.
  held <- withr::with_seed(seed, sample.int(nrow(z), round(0.1 * nrow(z))))
  train <- z[-held, , drop = FALSE]
  new <- z[held, , drop = FALSE]
  fit_ours <- run_umap(train, seed = seed, threads = threads, progress = FALSE)
  fit_uwot <- withr::with_seed(seed, uwot::umap(train, n_neighbors = 15, n_threads = threads, ret_model = TRUE))
  p_ours <- el(project_umap(fit_ours, new, threads = threads))
  p_uwot <- el(withr::with_seed(seed, uwot::umap_transform(new, fit_uwot, n_threads = threads)))
  k_new <- min(15L, nrow(new) - 1L)
  tab$projected_cells <- nrow(new)
  tab$project_ours_s <- p_ours$s
  tab$transform_uwot_s <- p_uwot$s
  tab$project_speedup <- p_uwot$s / p_ours$s
  tab$projected_np_ours <- neighbor_preservation(new, p_ours$value, k = k_new, seed = seed, threads = threads)
  tab$projected_np_uwot <- neighbor_preservation(new, p_uwot$value, k = k_new, seed = seed, threads = threads)
  tab
}

bench_umap <- function() {
  tab <- do.call(rbind, c(lapply(umap_cells, function(n) bench_umap_one("sim", n)), list(bench_umap_one("pbmc"))))
  cat(sprintf("\nuwot %s (defaults; n_sgd_threads 0) vs run_umap() (parametric, defaults); speed-up = uwot s / ours s;",
              as.character(utils::packageVersion("uwot"))),
      "np = neighbor_preservation(k = 15) of the latent space; projected_*: the 10% held-out cells",
      "on maps fitted to the other 90% (project_umap() vs uwot::umap_transform(), placement only)\n")
  show_table(tab)
  save_table(tab, "umap")
  invisible(tab)
}

# ---- doublets ------------------------------------------------------------------

# CellBench, every cell with counts (singlets and doublets): list(counts, batch, doublet).
load_cellbench_all <- function() {
  dir <- file.path(root, "..", "shared", "data", "cellbench_5cl_3plates")
  counts <- methods::as(Matrix::readMM(gzfile(file.path(dir, "counts.mtx.gz"))), "CsparseMatrix")
  genes <- utils::read.csv(gzfile(file.path(dir, "genes.csv.gz")), row.names = 1)
  cells <- utils::read.csv(gzfile(file.path(dir, "cells.csv.gz")), row.names = 1)
  dimnames(counts) <- list(rownames(genes), rownames(cells))
  keep <- Matrix::colSums(counts) > 0
  list(counts = counts[, keep], batch = cells$batch[keep], doublet = cells$demuxlet_cls[keep] == "DBL")
}

# AUROC / AUPRC of `score` against `truth`, over all cells and per plate.
doublet_rows <- function(method, score, truth, batch, seconds, per_plate_s = NULL) {
  one <- function(plate, keep, s) {
    data.frame(method = method, plate = plate, cells = sum(keep), doublets = sum(truth[keep]),
               scored = sum(keep & !is.na(score)), auroc = auroc(score[keep], truth[keep]),
               auprc = auprc(score[keep], truth[keep]), seconds = s)
  }
  plates <- unique(batch)
  rbind(one("all", rep(TRUE, length(truth)), seconds),
        do.call(rbind, lapply(plates, function(p) one(p, batch == p, if (is.null(per_plate_s)) NA else per_plate_s[[p]]))))
}

# The package's side. Written against find_doublets(x, batch, model, method, ..., seed,
# threads, progress) returning a data.frame (score, call) for a matrix; until the
# package exports it, the stage says so and runs only the peers. The VAE is fitted
# once (as find_doublets() would fit it: fit_vae(x, batch, max_epochs, seed, threads))
# and given to each method; each method's seconds include the VAE's.
bench_doublets <- function() {
  d <- load_cellbench_all()
  cat(sprintf("\n== doublets, CellBench: %s cells (%s doublets) x %s genes, %d plates; %d threads\n",
              fmt(ncol(d$counts)), fmt(sum(d$doublet)), fmt(nrow(d$counts)), length(unique(d$batch)), threads))
  rows <- list()
  if ("find_doublets" %in% getNamespaceExports("scdistill")) {
    # The VAE find_doublets() fits without `model`: on the 2,000 most variable
    # genes (batch-aware); fitted once here for the three methods.
    hvg <- highly_variable_genes(d$counts, n_hvg = 2000, batch = d$batch, threads = threads)
    sub <- d$counts[hvg$highly_variable, ]
    vae <- el(fit_vae(sub, batch = d$batch, max_epochs = doublet_epochs, seed = seed, threads = threads,
                      progress = FALSE))
    for (m in c("both", "classifier", "neighbors")) {
      r <- el(find_doublets(sub, batch = d$batch, model = vae$value, method = m, seed = seed, threads = threads,
                            progress = FALSE))
      rows[[m]] <- doublet_rows(sprintf("scdistill find_doublets(method = \"%s\")", m), r$value$score, d$doublet,
                                d$batch, vae$s + r$s)
    }
    cat(sprintf("scdistill: VAE %.1f s (%d epochs), included in each method's seconds\n", vae$s,
                nrow(vae$value$history)))
  } else {
    cat("find_doublets() not available yet\n")
  }

  if (!no_peers) {
    work <- file.path(tempdir(), "pipeline_doublets")
    dir.create(work, showWarnings = FALSE)
    invisible(writeMM(d$counts, file.path(work, "counts.mtx")))
    utils::write.csv(data.frame(cell = colnames(d$counts), batch = d$batch), file.path(work, "cells.csv"),
                     row.names = FALSE)
    utils::write.csv(data.frame(gene = rownames(d$counts)), file.path(work, "genes.csv"), row.names = FALSE)
    python <- peers_python(root)
    run <- timed(python, c(file.path(root, "bench", "doublets_peer.py"), "--counts", work, "--out", work,
                           "--threads", threads, "--seed", seed, "--methods", peer_methods), quiet = FALSE)
    if (!run$ok) stop("bench/doublets_peer.py failed")
    times <- jsonlite::fromJSON(file.path(work, "doublet_times.json"), simplifyVector = FALSE)
    sc <- utils::read.csv(file.path(work, "doublet_scores.csv"), colClasses = c(cell = "character"))
    for (m in unique(sc$method)) {
      s <- sc[sc$method == m, ]
      score <- s$score[match(colnames(d$counts), s$cell)]
      if (m == "scrublet") {
        per <- lapply(times$scrublet, `[[`, "seconds")
        label <- paste("scrublet", times$versions$scrublet)
      } else {
        per <- lapply(times$solo$per_batch, `[[`, "seconds")
        label <- paste("SOLO, scvi-tools", times$versions$`scvi-tools`)
      }
      rows[[m]] <- doublet_rows(label, score, d$doublet, d$batch, times$seconds[[m]], per)
    }
    cat(sprintf("peers (%s): process %.1f s, peak RSS %.0f MB", peer_methods, run$wall, run$rss_mb),
        if (!is.null(times$solo)) sprintf("; SOLO's per-plate seconds exclude its SCVI (%.1f s, %d epochs)",
                                          times$solo$seconds_scvi, times$solo$scvi_epochs), "\n", sep = "")
  }
  if (!length(rows)) return(invisible(NULL))
  tab <- do.call(rbind, rows)
  rownames(tab) <- NULL
  show_table(tab)
  save_table(tab, "doublets")
  invisible(tab)
}
`%||%` <- function(a, b) if (is.null(a)) b else a

# ---- ambient -------------------------------------------------------------------

# Errors of a decontaminated count matrix `est` against the clean counts, and of a
# per-cell ambient share: `share` is the method's own estimate where it gives one, else
# NULL and the share of each cell's counts the method removed is used.
ambient_row <- function(method, groups, est, clean, observed, truth, seconds, share = NULL) {
  est <- methods::as(est, "CsparseMatrix")
  removed <- 1 - Matrix::colSums(est) / Matrix::colSums(observed)
  own <- !is.null(share)
  if (!own) share <- removed
  r <- function(a, b) if (stats::sd(a) > 0) stats::cor(a, b) else NA_real_
  data.frame(method = method, groups = groups,
             count_error = sum(abs(est - clean)) / sum(clean),
             removed_total = 1 - sum(est) / sum(observed),
             frac_mae = mean(abs(share - truth)), frac_r = r(share, truth),
             frac_from = if (own) "estimate" else "removed counts",
             removed_mae = mean(abs(removed - truth)), removed_r = r(removed, truth),
             seconds = seconds)
}

# CellBender 0.4.0 (bench/ambient_peer.py) on the raw droplets (cells + empty droplets):
# list(counts = genes x cells, share, seconds, times), or NULL after a message.
ambient_cellbender <- function(observed, empty) {
  python <- peers_python(root)
  if (system2(python, c("-c", shQuote("import cellbender")), stdout = FALSE, stderr = FALSE) != 0) {
    message("  CellBender skipped: `import cellbender` fails in the peers' venv (", python,
            "); bench/setup_peers.sh installs cellbender==0.4.0")
    return(NULL)
  }
  work <- file.path(tempdir(), "pipeline_ambient")
  raw <- file.path(work, "raw")
  out <- file.path(work, "cellbender")
  dir.create(raw, showWarnings = FALSE, recursive = TRUE)
  dir.create(out, showWarnings = FALSE, recursive = TRUE)
  droplets <- cbind(observed, empty)
  invisible(writeMM(droplets, file.path(raw, "matrix.mtx")))
  writeLines(paste(rownames(droplets), rownames(droplets), sep = "\t"), file.path(raw, "genes.tsv"))
  writeLines(colnames(droplets), file.path(raw, "barcodes.tsv"))
  writeLines(colnames(observed), file.path(raw, "cells.txt"))
  run <- timed(python, c(file.path(root, "bench", "ambient_peer.py"), "--raw", raw, "--out", out,
                         "--epochs", ambient_epochs, "--threads", threads), quiet = FALSE)
  if (!run$ok) {
    message("  CellBender skipped: bench/ambient_peer.py failed (log: ", file.path(out, "cellbender.log"), ")")
    return(NULL)
  }
  times <- jsonlite::fromJSON(file.path(out, "ambient_times.json"))
  counts <- methods::as(Matrix::readMM(file.path(out, "cellbender_counts.mtx")), "CsparseMatrix")
  cells <- utils::read.csv(file.path(out, "cellbender_cells.csv"), colClasses = c(cell = "character"))
  stopifnot(identical(cells$cell, colnames(observed)), nrow(counts) == nrow(observed))
  dimnames(counts) <- dimnames(observed)
  list(counts = counts, share = cells$background_fraction, seconds = times$seconds, times = times,
       process = run)
}

bench_ambient <- function() {
  sim <- simulate_counts(n_cells = ambient_cells, n_genes = ambient_genes, n_groups = 8, n_batches = 1,
                         group_prob = c(0.3, 0.2, 0.15, 0.1, 0.1, 0.07, 0.05, 0.03),
                         ambient = list(fraction = 0.1, n_empty = 5000), seed = 1, threads = threads)
  observed <- methods::as(SummarizedExperiment::assay(sim, "counts"), "CsparseMatrix")
  clean <- methods::as(SummarizedExperiment::assay(sim, "true_counts"), "CsparseMatrix")
  # remove_ambient() writes its estimate to colData ambient_fraction: the truth is kept here first.
  truth <- sim$ambient_fraction
  cell_type <- as.character(sim$cell_type)
  empty <- S4Vectors::metadata(sim)$ambient$empty_droplets
  profile <- S4Vectors::metadata(sim)$ambient$profile
  cat(sprintf(paste("\n== ambient, simulated: %s cells x %s genes, 8 types, %s empty droplets (median %.0f counts;",
                    "cells %.0f); true ambient share %.3f mean (%.3f-%.3f), %.3f of all counts; %d threads\n"),
              fmt(ncol(observed)), fmt(nrow(observed)), fmt(ncol(empty)), stats::median(Matrix::colSums(empty)),
              stats::median(Matrix::colSums(observed)), mean(truth), min(truth), max(truth),
              1 - sum(clean) / sum(observed), threads))
  rows <- list()
  rows$observed <- ambient_row("observed counts (nothing removed)", "", observed, clean, observed, truth, NA)

  ours <- el(remove_ambient(sim, empty_droplets = empty, seed = seed, threads = threads, progress = FALSE))
  fit <- S4Vectors::metadata(ours$value)$ambient
  rows$ours <- ambient_row("scdistill remove_ambient(empty_droplets)", "",
                           SummarizedExperiment::assay(ours$value, "decontaminated"), clean, observed, truth,
                           ours$s, share = ours$value$ambient_fraction)
  epochs <- tryCatch(nrow(fit$history), error = function(e) NULL)

  cluster_s <- NA
  if (has("DropletUtils")) {
    ambient <- Matrix::rowSums(empty)
    # Groups as a user would have them: soft_clusters() (Leiden start, resolution 1) on
    # run_pca() of the observed counts. And the true types, an oracle.
    cl <- el({
      pcs <- run_pca(sim, n_pcs = 30, n_hvg = min(2000L, nrow(sim)), seed = seed, threads = threads)
      soft_clusters(pcs, reduction = "PCA", seed = seed, threads = threads, progress = FALSE)$soft_cluster
    })
    cluster_s <- cl$s
    groups <- as.character(cl$value)
    du_label <- paste("DropletUtils", as.character(utils::packageVersion("DropletUtils")), "removeAmbience()")
    for (g in list(list(groups, sprintf("soft_clusters(): %d (ARI %.2f)", length(unique(groups)),
                                        ari(groups, cell_type))),
                   list(cell_type, sprintf("true cell types: %d (oracle)", length(unique(cell_type)))))) {
      r <- try_method(du_label, el(DropletUtils::removeAmbience(observed, ambient = ambient, groups = g[[1]])))
      if (!is.null(r)) {
        rows[[g[[2]]]] <- ambient_row(du_label, g[[2]], r$value, clean, observed, truth, r$s)
      }
    }
  } else {
    message("  DropletUtils not installed: removeAmbience() skipped (bench/setup_peers.sh installs ",
            "r-bioc-dropletutils)")
  }

  cb <- NULL
  if (!no_peers) {
    cb <- ambient_cellbender(observed, empty)
    if (!is.null(cb)) {
      rows$cellbender <- ambient_row(sprintf("CellBender %s remove-background (CPU, %d epochs)",
                                             cb$times$versions$cellbender, cb$times$epochs), "",
                                     cb$counts, clean, observed, truth, cb$seconds, share = cb$share)
    }
  }

  tab <- do.call(rbind, rows)
  rownames(tab) <- NULL
  tab$seconds_vs_ours <- tab$seconds / ours$s
  tab <- cbind(data = "sim", cells = ncol(observed), genes = nrow(observed), empty = ncol(empty), tab)
  cat("count_error = sum |estimate - clean| / sum clean; removed_total = share of all counts removed;",
      "frac_* = the method's per-cell ambient share (its estimate, or 1 - its counts / observed where",
      "frac_from says so) against the truth: mean absolute error, Pearson r; removed_* the same for",
      "1 - counts / observed of every method; seconds_vs_ours = seconds / remove_ambient()'s\n")
  show_table(tab)
  cat(sprintf("remove_ambient(): %.1f s%s. ", ours$s,
              if (!is.null(epochs)) sprintf(" (%d epochs)", epochs) else ""))
  if (!is.na(cluster_s)) cat(sprintf("DropletUtils' groups: run_pca() + soft_clusters() %.1f s, not in its seconds. ",
                                     cluster_s))
  if (!is.null(cb)) {
    cat(sprintf(paste("CellBender: %.1f s (%d epochs; --expected-cells %d, --total-droplets-included %d of %d",
                      "droplets; %d of the cells called cells), %.1fx remove_ambient()'s seconds; its process",
                      "%.1f s wall, peak RSS %.0f MB."),
                cb$seconds, cb$times$epochs, cb$times$n_cells, cb$times$total_droplets_included,
                cb$times$n_droplets, cb$times$cells_called, cb$seconds / ours$s, cb$process$wall,
                cb$process$rss_mb))
  }
  cat("\n")
  save_table(tab, "ambient")
  invisible(tab)
}

# ---- run -----------------------------------------------------------------------

# ---- joint fine-tuning ---------------------------------------------------------

joint_data <- function(name) {
  if (name == "cellbench") {
    d <- load_cellbench_hvg(root, threads)
    return(SingleCellExperiment::SingleCellExperiment(list(counts = d$counts),
                                                      colData = S4Vectors::DataFrame(batch = d$batch,
                                                                                     truth = d$label)))
  }
  sce <- simulate_counts(n_cells = joint_cells, n_genes = 2000, n_batches = 3,
                         group_prob = c(0.2, 0.15, 0.12, 0.11, 0.1, 0.08, 0.07, 0.06, 0.03, 0.03, 0.025, 0.025),
                         de_fac_loc = 0.3, seed = 1, threads = threads)
  sce$truth <- as.character(sce$cell_type)
  hvg <- highly_variable_genes(sce, n_hvg = 2000, batch = "batch", threads = threads)
  sce <- sce[hvg$highly_variable, ]
  sce[, Matrix::colSums(SingleCellExperiment::counts(sce)) > 0]
}

# Within-type share of the latent variance.
within_share <- function(z, truth) {
  total <- sum(scale(z, scale = FALSE)^2)
  within <- sum(vapply(split(seq_len(nrow(z)), truth), function(i) sum(scale(z[i, , drop = FALSE], scale = FALSE)^2), 0))
  within / total
}

bench_joint_one <- function(name) {
  sce <- joint_data(name)
  truth <- sce$truth
  k <- length(unique(truth))
  cat(sprintf("\n== joint fine-tuning, %s: %s cells x %s genes, %d types; %d threads\n", name, fmt(ncol(sce)),
              fmt(nrow(sce)), k, threads))
  m <- el(fit_vae(sce, batch = "batch", seed = seed, threads = threads, progress = FALSE))
  z <- latent(m$value)
  cl <- el(soft_clusters(z, n_clusters = k, seed = seed, threads = threads, progress = FALSE))
  last_elbo <- function(h) utils::tail(h$validation_elbo, 1)
  rows <- list(data.frame(method = "fit_vae() + soft_clusters()", weight = NA, nmi = nmi(cl$value$clusters, truth),
                          ari = ari(cl$value$clusters, truth), within_share = within_share(z, truth),
                          validation_elbo = last_elbo(m$value$history), seconds = m$s + cl$s))
  for (w in joint_weights) {
    j <- el(fine_tune_clusters(m$value, cl$value, sce, weight = w, seed = seed, threads = threads, progress = FALSE))
    zj <- latent(j$value$model)
    h <- as.data.frame(j$value$model$info$fine_tuned$training$history)
    rows[[length(rows) + 1]] <- data.frame(
      method = if (w == 0) "+ 20 epochs without the clustering term (control)" else "+ fine_tune_clusters()",
      weight = w, nmi = nmi(j$value$clusters$clusters, truth), ari = ari(j$value$clusters$clusters, truth),
      within_share = within_share(zj, truth), validation_elbo = last_elbo(h), seconds = j$s)
  }
  tab <- cbind(data = name, cells = ncol(sce), types = k, do.call(rbind, rows))
  show_table(tab)
  save_table(tab, "joint")
  invisible(tab)
}

bench_joint <- function() {
  for (name in c("cellbench", "sim")) bench_joint_one(name)
}

# ---- the whole pipeline ---------------------------------------------------------

bench_whole <- function() {
  sim <- simulate_counts(n_cells = whole_cells, n_genes = 2000, n_groups = 10, n_batches = 3,
                         group_prob = c(0.25, 0.18, 0.14, 0.11, 0.09, 0.07, 0.06, 0.05, 0.03, 0.02),
                         ambient = list(fraction = 0.1, n_empty = 10000), seed = 1, threads = threads)
  empty <- S4Vectors::metadata(sim)$ambient$empty_droplets
  S4Vectors::metadata(sim)$ambient <- NULL
  clean <- SummarizedExperiment::assay(sim, "true_counts")
  SummarizedExperiment::assay(sim, "true_counts") <- NULL
  truth <- as.character(sim$cell_type)
  cat(sprintf("\n== whole pipeline: %s cells x %s genes, 3 batches, 10 types, %s empty droplets; %d threads\n",
              fmt(ncol(sim)), fmt(nrow(sim)), fmt(ncol(empty)), threads))
  out <- el(run_pipeline(sim, batch = "batch", empty_droplets = empty, seed = seed, threads = threads,
                         progress = FALSE))
  p <- S4Vectors::metadata(out$value)$pipeline
  print(p)
  observed <- SingleCellExperiment::counts(sim)
  dec <- SummarizedExperiment::assay(out$value, "decontaminated")
  tab <- data.frame(method = "run_pipeline() (all six stages, defaults)", cells = ncol(sim),
                    t(as.data.frame(p$seconds)), total_s = out$s,
                    clusters = length(unique(out$value$soft_cluster)), ari = ari(out$value$soft_cluster, truth),
                    nmi = nmi(out$value$soft_cluster, truth),
                    count_error = sum(abs(dec - clean)) / sum(clean),
                    observed_error = sum(abs(observed - clean)) / sum(clean), check.names = FALSE)
  rownames(tab) <- NULL
  show_table(tab)
  save_table(tab, "whole")
  if (!no_seurat && has("Seurat")) {
    suppressPackageStartupMessages(library(Seurat))
    obj <- suppressWarnings(CreateSeuratObject(observed))
    steps <- list(
      NormalizeData = function(o) NormalizeData(o, verbose = FALSE),
      FindVariableFeatures = function(o) FindVariableFeatures(o, verbose = FALSE),
      ScaleData = function(o) ScaleData(o, verbose = FALSE),
      RunPCA = function(o) RunPCA(o, verbose = FALSE),
      FindNeighbors = function(o) FindNeighbors(o, dims = 1:30, verbose = FALSE),
      FindClusters = function(o) FindClusters(o, verbose = FALSE),
      RunUMAP = function(o) RunUMAP(o, dims = 1:30, verbose = FALSE))
    secs <- numeric()
    for (nm in names(steps)) {
      r <- el(steps[[nm]](obj))
      obj <- r$value
      secs[nm] <- r$s
      cat(sprintf("  Seurat %s: %.1f s\n", nm, r$s))
    }
    seu <- data.frame(method = "Seurat standard workflow (no ambient, doublet or batch stage)", cells = ncol(sim),
                      t(as.data.frame(secs)), total_s = sum(secs), clusters = length(unique(obj$seurat_clusters)),
                      ari = ari(obj$seurat_clusters, truth), nmi = nmi(obj$seurat_clusters, truth),
                      check.names = FALSE)
    rownames(seu) <- NULL
    show_table(seu)
    save_table(seu, "whole_seurat")
  }
  invisible(tab)
}

if ("clusters" %in% stages) bench_clusters()
if ("umap" %in% stages) bench_umap()
if ("doublets" %in% stages) bench_doublets()
if ("ambient" %in% stages) bench_ambient()
if ("joint" %in% stages) bench_joint()
if ("whole" %in% stages) bench_whole()
