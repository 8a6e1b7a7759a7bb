test_that("PCA matches prcomp and irlba on the HVGs of real data (CellBench)", {
  cb <- read_cellbench()
  k <- 10
  pcs <- run_pca(cb$counts, n_pcs = k, n_hvg = 2000)
  hvg <- rownames(attr(pcs, "rotation"))
  expect_length(hvg, 2000)
  x <- t(ref_log_norm(cb$counts)[hvg, ])
  ref <- stats::prcomp(x, center = TRUE, scale. = TRUE, rank. = k)
  expect_equal(attr(pcs, "sdev"), ref$sdev[1:k], tolerance = 1e-4)
  # same components up to sign
  agreement <- abs(diag(stats::cor(pcs, ref$x)))
  expect_gt(min(agreement), 0.9999)
  expect_equal(abs(unname(attr(pcs, "rotation"))), abs(unname(ref$rotation)), tolerance = 1e-3)
  expect_equal(sum(attr(pcs, "percentVar")), 100 * sum(ref$sdev[1:k]^2) / sum(ref$sdev^2), tolerance = 1e-4)
  skip_if_not_installed("irlba")
  ir <- irlba::prcomp_irlba(x, n = k, center = TRUE, scale. = TRUE)
  # subspace agreement: canonical correlations of the two score sets
  expect_gt(min(stats::cancor(pcs, ir$x)$cor), 0.9999)
})

test_that("the exact path (more cells than genes) matches prcomp too, and so does the randomized one", {
  sim <- simulate_counts(n_cells = 1500, n_genes = 400, seed = 11, format = "list")
  exact <- run_pca(sim$counts, n_pcs = 15, n_hvg = 300)
  expect_identical(attr(exact, "iterations"), 0L)
  x <- t(ref_log_norm(sim$counts)[rownames(attr(exact, "rotation")), ])
  ref <- stats::prcomp(x, center = TRUE, scale. = TRUE, rank. = 15)
  expect_equal(attr(exact, "sdev"), ref$sdev[1:15], tolerance = 1e-8)
  expect_gt(min(abs(diag(stats::cor(exact, ref$x)))), 0.99999)
  # Per 10^6 (log2 CPM, the former default): `method = "log2cpm"` or the scale factor.
  cpm <- run_pca(sim$counts, n_pcs = 15, n_hvg = 300, method = "log2cpm", scale_factor = 1)
  expect_identical(cpm, run_pca(sim$counts, n_pcs = 15, n_hvg = 300, scale_factor = 1e6))
  ref_cpm <- stats::prcomp(t(ref_log2_cpm(sim$counts)[rownames(attr(cpm, "rotation")), ]), scale. = TRUE, rank. = 15)
  expect_equal(attr(cpm, "sdev"), ref_cpm$sdev[1:15], tolerance = 1e-8)
  expect_false(isTRUE(all.equal(attr(cpm, "sdev"), attr(exact, "sdev"))))
  expect_error(run_pca(sim$counts, n_pcs = 15, n_hvg = 300, scale_factor = 0), "`scale_factor` must be a positive")
  old <- options(scdistill.pca_exact_max_genes = 0)
  on.exit(options(old))
  randomized <- run_pca(sim$counts, n_pcs = 15, n_hvg = 300)
  expect_gt(attr(randomized, "iterations"), 0L)
  expect_gt(min(abs(diag(stats::cor(randomized, ref$x)))), 0.9999)
})

test_that("PCs separate the cell lines of the shipped example", {
  skip_if_not_installed("SingleCellExperiment")
  sce <- run_pca(example_cellbench(), n_pcs = 10, n_hvg = 1000, batch = "batch")
  pcs <- SingleCellExperiment::reducedDim(sce, "PCA")
  expect_identical(rownames(pcs), colnames(sce))
  # nearest neighbour in PC space shares the cell line for almost every cell
  d <- as.matrix(stats::dist(pcs))
  diag(d) <- Inf
  same <- mean(sce$cell_line[apply(d, 1, which.min)] == sce$cell_line)
  expect_gt(same, 0.95)
})

test_that("the same seed gives the same PCs; results go to SCE, Seurat and matrices", {
  d <- example_cellbench("list")$counts
  a <- run_pca(d, n_pcs = 5, n_hvg = 500, seed = 3, threads = 1)
  b <- run_pca(d, n_pcs = 5, n_hvg = 500, seed = 3, threads = 2)
  expect_identical(a, b)
  expect_identical(dim(a), c(ncol(d), 5L))
  skip_if_not_installed("SeuratObject")
  so <- suppressWarnings(SeuratObject::CreateSeuratObject(counts = d))
  so <- run_pca(so, n_pcs = 5, n_hvg = 500, seed = 3)
  expect_equal(unname(SeuratObject::Embeddings(so, "pca")), unname(a[, 1:5]))
  expect_identical(SeuratObject::Stdev(so[["pca"]]), attr(a, "sdev"))
})

test_that("PCA arguments are validated", {
  d <- toy_dgc()
  expect_error(run_pca(d, n_pcs = 0), "`n_pcs` must be a whole number >= 1")
  expect_error(run_pca(d, n_pcs = 12, n_hvg = 30), "`n_pcs` must be smaller than both the number of cells \\(12\\)")
  expect_error(run_pca(d, scale = NA), "`scale` must be TRUE or FALSE")
  expect_error(run_pca(d, batch = "plate"), "no cell metadata")
})

test_that("PCA of analytic Pearson residuals matches a direct computation", {
  sce <- example_cellbench()
  counts <- as.matrix(SingleCellExperiment::counts(sce))
  pcs <- run_pca(counts, n_pcs = 5, n_hvg = 300, method = "pearson_residuals", threads = 2)
  genes <- rownames(attr(pcs, "rotation"))
  # scanpy's normalize_pearson_residuals (theta 100, clip sqrt(N)), then a centred PCA.
  mu <- outer(rowSums(counts) / sum(counts), colSums(counts))
  r <- (counts - mu) / sqrt(mu + mu^2 / 100)
  r <- pmin(pmax(r, -sqrt(ncol(counts))), sqrt(ncol(counts)))
  ref <- prcomp(t(r[genes, ]), center = TRUE, scale. = FALSE, rank. = 5)
  for (j in 1:5) expect_gt(abs(cor(pcs[, j], ref$x[, j])), 0.9999)
  expect_equal(attr(pcs, "sdev"), ref$sdev[1:5], tolerance = 1e-6)
  expect_error(run_pca(counts, method = "pearson_residuals", residual_theta = -1), "residual_theta")
})
