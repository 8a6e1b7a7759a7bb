# Reference values: bench/metric_fixtures.py run with scib-metrics 0.5.10 on
# tests/testthat/fixtures/metrics_embedding.csv, fed an exact 90-NN graph
# (PCR with a categorical batch, as scib-metrics' Benchmarker calls it).
scib_reference <- c(ilisi = 0.523190, clisi = 1.000000, silhouette_label = 0.733824,
                    silhouette_batch = 0.877533, isolated_labels = 0.733824,
                    graph_connectivity = 0.977778, pcr_comparison = 0.934124,
                    nmi_kmeans = 0.987842, ari_kmeans = 0.993326,
                    # Leiden (igraph, seed 42) on the 15-NN UMAP connectivities
                    nmi_leiden = 0.987842, ari_leiden = 0.993326)

test_that("integration metrics reproduce scib-metrics on a fixed embedding", {
  fx <- utils::read.csv(test_path("fixtures", "metrics_embedding.csv"))
  post <- as.matrix(fx[, grep("^post", names(fx))])
  pre <- as.matrix(fx[, grep("^pre", names(fx))])
  m <- integration_metrics(post, batch = fx$batch, label = fx$label, pre = pre)
  expect_s3_class(m, "scdistill_metrics")
  for (k in names(scib_reference)) {
    expect_equal(m[[k]], scib_reference[[k]], tolerance = 1e-4, label = k)
  }
  # kBET: same test as scib-metrics on different neighbourhoods (see ?integration_metrics)
  expect_true(m$kbet > 0 && m$kbet < 1)
  bio <- mean(unlist(m[c("isolated_labels", "nmi_kmeans", "ari_kmeans", "silhouette_label", "clisi")]))
  batch <- mean(unlist(m[c("ilisi", "kbet", "graph_connectivity", "pcr_comparison", "silhouette_batch")]))
  expect_equal(m$total, 0.6 * bio + 0.4 * batch)
})

test_that("metrics rank a batch-mixed embedding above an unmixed one", {
  skip_if_not_installed("SingleCellExperiment")
  sim <- simulate_counts(n_cells = 600, n_genes = 300, n_groups = 3, n_batches = 2, batch_effect = "strong", seed = 2)
  sim <- run_pca(sim, n_pcs = 10, n_hvg = 300)
  pcs <- SingleCellExperiment::reducedDim(sim, "PCA")
  # an "ideal integration": remove each batch's mean within each cell type
  ideal <- pcs
  for (g in split(seq_len(ncol(sim)), interaction(sim$cell_type, sim$batch))) {
    ideal[g, ] <- sweep(pcs[g, , drop = FALSE], 2, colMeans(pcs[g, , drop = FALSE])) +
      rep(colMeans(pcs[sim$cell_type == sim$cell_type[g[1]], , drop = FALSE]), each = length(g))
  }
  SingleCellExperiment::reducedDim(sim, "ideal") <- ideal
  m <- integration_metrics(sim, batch = "batch", label = "cell_type", pre = "PCA")
  expect_identical(rownames(m), c("PCA", "ideal"))
  expect_gt(m["ideal", "ilisi"], m["PCA", "ilisi"])
  expect_gt(m["ideal", "kbet"], m["PCA", "kbet"])
  expect_gt(m["ideal", "batch_correction"], m["PCA", "batch_correction"])
  expect_equal(m["PCA", "pcr_comparison"], 0)
  png(tempfile(fileext = ".png"))
  expect_invisible(plot(m))
  dev.off()
})

test_that("metric inputs are checked", {
  x <- matrix(rnorm(200 * 3), 200)
  expect_error(integration_metrics(x, batch = rep(1:2, 50), label = rep(1, 200)), "`batch` has 100 values")
  expect_error(integration_metrics(x, batch = rep(1:2, 100), label = rep(1, 100)), "`label` has 100 values")
  expect_error(integration_metrics(x[1:50, ], batch = rep(1:2, 25), label = rep(1, 50)), "more than 90 cells")
  expect_error(integration_metrics("a", 1, 1), "must be a matrix")
  skip_if_not_installed("SingleCellExperiment")
  sce <- example_cellbench()
  expect_error(integration_metrics(sce, "batch", "cell_line"), "has no embeddings")
  expect_error(integration_metrics(run_pca(sce, n_pcs = 5, n_hvg = 200), "batch", "cell_line", reduction = "UMAP"),
               "'UMAP' not found; available: PCA")
})
