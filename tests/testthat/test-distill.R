# distill() on the CellBench example (571 cells, 5 cell lines, 3 plates).

distill_small <- function(...) {
  distill(example_cellbench(), batch = "batch", teacher = harmony_teacher(n_hvg = 1000), n_latent = 10,
          threads = 2, device = "cpu", progress = FALSE, ...)
}

fitted <- local({
  cache <- NULL
  function() {
    if (is.null(cache)) cache <<- distill_small(max_epochs_decoder = 30)
    cache
  }
})

test_that("the student learns the teacher: cell lines apart, plates mixed", {
  m <- fitted()
  sce <- example_cellbench()
  expect_s3_class(m, c("scdistill_distill", "scdistill_model"))
  z <- latent(m)
  expect_equal(dim(z), c(ncol(sce), 10))
  expect_identical(rownames(z), colnames(sce))
  s <- integration_metrics(list(student = z, teacher = teacher_latent(m)), batch = sce$batch,
                           label = sce$cell_line, threads = 2)
  expect_gt(s["teacher", "ari_kmeans"], 0.9)
  expect_gt(s["student", "clisi"], s["teacher", "clisi"] - 0.02)
  # Over seeds 0 to 4 the student's iLISI is 0.004 to 0.031 below the teacher's
  # (0.006 to 0.013 with batch norms), its scIB total -0.003 to +0.002.
  expect_gt(s["student", "ilisi"], s["teacher", "ilisi"] - 0.04)
  # Both phases lowered their held-out loss; the encoder stopped early.
  h1 <- m$info$history_encoder
  h2 <- m$info$history_decoder
  expect_lt(min(h1$validation_elbo), 0.6 * h1$validation_elbo[1])
  expect_lt(tail(h2$validation_elbo, 1), h2$validation_elbo[1])
  expect_length(h2$epoch, 30)
  expect_match(capture.output(print(m))[1], "1,000 input genes \\(log2 CPM\\) -> 10 latent dimensions -> 3,000 genes")
  # Placing the training cells again gives the stored latent space.
  expect_equal(latent(m, sce), z, tolerance = 1e-6)
})

test_that("the student's Z is in the teacher's units; summary() compares the two", {
  m <- fitted()
  sce <- example_cellbench()
  z <- latent(m)
  z_star <- teacher_latent(m)
  # Global standardization: the leading dimensions keep their scale and sign.
  for (j in 1:3) {
    expect_gt(cor(z[, j], z_star[, j]), 0.95)
    expect_equal(sd(z[, j]) / sd(z_star[, j]), 1, tolerance = 0.15)
  }
  expect_lt(max(abs(colMeans(z) - colMeans(z_star))), 0.1 * max(apply(z_star, 2, sd)))
  s <- summary(m, label = sce$cell_line, threads = 2)
  # Layer norms (the default): R² 0.983 and 0.947. Batch norms recalibrated
  # after training gave 0.993 and 0.959 (0.960 and 0.912 with the running
  # averages training left).
  expect_gt(s$r2[["all"]], 0.97)
  expect_gt(s$r2[["validation"]], 0.93)
  expect_equal(s$metrics["student - teacher", "total"],
               s$metrics["student", "total"] - s$metrics["teacher", "total"])
  # k-means moves with small changes of the embedding (the student's ARI is
  # 0.90 or 1 by seed); the neighbourhood scores do not.
  expect_gt(min(unlist(s$metrics["student - teacher", c("ari_leiden", "nmi_leiden", "clisi")])), -0.02)
  expect_gt(s$metrics["student - teacher", "ilisi"], -0.04)
  out <- capture.output(print(s))
  expect_true(any(grepl("Student against teacher: R\u00b2 0\\.[0-9]{3} on all cells", out)))
  expect_true(any(grepl("^ari_kmeans", out)))
  expect_identical(summary(m, label = "cell_line", x = sce, threads = 2)$metrics, s$metrics)
  expect_error(summary(m, label = sce$cell_line[-1]), "570 values for the model's 571 training cells")
  expect_error(summary(m, label = "cell_line"), "pass the training data as `x`")
  # scDistill's per-cell target: rows of Z standardized (LayerNorm), and R²
  # measured against the standardized Z*.
  c1 <- distill_small(standardize = "cell", max_epochs_encoder = 20, max_epochs_decoder = 2)
  zc <- latent(c1)
  expect_equal(unname(rowMeans(zc)), rep(0, nrow(zc)), tolerance = 1e-4)
  expect_equal(unname(sqrt(rowMeans(sweep(zc, 1, rowMeans(zc))^2))), rep(1, nrow(zc)), tolerance = 1e-3)
  expect_identical(c1$info$config$target, "cell")
  expect_gt(summary(c1)$r2[["all"]], 0.5)
  zs <- t(apply(teacher_latent(c1), 1, function(r) (r - mean(r)) / (sqrt(mean((r - mean(r))^2)) + 1e-5)))
  expect_equal(summary(c1)$r2[["all"]], 1 - sum((c1$latent - zs)^2) / sum(sweep(zs, 2, colMeans(zs))^2),
               tolerance = 1e-10)
  expect_error(distill_small(standardize = "rows"), "`standardize` must be one of")
  # Widths: c(encoder, decoder) by default, one number for both.
  expect_identical(unlist(m$info$config[c("n_hidden", "n_hidden_decoder")]), c(n_hidden = 256L, n_hidden_decoder = 128L))
  expect_identical(c1$info$config$n_hidden, 256L)
  expect_match(capture.output(print(m))[1], "\\(2 x 256/128 hidden\\)")
  expect_error(distill_small(n_hidden = c(64, 64, 64)), "one width or c\\(encoder, decoder\\)")
  expect_error(distill_small(n_hidden = c(64, 0)), "`n_hidden` must be a whole number >= 1")
})

