# Differential expression against the simulator's truth, side by side with
# scvi-tools 1.4.2 (change mode) and scDistill 0.3.1 (pseudobulk, MC dropout).
#
#   Rscript bench/de.R [s1 s2 ... s6] [--cells N] [--threads N] [--epochs N] [--sample-sd X] [--per-type]
#       [--no-peers] [--seed N] [--only REGEX]
#
# For each scenario (default all six, at their own sizes unless --cells):
# treated against control cells of every cell type together, as scDistill's
# benchmark compares them; truth: rowData is_de and true_lfc (the cell-type
# mixture's fold change). With --per-type, treated against control within
# each cell type instead, truth is_de_<type> and true_lfc_<type>, pooled over
# the types. Per method: F1 of the calls, false discovery proportion among
# calls, Pearson r of the estimated against the true LFC on the true DE
# genes, seconds of the DE calls (model training separately). Tables go to
# bench/results/de_<scenario>[_per_type].csv and are printed. --sample-sd adds
# biological variation between samples (simulate_counts(sample_sd = X);
# 0.25 is a typical donor spread): the case where treating cells as
# replicates calls donor differences and the samples method should not.
# --seed draws another simulation of the same design (default 1); --only
# runs only the methods whose names match REGEX (e.g. "samples|pseudobulk").
# The samples method also runs on models trained with the condition
# protected (distill() with harmony_teacher(protect = "condition"); fit_vae()
# with the condition as a categorical covariate).
suppressMessages(library(scdistill))
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE))), "common.R"))
root <- bench_root()
args <- commandArgs(trailingOnly = TRUE)
opt <- function(name, default) bench_option(args, name, default, as = as.numeric)
threads <- opt("--threads", 2)
cells <- opt("--cells", NA)
epochs <- opt("--epochs", NA)
sample_sd <- opt("--sample-sd", 0)
sim_seed <- opt("--seed", 1)
only <- bench_option(args, "--only", NA, as = as.character)
peers <- !"--no-peers" %in% args
per_type <- "--per-type" %in% args
tag <- paste0(if (per_type) "_per_type" else "", if (sample_sd > 0) sprintf("_sd%g", sample_sd) else "",
              if (sim_seed != 1) sprintf("_seed%g", sim_seed) else "")
scenarios <- grep("^s[1-6]$", args, value = TRUE)
if (!length(scenarios)) scenarios <- paste0("s", 1:6)
python <- file.path(Sys.getenv("HOME"), ".local", "share", "scdistill", "peers", "bin", "python")
out_dir <- file.path(root, "bench", "results")
dir.create(out_dir, showWarnings = FALSE, recursive = TRUE)

score <- function(calls, lfc, truth, true_lfc) {
  tp <- sum(calls & truth, na.rm = TRUE)
  n_calls <- sum(calls, na.rm = TRUE)
  data.frame(calls = n_calls, true_de = sum(truth), tp = tp,
             f1 = 2 * tp / (n_calls + sum(truth)), fdp = if (n_calls) 1 - tp / n_calls else NA,
             lfc_r = stats::cor(lfc[truth], true_lfc[truth], use = "complete.obs"))
}

