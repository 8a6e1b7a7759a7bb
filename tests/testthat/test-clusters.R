# Soft k-means clustering: known cell lines, held-out cells, supervised mode.

# Adjusted Rand index of two labelings (Hubert & Arabie).
ari <- function(a, b) {
  t <- table(a, b)
  comb <- function(n) sum(n * (n - 1) / 2)
  idx <- comb(t)
  expected <- comb(rowSums(t)) * comb(colSums(t)) / comb(sum(t))
  (idx - expected) / ((comb(rowSums(t)) + comb(colSums(t))) / 2 - expected)
}

cellbench_pca <- function() {
  sce <- example_cellbench()
  run_pca(sce, n_pcs = 10, n_hvg = 1000, threads = 2)
}

test_that("soft_clusters() finds the five cell lines and writes clusters, confidence and assignments back", {
  sce <- soft_clusters(cellbench_pca(), n_clusters = 5, threads = 2)
  expect_s3_class(sce$soft_cluster, "factor")
  expect_equal(nlevels(sce$soft_cluster), 5)
  expect_gt(ari(sce$soft_cluster, sce$cell_line), 0.95)
  p <- SingleCellExperiment::reducedDim(sce, "soft_cluster")
  expect_equal(dim(p), c(ncol(sce), 5))
  expect_equal(unname(rowSums(p)), rep(1, ncol(sce)), tolerance = 1e-5)
  expect_equal(sce$soft_cluster_confidence, unname(apply(p, 1, max)), tolerance = 1e-6)
  expect_true(all(sce$soft_cluster_confidence > 0.2 & sce$soft_cluster_confidence <= 1))
  fit <- S4Vectors::metadata(sce)$soft_cluster
  expect_s3_class(fit, "scdistill_clusters")
  expect_equal(dim(fit$centroids), c(5, 10))
  expect_output(print(fit), "5 clusters on a 10-dimensional space \\('PCA'\\)")
  # One temperature per cluster by default, within a factor 4 of the pooled T.
  expect_length(fit$temperatures, 5)
  expect_true(all(fit$temperatures >= fit$temperature / 4 - 1e-9 & fit$temperatures <= 4 * fit$temperature + 1e-9))
  expect_gt(max(fit$temperatures) / min(fit$temperatures), 1.2)
  expect_output(print(fit), "temperatures .* \\(per cluster; pooled")
  shared <- soft_clusters(cellbench_pca(), n_clusters = 5, per_cluster = FALSE, threads = 2)
  fit_shared <- S4Vectors::metadata(shared)$soft_cluster
  expect_null(fit_shared$temperatures)
  expect_equal(fit_shared$temperature, fit$temperature)
  expect_output(print(fit_shared), "clusters on a 10-dimensional space \\('PCA'\\), temperature [0-9]")
  expect_null(S4Vectors::metadata(soft_clusters(cellbench_pca(), n_clusters = 5, temperature = 3,
                                                threads = 2))$soft_cluster$temperatures)
  # The same seed gives the same clusters; the fit survives saveRDS().
  again <- soft_clusters(cellbench_pca(), n_clusters = 5, threads = 2)
  expect_identical(again$soft_cluster, sce$soft_cluster)
  path <- tempfile(fileext = ".rds")
  saveRDS(fit, path)
  back <- predict(readRDS(path), sce, name = "again")
  expect_identical(back$again, sce$soft_cluster)
})

