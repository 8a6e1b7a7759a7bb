# align_species() against scSpecies 0.1.4 (PyPI, Python) on two simulated
# species, each at its defaults, on CPU with the same threads and epochs.
#
#   Rscript bench/species_vs_scspecies.R [--cells 5000] [--genes 2000] [--epochs 40] [--threads 2]
#       [--seed 1] [--no-peer] [--no-ours] [--work DIR] [--ours-epochs N|default] [--fc-samples N]
#       [--model-seeds 0,1,2]
#
# --seed draws the data; --model-seeds trains each side once per seed on
# that data (ours: seed = s; scSpecies: random_seed = 369963 + s, its default
# for s = 0): label transfer swings with the seed at a few thousand cells,
# so compare means over seeds. One row per side and seed, then the means.
#
# --epochs sets both sides' epochs (scSpecies' default is 40 + 40; equal
# epochs is how the speed is compared). --ours-epochs gives ours other
# epochs; "default" leaves align_species() its own rule (40 epochs per
# 20,000 cells, 40 to 400). --fc-samples: our homolog_fold_changes()
# n_samples (default its own, 10,000; scSpecies' compute_logfold_change()
# draws 50,000 per type).
#
# --work keeps the exchanged files, both sides' outputs and our child script
# (ours.R) in DIR (default: a temporary folder, removed at exit).
#
# Data: simulate_counts(species = ...): the first species is the context
# (labelled), the second the target; 7 cell types in unequal proportions, 3
# batches per species, --cells cells and --genes genes per species, 80% of
# the target's genes one-to-one homologs. One cell type is only in the
# context and one only in the target: through the simulator's
# `only_first`/`only_second` when it has them, otherwise by dropping that
# type's cells from the other species. Cells scSpecies would filter out (fewer
# than 2.5% of the genes detected, cell types of <= 20 cells, batches of < 20
# cells) are removed first, so both get the same cells. The homolog pairs go
# to both as a table (target, context).
#
# Each side runs in its own process under /usr/bin/time (peak RSS): ours
# through an Rscript child (align_species, latent, transfer_labels,
# homolog_fold_changes), scSpecies through bench/species_peer.py (its
# preprocessing with the data-level neighbour search, train_context,
# train_target, transfer_labels_data, compute_logfold_change). Scores, all
# computed here by the same code:
#   - bal_acc: label-transfer balanced accuracy (mean recall over the true
#     types) over the target cells whose true type exists in the context;
#   - ilisi (species as the batch), clisi, ari (k-means, k = number of shared
#     types) of the joint latent (both species' cells), from
#     integration_metrics(), on the cells of the shared types;
#   - fc_r / fc_r_lfc1: Pearson r of the estimated log2 fold changes (target
#     over context, per shared type) with the truth, over the homologous
#     genes, all and where |true LFC| > 1; estimate and truth are centred
#     per type by their median first (a per-type shift is a normalisation
#     choice, not an error). Truth: metadata(species2)$homolog_lfc when the
#     simulator gives it, otherwise from its parameters: base_mean x
#     de_factor_<type> normalised over the homologous genes in each species.
# Prints one Markdown table (seconds per phase, total, process, peak RSS, the
# speed ratio) and appends it to bench/results/species_vs_scspecies.csv.
suppressPackageStartupMessages({ library(scdistill); library(Matrix); library(SingleCellExperiment) })
args <- commandArgs(trailingOnly = TRUE)
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE))), "common.R"))
opt <- function(name, default) bench_option(args, name, default)
n_cells <- opt("--cells", 5000L)
n_genes <- opt("--genes", 2000L)
epochs <- opt("--epochs", 40L)
ours_epochs <- bench_option(args, "--ours-epochs", as.character(epochs), as = as.character)
ours_epochs_arg <- if (identical(ours_epochs, "default")) "NULL" else as.character(as.integer(ours_epochs))
fc_samples <- opt("--fc-samples", 10000L)
threads <- opt("--threads", 2L)
seed <- opt("--seed", 1L)
model_seeds <- as.integer(strsplit(bench_option(args, "--model-seeds", "0", as = as.character), ",")[[1]])
if (!length(model_seeds) || anyNA(model_seeds)) stop("--model-seeds takes integers separated by commas, e.g. 0,1,2")
run_ours <- !"--no-ours" %in% args
run_peer <- !"--no-peer" %in% args
root <- bench_root()
work <- bench_option(args, "--work", file.path(tempdir(), "species"), as = as.character)
dir.create(work, showWarnings = FALSE, recursive = TRUE)
work <- normalizePath(work)

