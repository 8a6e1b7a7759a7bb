# run_harmony() on the CellBench example and on simulated data with a
# condition partly confounded with batch.

test_that("Harmony mixes CellBench plates and keeps cell lines apart", {
  sce <- run_pca(example_cellbench(), n_pcs = 20, batch = "batch", threads = 2)
  sce <- run_harmony(sce, batch = "batch", threads = 2, progress = FALSE)
  expect_true("HARMONY" %in% SingleCellExperiment::reducedDimNames(sce))
  s <- integration_metrics(sce, batch = "batch", label = "cell_line", reduction = c("PCA", "HARMONY"), threads = 2)
  # The plates are mixed better than before, the cell lines stay separate.
  expect_gt(s["HARMONY", "ilisi"], s["PCA", "ilisi"] + 0.1)
  expect_gt(s["HARMONY", "clisi"], 0.98)
  # A matrix in, the corrected matrix out, with the fit's record; the same
  # seed gives the same result whatever the thread count.
  pcs <- SingleCellExperiment::reducedDim(sce, "PCA")
  a <- run_harmony(pcs, batch = sce$batch, seed = 4, threads = 1, progress = FALSE, memberships = TRUE)
  b <- run_harmony(pcs, batch = sce$batch, seed = 4, threads = 2, progress = FALSE)
  expect_identical(a[, ], b[, ])
  expect_equal(dim(a), dim(pcs))
  fit <- attr(a, "harmony")
  expect_true(fit$converged)
  expect_equal(fit$n_clusters, round(ncol(sce) / 30))
  # Memberships are held in single precision (as in harmonypy 2.1).
  expect_equal(unname(rowSums(fit$memberships)), rep(1, ncol(sce)), tolerance = 1e-6)
  expect_equal(dim(fit$memberships), c(ncol(sce), fit$n_clusters))
  expect_null(attr(b, "harmony")$memberships)
  expect_lt(tail(fit$objective, 1), fit$objective[1])
})

test_that("protected covariates keep a condition effect that plain Harmony erodes", {
  # Condition shifts dimension 1 by 3; treated cells are 80 % of batch a and
  # 20 % of batch b, which is shifted by 2.5 in every dimension.
  set.seed(2)
  n <- 1200
  batch <- rep(c("a", "b"), length.out = n)
  treated <- ifelse(batch == "a", runif(n) < 0.8, runif(n) < 0.2)
  type <- rep(1:3, length.out = n)
  x <- matrix(rnorm(n * 5), n, 5)
  x[cbind(seq_len(n), type + 1)] <- x[cbind(seq_len(n), type + 1)] + 6
  x <- x + 2.5 * (batch == "b")
  x[, 1] <- x[, 1] + 3 * treated
  meta <- data.frame(batch = batch, condition = ifelse(treated, "treated", "control"))
  effect <- function(z) mean(sapply(1:3, function(t) {
    mean(z[type == t & treated, 1]) - mean(z[type == t & !treated, 1])
  }))
  plain <- run_harmony(x, batch = meta$batch, progress = FALSE, threads = 2)
  kept <- run_harmony(x, batch = meta["batch"], protect = meta["condition"], progress = FALSE, threads = 2)
  expect_lt(effect(x), 2) # pooled over batches the input understates it
  expect_gt(effect(kept), effect(plain) + 0.4)
  expect_gt(effect(kept), effect(x) + 0.7)
})

test_that("bad input gives clear errors", {
  sce <- example_cellbench()
  expect_error(run_harmony(sce, batch = "batch"), "no reduction 'PCA'.*run_pca")
  pcs <- matrix(rnorm(200), 100, 2)
  expect_error(run_harmony(pcs, batch = rep(1:2, 50), protect = NULL, theta = -1, progress = FALSE), "theta")
  expect_error(run_harmony(pcs, batch = rep(1:2, 40), progress = FALSE), "80 values but `x` has 100 cells")
  expect_error(run_harmony(pcs, batch = NULL, progress = FALSE), "`batch` is required")
  pcs[3, 1] <- NA
  expect_error(run_harmony(pcs, batch = rep(1:2, 50), progress = FALSE), "missing value")
})

