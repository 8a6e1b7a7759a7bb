# Reference mapping and label transfer: map_query() + fit_labels() +
# predict_labels() against scvi-tools 1.4.2 (SCVI, SCANVI.from_scvi_model,
# SCANVI.load_query_data, predict) on the same split, each in its own
# process under /usr/bin/time, both on CPU with the same threads.
#
#   Rscript bench/mapping_vs_scarches.R [sim|cellbench|both] [--epochs N] [--query-epochs N]
#                                       [--label-epochs N] [--threads N] [--cells N]
#
# --query-epochs N trains both query models for exactly N epochs (per-epoch
# speed); --query-epochs 0 leaves each at its defaults (scvi-tools: its
# epoch rule, no early stopping; ours: the same rule, early stopping on):
# the time a user waits for the mapping.
#
# cellbench: ../shared/data/cellbench_5cl_3plates singlets on 2,000 HVGs;
#   reference = plates 1 and 2, query = plate 3 (every cell line in both).
# sim: simulate_counts(--cells, 2000 genes, 8 types, 6 batches of unequal
#   size); reference = batches 1-4 without type 8, query = batches 5-6, which
#   hold type 8: a type the reference never saw.
# In both, half the reference cells are unlabelled (scANVI's "Unknown").
#
# Reported per method: seconds of the reference model, of the labels and of
# the mapping (the target is mapping >= 5x faster), peak RSS; balanced
# accuracy of the query's predicted labels over the types the reference
# knows (target: >= scANVI's); for ours also with the unknown call, and the
# fraction of the unseen type called unknown (scANVI has no unknown call);
# iLISI (batch mixing) and cLISI of the joint latent space of reference and
# query; the largest change of a reference cell's latent coordinate caused
# by mapping (target: 0, bit-identical). Appends to bench/results/mapping.csv.
suppressPackageStartupMessages({ library(scdistill); library(Matrix) })
args <- commandArgs(trailingOnly = TRUE)
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE))), "common.R"))
opt <- function(name, default) bench_option(args, name, default)
epochs <- opt("--epochs", 100L)
query_epochs <- opt("--query-epochs", 100L)
label_epochs <- opt("--label-epochs", 20L)
threads <- opt("--threads", 2L)
n_sim <- opt("--cells", 12000L)
which_data <- if (length(args) && !startsWith(args[1], "--")) args[1] else "both"
root <- bench_root()
python <- peers_python(root)

load_data <- function(name) {
  if (name == "cellbench") {
    d <- load_cellbench_hvg(root, threads)
    plates <- sort(unique(d$batch))
    d$role <- ifelse(d$batch == plates[length(plates)], "query", "reference")
    return(d)
  }
  s <- simulate_counts(n_cells = n_sim, n_genes = 2000, n_groups = 8, n_batches = 6,
                       group_prob = c(0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.06, 0.04),
                       batch_prob = c(0.25, 0.2, 0.2, 0.15, 0.1, 0.1), format = "list", threads = threads)
  cd <- s$cell_data
  types <- levels(factor(cd$cell_type))
  batches <- levels(factor(cd$batch))
  query <- cd$batch %in% batches[5:6]
  keep <- query | cd$cell_type != types[8]
  list(counts = s$counts[, keep], batch = as.character(cd$batch[keep]), label = as.character(cd$cell_type[keep]),
       role = ifelse(query[keep], "query", "reference"))
}