# ---- our side: every call of the align_species() API is in this child script
# ({{...}} are filled in below). It writes the latents, transferred labels,
# fold changes and seconds per phase to {{OUT}}.
ours_template <- c(
  "suppressPackageStartupMessages({library(scdistill); library(SingleCellExperiment)})",
  "d <- readRDS('{{DATA}}')",
  "secs <- numeric(0)",
  "tick <- function(name, t0) secs[name] <<- proc.time()[['elapsed']] - t0",
  "t0 <- proc.time()[['elapsed']]",
  paste("fit <- align_species(d$context, d$target, d$homologs, context_labels = 'cell_type',",
        "batch_context = 'batch', batch_target = 'batch', max_epochs = {{OURS_EPOCHS}}, seed = {{SEED}},",
        "threads = {{THREADS}}, verbose = FALSE)"),
  "tick('fit', t0)",
  "t0 <- proc.time()[['elapsed']]",
  "z_ctx <- latent(fit, d$context)",
  "z_tgt <- latent(fit, d$target)",
  "tick('latent', t0)",
  "t0 <- proc.time()[['elapsed']]",
  "tl <- transfer_labels(fit, d$target)",
  "tick('transfer', t0)",
  "acc <- label_transfer_accuracy(tl$scSpecies_label, tl$cell_type)",
  "t0 <- proc.time()[['elapsed']]",
  "fc <- homolog_fold_changes(fit, d$target, labels = 'cell_type', n_samples = {{FC_SAMPLES}})",
  "tick('fold_changes', t0)",
  "rownames(z_ctx) <- colnames(d$context); rownames(z_tgt) <- colnames(d$target)",
  "write.csv(z_ctx, file.path('{{OUT}}', 'ours_z_context.csv'))",
  "write.csv(z_tgt, file.path('{{OUT}}', 'ours_z_target.csv'))",
  "write.csv(data.frame(label = tl$scSpecies_label, confidence = tl$scSpecies_confidence, row.names = colnames(tl)),",
  "          file.path('{{OUT}}', 'ours_labels.csv'))",
  "fc_long <- do.call(rbind, lapply(names(fc), function(t) data.frame(cell_type = t, target_gene = rownames(fc[[t]]),",
  "                                  lfc = fc[[t]]$lfc, p = fc[[t]]$p)))",
  "write.csv(fc_long, file.path('{{OUT}}', 'ours_lfc.csv'), row.names = FALSE)",
  "secs['epochs_context'] <- sum(fit$history$phase == 'context'); secs['epochs_target'] <- sum(fit$history$phase == 'target')",
  "inner <- tapply(fit$history$seconds, fit$history$phase, sum)",
  "inner <- stats::setNames(as.numeric(inner), names(inner))",
  "if (length(inner)) names(inner) <- paste0('fit_', names(inner))",
  "s <- c(secs, inner, own_balanced_accuracy = as.numeric(acc$balanced_accuracy))",
  "write.csv(data.frame(key = names(s), value = unname(s)), file.path('{{OUT}}', 'ours_seconds.csv'), row.names = FALSE)")

