# The package's pipeline stages against their reference tools, on the same
# data in one run (one R process; the doublet peers in their own process).
#
#   Rscript bench/pipeline.R [--stages clusters,umap,doublets] [--sim-cells 20000]
#                            [--umap-cells 10000,100000] [--threads 2] [--seed 1]
#                            [--doublet-epochs N] [--peer-methods scrublet,solo] [--no-peers]
#
# clusters: CellBench (the singlets of the 3 plates, all genes; truth =
#   cell_line; embedding run_pca(n_pcs = 30, n_hvg = 2000), "PCA") and the
#   simulator (simulate_counts(--sim-cells, 2000 genes, 3 batches, 10 types in
#   unequal proportions, seed 1); truth = cell_type; the same PCA, then
#   run_harmony(batch = "batch"), "HARMONY"). On that embedding, NMI
#   (arithmetic normalisation) and ARI against the truth, clusters found and
#   seconds of:
#     soft_clusters(n_clusters = number of true types) and soft_clusters()
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
# umap: simulate_counts(N, 2000 genes, 10 types, seed 1) for each N in
#   --umap-cells, run_pca(n_pcs = 30, n_hvg = 1000); and 2,000 real PBMCs
#   (../shared/data/pbmc_stim/pbmc_stim.RData: pbmc.ctrl + pbmc.stim),
#   run_pca(n_pcs = 20). On all cells: run_umap(z) (parametric, defaults)
#   against uwot::umap(z, n_neighbors = 15) (its defaults: min_dist 0.01,
#   200 / 500 epochs; seeded with withr::with_seed), the same threads; seconds,
#   neighbor_preservation(z, map, k = 15) of both, their difference and the
#   speed-up (uwot s / ours). Projection: both refitted on a random 90% of the
#   cells (uwot with ret_model = TRUE), then the other 10% placed by
#   project_umap() and uwot::umap_transform(), timing the placement only;
#   also the held-out cells' neighbour preservation among themselves.
#
# doublets: CellBench, every cell (singlets and doublets, plate = batch, all
#   genes), truth demuxlet_cls == "DBL". find_doublets() with method "both",
#   "classifier" (SOLO-like) and "neighbors" (Scrublet-like) on one VAE
#   (fit_vae() as find_doublets() fits it; --doublet-epochs N caps its epochs,
#   default the package's rule), where the package exports find_doublets()
#   (see bench_doublets()); and the peers (bench/doublets_peer.py: scrublet
#   0.2.3 and scvi-tools 1.4.2 SOLO, each at its defaults per plate, in their
#   own process under /usr/bin/time) unless --no-peers; --peer-methods picks
#   them. AUROC (Mann-Whitney) and AUPRC (average precision, as
#   scikit-learn's average_precision_score) overall and per plate, and seconds.
#
# Every stage prints Markdown tables and appends to
# bench/results/pipeline_<stage>.csv. --seed seeds the methods (soft
# clusters, UMAPs, splits, the peers); the simulations keep seed 1.
suppressPackageStartupMessages({ library(scdistill); library(Matrix) })
args <- commandArgs(trailingOnly = TRUE)
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE))), "common.R"))
as_list <- function(as) function(x) as(strsplit(x, ",", fixed = TRUE)[[1]])
stages <- bench_option(args, "--stages", c("clusters", "umap", "doublets"), as_list(trimws))
sim_cells <- bench_option(args, "--sim-cells", 20000L)
umap_cells <- bench_option(args, "--umap-cells", c(10000L, 100000L), as_list(as.integer))
threads <- bench_option(args, "--threads", 2L)
seed <- bench_option(args, "--seed", 1L)
peer_methods <- bench_option(args, "--peer-methods", "scrublet,solo", as.character)
no_peers <- "--no-peers" %in% args
doublet_epochs <- bench_option(args, "--doublet-epochs", NULL)
bad <- setdiff(stages, c("clusters", "umap", "doublets"))
if (length(bad)) stop("--stages: unknown ", paste(bad, collapse = ", "), "; choose from clusters,umap,doublets")
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
  for (name in c("cellbench", "sim")) bench_clusters_one(name)
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
  s <- simulate_counts(n_cells = n, n_genes = 2000, n_groups = 10, seed = 1, format = "list", threads = threads)
  run_pca(s$counts, n_pcs = 30, n_hvg = 1000, seed = seed, threads = threads)
}

bench_umap_one <- function(name, n = NA) {
  z <- unclass(umap_data(name, n))
  attributes(z) <- attributes(z)[c("dim", "dimnames")]
  cat(sprintf("\n== umap, %s: %s cells x %d dims; %d threads\n", name, fmt(nrow(z)), ncol(z), threads))
  np <- function(x, y) neighbor_preservation(x, y, k = 15, seed = seed, threads = threads)

  ours <- el(run_umap(z, seed = seed, threads = threads, progress = FALSE))
  theirs <- el(withr::with_seed(seed, uwot::umap(z, n_neighbors = 15, n_threads = threads)))
  np_ours <- np(z, ours$value$embedding)
  np_uwot <- np(z, theirs$value)

  # Projection: both refitted on 90% of the cells; the other 10% placed.
  held <- withr::with_seed(seed, sample.int(nrow(z), round(0.1 * nrow(z))))
  train <- z[-held, , drop = FALSE]
  new <- z[held, , drop = FALSE]
  fit_ours <- run_umap(train, seed = seed, threads = threads, progress = FALSE)
  fit_uwot <- withr::with_seed(seed, uwot::umap(train, n_neighbors = 15, n_threads = threads, ret_model = TRUE))
  p_ours <- el(project_umap(fit_ours, new, threads = threads))
  p_uwot <- el(withr::with_seed(seed, uwot::umap_transform(new, fit_uwot, n_threads = threads)))
  k_new <- min(15L, nrow(new) - 1L)
  tab <- data.frame(
    data = name, cells = nrow(z), dims = ncol(z), epochs_ours = nrow(ours$value$history),
    ours_s = ours$s, uwot_s = theirs$s, speedup = theirs$s / ours$s,
    np_ours = np_ours, np_uwot = np_uwot, np_diff = np_ours - np_uwot,
    projected_cells = nrow(new), project_ours_s = p_ours$s, transform_uwot_s = p_uwot$s,
    project_speedup = p_uwot$s / p_ours$s,
    projected_np_ours = neighbor_preservation(new, p_ours$value, k = k_new, seed = seed, threads = threads),
    projected_np_uwot = neighbor_preservation(new, p_uwot$value, k = k_new, seed = seed, threads = threads))
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
    vae <- el(fit_vae(d$counts, batch = d$batch, max_epochs = doublet_epochs, seed = seed, threads = threads,
                      progress = FALSE))
    for (m in c("both", "classifier", "neighbors")) {
      r <- el(find_doublets(d$counts, batch = d$batch, model = vae$value, method = m, seed = seed, threads = threads,
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

# ---- run -----------------------------------------------------------------------

if ("clusters" %in% stages) bench_clusters()
if ("umap" %in% stages) bench_umap()
if ("doublets" %in% stages) bench_doublets()