test_that("corrected expression removes the plate effect within cell lines", {
  m <- fitted()
  sce <- example_cellbench()
  cpm <- log2(t(t(as.matrix(SingleCellExperiment::counts(sce))) / colSums(SingleCellExperiment::counts(sce))) * 1e6 + 1)
  cor1 <- corrected_expression(m, sce, reference_batch = "p1")
  expect_equal(dim(cor1), dim(sce))
  rho <- corrected_expression(m, sce, reference_batch = "p1", type = "scale")
  expect_equal(unname(colSums(rho)), rep(1, ncol(sce)), tolerance = 1e-4)
  # Distance between plate means of each cell line, over the 500 most expressed genes.
  top <- order(rowMeans(cpm), decreasing = TRUE)[1:500]
  gap <- function(x) mean(sapply(split(seq_len(ncol(sce)), sce$cell_line), function(cells) {
    means <- sapply(split(cells, sce$batch[cells]), function(cs) rowMeans(x[top, cs, drop = FALSE]))
    mean(dist(t(means)))
  }))
  expect_lt(gap(cor1), 0.5 * gap(cpm))
  expect_error(corrected_expression(m, sce, reference_batch = "p9"), "'p9' is not a batch of the model")
  # normalized_expression() on a distilled model is the same decoding.
  ne <- normalized_expression(m, sce, transform_batch = "p1", library_size = 1e6)
  expect_equal(log2(ne + 1), cor1, tolerance = 1e-5)
})

test_that("models save, load and place new cells; same seed, same model", {
  m <- fitted()
  sce <- example_cellbench()
  f <- tempfile(fileext = ".safetensors")
  save_model(m, f)
  back <- load_model(f)
  expect_s3_class(back, "scdistill_distill")
  expect_equal(latent(back, sce), latent(m), tolerance = 1e-6)
  expect_error(teacher_latent(back), "no teacher embedding")
  rds <- tempfile(fileext = ".rds")
  saveRDS(m, rds)
  expect_equal(latent(readRDS(rds), sce[, 1:50]), latent(m)[1:50, ], tolerance = 1e-6)
  # New cells: genes matched by name, order does not matter.
  shuffled <- sce[rev(seq_len(nrow(sce))), 1:40]
  expect_equal(latent(m, shuffled), latent(m)[1:40, ], tolerance = 1e-6)
  expect_error(latent(m, sce[-(1:500), ]), "of the model's 1000 input genes are missing")
  # Batch norms (the default before layer norms; saved models may have
  # them): the same seed, the same model, and their running statistics
  # survive saving.
  a <- distill_small(max_epochs_encoder = 3, max_epochs_decoder = 2, seed = 5, norm = "batch")
  b <- distill_small(max_epochs_encoder = 3, max_epochs_decoder = 2, seed = 5, norm = "batch")
  expect_identical(latent(a), latent(b))
  expect_identical(a$info$config$norm, "batch")
  save_model(a, f, overwrite = TRUE)
  expect_equal(latent(load_model(f), sce), latent(a), tolerance = 1e-6)
  # The encoder's input scale: recorded, it matters, and a loaded model
  # reads new cells as it was fitted (1e5, not the 1e6 of the default and
  # of files that have none).
  expect_equal(m$info$config$input_scale_factor, 1e6)
  e5 <- distill_small(max_epochs_encoder = 3, max_epochs_decoder = 2, seed = 5, norm = "batch",
                      input_scale_factor = 1e5)
  expect_equal(e5$info$config$input_scale_factor, 1e5)
  expect_output(print(e5), "input genes \\(log2 per 100,000\\)")
  expect_gt(max(abs(latent(e5) - latent(a))), 1e-3)
  save_model(e5, f, overwrite = TRUE)
  expect_equal(latent(load_model(f), sce), latent(e5), tolerance = 1e-6)
  expect_error(distill_small(input_scale_factor = 0), "input_scale_factor")
  expect_error(sample_counts(m, sce), "not available for distilled models")
})

test_that("a given embedding can be the teacher", {
  sce <- run_pca(example_cellbench(), n_pcs = 8, batch = "batch", threads = 2)
  m <- distill(sce, batch = "batch", teacher = given_teacher("PCA", n_hvg = 500), max_epochs_encoder = 5,
               max_epochs_decoder = 2, threads = 2, progress = FALSE)
  expect_equal(ncol(latent(m)), 8)
  expect_equal(teacher_latent(m), SingleCellExperiment::reducedDim(sce, "PCA"), ignore_attr = TRUE)
  expect_match(m$info$teacher, "given embedding 'PCA'")
  expect_error(distill(sce, batch = "batch", teacher = given_teacher("UMAP"), progress = FALSE), "no reduction 'UMAP'")
  expect_error(distill(sce, batch = "batch", teacher = given_teacher(matrix(0, 10, 3)), progress = FALSE),
               "10 rows but `x` has 571 cells")
  expect_error(distill(sce, batch = "nope", progress = FALSE), "'nope' is not a column")
  expect_error(distill(sce, progress = FALSE), "`batch` is required")
})