# ---- data
group_prob <- c(0.25, 0.20, 0.15, 0.13, 0.12, 0.09, 0.06)
types <- paste0("Group", seq_along(group_prob))
context_only <- types[7]  # wanted in the context only
target_only <- types[6]   # wanted in the target only
simulate <- function(extra) {
  simulate_counts(n_cells = n_cells, n_genes = n_genes, n_groups = length(group_prob), group_prob = group_prob,
                  n_batches = 3, batch_effect = "medium",
                  species = c(list(n_cells = n_cells, n_genes = n_genes), extra), seed = seed, threads = threads)
}
# The simulator's own species-specific types, where it has them (a teammate's
# addition): `only_first`/`only_second`, the number of cell types in one species only.
sim <- tryCatch(simulate(list(only_first = 1L, only_second = 1L)), error = function(e) NULL)
native_only <- !is.null(sim)
if (!native_only) sim <- simulate(list())
sp2 <- S4Vectors::metadata(sim)$species2
if (native_only) {
  context_only <- setdiff(unique(as.character(sim$cell_type)), unique(as.character(sp2$cell_type)))
  target_only <- setdiff(unique(as.character(sp2$cell_type)), unique(as.character(sim$cell_type)))
}
if (!length(context_only) || !length(target_only)) {  # fall back: drop the types' cells
  context_only <- types[7]
  target_only <- types[6]
  native_only <- FALSE
}
ctx <- sim[, !as.character(sim$cell_type) %in% target_only]
tgt <- sp2[, !as.character(sp2$cell_type) %in% context_only]

# scSpecies' filters (min_non_zero_genes 0.025, min_cell_type_size 20,
# min_batch_size 20), applied to both so both see the same cells.
prefilter <- function(x) {
  repeat {
    n0 <- ncol(x)
    x <- x[, Matrix::colSums(counts(x) > 0) >= 0.025 * nrow(x)]
    bt <- table(as.character(x$batch))
    x <- x[, as.character(x$batch) %in% names(bt)[bt >= 20]]
    ct <- table(as.character(x$cell_type))
    x <- x[, as.character(x$cell_type) %in% names(ct)[ct > 20]]
    if (ncol(x) == n0) break
  }
  x$cell_type <- droplevels(factor(as.character(x$cell_type)))
  x$batch <- droplevels(factor(as.character(x$batch)))
  x
}
ctx <- prefilter(ctx)
tgt <- prefilter(tgt)
hom <- rowData(tgt)$homolog
homologs <- data.frame(target = rownames(tgt)[!is.na(hom)], context = hom[!is.na(hom)])
shared <- intersect(levels(ctx$cell_type), levels(tgt$cell_type))

# Truth: log2 fold change target over context per shared type, homologous target genes.
truth_lfc <- function() {
  given <- S4Vectors::metadata(sp2)$homolog_lfc
  if (!is.null(given)) return(list(lfc = as.matrix(given)[, intersect(shared, colnames(given)), drop = FALSE],
                                   source = "simulator homolog_lfc"))
  r1 <- rowData(sim)
  r2 <- rowData(sp2)
  g2 <- homologs$target
  g1 <- homologs$context
  lfc <- sapply(shared, function(t) {
    e2 <- r2[g2, "base_mean"] * r2[g2, paste0("de_factor_", t)]
    e1 <- r1[g1, "base_mean"] * r1[g1, paste0("de_factor_", t)]
    log2(e2 / sum(e2)) - log2(e1 / sum(e1))
  })
  rownames(lfc) <- g2
  list(lfc = lfc, source = "base_mean x de_factor")
}
truth <- truth_lfc()

cat(sprintf(paste("\n== context %s cells x %s genes, target %s cells x %s genes, %s homolog pairs; types %d shared",
                  "(%s), context only %s, target only %s (%s); %d + %d batches; %d epochs, %d threads\n"),
            format(ncol(ctx), big.mark = ","), format(nrow(ctx), big.mark = ","), format(ncol(tgt), big.mark = ","),
            format(nrow(tgt), big.mark = ","), format(nrow(homologs), big.mark = ","), length(shared),
            paste(sprintf("%s %d/%d", shared, as.integer(table(ctx$cell_type)[shared]),
                          as.integer(table(tgt$cell_type)[shared])), collapse = ", "),
            paste(setdiff(levels(ctx$cell_type), shared), collapse = ","),
            paste(setdiff(levels(tgt$cell_type), shared), collapse = ","),
            if (native_only) "simulator" else "dropped", nlevels(ctx$batch), nlevels(tgt$batch), epochs, threads))

