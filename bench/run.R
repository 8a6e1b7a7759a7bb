# Comparison harness: runs this package and the reference tools in one run on
# the same data and prints one table (method, seconds, peak memory, scIB
# metrics). Each method runs in its own process under /usr/bin/time, so peak
# memory is its own. Results: bench/results/<data>[_<cells>].csv.
#
#   Rscript bench/run.R [data] [n_cells] [--epochs N] [--methods a,b,...]
#   data: s1 ... s6 (the simulator's scenarios) or cellbench (../shared/data,
#         singlets only). Peers come from bench/setup_peers.sh.
#
# Methods (all by default, in this order):
#   pca           the package's PCA (batch-aware HVGs, 50 PCs): the unintegrated
#                 reference every other method is compared with (PCR comparison)
#   harmony       the package's run_harmony() on those PCs (theta 2)
#   harmonypy     harmonypy 2.1.0 on the same PCs (theta 2)
#   distill       the package's distill() with its defaults; the student latent
#   scdistill_py  scDistill 0.3.1 from PyPI (the Python original, default
#                 Harmony teacher); its student's latent
#   vae           the package's fit_vae() with its defaults (scVI's); latent mean
#   scvi          scvi-tools 1.4.2 SCVI with its defaults; latent mean
# --epochs N caps the training epochs of the four deep models (both phases of
# the distillers); without it each uses its own default. pca always runs.
suppressPackageStartupMessages({ library(scdistill); library(Matrix) })
args <- commandArgs(trailingOnly = TRUE)
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE))), "common.R"))
epochs <- bench_option(args, "--epochs", NA_integer_)
all_methods <- c("pca", "harmony", "harmonypy", "distill", "scdistill_py", "vae", "scvi")
methods <- union("pca", strsplit(bench_option(args, "--methods", paste(all_methods, collapse = ","), as = identity), ",")[[1]])
if (length(bad <- setdiff(methods, all_methods))) stop("unknown method(s): ", paste(bad, collapse = ", "))
flags <- which(startsWith(args, "--"))
positional <- if (length(flags)) args[-c(flags, flags + 1)] else args
data_name <- if (length(positional) >= 1) positional[1] else "s1"
n_cells <- if (length(positional) >= 2) as.integer(positional[2]) else NULL
root <- bench_root()
threads <- 2L

load_data <- function(name) {
  if (name == "cellbench") return(load_cellbench(root))
  s <- simulation_scenario(name, n_cells = n_cells, format = "list", threads = threads)
  list(counts = s$counts, batch = s$cell_data$batch, label = s$cell_data$cell_type)
}

jsonlite_seconds <- function(path) as.numeric(sub('.*"seconds": *([0-9.eE+-]+).*', "\\1", readLines(path, warn = FALSE)))

d <- load_data(data_name)
work <- file.path(tempdir(), "bench")
dir.create(work, showWarnings = FALSE)
cat(sprintf("data: %s, %s cells x %s genes, %d batches; methods: %s\n", data_name,
            format(ncol(d$counts), big.mark = ","), format(nrow(d$counts), big.mark = ","),
            length(unique(d$batch)), paste(methods, collapse = ", ")))
write_peer_input(work, if (any(c("scvi", "scdistill_py") %in% methods)) d$counts,
                 data.frame(batch = d$batch, label = d$label), cells = colnames(d$counts))
saveRDS(d, file.path(work, "data.rds"), compress = FALSE)