test_that("without n_clusters, Leiden sets the clusters; new cells are assigned by the fitted centroids", {
  sce <- cellbench_pca()
  leid <- soft_clusters(sce, threads = 2)
  expect_gte(nlevels(leid$soft_cluster), 5)
  # Every Leiden cluster is (almost) one cell line.
  purity <- apply(table(leid$soft_cluster, leid$cell_line), 1, function(r) max(r) / sum(r))
  expect_gt(min(purity), 0.9)
  coarse <- soft_clusters(sce, resolution = 0.05, threads = 2)
  expect_lt(nlevels(coarse$soft_cluster), nlevels(leid$soft_cluster))

  pcs <- SingleCellExperiment::reducedDim(sce, "PCA")
  ref <- sce$batch != "p3"
  fit <- soft_clusters(pcs[ref, ], n_clusters = 5, threads = 2)
  expect_s3_class(fit$clusters, "factor")
  new <- predict(fit, pcs[!ref, ])
  expect_named(new, c("cluster", "confidence"))
  expect_equal(dim(attr(new, "probabilities")), c(sum(!ref), 5))
  expect_gt(ari(new$cluster, sce$cell_line[!ref]), 0.95)
  expect_error(predict(fit, pcs[!ref, 1:4]), "4 dimensions where the clustering was fitted on 10")
  expect_error(predict(fit, pcs[0, ]), "no cells")
  shuffled <- pcs[!ref, c(2, 1, 3:10)]
  expect_error(predict(fit, shuffled), "are not those the clustering was fitted on")
})

test_that("with labels, soft_clusters() is a nearest-centroid classifier of unlabelled cells", {
  sce <- cellbench_pca()
  held <- sce$batch == "p3"
  labels <- ifelse(held, NA, as.character(sce$cell_line))
  sup <- soft_clusters(sce, labels = labels, name = "type", threads = 2)
  expect_equal(levels(sup$type), sort(unique(as.character(sce$cell_line))))
  expect_gt(mean(as.character(sup$type[held]) == as.character(sce$cell_line[held])), 0.97)
  expect_true(S4Vectors::metadata(sup)$type$supervised)
  # Seurat: metadata columns and the fit in Misc().
  seu <- suppressWarnings(SeuratObject::CreateSeuratObject(SingleCellExperiment::counts(sce)))
  seu <- write_back(seu, SingleCellExperiment::reducedDim(sce, "PCA"), "pca")
  seu <- soft_clusters(seu, reduction = "pca", n_clusters = 5, threads = 2)
  expect_gt(ari(seu$soft_cluster, sce$cell_line), 0.95)
  expect_s3_class(SeuratObject::Misc(seu, "soft_cluster"), "scdistill_clusters")
  expect_equal(dim(SeuratObject::Embeddings(seu, "soft_cluster_probabilities")), c(ncol(seu), 5))
})

test_that("distances in the shared covariance keep types that share an elongated shape", {
  # Four types 2.5 apart along the first axis, all stretched along the second
  # (as sequencing depth stretches every type of a PCA alike).
  set.seed(3)
  type <- rep(1:4, c(300, 300, 200, 200))
  z <- cbind(2.5 * type + rnorm(1000, sd = 0.5), rnorm(1000, sd = 3), matrix(rnorm(3000, sd = 0.5), 1000))
  shared <- soft_clusters(z, n_clusters = 4, threads = 2)
  euclid <- soft_clusters(z, n_clusters = 4, covariance = "spherical", threads = 2)
  expect_gt(ari(shared$clusters, type), 0.9)
  expect_gt(ari(shared$clusters, type), ari(euclid$clusters, type) + 0.2)
  expect_output(print(shared), "distances in the clusters' shared covariance")
  expect_no_match(capture.output(print(euclid)), "shared covariance")
  # New cells of each type go to its cluster.
  new_type <- rep(1:4, each = 100)
  new <- cbind(2.5 * new_type + rnorm(400, sd = 0.5), rnorm(400, sd = 3), matrix(rnorm(1200, sd = 0.5), 400))
  expect_gt(ari(predict(shared, new)$cluster, new_type), 0.9)
  expect_error(soft_clusters(z, n_clusters = 4, covariance = "full"), "covariance")
})

test_that("soft_clusters() refuses bad input by name", {
  sce <- cellbench_pca()
  expect_error(soft_clusters(sce, n_clusters = 10000), "`n_clusters` = 10000 is more than the 571 cells")
  expect_error(soft_clusters(sce, reduction = "UMAP"), "`x` has no reduction 'UMAP'")
  expect_error(soft_clusters(sce, labels = rep("a", ncol(sce))), "at least two classes")
  expect_error(soft_clusters(sce, labels = "cell_line", n_clusters = 3), "`labels` has 5 classes")
  expect_error(soft_clusters(sce, labels = "nope"), "'nope' is not a column")
  expect_error(soft_clusters(sce, temperature = -1), "`temperature` must be a positive number")
  expect_error(soft_clusters(sce, per_cluster = "yes"), "`per_cluster` must be TRUE or FALSE")
  z <- SingleCellExperiment::reducedDim(sce, "PCA")
  z[3, 2] <- NA
  expect_error(soft_clusters(z, n_clusters = 2), "missing or infinite")
})

