test_that("log2_cpm equals log2(counts / library size * 1e6 + 1) and stays sparse", {
  d <- toy_dgc()
  l <- log2_cpm(d)
  expect_s4_class(l, "dgCMatrix")
  expect_identical(l@i, d@i)
  expect_equal(as.matrix(l), ref_log2_cpm(d), tolerance = 1e-6)
  skip_if_not_installed("SingleCellExperiment")
  sce <- log2_cpm(example_cellbench(), name = "lcpm")
  expect_true("lcpm" %in% SummarizedExperiment::assayNames(sce))
})

test_that("standardized variances match an exact-LOESS reference implementation", {
  ex <- example_cellbench("list")
  m <- ex$counts[1:600, ]
  m <- m[, Matrix::colSums(m) > 0]
  ours <- highly_variable_genes(m, n_hvg = 100)
  ref <- ref_standardized_variance(m)
  expect_equal(ours$variance_norm, unname(ref), tolerance = 1e-6)
  expect_equal(ours$mean, unname(Matrix::rowMeans(m)), tolerance = 1e-12)
  top_ref <- rownames(m)[order(-ref)[1:100]]
  expect_setequal(ours$gene[ours$highly_variable], top_ref)
  expect_identical(sum(ours$highly_variable), 100L)
})

test_that("batch-aware selection follows the seurat_v3 rule, batch by batch", {
  ex <- example_cellbench("list")
  n_top <- 300
  hvg <- highly_variable_genes(ex$counts, n_hvg = n_top, batch = ex$cell_data$batch)
  expect_identical(sum(hvg$highly_variable), as.integer(n_top))
  # reference: rank genes within each batch; median rank over the batches where a
  # gene is in the top n_top; order by that median, then by the number of batches
  ranks <- sapply(split(seq_len(ncol(ex$counts)), ex$cell_data$batch), function(j) {
    r <- rank(-ref_standardized_variance(ex$counts[, j]), ties.method = "first") - 1
    ifelse(r < n_top, r, NA)
  })
  n_batches <- rowSums(!is.na(ranks))
  med <- apply(ranks, 1, function(r) if (all(is.na(r))) NA else stats::median(r, na.rm = TRUE))
  expect_identical(hvg$n_batches, as.integer(n_batches))
  expect_equal(hvg$rank, unname(med))
  chosen <- order(med, -n_batches, na.last = TRUE)[seq_len(n_top)]
  expect_setequal(hvg$gene[hvg$highly_variable], rownames(ex$counts)[chosen])
})

test_that("the selection agrees with Seurat's vst on real data", {
  skip_if_not_installed("Seurat")
  ex <- example_cellbench("list")
  so <- suppressWarnings(SeuratObject::CreateSeuratObject(counts = ex$counts))
  so <- Seurat::FindVariableFeatures(so, selection.method = "vst", nfeatures = 1000, verbose = FALSE)
  ours <- highly_variable_genes(ex$counts, n_hvg = 1000)
  overlap <- length(intersect(ours$gene[ours$highly_variable], Seurat::VariableFeatures(so))) / 1000
  expect_gt(overlap, 0.95) # Seurat interpolates its LOESS; we evaluate it exactly
})

test_that("arguments are checked before any work", {
  d <- toy_dgc()
  expect_error(highly_variable_genes(d, n_hvg = 0), "`n_hvg` must be a whole number >= 1")
  expect_error(highly_variable_genes(d, span = 2), "`span` must be a number in \\(0, 1\\]")
})