test_that("Harmony on a sketch corrects the other cells as the full run does", {
  set.seed(3)
  n <- 6000
  type <- sample(4, n, TRUE, prob = c(0.4, 0.3, 0.2, 0.1))
  b <- sample(c("a", "b", "c"), n, TRUE, prob = c(0.5, 0.3, 0.2))
  centre <- matrix(rnorm(4 * 8, sd = 6), 4)
  shift <- matrix(rnorm(3 * 8, sd = 2), 3)
  x <- centre[type, ] + shift[match(b, c("a", "b", "c")), ] + matrix(rnorm(n * 8), n)
  full <- run_harmony(x, batch = b, progress = FALSE)
  sk <- run_harmony(x, batch = b, progress = FALSE, sketch = 2000)
  # Batch "c" (20%) would give 400 cells; the floor of 500 per batch lifts it.
  fitted <- attr(sk, "harmony")$fitted_cells
  expect_true(fitted >= 2000 && fitted <= 2200)
  expect_equal(attr(full, "harmony")$fitted_cells, n)
  # Measured 8e-4 of the variance; batch spread 7.72 -> 1.33 (full), 1.37 (sketch).
  expect_lt(mean((sk - full)^2) / mean(sweep(full, 2, colMeans(full))^2), 0.005)
  spread <- function(z) {
    mean(sapply(1:4, function(t) {
      m <- rowsum(z[type == t, ], b[type == t]) / as.vector(table(b[type == t]))
      mean(dist(m))
    }))
  }
  expect_lt(spread(sk), 1.15 * spread(full))
  expect_lt(spread(sk), spread(x) / 4)
  expect_identical(run_harmony(x, batch = b, progress = FALSE, sketch = 2000), sk)
  expect_error(run_harmony(x, batch = b, progress = FALSE, sketch = 2000, memberships = TRUE),
               "needs Harmony fitted on all cells")
  expect_error(run_harmony(x, batch = b, progress = FALSE, sketch = 0.5), "`sketch` must be a whole number")
  # distill()'s teacher has Harmony overwrite its own PCs: the same values,
  # on a sketch and fitted on all cells, and the input is the result.
  for (sketch in list(2000, NULL)) {
    mine <- x + 0
    z <- harmony_fit(mine, NULL, b, NULL, theta = 2, lambda = NULL, sigma = 0.1, n_clusters = NULL,
                     max_iter = 10, max_iter_cluster = 4, epsilon_cluster = 1e-3, epsilon_harmony = 1e-2,
                     block_size = 0.05, alpha = 0.2, tau = 0, protect_theta = 0, seed = 1, threads = 2,
                     progress = FALSE, sketch = sketch, in_place = TRUE)
    expect_identical(z[, ], (if (is.null(sketch)) full else sk)[, ])
    expect_identical(mine[, ], z[, ])
  }
})

test_that("run_harmony() on a SingleCellExperiment stores Z* without copying it", {
  skip_if_not(capabilities("profmem"), "R was built without memory profiling")
  suppressMessages(library(SingleCellExperiment))
  set.seed(2)
  n <- 3000
  cells <- paste0("c", seq_len(n))
  sce <- SingleCellExperiment(list(counts = matrix(0L, 2, n, dimnames = list(c("g1", "g2"), cells))),
                              colData = data.frame(batch = rep(c("a", "b"), n / 2), row.names = cells))
  reducedDim(sce, "PCA") <- matrix(rnorm(n * 10), n, dimnames = list(cells, NULL))
  bytes <- n * 10 * 8
  log <- tempfile()
  Rprofmem(log, threshold = bytes - 1)
  out <- run_harmony(sce, batch = "batch", progress = FALSE, threads = 2)
  Rprofmem(NULL)
  hits <- grep("^[0-9]+ *:", readLines(log), value = TRUE)
  sizes <- as.numeric(sub(" *:.*", "", hits))
  # Allocations of Z*'s size made by run_harmony() itself: dropping the fit's
  # record with `attr<-` copied it.
  own <- grepl('^[0-9]+ *:"run_harmony"( |$)', hits) & sizes >= bytes & sizes < bytes + 1000
  expect_false(any(own))
  z <- reducedDim(out, "HARMONY")
  expect_null(attr(z, "harmony"))
  expect_identical(dimnames(z), list(cells, paste0("harmony_", 1:10)))
})
