test_that("dgCMatrix, matrix, Matrix and scdistill_counts give the same counts", {
  m <- toy_counts()
  d <- toy_dgc()
  a <- as_counts(m)
  expect_s3_class(a, "scdistill_counts")
  expect_identical(a$counts, d)
  expect_identical(as_counts(d)$counts, d)
  expect_identical(as_counts(as(d, "TsparseMatrix"))$counts, d)
  expect_identical(as_counts(a)$counts, d)
  expect_output(print(a), "30 genes x 12 cells")
})

test_that("SingleCellExperiment input uses assay.type and colData columns", {
  skip_if_not_installed("SingleCellExperiment")
  d <- toy_dgc()
  sce <- SingleCellExperiment::SingleCellExperiment(
    assays = list(counts = d, logcounts = log1p(d)),
    colData = data.frame(plate = rep(c("a", "b", "c"), each = 4)))
  cnt <- as_counts(sce, batch = "plate")
  expect_identical(cnt$counts, d)
  expect_identical(levels(cnt$batch), c("a", "b", "c"))
  expect_error(as_counts(sce, assay.type = "logcounts"), "non-integer value")
  expect_error(as_counts(sce, assay.type = "raw"), "`assay.type` = \"raw\" is not an assay of `x`; it has: counts, logcounts")
  expect_error(as_counts(sce, batch = "donor"), "'donor' is not a column of the cell metadata; available: plate")
})

test_that("Seurat input reads the counts layer of the chosen assay", {
  skip_if_not_installed("SeuratObject")
  d <- toy_dgc()
  so <- suppressWarnings(SeuratObject::CreateSeuratObject(counts = d))
  so$plate <- rep(c("a", "b"), 6)
  cnt <- as_counts(so, batch = "plate")
  expect_equal(as.matrix(cnt$counts), as.matrix(d))
  expect_identical(table(cnt$batch)[["a"]], 6L)
  expect_error(as_counts(so, assay = "ATAC"), "'ATAC' is not an assay of `x`; it has: RNA")
})

test_that("DelayedMatrix and HDF5 input are read in blocks and equal the in-memory counts", {
  skip_if_not_installed("DelayedArray")
  d <- toy_dgc(n_cells = 25)
  dm <- DelayedArray::DelayedArray(as.matrix(d))
  expect_identical(as_counts(dm, block_cells = 4)$counts, d)
  skip_if_not_installed("HDF5Array")
  h5 <- HDF5Array::writeHDF5Array(as.matrix(d), filepath = tempfile(fileext = ".h5"), name = "counts",
                                  with.dimnames = TRUE)
  expect_identical(as_counts(h5, block_cells = 7)$counts, d)
})

test_that("bad count values give errors that name the problem and the place", {
  m <- toy_counts()
  neg <- m; neg[3, 2] <- -1
  expect_error(as_counts(neg), "1 negative value\\(s\\) \\(first: -1 at gene 'gene3', cell 'cell2'\\)")
  frac <- m; frac[5, 7] <- 2.5
  expect_error(as_counts(frac), "non-integer value\\(s\\) \\(first: 2.5 at gene 'gene5', cell 'cell7'\\); pass raw counts")
  na <- m; na[2, 4] <- NA
  expect_error(as_counts(na), "1 NA/NaN/Inf value\\(s\\) \\(first at gene 'gene2', cell 'cell4'\\)")
  inf <- m; inf[1, 1] <- Inf
  expect_error(as_counts(inf), "NA/NaN/Inf")
  expect_error(as_counts(matrix("a", 2, 2)), "character matrix; counts must be numeric")
  expect_error(as_counts(list(1)), "does not know objects of class 'list'")
})

test_that("empty and badly named inputs are refused", {
  m <- toy_counts()
  expect_error(as_counts(m[, 0]), "no cells \\(0 columns\\)")
  expect_error(as_counts(m[0, ]), "no genes \\(0 rows\\)")
  empty <- m; empty[, c(3, 9)] <- 0
  expect_error(as_counts(empty), "2 cell\\(s\\) have zero total counts \\(first: 'cell3', 'cell9'\\); remove them")
  dup <- m; rownames(dup)[2] <- "gene1"
  expect_error(as_counts(dup), "1 gene name\\(s\\) are duplicated \\(first: 'gene1'\\)")
  unnamed <- m; rownames(unnamed) <- NULL
  expect_error(as_counts(unnamed), "no row names")
  blank <- m; rownames(blank)[4] <- ""
  expect_error(as_counts(blank), "gene name number 4 is missing")
  nocells <- m; colnames(nocells) <- NULL
  expect_identical(colnames(as_counts(nocells)$counts)[1:2], c("cell_1", "cell_2"))
})

