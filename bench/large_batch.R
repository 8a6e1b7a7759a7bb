# Larger minibatches with the learning rate scaled (scaled_lr(), issue 27):
# held-out ELBO and time against the default (128 cells, lr 1e-3).
#
#   Rscript bench/large_batch.R [--cells 20000] [--genes 2000] [--epochs 100] [--sizes 512,1024,2048]
#                               [--threads 2] [--seed 1]
#
# Data: simulate_counts(--cells + 10% cells, --genes genes, 4 batches, 8
# groups, seed --seed); the extra 10% are a test set no model sees. For the
# default and for each size in --sizes with the linear and the square-root
# rule, fit_vae(batch_size, lr, max_epochs = --epochs, early_stopping =
# FALSE) with the same seed: the same epochs over the data, so fewer steps
# with larger minibatches. Reports seconds per epoch (median), the
# validation ELBO at the end and at its best, and elbo() on the test cells
# (mean negative ELBO per cell, lower is better, one posterior draw per
# cell, seed 1), with its difference from the default in percent.
suppressPackageStartupMessages(library(scdistill))
args <- commandArgs(trailingOnly = TRUE)
source(file.path(dirname(sub("^--file=", "", grep("^--file=", commandArgs(), value = TRUE))), "common.R"))
n_cells <- bench_option(args, "--cells", 20000L)
n_genes <- bench_option(args, "--genes", 2000L)
epochs <- bench_option(args, "--epochs", 100L)
sizes <- as.integer(strsplit(bench_option(args, "--sizes", "512,1024,2048", as = identity), ",")[[1]])
threads <- bench_option(args, "--threads", 2L)
seed <- bench_option(args, "--seed", 1L)

n_test <- ceiling(0.1 * n_cells)
sim <- simulate_counts(n_cells = n_cells + n_test, n_genes = n_genes, n_batches = 4, n_groups = 8, seed = seed,
                       threads = threads)
set.seed(seed)
test <- sort(sample(ncol(sim), n_test))
train <- sim[, -test]
held <- sim[, test]
cat(sprintf("%s training + %s test cells x %s genes, %d epochs, %d threads\n", format(ncol(train), big.mark = ","),
            format(ncol(held), big.mark = ","), format(n_genes, big.mark = ","), epochs, threads))

runs <- c(list(list(size = 128L, rule = "default", lr = 1e-3)),
          unlist(lapply(sizes, function(b) lapply(c("linear", "sqrt"), function(r) {
            list(size = b, rule = r, lr = scaled_lr(b, rule = r))
          })), recursive = FALSE))
rows <- lapply(runs, function(r) {
  m <- fit_vae(train, batch = "batch", batch_size = r$size, lr = r$lr, max_epochs = epochs, early_stopping = FALSE,
               seed = seed, threads = threads, progress = FALSE)
  h <- m$history
  row <- data.frame(batch_size = r$size, rule = r$rule, lr = r$lr, s_per_epoch = stats::median(h$seconds),
                    total_s = sum(h$seconds), val_elbo_end = utils::tail(h$validation_elbo, 1),
                    val_elbo_best = min(h$validation_elbo), test_elbo = elbo(m, held, seed = 1, threads = threads))
  print(row, digits = 5, row.names = FALSE)
  row
})
tab <- do.call(rbind, rows)
tab$test_vs_default_pct <- 100 * (tab$test_elbo / tab$test_elbo[1] - 1)
tab$speedup <- tab$s_per_epoch[1] / tab$s_per_epoch
cat("\n")
print(tab, digits = 4, row.names = FALSE)
tab$date <- format(Sys.time(), "%Y-%m-%d %H:%M")
tab$cells <- ncol(train)
tab$genes <- n_genes
tab$epochs <- epochs
tab$threads <- threads
append_csv(tab, file.path(bench_root(), "bench", "results", "large_batch.csv"))