run_one <- function(name) {
  d <- load_data(name)
  work <- file.path(tempdir(), paste0("mapping_", name))
  dir.create(work, showWarnings = FALSE)
  # Reference cells first, then the query (the order the peer writes its latent space in).
  o <- order(d$role != "reference")
  counts <- d$counts[, o]
  obs <- data.frame(batch = d$batch[o], truth = d$label[o], role = d$role[o], row.names = colnames(counts))
  set.seed(1)
  ref <- obs$role == "reference"
  obs$label <- ifelse(ref & stats::runif(nrow(obs)) < 0.5, obs$truth, "Unknown")
  obs$label[!ref] <- "Unknown"
  write_peer_input(work, counts, obs[c("batch", "label", "role")])
  saveRDS(list(counts = counts, obs = obs), file.path(work, "data.rds"))
  cat(sprintf("\n== %s: %s reference + %s query cells x %s genes; %d + %d epochs, labels %d; %d threads\n", name,
              fmt(sum(ref)), fmt(sum(!ref)), fmt(nrow(counts)), epochs, query_epochs, label_epochs, threads))

  ours <- file.path(work, "ours.R")
  writeLines(c(
    "suppressPackageStartupMessages({library(scdistill); library(Matrix)})",
    sprintf("d <- readRDS('%s'); r <- d$obs$role == 'reference'; q <- !r", file.path(work, "data.rds")),
    "el <- function(expr) { t0 <- proc.time()[['elapsed']]; v <- expr; list(v, proc.time()[['elapsed']] - t0) }",
    sprintf(paste("m <- el(fit_vae(d$counts[, r], batch = d$obs$batch[r], max_epochs = %d, early_stopping = FALSE,",
                  "threads = %d, device = 'cpu', progress = FALSE))"), epochs, threads),
    sprintf(paste("lab <- el(fit_labels(m[[1]], d$counts[, r], labels = d$obs$label[r], unlabeled = 'Unknown',",
                  "max_epochs = %d, threads = %d, progress = FALSE))"), label_epochs, threads),
    "z_before <- latent(m[[1]], d$counts[, r], batch = d$obs$batch[r])",
    if (query_epochs > 0) {
      sprintf(paste("mq <- el(map_query(m[[1]], d$counts[, q], batch = d$obs$batch[q], max_epochs = %d,",
                    "early_stopping = FALSE, threads = %d, progress = FALSE))"), query_epochs, threads)
    } else {
      sprintf("mq <- el(map_query(m[[1]], d$counts[, q], batch = d$obs$batch[q], threads = %d, progress = FALSE))",
              threads)
    },
    "query_epochs_run <- nrow(mq[[1]]$history)",
    "pr <- el(predict_labels(lab[[1]], d$counts[, q], model = mq[[1]], batch = d$obs$batch[q]))",
    "z_after <- latent(mq[[1]], d$counts[, r], batch = d$obs$batch[r])",
    sprintf("write.csv(rbind(z_after, latent(mq[[1]])), '%s')", file.path(work, "ours_latent.csv")),
    sprintf("write.csv(pr[[1]][c('label', 'best')], '%s')", file.path(work, "ours_pred.csv")),
    sprintf("writeLines(sprintf('%%.4f %%.4f %%.4f %%.4f %%.6g %%d', m[[2]], lab[[2]], mq[[2]], pr[[2]], max(abs(z_after - z_before)), query_epochs_run), '%s')",
            file.path(work, "ours.txt"))), ours)
  r_ours <- timed(file.path(R.home("bin"), "Rscript"), ours, quiet = FALSE)
  v <- scan(file.path(work, "ours.txt"), quiet = TRUE)
  peer_args <- c(file.path(root, "bench", "mapping_peer.py"), work, "--epochs", epochs,
                 if (query_epochs > 0) c("--query-epochs", query_epochs), "--label-epochs", label_epochs,
                 "--threads", threads)
  r_scvi <- timed(python, peer_args, quiet = FALSE)
  js <- paste(readLines(file.path(work, "scvi_mapping.json"), warn = FALSE), collapse = " ")
  num <- function(key) as.numeric(sub(sprintf('.*"%s": *([0-9.eE+-]+).*', key), "\\1", js))
  version <- sub('.*"method": *"([^"]+)".*', "\\1", js)

  query_obs <- obs[!ref, ]
  known <- query_obs$truth %in% unique(obs$truth[ref])
  bal <- function(pred, keep = known) attr(confusion_matrix(pred[keep], query_obs$truth[keep]), "balanced_accuracy")
  p_ours <- utils::read.csv(file.path(work, "ours_pred.csv"), row.names = 1)[rownames(query_obs), ]
  p_scvi <- utils::read.csv(file.path(work, "scvi_pred.csv"), row.names = 1)[rownames(query_obs), "predicted"]
  novel_unknown <- if (any(!known)) mean(p_ours$label[!known] == "unknown") else NA
  score <- function(file) {
    z <- as.matrix(utils::read.csv(file, row.names = 1))[rownames(obs), , drop = FALSE]
    integration_metrics(z, batch = obs$batch, label = obs$truth, threads = threads)
  }
  m_ours <- score(file.path(work, "ours_latent.csv"))
  m_scvi <- score(file.path(work, "scvi_latent.csv"))
  tab <- data.frame(
    data = name, method = c("scdistill map_query + fit_labels", version),
    reference_s = c(v[1], num("seconds_reference")), labels_s = c(v[2], num("seconds_labels")),
    mapping_s = c(v[3], num("seconds_mapping")), mapping_epochs = c(v[6], num("query_epochs_run")),
    predict_s = c(v[4], num("seconds_predict")),
    process_s = c(r_ours$wall, r_scvi$wall), peak_rss_mb = c(r_ours$rss_mb, r_scvi$rss_mb),
    balanced_accuracy = c(bal(p_ours$best), bal(p_scvi)),
    balanced_accuracy_with_unknown = c(bal(p_ours$label), NA),
    unseen_called_unknown = c(novel_unknown, NA),
    ilisi = c(m_ours$ilisi, m_scvi$ilisi), clisi = c(m_ours$clisi, m_scvi$clisi),
    reference_latent_change = c(v[5], num("reference_latent_max_change")))
  print(tab, row.names = FALSE, digits = 4)
  cat(sprintf("mapping speed-up (scvi-tools s / ours): %.1fx; balanced accuracy ours %.3f vs scANVI %.3f\n",
              tab$mapping_s[2] / tab$mapping_s[1], tab$balanced_accuracy[1], tab$balanced_accuracy[2]))
  tab$date <- format(Sys.time(), "%Y-%m-%d %H:%M")
  tab$epochs <- epochs
  tab$query_epochs <- query_epochs
  tab$label_epochs <- label_epochs
  tab$threads <- threads
  append_csv(tab, file.path(root, "bench", "results", "mapping.csv"))
  invisible(tab)
}

fmt <- function(n) format(n, big.mark = ",")
for (name in if (which_data == "both") c("cellbench", "sim") else which_data) run_one(name)
