# Parametric UMAP: separation, neighbourhoods kept, new cells placed, errors.

cellbench_pcs <- function() {
  sce <- run_pca(example_cellbench(), n_pcs = 10, n_hvg = 1000, threads = 2)
  list(sce = sce, z = SingleCellExperiment::reducedDim(sce, "PCA"))
}

# Fraction of cells of `q` whose nearest cell of `r` (in the map) has their label.
nearest_label_accuracy <- function(q, q_lab, r, r_lab) {
  d <- as.matrix(dist(rbind(q, r)))[seq_len(nrow(q)), nrow(q) + seq_len(nrow(r))]
  mean(as.character(r_lab[apply(d, 1, which.min)]) == as.character(q_lab))
}

test_that("run_umap() maps a latent space so that cell lines separate and neighbourhoods are kept", {
  d <- cellbench_pcs()
  sce <- run_umap(d$sce, max_epochs = 40, threads = 2)
  um <- SingleCellExperiment::reducedDim(sce, "UMAP")
  expect_equal(dim(um), c(ncol(sce), 2))
  expect_identical(rownames(um), colnames(sce))
  fit <- S4Vectors::metadata(sce)$UMAP
  expect_s3_class(fit, "scdistill_umap")
  expect_output(print(fit), "parametric UMAP: 10 -> 2 dimensions \\('PCA'\\)")
  expect_gt(fit$info$a, 1.5)
  # Cells of a line sit beside cells of the same line (leave-one-out 1-NN).
  dm <- as.matrix(dist(um))
  diag(dm) <- Inf
  expect_gt(mean(sce$cell_line[apply(dm, 1, which.min)] == sce$cell_line), 0.97)
  kept <- neighbor_preservation(d$z, um)
  random <- neighbor_preservation(d$z, matrix(rnorm(2 * ncol(sce)), ncol = 2))
  expect_gt(kept, 0.25)
  expect_lt(random, 0.1)
  # The same seed gives the same map.
  expect_identical(SingleCellExperiment::reducedDim(run_umap(d$sce, max_epochs = 40, threads = 2), "UMAP"), um)
})

test_that("project_umap() places new cells beside the training cells of their kind, parametric or uwot", {
  d <- cellbench_pcs()
  ref <- d$sce$batch != "p3"
  for (parametric in c(TRUE, FALSE)) {
    fit <- run_umap(d$z[ref, ], parametric = parametric, max_epochs = 40, threads = 2)
    expect_equal(dim(fit$embedding), c(sum(ref), 2))
    new <- project_umap(fit, d$z[!ref, ])
    expect_equal(dim(new), c(sum(!ref), 2))
    expect_gt(nearest_label_accuracy(new, d$sce$cell_line[!ref], fit$embedding, d$sce$cell_line[ref]), 0.95)
  }
  # Saved and read back, the parametric map places cells identically.
  fit <- run_umap(d$z[ref, ], max_epochs = 20, threads = 2)
  path <- tempfile(fileext = ".rds")
  saveRDS(fit, path)
  expect_identical(project_umap(readRDS(path), d$z[!ref, ]), project_umap(fit, d$z[!ref, ]))
  # Into a container: the reduction is written back.
  sce <- project_umap(fit, d$sce[, !ref], reduction = "PCA")
  expect_equal(dim(SingleCellExperiment::reducedDim(sce, "UMAP")), c(sum(!ref), 2))
  expect_error(project_umap(fit, d$z[!ref, 1:5]), "5 dimensions where the UMAP was fitted on 10")
  expect_error(project_umap(fit, d$z[!ref, c(2, 1, 3:10)]), "are not those the UMAP was fitted on")
  expect_error(project_umap(list(), d$z), "must be a UMAP from run_umap\\(\\)")
})

test_that("run_umap() and neighbor_preservation() refuse bad input by name", {
  d <- cellbench_pcs()
  expect_error(run_umap(d$sce, n_neighbors = 1000), "`n_neighbors` = 1000 is more than the 571 cells")
  expect_error(run_umap(d$sce, reduction = "HARMONY"), "`x` has no reduction 'HARMONY'")
  expect_error(run_umap(d$sce, min_dist = 2), "`min_dist` must be at most `spread`")
  expect_error(neighbor_preservation(d$z, d$z[-1, ]), "571 cells and `y` 570")
  expect_error(neighbor_preservation(d$z, d$z, k = 571), "less than the number of cells")
  expect_equal(neighbor_preservation(d$z, d$z), 1)
})
