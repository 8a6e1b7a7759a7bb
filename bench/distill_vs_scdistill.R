# distill() against scDistill 0.3.1 (PyPI, Python) end to end on CPU.
#
#   Rscript bench/distill_vs_scdistill.R [cellbench|sim|both] [--threads N] [--cells N]
#
# Both get the same raw counts (2,000 highly variable genes) and batches and
# run with their defaults: PCA of log2(CPM + 1), Harmony (theta 2) as the
# teacher, 50 latent dimensions, 100 + 100 epochs at most with early
# stopping. scDistill 0.3.1's teacher expects harmonypy < 2's Z_corr layout;
# bench/peers.py adapts harmonypy 2.1's result at runtime. Each runs in its
# own process (seconds of the whole job, peak RSS); then iLISI/cLISI/ARI of
# each student and each teacher. cellbench: ../shared/data/cellbench_5cl_3plates;
# sim: simulate_counts() with 4 batches and 6 cell types (default 20,000 cells).
# Appends to bench/results/distill_vs_scdistill.csv.
suppressPackageStartupMessages({ library(scdistill); library(Matrix) })
args <- commandArgs(trailingOnly = TRUE)
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE))), "common.R"))
opt <- function(name, default) bench_option(args, name, default)
threads <- opt("--threads", 2L)
n_sim <- opt("--cells", 20000L)
which_data <- if (length(args) && !startsWith(args[1], "--")) args[1] else "both"
root <- bench_root()
python <- peers_python(root)

load_data <- function(name) {
  d <- if (name == "cellbench") {
    load_cellbench(root)
  } else {
    s <- simulate_counts(n_cells = n_sim, n_genes = 4000, n_groups = 6, n_batches = 4, batch_effect = "medium",
                         format = "list", threads = threads, seed = 2)
    list(counts = s$counts, batch = s$cell_data$batch, label = s$cell_data$cell_type)
  }
  hvg_subset(d, threads)
}

run_one <- function(name) {
  d <- load_data(name)
  work <- file.path(tempdir(), paste0("distill_", name))
  obs <- data.frame(batch = d$batch, label = d$label, row.names = colnames(d$counts))
  write_peer_input(work, d$counts, obs)
  saveRDS(list(counts = d$counts, obs = obs), file.path(work, "data.rds"))
  cat(sprintf("\n== %s: %s cells x %s genes, %d batches, %d threads\n", name, format(ncol(d$counts), big.mark = ","),
              format(nrow(d$counts), big.mark = ","), length(unique(d$batch)), threads))
  ours <- file.path(work, "ours.R")
  writeLines(c(
    "suppressPackageStartupMessages({library(scdistill); library(Matrix)})",
    sprintf("d <- readRDS('%s')", file.path(work, "data.rds")),
    "t0 <- proc.time()[['elapsed']]",
    sprintf("m <- distill(d$counts, batch = d$obs$batch, threads = %d, device = 'cpu', progress = FALSE)", threads),
    "total <- proc.time()[['elapsed']] - t0",
    sprintf("write.csv(m$latent, '%s')", file.path(work, "ours.csv")),
    sprintf("write.csv(teacher_latent(m), '%s')", file.path(work, "ours_teacher.csv")),
    "e <- c(length(m$info$history_encoder$epoch), length(m$info$history_decoder$epoch))",
    sprintf("writeLines(sprintf('%%.3f %%d %%d', total, e[1], e[2]), '%s')", file.path(work, "ours.txt"))), ours)
  r_ours <- timed(file.path(R.home("bin"), "Rscript"), ours, quiet = FALSE)
  v <- scan(file.path(work, "ours.txt"), quiet = TRUE)
  r_py <- timed(python, c(file.path(root, "bench", "peers.py"), "scdistill_py", work, "--threads", threads), quiet = FALSE)
  js <- paste(readLines(file.path(work, "scdistill_py.json"), warn = FALSE), collapse = " ")
  py_s <- as.numeric(sub('.*"seconds": *([0-9.eE+-]+).*', "\\1", js))
  read <- function(f) {
    z <- as.matrix(utils::read.csv(file.path(work, f), row.names = 1))
    rownames(z) <- rownames(obs)
    z
  }
  embs <- list(ours_student = read("ours.csv"), ours_teacher = read("ours_teacher.csv"),
               py_student = read("scdistill_py.csv"), py_teacher = read("scdistill_py_teacher.csv"))
  m <- integration_metrics(embs, batch = obs$batch, label = obs$label, threads = threads)
  tab <- data.frame(data = name, embedding = rownames(m),
                    seconds = c(v[1], NA, py_s, NA), process_s = c(r_ours$wall, NA, r_py$wall, NA),
                    peak_rss_mb = c(r_ours$rss_mb, NA, r_py$rss_mb, NA),
                    ilisi = m$ilisi, clisi = m$clisi, ari = m$ari_kmeans, nmi = m$nmi_kmeans, total = m$total)
  print(tab, row.names = FALSE, digits = 4)
  cat(sprintf("end-to-end speed-up (scDistill 0.3.1 / ours): %.2fx (method time), %.2fx (process); our epochs: %d + %d\n",
              py_s / v[1], r_py$wall / r_ours$wall, v[2], v[3]))
  cat(sprintf("student - teacher (ours): iLISI %+.3f cLISI %+.3f ARI %+.3f\n",
              m["ours_student", "ilisi"] - m["ours_teacher", "ilisi"], m["ours_student", "clisi"] - m["ours_teacher", "clisi"],
              m["ours_student", "ari_kmeans"] - m["ours_teacher", "ari_kmeans"]))
  tab$date <- format(Sys.time(), "%Y-%m-%d %H:%M")
  tab$threads <- threads
  out <- file.path(root, "bench", "results", "distill_vs_scdistill.csv")
  append_csv(tab, out)
}

for (name in if (which_data == "both") c("cellbench", "sim") else which_data) run_one(name)