# ---- exchange: RDS for ours; Matrix Market + CSVs for the peer
strip <- function(x) SingleCellExperiment(assays = list(counts = counts(x)),
                                          colData = colData(x)[, c("cell_type", "batch")])
saveRDS(list(context = strip(ctx), target = strip(tgt), homologs = homologs), file.path(work, "data.rds"))
for (side in c("context", "target")) {
  x <- if (side == "context") ctx else tgt
  invisible(writeMM(counts(x), file.path(work, paste0(side, ".mtx"))))
  writeLines(rownames(x), file.path(work, paste0(side, "_genes.txt")))
  utils::write.csv(data.frame(batch = x$batch, cell_type = x$cell_type, row.names = colnames(x)),
                   file.path(work, paste0(side, "_obs.csv")))
}
utils::write.csv(homologs, file.path(work, "homologs.csv"), row.names = FALSE)

# ---- run: each side once per model seed, on the same data
res <- list()
for (ms in model_seeds) {
  if (run_ours) {
    script <- file.path(work, "ours.R")
    fill <- function(s) {
      for (k in c("DATA", "OURS_EPOCHS", "FC_SAMPLES", "SEED", "THREADS", "OUT")) {
        s <- gsub(sprintf("{{%s}}", k), switch(k, DATA = file.path(work, "data.rds"), OURS_EPOCHS = ours_epochs_arg,
                                                FC_SAMPLES = fc_samples, SEED = ms, THREADS = threads, OUT = work),
                  s, fixed = TRUE)
      }
      s
    }
    writeLines(fill(ours_template), script)
    r <- timed(file.path(R.home("bin"), "Rscript"), script, quiet = FALSE)
    if (!r$ok) stop("our side failed; run ", script, " to see why")
    s <- utils::read.csv(file.path(work, "ours_seconds.csv"))
    sec <- stats::setNames(s$value, s$key)
    lab <- utils::read.csv(file.path(work, "ours_labels.csv"), row.names = 1)
    ph <- function(k) if (k %in% names(sec)) unname(sec[[k]]) else NA_real_
    res[[paste0("ours_s", ms)]] <- list(
      method = "scdistill align_species", seed = ms, process = r,
      z = rbind(as.matrix(utils::read.csv(file.path(work, "ours_z_context.csv"), row.names = 1)),
                as.matrix(utils::read.csv(file.path(work, "ours_z_target.csv"), row.names = 1))),
      pred = stats::setNames(as.character(lab$label), rownames(lab)),
      lfc = utils::read.csv(file.path(work, "ours_lfc.csv")),
      seconds = c(prepare = ph("fit_prepare"), context = ph("fit_context"), target = ph("fit_target"),
                  fit = ph("fit"), transfer = ph("transfer"), fold_changes = ph("fold_changes"),
                  total = sum(sec[c("fit", "latent", "transfer", "fold_changes")])),
      own_bal_acc = ph("own_balanced_accuracy"),
      epochs = sprintf("%d + %d", as.integer(ph("epochs_context")), as.integer(ph("epochs_target"))),
      fc_samples = fc_samples)
  }
  if (run_peer) {
    python <- peers_python(root)
    r <- timed(python, c(file.path(root, "bench", "species_peer.py"), work, "--epochs", epochs, "--threads", threads,
                           "--seed", 369963L + ms),
               quiet = FALSE)
    if (!r$ok) stop("scSpecies failed; run ", python, " bench/species_peer.py ", work, " to see why")
    js <- paste(readLines(file.path(work, "scspecies.json"), warn = FALSE), collapse = " ")
    num <- function(key) as.numeric(sub(sprintf('.*"%s": *([0-9.eE+-]+).*', key), "\\1", js))
    lab <- utils::read.csv(file.path(work, "scspecies_labels.csv"), row.names = 1, colClasses = "character")
    sec <- c(prepare = num("prepare"), context = num("context"), target = num("target"))
    res[[paste0("peer_s", ms)]] <- list(
      method = sub('.*"method": *"([^"]+)".*', "\\1", js), seed = 369963L + ms, process = r,
      z = rbind(as.matrix(utils::read.csv(file.path(work, "scspecies_z_context.csv"), row.names = 1)),
                as.matrix(utils::read.csv(file.path(work, "scspecies_z_target.csv"), row.names = 1))),
      pred = stats::setNames(lab$pred_sim_cell_type, rownames(lab)),
      lfc = utils::read.csv(file.path(work, "scspecies_lfc.csv")),
      seconds = c(sec, fit = sum(sec), transfer = num("transfer"), fold_changes = num("fold_changes"),
                  total = num("total")),
      own_bal_acc = num("balanced_accuracy_sim"), nns_bal_acc = num("balanced_accuracy_nns"),
      epochs = sprintf("%d + %d", as.integer(num("epochs")), as.integer(num("epochs"))), fc_samples = 50000L)
  }
}
if (!length(res)) stop("nothing to run (--no-ours and --no-peer)")