run_scenario <- function(sc) {
  sim <- simulation_scenario(sc, n_cells = if (is.na(cells)) NULL else cells, sample_sd = sample_sd, seed = sim_seed,
                             threads = threads)
  rd <- SummarizedExperiment::rowData(sim)
  types <- sort(unique(as.character(sim$cell_type)))
  cat(sprintf("\n== %s: %d cells x %d genes, %d cell types, %s ==\n", sc, ncol(sim), nrow(sim), length(types),
              if (per_type) "treated vs control within each type" else "treated vs control over all cells"))
  ep <- if (is.na(epochs)) NULL else epochs
  t0 <- Sys.time()
  vae <- fit_vae(sim, batch = "batch", max_epochs = ep, threads = threads)
  t_vae <- as.numeric(Sys.time() - t0, units = "secs")
  t0 <- Sys.time()
  # `--epochs` caps both phases; without it each phase has its default.
  fit_distill <- function(...) if (is.null(ep)) distill(sim, batch = "batch", threads = threads, ...) else
    distill(sim, batch = "batch", max_epochs_encoder = ep, max_epochs_decoder = ep, threads = threads, ...)
  dst <- fit_distill()
  t_dst <- as.numeric(Sys.time() - t0, units = "secs")
  # The groups protected in training: Harmony keeps the condition in the
  # teacher's embedding; the VAE's decoder is given it as a covariate.
  dst_prot <- fit_distill(teacher = harmony_teacher(protect = "condition"))
  vae_cond <- fit_vae(sim, batch = "batch", categorical_covariates = "condition", max_epochs = ep, threads = threads)
  cat(sprintf("training: fit_vae %.1f s, distill %.1f s\n", t_vae, t_dst))
  samples <- function(model) function(x) differential_expression(model, x, "condition", "treated", "control",
                                                                 method = "samples", sample_key = "sample",
                                                                 threads = threads)
  methods <- list(
    vae_change = function(x) differential_expression(vae, x, "condition", "treated", "control", threads = threads),
    vae_change_bc = function(x) differential_expression(vae, x, "condition", "treated", "control",
                                                        batch_correction = TRUE, threads = threads),
    vae_mc_dropout = function(x) differential_expression(vae, x, "condition", "treated", "control",
                                                         method = "mc_dropout", threads = threads),
    vae_samples = samples(vae),
    distill_samples = samples(dst),
    distill_samples_protected = samples(dst_prot),
    vae_samples_condition = samples(vae_cond),
    distill_change_bc = function(x) differential_expression(dst, x, "condition", "treated", "control",
                                                            batch_correction = TRUE, threads = threads),
    distill_mc_dropout = function(x) differential_expression(dst, x, "condition", "treated", "control",
                                                             method = "mc_dropout", batch_correction = TRUE,
                                                             threads = threads),
    pseudobulk_deseq2 = function(x) differential_expression(NULL, x, "condition", "treated", "control",
                                                            method = "pseudobulk", sample_key = "sample"),
    pseudobulk_deseq2_batch = function(x) differential_expression(NULL, x, "condition", "treated", "control",
                                                                  method = "pseudobulk", sample_key = "sample",
                                                                  covariates = "batch"),
    pseudobulk_edger = function(x) differential_expression(NULL, x, "condition", "treated", "control",
                                                           method = "pseudobulk", sample_key = "sample",
                                                           test = "edgeR"))
  if (!is.na(only)) methods <- methods[grepl(only, names(methods))]
  # The comparisons: one over all cells, or one per cell type.
  parts <- if (per_type) types else "all"
  truth_of <- function(part, what) rd[[if (part == "all") what else paste0(what, "_", part)]]
  rows <- list()
  for (m in names(methods)) {
    calls <- lfc <- truth <- tl <- c()
    secs <- 0
    for (ct in parts) {
      x <- if (ct == "all") sim else sim[, sim$cell_type == ct]
      t0 <- Sys.time()
      de <- tryCatch(methods[[m]](x), error = function(e) {
        message(m, " on ", ct, ": ", conditionMessage(e))
        NULL
      })
      secs <- secs + as.numeric(Sys.time() - t0, units = "secs")
      if (is.null(de)) next
      calls <- c(calls, de$is_de)
      lfc <- c(lfc, de$lfc_mean)
      truth <- c(truth, truth_of(ct, "is_de"))
      tl <- c(tl, truth_of(ct, "true_lfc"))
    }
    if (length(calls)) rows[[m]] <- cbind(method = m, score(calls, lfc, truth, tl), seconds = secs)
  }
  if (peers && file.exists(python)) {
    dir <- file.path(out_dir, paste0("de_", sc, tag, "_data"))
    write_peer_input(dir, SingleCellExperiment::counts(sim),
                     data.frame(batch = sim$batch, cell_type = sim$cell_type, condition = sim$condition,
                                sample = sim$sample))
    writeLines(rownames(sim), file.path(dir, "genes.txt"))
    peer_args <- c(file.path(root, "bench", "de_peer.py"), dir, "--threads", threads,
                   if (!is.na(epochs)) c("--epochs", epochs), if (!per_type) "--population")
    status <- system2(python, peer_args, stdout = FALSE, stderr = file.path(dir, "peer.log"))
    if (status == 0) {
      secs <- jsonlite_read(file.path(dir, "peer_de.json"))
      cat(sprintf("peers' training: scvi %.1f s, scDistill %.1f s\n", secs$scvi_train, secs$scdistill_train))
      for (m in c("scvi_change", "scdistill_pseudobulk", "scdistill_bayesian")) {
        p <- utils::read.csv(file.path(dir, paste0("peer_", m, ".csv")))
        p <- p[order(match(p$cell_type, parts)), ]
        at <- function(what) {
          unlist(lapply(parts, function(ct) truth_of(ct, what)[match(p$gene[p$cell_type == ct], rownames(sim))]))
        }
        truth <- at("is_de")
        tl <- at("true_lfc")
        rows[[m]] <- cbind(method = m, score(as.logical(p$is_de), p$lfc, truth, tl), seconds = secs[[m]])
      }
    } else {
      message("peers failed; see ", file.path(dir, "peer.log"))
    }
  }
  res <- cbind(scenario = sc, do.call(rbind, rows))
  res$train_seconds <- ifelse(grepl("^vae", res$method), t_vae, ifelse(grepl("^distill", res$method), t_dst, NA))
  utils::write.csv(res, file.path(out_dir, paste0("de_", sc, tag, ".csv")), row.names = FALSE)
  print(res, digits = 3, row.names = FALSE)
  res
}

# Minimal reader for the peers' flat JSON of numbers.
jsonlite_read <- function(path) {
  txt <- gsub("[{}\" ]", "", paste(readLines(path, warn = FALSE), collapse = ""))
  kv <- strsplit(strsplit(txt, ",")[[1]], ":")
  stats::setNames(lapply(kv, function(p) as.numeric(p[2])), vapply(kv, `[`, "", 1))
}

all <- do.call(rbind, lapply(scenarios, run_scenario))
cat("\n== all scenarios ==\n")
print(all[, c("scenario", "method", "calls", "true_de", "f1", "fdp", "lfc_r", "seconds")], digits = 3, row.names = FALSE)