test_that("batch problems are named", {
  m <- toy_counts()
  expect_error(as_counts(m, batch = rep("a", 5)), "`batch` has 5 values but `x` has 12 cells")
  expect_error(as_counts(m, batch = "plate"), "names a column, but `x` has no cell metadata")
  b <- rep(c("a", "b"), 6); b[c(4, 8)] <- NA
  expect_error(as_counts(m, batch = b), "2 missing value\\(s\\) \\(first in cell 'cell4'\\)")
  expect_error(as_counts(m, batch = c(rep("a", 11), "z")), "level\\(s\\) with a single cell: 'z'")
  f <- factor(rep(c("a", "b"), 6), levels = c("a", "b", "unused"))
  expect_identical(levels(as_counts(m, batch = f)$batch), c("a", "b"))
})

test_that("the core re-checks what R passes (never trust one side)", {
  d <- toy_dgc()
  x <- d@x; x[1] <- -3
  expect_error(scdistill:::rs_validate_counts(list(p = d@p, i = d@i, x = x, genes = rownames(d), cells = colnames(d))), "negative")
  p <- d@p; p[3] <- p[3] + 1000L
  expect_error(scdistill:::rs_validate_counts(list(p = p, i = d@i, x = d@x, genes = rownames(d), cells = colnames(d))), "malformed sparse matrix")
  expect_error(scdistill:::rs_hvg(scdistill:::slots(as_counts(d)), c(rep(1L, 11), 2L), c("a", "b"),
                                  10L, 0.3, 1L),
               "fewer than 2 cells \\(first: 'b'\\)")
})

test_that("minibatches cut from CSR into tensors equal the matrix columns", {
  d <- toy_dgc()
  rows <- c(5L, 1L, 12L, 5L)
  dense <- scdistill:::rs_dense_cells(scdistill:::slots(as_counts(d)), rows)
  expect_identical(matrix(dense, ncol = length(rows)), unname(as.matrix(d[, rows])))
  expect_error(scdistill:::rs_dense_cells(scdistill:::slots(as_counts(d)), 13L), "out of range")
})

test_that("glue results get their shape and names in place, never a copy, and wrong shapes are refused", {
  shape <- scdistill:::shape_in_place
  x <- as.double(1:6)
  traced <- capabilities("profmem")
  if (traced) tracemem(x)
  printed <- capture.output(y <- shape(x, c(3, 2), list(letters[1:3], c("u", "v")), note = "kept"))
  if (traced) {
    untracemem(x)
    expect_identical(printed, character(0)) # tracemem reports every copy
  }
  expect_identical(y, structure(as.double(1:6), dim = 3:2, dimnames = list(letters[1:3], c("u", "v")), note = "kept"))
  expect_identical(dim(x), 3:2) # the same object: that is why it is only for the glue's fresh results
  m <- shape(matrix(as.double(1:4), 2), dimnames = list(NULL, c("a", "b")))
  expect_identical(dimnames(m), list(NULL, c("a", "b")))
  expect_error(shape(as.double(1:6), c(4, 2), list(NULL, NULL)), "6 values cannot be shaped")
  expect_error(shape(as.double(1:6), c(3, 2), list(letters[1:2], NULL)), "dimension 1 must be 3 strings")
  expect_error(shape(as.double(1:6), c(3, 2), list(NULL)), "list of two")
  # Integers are copied into a new matrix.
  expect_identical(shape(1:4, c(2, 2), list(c("a", "b"), NULL)), matrix(1:4, 2, dimnames = list(c("a", "b"), NULL)))
})

test_that("write_back puts reductions where SCE and Seurat users look, and checks cells", {
  skip_if_not_installed("SingleCellExperiment")
  d <- toy_dgc()
  emb <- matrix(seq_len(24) / 2, ncol = 2, dimnames = list(colnames(d), NULL))
  sce <- SingleCellExperiment::SingleCellExperiment(assays = list(counts = d))
  sce2 <- write_back(sce, emb, "emb")
  expect_identical(SingleCellExperiment::reducedDim(sce2, "emb"), emb)
  expect_error(write_back(sce, emb[1:3, ], "emb"), "3 rows that do not match the 12 cells")
  expect_identical(SingleCellExperiment::reducedDimNames(sce), character(0)) # the original is untouched
  skip_if_not_installed("SeuratObject")
  so <- suppressWarnings(SeuratObject::CreateSeuratObject(counts = d))
  so <- write_back(so, emb, "emb")
  expect_equal(unname(SeuratObject::Embeddings(so, "emb")), unname(emb))
  expect_identical(SeuratObject::Key(so[["emb"]]), "emb_")
})