# ---- scores (the same code for both)
balanced_accuracy <- function(pred, truth) {
  keep <- truth %in% levels(ctx$cell_type)
  recall <- tapply(pred[keep] == truth[keep], truth[keep], mean)
  mean(recall)
}
fc_r <- function(lfc) {
  est <- truth$lfc
  est[] <- NA_real_
  for (t in intersect(colnames(est), unique(lfc$cell_type))) {
    d <- lfc[lfc$cell_type == t, ]
    est[, t] <- d$lfc[match(rownames(est), d$target_gene)]
  }
  centre <- function(m) sweep(m, 2, apply(m, 2, stats::median, na.rm = TRUE))
  e <- as.vector(centre(est))
  tr <- as.vector(centre(truth$lfc))
  ok <- is.finite(e) & is.finite(tr)
  big <- ok & abs(tr) > 1
  c(all = stats::cor(e[ok], tr[ok]), lfc1 = if (sum(big) > 2) stats::cor(e[big], tr[big]) else NA_real_,
    coverage = mean(ok))
}
# A reference without a model: the same r for pseudobulk log2 fold changes
# of the true labels (each species' summed counts of the type over its
# homologous genes, as proportions; +1e-6 as the models' ε). Its error is
# the counting noise of weakly expressed genes, which a model's shrinkage
# can beat.
pseudobulk_lfc <- function() {
  prop <- function(x, genes, t) {
    s <- Matrix::rowSums(counts(x)[genes, x$cell_type == t, drop = FALSE])
    s / sum(s)
  }
  do.call(rbind, lapply(shared, function(t) {
    data.frame(cell_type = t, target_gene = homologs$target,
               lfc = log2(prop(tgt, homologs$target, t) + 1e-6) - log2(prop(ctx, homologs$context, t) + 1e-6))
  }))
}
pseudobulk_r <- fc_r(pseudobulk_lfc())
cells_ctx <- colnames(ctx)[ctx$cell_type %in% shared]
cells_tgt <- colnames(tgt)[tgt$cell_type %in% shared]
cells <- Reduce(intersect, lapply(res, function(r) rownames(r$z)), c(cells_ctx, cells_tgt))
species_of <- ifelse(cells %in% colnames(ctx), "context", "target")
type_of <- c(stats::setNames(as.character(ctx$cell_type), colnames(ctx)),
             stats::setNames(as.character(tgt$cell_type), colnames(tgt)))[cells]
m <- integration_metrics(lapply(res, function(r) r$z[cells, , drop = FALSE]), batch = species_of, label = type_of,
                         threads = threads)
