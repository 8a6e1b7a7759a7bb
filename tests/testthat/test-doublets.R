# Doublet detection: planted doublets of known parents, errors.

# 600 simulated cells of 4 types plus 60 planted doublets (sums of two
# cells of different types, same batch); returns the SCE and the truth.
planted <- function() {
  sim <- simulate_counts(n_cells = 600, n_genes = 300, n_groups = 4, n_batches = 2, seed = 3)
  m <- SingleCellExperiment::counts(sim)
  set.seed(1)
  pairs <- t(replicate(60, {
    repeat {
      ij <- sample(ncol(m), 2)
      if (sim$cell_type[ij[1]] != sim$cell_type[ij[2]] && sim$batch[ij[1]] == sim$batch[ij[2]]) break
    }
    ij
  }))
  dbl <- m[, pairs[, 1]] + m[, pairs[, 2]]
  colnames(dbl) <- paste0("planted", seq_len(60))
  all <- cbind(m, dbl)
  sce <- SingleCellExperiment::SingleCellExperiment(list(counts = all))
  sce$batch <- c(as.character(sim$batch), as.character(sim$batch[pairs[, 1]]))
  list(sce = sce, truth = rep(c(FALSE, TRUE), c(ncol(m), 60)))
}

auroc <- function(s, y) {
  r <- rank(s)
  (sum(r[y]) - sum(y) * (sum(y) + 1) / 2) / (sum(y) * sum(!y))
}

test_that("find_doublets() ranks planted doublets above singlets with each score", {
  p <- planted()
  model <- fit_vae(p$sce, batch = "batch", max_epochs = 60, threads = 2, seed = 1)
  out <- find_doublets(p$sce, batch = "batch", model = model, threads = 2)
  expect_true(all(c("doublet_score", "doublet_call") %in% colnames(SummarizedExperiment::colData(out))))
  expect_gt(auroc(out$doublet_score, p$truth), 0.9)
  # The default calls: the expected rate (8%) of each batch.
  expect_equal(sum(out$doublet_call), sum(round(0.08 * table(p$sce$batch))))
  expect_gt(mean(p$truth[out$doublet_call]), 0.5)
  cls <- find_doublets(SingleCellExperiment::counts(p$sce), batch = p$sce$batch, model = model, method = "classifier",
                       threads = 2)
  expect_named(cls, c("score", "call"))
  expect_true(all(cls$score >= 0 & cls$score <= 1))
  expect_identical(cls$call, cls$score > 0.5)
  expect_gt(auroc(cls$score, p$truth), 0.85)
  both <- find_doublets(p$sce, batch = "batch", model = model, method = "both", threshold = 0.9, threads = 2)
  expect_gt(auroc(both$doublet_score, p$truth), 0.9)
  expect_identical(both$doublet_call, both$doublet_score > 0.9)
  # The same seed gives the same scores.
  again <- find_doublets(p$sce, batch = "batch", model = model, threads = 2)
  expect_identical(again$doublet_score, out$doublet_score)
})

test_that("find_doublets() also finds doublets that hold one cell's molecules (plate data)", {
  p <- planted()
  m <- SingleCellExperiment::counts(p$sce)
  dbl <- which(p$truth)
  set.seed(2)
  thin <- m[, dbl]
  thin@x <- as.numeric(stats::rbinom(length(thin@x), thin@x, 0.5))
  m[, dbl] <- thin
  m <- Matrix::drop0(m)
  expect_equal(mean(Matrix::colSums(m)[dbl]) / mean(Matrix::colSums(m)[-dbl]), 1, tolerance = 0.15)
  sce <- SingleCellExperiment::SingleCellExperiment(list(counts = m))
  sce$batch <- p$sce$batch
  model <- fit_vae(sce, batch = "batch", max_epochs = 60, threads = 2, seed = 1)
  nb <- find_doublets(sce, batch = "batch", model = model, method = "neighbors", threads = 2)
  expect_gt(auroc(nb$doublet_score, p$truth), 0.85)
})

test_that("find_doublets() refuses bad input by name", {
  p <- planted()
  expect_error(find_doublets(p$sce[, 1:5], batch = "batch"), "5 cells: doublet detection needs at least 10")
  expect_error(find_doublets(p$sce, batch = "nope"), "'nope' is not a column")
  expect_error(find_doublets(p$sce, method = "magic"), "`method` must be one of")
  expect_error(find_doublets(p$sce, ratio = 0), "`ratio` must be a positive number")
  expect_error(find_doublets(p$sce, model = "vae"), "`model` must be a scdistill model")
})
