# run_pipeline(): every stage's result written back, new cells through the fitted stages, errors.

pipeline_sim <- function() {
  simulate_counts(n_cells = 1000, n_genes = 300, n_groups = 4, group_prob = c(0.5, 0.25, 0.15, 0.1),
                  ambient = list(fraction = 0.1, n_empty = 1000), seed = 5)
}

quick <- list(vae = list(max_epochs = 80),
              umap = list(max_epochs = 20), ambient = list(max_epochs = 200))

ari <- function(a, b) {
  t <- table(a, b)
  comb <- function(n) sum(n * (n - 1) / 2)
  e <- comb(rowSums(t)) * comb(colSums(t)) / comb(sum(t))
  (comb(t) - e) / ((comb(rowSums(t)) + comb(colSums(t))) / 2 - e)
}

test_that("run_pipeline() runs every stage, writes each result back and keeps the fitted stages", {
  sim <- pipeline_sim()
  empty <- S4Vectors::metadata(sim)$ambient$empty_droplets
  truth <- sim$ambient_fraction
  fit_on <- sim[, sim$batch == "Batch1" | seq_len(ncol(sim)) %% 2 == 0]
  out <- run_pipeline(fit_on, batch = "batch", empty_droplets = empty, n_clusters = 4, args = quick, threads = 2)
  expect_true("decontaminated" %in% SummarizedExperiment::assayNames(out))
  expect_true(all(c("VAE", "HARMONY", "UMAP", "soft_cluster") %in% SingleCellExperiment::reducedDimNames(out)))
  cd <- SummarizedExperiment::colData(out)
  expect_true(all(c("ambient_fraction", "ambient_removed", "doublet_score", "doublet_call", "soft_cluster",
                    "soft_cluster_confidence") %in% colnames(cd)))
  expect_gt(ari(out$soft_cluster, out$cell_type), 0.8)
  p <- S4Vectors::metadata(out)$pipeline
  expect_s3_class(p, "scdistill_pipeline")
  expect_identical(p$steps, c("ambient", "vae", "doublets", "harmony", "umap", "clusters"))
  expect_output(print(p), "ambient -> vae -> doublets -> harmony -> umap -> clusters")
  # Each stage's wall seconds are kept (and printed), in run order.
  expect_identical(names(p$seconds), c("ambient", "hvg", "vae", "doublets", "harmony", "umap", "clusters"))
  expect_true(all(p$seconds >= 0) && p$seconds[["vae"]] > 0)
  expect_output(print(p), "seconds: ambient [0-9.]+, hvg")
  # New cells of the same batches through every fitted stage.
  new <- sim[, !colnames(sim) %in% colnames(fit_on)]
  proj <- project(p, new, batch = "batch")
  expect_true(all(c("VAE", "HARMONY", "UMAP") %in% SingleCellExperiment::reducedDimNames(proj)))
  expect_gt(ari(proj$soft_cluster, new$cell_type), 0.8)
  expect_equal(dim(SummarizedExperiment::assay(proj, "decontaminated")), dim(new))
  # The pipeline's plot draws its three panels.
  path <- tempfile(fileext = ".png")
  grDevices::png(path)
  expect_invisible(plot(p, out))
  grDevices::dev.off()
  expect_gt(file.size(path), 1000)
  # Projecting cells on other genes, or of an unknown batch, is refused by name.
  expect_error(project(p, new[1:100, ], batch = "batch"), "on other genes: 200 of the pipeline's 300 genes")
  other <- new
  other$batch <- "Batch9"
  expect_error(project(p, other, batch = "batch"), "batch 'Batch9' is not one the pipeline was fitted on")
})

test_that("run_pipeline() runs a subset of stages and can leave doublets out", {
  sim <- simulate_counts(n_cells = 600, n_genes = 200, n_groups = 3, seed = 6)
  out <- run_pipeline(SingleCellExperiment::counts(sim), batch = sim$batch, steps = c("clusters", "vae", "doublets"),
                      remove_doublets = TRUE, n_clusters = 3, args = quick, threads = 2)
  expect_s4_class(out, "SingleCellExperiment")
  expect_identical(S4Vectors::metadata(out)$pipeline$steps, c("vae", "doublets", "clusters"))
  expect_true(all(is.na(out$soft_cluster[out$doublet_call])))
  expect_false(anyNA(out$soft_cluster[!out$doublet_call]))
  expect_false("UMAP" %in% SingleCellExperiment::reducedDimNames(out))
  # A Seurat object gets its results as reductions, metadata columns and Misc().
  seu <- suppressWarnings(SeuratObject::CreateSeuratObject(SingleCellExperiment::counts(sim),
                                                           meta.data = as.data.frame(SummarizedExperiment::colData(sim))))
  seu <- run_pipeline(seu, batch = "batch", steps = c("vae", "umap", "clusters"), n_clusters = 3, args = quick,
                      threads = 2)
  expect_true(all(c("vae", "umap", "soft_cluster_probabilities") %in% SeuratObject::Reductions(seu)))
  expect_gt(ari(seu$soft_cluster, sim$cell_type), 0.8)
  expect_s3_class(SeuratObject::Misc(seu, "pipeline"), "scdistill_pipeline")
})

test_that("run_pipeline() refuses bad input by name", {
  sim <- simulate_counts(n_cells = 200, n_genes = 100, seed = 7)
  expect_error(run_pipeline(sim, batch = "batch"), "needs `empty_droplets`, `raw` or `ambient`")
  expect_error(run_pipeline(sim, steps = c("vae", "magic")), "`steps` must be some of")
  expect_error(run_pipeline(sim, steps = "vae", args = list(vea = list())), "`args` must be a list named by stage")
  expect_error(run_pipeline(sim, steps = "harmony"), "the \"harmony\" stage needs `batch`")
  expect_error(run_pipeline(sim, steps = "clusters", n_clusters = 500), "`n_clusters` = 500 is more than the 200 cells")
  expect_error(run_pipeline(sim, steps = c("vae", "umap"), joint = TRUE), "needs the \"vae\" and \"clusters\" steps")
  expect_error(run_pipeline(sim, batch = "batch", steps = c("vae", "harmony", "clusters"), joint = TRUE),
               "no \"harmony\" step")
})

test_that("run_pipeline(joint = TRUE) fine-tunes the VAE with its clusters and maps from the tuned latent space", {
  sim <- simulate_counts(n_cells = 600, n_genes = 200, n_groups = 3, seed = 6)
  out <- run_pipeline(sim, batch = "batch", steps = c("vae", "umap", "clusters"), n_clusters = 3, joint = TRUE,
                      args = c(quick, list(joint = list(weight = 20, max_epochs = 10))), threads = 2)
  fit <- S4Vectors::metadata(out)$pipeline
  expect_equal(fit$vae$info$fine_tuned$weight, 20)
  expect_equal(fit$clusters$info$fine_tuned$weight, 20)
  z <- SingleCellExperiment::reducedDim(out, "VAE")
  expect_equal(unname(z), unname(latent(fit$vae, out)), tolerance = 1e-5)
  expect_gt(ari(out$soft_cluster, sim$cell_type), 0.9)
  # New cells go through the tuned VAE and clusters.
  new <- project(fit, sim[, 1:100], batch = "batch", threads = 2)
  expect_identical(new$soft_cluster, out$soft_cluster[1:100])
})
