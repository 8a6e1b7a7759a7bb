# Integration quality of every method at its defaults, scored twice: by the
# package's integration_metrics() and by scib-metrics' Benchmarker (the
# independent scorer, bench/scib_score.py), on the same embeddings (issue 23).
#
#   Rscript bench/quality.R [--data cellbench,sim_rare,sim_confounded] [--threads 2] [--seed 3]
#                           [--epochs N] [--sim-cells 12000]
#
# Embeddings (each method in its own process under /usr/bin/time: seconds of
# the method itself, of the process, peak RSS):
#   pca                   run_pca() of the same 2,000 HVG counts (50 PCs): the
#                         unintegrated baseline and `pre` of the PCR comparison
#   distill_student       distill() with its defaults (Harmony teacher), m$latent
#   distill_teacher       its teacher, teacher_latent(m) (same process)
#   scdistill_py_student  scDistill 0.3.1 (PyPI) Distiller, defaults (bench/peers.py)
#   scdistill_py_teacher  its teacher (same process)
#   fit_vae               fit_vae() with its defaults (scVI's), latent(m, counts)
#   scvi                  scvi-tools 1.4.2 SCVI with its defaults (bench/peers.py)
# All on the CPU with --threads threads. --epochs N caps the epochs of all
# four models (both phases of the distillers; passed as peers.py --epochs);
# without it each uses its own default (quick runs: --epochs 20).
#
# Data sets (--data, comma-separated, default all three; 2,000 batch-aware HVGs
# as load_cellbench_hvg() picks them, cells without counts there dropped):
#   cellbench       CellBench 5 cell lines x 3 plates, singlets (../shared/data)
#   sim_rare        simulate_counts(--sim-cells 12,000 cells, 3,000 genes, 14
#                   types in proportions 20% ... 1%, 4 batches, medium batch
#                   effect, seed --seed), then per batch its own type
#                   proportions: weights runif(0.3, 1) per type, two random
#                   types at 0.1, round(n * w * 0.5) of each batch x type's
#                   cells kept (set.seed(--seed)); about 3,400 cells, several
#                   types at 0.5-3% of them
#   sim_confounded  the same with 12 types (20% ... 3%) and 3 batches, where
#                   each batch lacks (weight 0.02) three types, 9 distinct
#                   types in all: a partially confounded design in which every
#                   type is in at least two batches
#
# Scores: integration_metrics(pre = pca) in this process, then scib-metrics
# 0.5.10's Benchmarker with its defaults on the same embeddings and pre
# (bench/scib_score.py in the peers' venv). Its default batch set has BRAS in
# place of the batch silhouette and its kBET works on a diffusion map, so
# batch_correction and total are not expected to agree between the two
# scorers; the other scores should to about 1e-4 given the same neighbours
# (its 90-NN graph is pynndescent's, ours exact), except k-means NMI/ARI:
# scib-metrics runs k-means once (k-means++, seed 42), integration_metrics()
# keeps the best of 5 runs, so where one run can merge two types scib-metrics
# scores lower (CellBench PCA: ARI 0.80 vs 0.995). Prints per data set: seconds
# per method, one table per scorer, the difference of the two scorers, and
# student - teacher for both distillers under both scorers. Appends one row
# per data set x embedding x scorer to bench/results/quality.csv.
suppressPackageStartupMessages({ library(scdistill); library(Matrix) })
args <- commandArgs(trailingOnly = TRUE)
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE))), "common.R"))
all_data <- c("cellbench", "sim_rare", "sim_confounded")
data_sets <- strsplit(bench_option(args, "--data", paste(all_data, collapse = ","), as = identity), ",")[[1]]
if (length(bad <- setdiff(data_sets, all_data))) stop("unknown data set(s): ", paste(bad, collapse = ", "))
threads <- bench_option(args, "--threads", 2L)
seed <- bench_option(args, "--seed", 3L)
epochs <- bench_option(args, "--epochs", NA_integer_)
sim_cells <- bench_option(args, "--sim-cells", 12000L)
root <- bench_root()
python <- peers_python(root)
scib_version <- system2(python, c("-c", shQuote("import importlib.metadata as m; print(m.version('scib-metrics'))")),
                        stdout = TRUE)

# The columns printed for each scorer, in this order.
show <- c("total", "bio_conservation", "batch_correction", "ari_kmeans", "nmi_kmeans", "isolated_labels",
          "pcr_comparison", "ilisi", "kbet", "clisi", "silhouette_label")

load_data <- function(name) quality_data(name, root, threads, seed, sim_cells)

