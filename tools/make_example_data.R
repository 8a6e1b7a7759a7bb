# Builds inst/extdata/cellbench_sng.rds, the example shipped in the package,
# from ../shared/data/cellbench_5cl_3plates (CellBench, Tian et al. 2019, MIT):
# singlet cells only (demuxlet "SNG"; plates 1-2 hold ~47% doublets), ERCC
# spike-ins dropped, genes detected in at least 5% of cells, the 3,000 with
# the highest mean count kept. Run from the repository root.
library(Matrix)
src <- file.path("..", "shared", "data", "cellbench_5cl_3plates")
counts <- readMM(gzfile(file.path(src, "counts.mtx.gz")))
genes <- read.csv(gzfile(file.path(src, "genes.csv.gz")), row.names = 1)
cells <- read.csv(gzfile(file.path(src, "cells.csv.gz")), row.names = 1)
dimnames(counts) <- list(rownames(genes), rownames(cells))
keep_cells <- cells$demuxlet_cls == "SNG"
counts <- as(counts[, keep_cells], "CsparseMatrix")
cells <- cells[keep_cells, ]
counts <- counts[!grepl("^ERCC-", rownames(counts)), ]
detected <- rowSums(counts > 0) >= 0.05 * ncol(counts)
counts <- counts[detected, ]
counts <- counts[order(rowMeans(counts), decreasing = TRUE)[1:3000], ]
counts <- counts[sort(rownames(counts)), ]
cell_data <- data.frame(
  batch = factor(sub("^sc_celseq2_5cl_", "", cells$batch)),
  cell_line = factor(cells$cell_line),
  row.names = rownames(cells))
storage.mode(counts@x) <- "double"
saveRDS(list(counts = counts, cell_data = cell_data), "inst/extdata/cellbench_sng.rds",
        compress = "xz")
cat(sprintf("%d genes x %d cells, %d non-zero\n", nrow(counts), ncol(counts), length(counts@x)))