truth_tgt <- stats::setNames(as.character(tgt$cell_type), colnames(tgt))
tab <- do.call(rbind, lapply(names(res), function(k) {
  r <- res[[k]]
  f <- fc_r(r$lfc)
  data.frame(method = r$method, seed = r$seed, epochs = r$epochs, fc_samples = r$fc_samples,
             bal_acc = balanced_accuracy(r$pred[names(truth_tgt)], truth_tgt),
             own_bal_acc = r$own_bal_acc, ilisi = m[k, "ilisi"], clisi = m[k, "clisi"], ari = m[k, "ari_kmeans"],
             fc_r = f[["all"]], fc_r_lfc1 = f[["lfc1"]], fc_coverage = f[["coverage"]],
             prepare_s = r$seconds[["prepare"]], context_s = r$seconds[["context"]], target_s = r$seconds[["target"]],
             fit_s = r$seconds[["fit"]], transfer_s = r$seconds[["transfer"]],
             fold_changes_s = r$seconds[["fold_changes"]], total_s = r$seconds[["total"]],
             process_s = r$process$wall, peak_rss_mb = r$process$rss_mb)
}))
markdown <- function(d) {
  f <- vapply(d, function(v) if (is.numeric(v)) trimws(formatC(v, digits = 4, format = "g")) else as.character(v),
              character(nrow(d)))
  f <- matrix(f, nrow = nrow(d))
  f[f == "NA"] <- ""
  c(paste("|", paste(names(d), collapse = " | "), "|"), paste0(paste(rep("|---", ncol(d)), collapse = ""), "|"),
    apply(f, 1, function(r) paste("|", paste(r, collapse = " | "), "|")))
}
cat("\n", markdown(tab), sep = "\n")
cat(sprintf("fold-change truth: %s; %d homologous genes x %d shared types\n", truth$source, nrow(truth$lfc),
            ncol(truth$lfc)))
cat(sprintf("fold-change reference (pseudobulk of the true labels, no model): r %.3f, r (|LFC|>1) %.3f\n",
            pseudobulk_r[["all"]], pseudobulk_r[["lfc1"]]))
peers <- Filter(function(r) !is.null(r$nns_bal_acc), res)
if (length(peers)) cat(sprintf("scSpecies data-level neighbour vote (pred_nns): balanced accuracy %s\n",
                               paste(sprintf("%.3f", vapply(peers, function(r) r$nns_bal_acc, 1)), collapse = ", ")))
# Means over the model seeds, one row per side.
cols <- c("bal_acc", "ari", "ilisi", "fc_r", "fc_r_lfc1", "fit_s", "transfer_s", "fold_changes_s", "total_s",
          "process_s", "peak_rss_mb")
means <- do.call(rbind, lapply(split(tab, tab$method), function(d) {
  data.frame(method = d$method[1], seeds = nrow(d), epochs = d$epochs[1], bal_acc_min = min(d$bal_acc),
             bal_acc_max = max(d$bal_acc), as.list(colMeans(d[cols])))
}))
if (length(model_seeds) > 1) cat("\nmeans over the model seeds:\n", markdown(means), sep = "\n")
ours_row <- grepl("^scdistill", means$method)
if (any(ours_row) && any(!ours_row)) {
  o <- means[ours_row, ][1, ]
  p <- means[!ours_row, ][1, ]
  cat(sprintf("speed-up (scSpecies / ours): %.2fx total, %.2fx process, %.2fx training%s\n",
              p$total_s / o$total_s, p$process_s / o$process_s, p$fit_s / o$fit_s,
              if (identical(o$epochs, p$epochs)) " (equal epochs)" else
                sprintf(" (NOT at equal epochs: %s against %s)", o$epochs, p$epochs)))
}
tab$date <- format(Sys.time(), "%Y-%m-%d %H:%M")
tab$context_cells <- ncol(ctx)
tab$target_cells <- ncol(tgt)
tab$genes <- n_genes
tab$shared_types <- length(shared)
tab$fc_pseudobulk_r <- pseudobulk_r[["all"]]
tab$fc_pseudobulk_r_lfc1 <- pseudobulk_r[["lfc1"]]
tab$threads <- threads
tab$data_seed <- seed
tab$only_types <- if (native_only) "simulator" else "dropped"
tab$truth <- truth$source
append_csv(tab, file.path(root, "bench", "results", "species_vs_scspecies.csv"))