# One of the package's methods in its own process: `body` computes `emb` (and
# may write more files) from `d`; returns timed()'s list with `seconds`.
run_ours <- function(work, name, body) {
  script <- file.path(work, paste0(name, ".R"))
  writeLines(c("suppressPackageStartupMessages({library(scdistill); library(Matrix)})",
               sprintf("d <- readRDS('%s')", file.path(work, "data.rds")),
               sprintf("threads <- %d; epochs <- %s", threads, if (is.na(epochs)) "NULL" else epochs),
               "invisible(torch_config(device = 'cpu', threads = threads))",
               "t0 <- proc.time()[['elapsed']]", body,
               "s <- proc.time()[['elapsed']] - t0",
               sprintf("utils::write.csv(emb, '%s')", file.path(work, paste0(name, ".csv"))),
               sprintf("writeLines(as.character(s), '%s')", file.path(work, paste0(name, ".seconds")))), script)
  r <- timed(file.path(R.home("bin"), "Rscript"), script, quiet = FALSE)
  r$seconds <- if (r$ok) as.numeric(readLines(file.path(work, paste0(name, ".seconds")))) else NA_real_
  r
}

run_peer <- function(work, method) {
  r <- timed(python, c(file.path(root, "bench", "peers.py"), method, work, if (!is.na(epochs)) c("--epochs", epochs),
                       "--threads", threads), quiet = FALSE)
  js <- file.path(work, paste0(method, ".json"))
  r$seconds <- if (r$ok) as.numeric(sub('.*"seconds": *([0-9.eE+-]+).*', "\\1", paste(readLines(js, warn = FALSE),
                                                                                     collapse = " "))) else NA_real_
  r
}

bodies <- list(
  pca = "emb <- run_pca(d$counts, n_pcs = 50, n_hvg = nrow(d$counts), batch = d$batch, threads = threads)",
  distill = c("m <- if (is.null(epochs)) distill(d$counts, batch = d$batch, device = 'cpu', threads = threads, progress = FALSE) else",
              "  distill(d$counts, batch = d$batch, max_epochs_encoder = epochs, max_epochs_decoder = epochs,",
              "          device = 'cpu', threads = threads, progress = FALSE)",
              "emb <- m$latent",
              sprintf("utils::write.csv(teacher_latent(m), '%s')", "TEACHER")),
  fit_vae = c("m <- fit_vae(d$counts, batch = d$batch, max_epochs = epochs, device = 'cpu', threads = threads, progress = FALSE)",
              "emb <- latent(m, d$counts)")
)

# Prints a data.frame as a Markdown table, numbers to 3 significant digits
# (as bench/run.R), those under 5e-5 in absolute value (differences) as 0.
print_md <- function(tab, title) {
  cat("\n", title, "\n\n", sep = "")
  fmt <- function(v) {
    if (!is.numeric(v)) return(v)
    ifelse(is.na(v), "", as.character(signif(ifelse(abs(v) < 5e-5, 0, v), 3)))
  }
  body <- vapply(seq_len(nrow(tab)), function(i) paste0("| ", paste(vapply(tab[i, , drop = FALSE], fmt, ""), collapse = " | "), " |"), "")
  writeLines(c(paste0("| ", paste(names(tab), collapse = " | "), " |"), paste0("|", strrep("---|", ncol(tab))), body))
}