# One of the package's methods, timed in its own process: `body` computes
# `emb` (cells x dims) from `d` (and `pcs` where it needs the PCA).
ours <- function(name, body) {
  script <- file.path(work, paste0(name, ".R"))
  writeLines(c("suppressPackageStartupMessages(library(scdistill))",
               sprintf("d <- readRDS('%s')", file.path(work, "data.rds")),
               sprintf("threads <- %d; epochs <- %s", threads, if (is.na(epochs)) "NULL" else epochs),
               if (name == "harmony") sprintf("pcs <- as.matrix(utils::read.csv('%s', row.names = 1))",
                                          file.path(work, "pca.csv")),
               "invisible(torch_config(threads = threads))",
               "t0 <- proc.time()[['elapsed']]", body,
               "s <- proc.time()[['elapsed']] - t0",
               sprintf("utils::write.csv(emb, '%s')", file.path(work, paste0(name, ".csv"))),
               sprintf("writeLines(as.character(s), '%s')", file.path(work, paste0(name, ".seconds")))), script)
  r <- timed(file.path(R.home("bin"), "Rscript"), script)
  if (r$ok) r$seconds <- as.numeric(readLines(file.path(work, paste0(name, ".seconds"))))
  r
}
bodies <- list(
  pca = "emb <- run_pca(d$counts, n_pcs = 50, n_hvg = 2000, batch = d$batch, threads = threads)",
  harmony = "emb <- run_harmony(pcs, batch = d$batch, theta = 2, threads = threads, progress = FALSE)",
  distill = c("m <- if (is.null(epochs)) distill(d$counts, batch = d$batch, threads = threads) else",
              "  distill(d$counts, batch = d$batch, max_epochs_encoder = epochs, max_epochs_decoder = epochs, threads = threads)",
              "emb <- latent(m)"),
  vae = c("m <- fit_vae(d$counts, batch = d$batch, max_epochs = epochs, threads = threads)",
          "emb <- latent(m, d$counts)")
)

peers_py <- if (any(c("harmonypy", "scvi", "scdistill_py") %in% methods)) {
  tryCatch(peers_python(root), error = function(e) character())
} else character()
runs <- list()
for (m in methods) {
  if (m %in% names(bodies)) {
    runs[[m]] <- ours(m, bodies[[m]])
  } else if (length(peers_py)) {
    extra <- c(if (m %in% c("scvi", "scdistill_py") && !is.na(epochs)) c("--epochs", epochs), "--threads", threads)
    r <- timed(peers_py, c(file.path(root, "bench", "peers.py"), m, work, extra))
    if (r$ok) r$seconds <- jsonlite_seconds(file.path(work, paste0(m, ".json")))
    runs[[m]] <- r
  } else {
    message(m, ": skipped, the peers' venv (bench/setup_peers.sh) is not available")
  }
  if (!is.null(runs[[m]])) {
    cat(sprintf("  %-13s %s\n", m, if (runs[[m]]$ok) sprintf("%.1f s, %.0f MB", runs[[m]]$seconds, runs[[m]]$rss_mb)
                                    else "FAILED"))
  }
}
if (!runs$pca$ok) stop("the package's PCA failed; nothing to compare")

read_emb <- function(m) as.matrix(utils::read.csv(file.path(work, paste0(m, ".csv")), row.names = 1))
embs <- lapply(names(runs)[vapply(runs, `[[`, TRUE, "ok")], read_emb)
names(embs) <- names(runs)[vapply(runs, `[[`, TRUE, "ok")]
t0 <- proc.time()[["elapsed"]]
met <- integration_metrics(embs, batch = d$batch, label = d$label, pre = embs$pca, threads = threads)
cat(sprintf("integration_metrics() on %d embeddings: %.1f s\n", length(embs), proc.time()[["elapsed"]] - t0))
tab <- data.frame(method = names(embs),
                  seconds = vapply(runs[names(embs)], function(r) r$seconds, 0),
                  process_seconds = vapply(runs[names(embs)], function(r) r$wall, 0),
                  peak_rss_mb = vapply(runs[names(embs)], function(r) r$rss_mb, 0),
                  as.data.frame(met)[, c("ilisi", "clisi", "kbet", "silhouette_label", "silhouette_batch",
                                         "nmi_kmeans", "ari_kmeans", "graph_connectivity", "pcr_comparison",
                                         "bio_conservation", "batch_correction", "total")],
                  row.names = NULL)
# A Markdown table, as bench/RESULTS.md shows them.
cells <- function(v) if (is.numeric(v)) as.character(signif(v, 3)) else v
md <- vapply(seq_len(nrow(tab)), function(i) paste0("| ", paste(vapply(tab[i, ], cells, ""), collapse = " | "), " |"), "")
writeLines(c(paste0("| ", paste(names(tab), collapse = " | "), " |"), paste0("|", strrep("---|", ncol(tab))), md))
out <- file.path(root, "bench", "results")
dir.create(out, showWarnings = FALSE)
utils::write.csv(tab, file.path(out, paste0(data_name, if (!is.null(n_cells)) paste0("_", n_cells), ".csv")),
                 row.names = FALSE)
