# Comparison harness: runs this package and the reference tools in one run on
# the same data and prints one table (method, seconds, peak memory, scIB
# metrics). Each method runs in its own process under /usr/bin/time, so peak
# memory is its own. Results: bench/results/<data>.csv.
#
#   Rscript bench/run.R [data] [n_cells] [--epochs N]
#   data: s1 ... s6 (the simulator's scenarios) or cellbench (../shared/data,
#         singlets only). Peers come from bench/setup_peers.sh.
#
# Methods so far: the package's PCA (unintegrated reference), harmonypy 2.1.0
# on those PCs, scVI (scvi-tools 1.4.2), scDistill 0.3.1 from PyPI (the Python
# original, default Harmony teacher; its student's latent). --epochs goes to
# scVI and scDistill. The package's own models join as they land.
suppressPackageStartupMessages({ library(scdistill); library(Matrix) })
args <- commandArgs(trailingOnly = TRUE)
epochs <- if ("--epochs" %in% args) as.integer(args[which(args == "--epochs") + 1]) else NA
args <- args[!args %in% c("--epochs", as.character(epochs))]
data_name <- if (length(args) >= 1) args[1] else "s1"
n_cells <- if (length(args) >= 2) as.integer(args[2]) else NULL
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE))), "common.R"))
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
cat(sprintf("data: %s, %s cells x %s genes, %d batches\n", data_name, format(ncol(d$counts), big.mark = ","),
            format(nrow(d$counts), big.mark = ","), length(unique(d$batch))))
invisible(writeMM(d$counts, file.path(work, "counts.mtx")))
utils::write.csv(data.frame(batch = d$batch, label = d$label, row.names = colnames(d$counts)), file.path(work, "obs.csv"))

# The package's PCA, timed in its own process too.
saveRDS(d, file.path(work, "data.rds"))
pca_script <- file.path(work, "pca.R")
writeLines(c("suppressPackageStartupMessages(library(scdistill))",
             sprintf("d <- readRDS('%s')", file.path(work, "data.rds")),
             "t0 <- proc.time()[['elapsed']]",
             sprintf("p <- run_pca(d$counts, n_pcs = 50, n_hvg = 2000, batch = d$batch, threads = %d)", threads),
             "s <- proc.time()[['elapsed']] - t0",
             sprintf("utils::write.csv(p, '%s')", file.path(work, "pca.csv")),
             sprintf("writeLines(as.character(s), '%s')", file.path(work, "pca.seconds"))), pca_script)
runs <- list(pca = timed(file.path(R.home("bin"), "Rscript"), pca_script))
runs$pca$seconds <- as.numeric(readLines(file.path(work, "pca.seconds")))

peers_py <- tryCatch(system2("bash", file.path(root, "bench", "setup_peers.sh"), stdout = TRUE, stderr = FALSE),
                     error = function(e) character())
peers_py <- utils::tail(peers_py, 1)
for (m in c("harmonypy", "scvi", "scdistill_py")) {
  if (!length(peers_py)) break
  extra <- c(if (m %in% c("scvi", "scdistill_py") && !is.na(epochs)) c("--epochs", epochs), "--threads", threads)
  r <- timed(peers_py, c(file.path(root, "bench", "peers.py"), m, work, extra))
  if (r$ok) r$seconds <- jsonlite_seconds(file.path(work, paste0(m, ".json")))
  runs[[m]] <- r
}

read_emb <- function(m) as.matrix(utils::read.csv(file.path(work, paste0(m, ".csv")), row.names = 1))
embs <- lapply(names(runs)[vapply(runs, `[[`, TRUE, "ok")], read_emb)
names(embs) <- names(runs)[vapply(runs, `[[`, TRUE, "ok")]
met <- integration_metrics(embs, batch = d$batch, label = d$label, pre = embs$pca, threads = threads)
tab <- data.frame(method = names(embs),
                  seconds = vapply(runs[names(embs)], function(r) r$seconds, 0),
                  process_seconds = vapply(runs[names(embs)], function(r) r$wall, 0),
                  peak_rss_mb = vapply(runs[names(embs)], function(r) r$rss_mb, 0),
                  as.data.frame(met)[, c("ilisi", "clisi", "kbet", "silhouette_label", "silhouette_batch",
                                         "nmi_kmeans", "ari_kmeans", "graph_connectivity", "pcr_comparison",
                                         "bio_conservation", "batch_correction", "total")],
                  row.names = NULL)
print(format(tab, digits = 3), row.names = FALSE)
out <- file.path(root, "bench", "results")
dir.create(out, showWarnings = FALSE)
utils::write.csv(tab, file.path(out, paste0(data_name, if (!is.null(n_cells)) paste0("_", n_cells), ".csv")),
                 row.names = FALSE)