run_one <- function(name) {
  d <- load_data(name)
  work <- file.path(tempdir(), paste0("quality_", name))
  obs <- data.frame(batch = d$batch, label = d$label, row.names = colnames(d$counts))
  write_peer_input(work, d$counts, obs)
  saveRDS(list(counts = d$counts, batch = d$batch, label = d$label), file.path(work, "data.rds"), compress = FALSE)
  props <- sort(table(d$label) / length(d$label))
  cat(sprintf("\n== %s: %s cells x %s genes, %d batches, %d types (smallest %s), %d threads, epochs %s\n", name,
              format(ncol(d$counts), big.mark = ","), format(nrow(d$counts), big.mark = ","),
              length(unique(d$batch)), length(props),
              paste(sprintf("%s %.1f%%", names(props)[1:min(3, length(props))], 100 * props[1:min(3, length(props))]),
                    collapse = ", "),
              threads, if (is.na(epochs)) "default" else epochs))
  print(table(label = d$label, batch = d$batch))

  runs <- list()
  bodies$distill <- sub("TEACHER", file.path(work, "distill_teacher.csv"), bodies$distill, fixed = TRUE)
  for (m in names(bodies)) runs[[m]] <- run_ours(work, m, bodies[[m]])
  for (m in c("scdistill_py", "scvi")) runs[[m]] <- run_peer(work, m)
  for (m in names(runs)) {
    cat(sprintf("  %-13s %s\n", m, if (runs[[m]]$ok) sprintf("%.1f s (process %.1f s), %.0f MB", runs[[m]]$seconds,
                                                                  runs[[m]]$wall, runs[[m]]$rss_mb) else "FAILED"))
  }
  if (!runs$pca$ok) stop("the package's PCA failed; nothing to compare")

  # embedding -> (method, file)
  files <- c(pca = "pca", distill_student = "distill", distill_teacher = "distill_teacher",
             scdistill_py_student = "scdistill_py", scdistill_py_teacher = "scdistill_py_teacher",
             fit_vae = "fit_vae", scvi = "scvi")
  method_of <- c(pca = "pca", distill_student = "distill", distill_teacher = "distill",
                 scdistill_py_student = "scdistill_py", scdistill_py_teacher = "scdistill_py",
                 fit_vae = "fit_vae", scvi = "scvi")
  files <- files[vapply(method_of[names(files)], function(m) runs[[m]]$ok, TRUE)]
  embs <- lapply(files, function(f) {
    z <- as.matrix(utils::read.csv(file.path(work, paste0(f, ".csv")), row.names = 1))
    rownames(z) <- rownames(obs)
    z
  })

  t0 <- proc.time()[["elapsed"]]
  ours <- as.data.frame(integration_metrics(embs, batch = obs$batch, label = obs$label, pre = embs$pca,
                                            threads = threads))
  ours_s <- proc.time()[["elapsed"]] - t0

  # scib-metrics in its own process, timed like the methods.
  sdir <- file.path(work, "scib")
  write_scib_input(sdir, obs, rownames(obs), embs$pca, embs)
  r_scib <- timed(python, c(file.path(root, "bench", "scib_score.py"), sdir, "--threads", threads), quiet = FALSE)
  scib <- if (r_scib$ok) read_scib(sdir, embs) else NULL
  cat(sprintf("scoring: integration_metrics() %.1f s; scib-metrics %s\n", ours_s,
              if (r_scib$ok) sprintf("%.1f s (process, %.0f MB)", r_scib$wall, r_scib$rss_mb) else "FAILED"))

  secs <- data.frame(method = names(runs), seconds = vapply(runs, `[[`, 0, "seconds"),
                     process_s = vapply(runs, `[[`, 0, "wall"), peak_rss_mb = vapply(runs, `[[`, 0, "rss_mb"),
                     row.names = NULL)
  print_md(secs, sprintf("%s: seconds per method", name))
  pick <- function(s) data.frame(embedding = rownames(s), s[, intersect(show, names(s)), drop = FALSE], row.names = NULL)
  print_md(pick(ours), sprintf("%s: integration_metrics()", name))
  if (!is.null(scib)) {
    print_md(pick(scib), sprintf("%s: scib-metrics %s Benchmarker (batch set has BRAS, not the batch silhouette)",
                                 name, scib_version))
    both <- intersect(show, names(scib))
    diff <- data.frame(embedding = rownames(ours), ours[, both] - scib[rownames(ours), both], row.names = NULL)
    print_md(diff, sprintf("%s: integration_metrics() - scib-metrics", name))
  }
  st <- list()
  for (pair in list(c("distill", "distill_student", "distill_teacher"),
                    c("scdistill_py", "scdistill_py_student", "scdistill_py_teacher"))) {
    for (sc in c("integration_metrics", "scib")) {
      s <- if (sc == "scib") scib else ours
      if (is.null(s) || !all(pair[2:3] %in% rownames(s))) next
      cols <- intersect(show, names(s))
      st[[length(st) + 1]] <- data.frame(distiller = pair[1], scorer = sc,
                                         s[pair[2], cols, drop = FALSE] - s[pair[3], cols, drop = FALSE],
                                         row.names = NULL)
    }
  }
  if (length(st)) print_md(do.call(rbind, st), sprintf("%s: student - teacher", name))

  rows <- function(s, scorer) {
    m <- method_of[rownames(s)]
    data.frame(data = name, embedding = rownames(s), scorer = scorer, n_cells = nrow(obs),
               seconds = vapply(runs[m], `[[`, 0, "seconds"), process_s = vapply(runs[m], `[[`, 0, "wall"),
               peak_rss_mb = vapply(runs[m], `[[`, 0, "rss_mb"), s, row.names = NULL, check.names = FALSE)
  }
  tab <- rows(ours, "integration_metrics")
  if (!is.null(scib)) {
    sc <- rows(scib, paste0("scib_metrics_", scib_version))
    for (col in setdiff(names(tab), names(sc))) sc[[col]] <- NA
    for (col in setdiff(names(sc), names(tab))) tab[[col]] <- NA
    tab <- rbind(tab, sc[names(tab)])
  }
  tab$date <- format(Sys.time(), "%Y-%m-%d %H:%M")
  tab$threads <- threads
  tab$seed <- seed
  tab$epochs <- if (is.na(epochs)) "default" else as.character(epochs)
  append_csv(tab, file.path(root, "bench", "results", "quality.csv"))
  invisible(tab)
}

for (name in data_sets) run_one(name)