test_that("fine_tune_clusters() tunes a VAE with its clusters, keeping the types and leaving the inputs", {
  sim <- simulate_counts(n_cells = 600, n_genes = 200, n_groups = 3, group_prob = c(0.4, 0.35, 0.25), seed = 11)
  model <- fit_vae(sim, batch = "batch", max_epochs = 40, threads = 2, progress = FALSE)
  z0 <- latent(model)
  cl <- soft_clusters(z0, n_clusters = 3, threads = 2, progress = FALSE)
  within <- function(z) {
    sum(vapply(split(seq_len(nrow(z)), sim$cell_type), function(i) sum(scale(z[i, ], scale = FALSE)^2), 0)) /
      sum(scale(z, scale = FALSE)^2)
  }
  joint <- fine_tune_clusters(model, cl, sim, weight = 20, max_epochs = 15, threads = 2, progress = FALSE)
  expect_s3_class(joint, "scdistill_joint")
  expect_s3_class(joint$model, "scdistill_vae")
  z1 <- latent(joint$model)
  expect_equal(dim(z1), dim(z0))
  expect_identical(rownames(z1), colnames(sim))
  # The types stay apart and in their clusters (with dropout in the loss,
  # cells crossed between clusters: ARI 0.88 -> 0.55). From the shared
  # covariance's start (0.92 here) a few cells move (0.90).
  expect_lte(within(z1), within(z0) + 0.02)
  expect_gt(ari(cl$clusters, sim$cell_type), 0.85)
  expect_gte(ari(joint$clusters$clusters, sim$cell_type), ari(cl$clusters, sim$cell_type) - 0.035)
  expect_equal(joint$model$info$fine_tuned$weight, 20)
  expect_equal(nrow(as.data.frame(joint$model$info$fine_tuned$training$history)), 15)
  expect_output(print(joint), "3 soft clusters fine-tuned jointly \\(weight 20, 15 epochs\\)")
  # The tuned clustering assigns the tuned latent space as it was fitted.
  again <- predict(joint$clusters, z1)
  expect_identical(again$cluster, joint$clusters$clusters)
  # The given model and clustering are unchanged; the seed repeats the result.
  expect_equal(latent(model, sim), z0, tolerance = 1e-6)
  expect_identical(predict(cl, z0)$cluster, cl$clusters)
  path <- tempfile(fileext = ".scdistill")
  save_model(joint$model, path)
  expect_equal(latent(load_model(path), sim), z1, tolerance = 1e-6)
  expect_identical(latent(fine_tune_clusters(model, cl, sim, weight = 20, max_epochs = 15, threads = 2,
                                             progress = FALSE)$model), z1)
  # Refused: a classifier, another space, a model other than a VAE, a negative weight.
  sup <- soft_clusters(z0, labels = sim$cell_type, threads = 2, progress = FALSE)
  expect_error(fine_tune_clusters(model, sup, sim), "fitted on labels")
  other <- soft_clusters(z0[, 1:4], n_clusters = 3, threads = 2, progress = FALSE)
  expect_error(fine_tune_clusters(model, other, sim, threads = 2), "4-dimensional space")
  expect_error(fine_tune_clusters(model, cl, sim, weight = -1), "`weight` must be a non-negative number")
  expect_error(fine_tune_clusters(cl, cl, sim), "must be a scdistill model")
  student <- distill(sim, batch = "batch", max_epochs_encoder = 2, max_epochs_decoder = 2, threads = 2,
                     progress = FALSE)
  expect_error(fine_tune_clusters(student, cl, sim), "needs a VAE from fit_vae\\(\\)")
  expect_error(fine_tune_clusters(model, z0, sim), "must be a soft_clusters\\(\\) fit")
})
