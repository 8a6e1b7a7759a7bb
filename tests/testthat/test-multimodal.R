# fit_multimodal(): the regularizedvi-style multimodal VAE.

sim_multiome <- function(n_cells, n_groups, atac_only, n_batches = 2, seed = 1) {
  simulate_counts(n_cells = n_cells, n_genes = 200, n_groups = n_groups, n_batches = n_batches, atac = TRUE,
                  n_peaks = 600, atac_only_groups = atac_only, seed = seed, threads = 2)
}

peaks_of <- function(sce) SummarizedExperiment::assay(SingleCellExperiment::altExp(sce, "ATAC"), "counts")

test_that("on the real multiome data, training stops early and gives joint and per-modality latents", {
  skip_if_not_installed("SingleCellExperiment")
  mo <- example_multiome()
  expect_equal(SingleCellExperiment::altExpNames(mo), "ATAC")
  m <- fit_multimodal(mo, max_epochs = 400, patience = 10, threads = 2, progress = FALSE)
  expect_s3_class(m, "scdistill_multimodal")
  expect_true(m$info$stopped_early)
  h <- m$history
  expect_lt(h$validation_elbo[m$info$best_epoch], h$validation_elbo[1])
  z <- latent(m)
  expect_equal(dim(z), c(ncol(mo), 20))
  expect_equal(rownames(z), colnames(mo))
  expect_equal(dim(latent(m, modality = "ATAC")), c(ncol(mo), 10))
  expect_error(latent(m, modality = "protein"), "must be one of RNA, ATAC")
  # The RNA modality has the ambient term and ATAC the feature scaling, by default.
  spec <- m$info$config$modalities
  expect_true(spec$ambient[spec$name == "RNA"])
  expect_true(spec$feature_scaling[spec$name == "ATAC"])
  acc <- normalized_expression(m, mo, modality = "ATAC", library_size = 1e4)
  expect_equal(dim(acc), c(nrow(SingleCellExperiment::altExp(mo)), ncol(mo)))
  expect_true(all(is.finite(acc)) && all(acc > 0))
  # Including the ambient background only adds to RNA.
  rna0 <- normalized_expression(m, mo)
  rna1 <- normalized_expression(m, mo, ambient = TRUE)
  expect_true(all(rna1 >= rna0))
  a <- modality_attribution(m, mo)
  expect_equal(dim(a), c(ncol(mo), 2, 20))
  expect_true(all(is.finite(a)) && all(a >= 0))
  expect_equal(unname(rowSums(attr(a, "share"))), rep(1, ncol(mo)), tolerance = 1e-8)
  # Each modality's decoder leans on its own block of the concatenated latent space.
  per_dim <- apply(unclass(a), c(2, 3), mean)
  expect_gt(mean(per_dim["RNA", 1:10]), mean(per_dim["RNA", 11:20]))
  expect_gt(mean(per_dim["ATAC", 11:20]), mean(per_dim["ATAC", 1:10]))
  pdf(NULL)
  on.exit(grDevices::dev.off(), add = TRUE)
  xy <- plot(a)
  expect_equal(dim(xy), c(ncol(mo), 2))
  plot(m)
  expect_output(print(summary(m)), "981 cells x 219 features")

  f <- tempfile(fileext = ".safetensors")
  save_model(m, f)
  back <- load_model(f)
  expect_s3_class(back, "scdistill_multimodal")
  expect_equal(latent(back, mo), z, tolerance = 1e-6)
  sce <- add_latent(mo, m)
  expect_true(all(c("multimodal", "multimodal_RNA", "multimodal_ATAC") %in% SingleCellExperiment::reducedDimNames(sce)))
  expect_equal(back$info$kind, "multimodal")
  expect_true(is.finite(elbo(m, mo[, m$validation_cells])))
})

test_that("the joint latent space separates cell types that only ATAC tells apart", {
  skip_if_not_installed("SingleCellExperiment")
  # The last of 4 cell types has the first one's RNA and differs in its peaks only.
  sce <- sim_multiome(1200, 4, atac_only = 1)
  both <- fit_multimodal(sce, batch = "batch", max_epochs = 150, patience = 10, kl_warmup = 0.1, threads = 2,
                         progress = FALSE)
  rna_only <- fit_vae(sce, batch = "batch", regularized = TRUE, max_epochs = 150, patience = 10, kl_warmup = 0.1,
                      threads = 2, progress = FALSE)
  expect_s3_class(rna_only, "scdistill_multimodal")
  expect_equal(rna_only$info$config$modalities$name, "RNA")
  twins <- sce$cell_type %in% c("Group1", "Group4")
  score <- function(z) integration_metrics(z[twins, ], batch = sce$batch[twins], label = sce$cell_type[twins])
  joint <- score(latent(both))
  alone <- score(latent(rna_only))
  expect_gt(joint$ari_kmeans, 0.8)
  expect_lt(alone$ari_kmeans, 0.3)
  # Held-out cells: the joint model's bound is finite and close to its training cells'.
  val <- both$validation_cells
  expect_lt(elbo(both, sce[, val]), 1.2 * elbo(both, sce[, -val]))
})

test_that("attribution favours the modality that carries the signal", {
  skip_if_not_installed("SingleCellExperiment")
  # 3 cell types; with atac_only = 2 every type copies the first one's RNA and
  # only the peaks differ, with 0 both modalities differ.
  # Mean ATAC share over two simulated data sets of each kind: the gap is a
  # few hundredths (0.03-0.05 for seeds 11 to 13), the same size as the
  # spread of one data set's share between seeds.
  share_atac <- function(atac_only) {
    mean(vapply(c(11, 12), function(seed) {
      sce <- sim_multiome(800, 3, atac_only = atac_only, n_batches = 1, seed = seed)
      m <- fit_multimodal(sce, max_epochs = 60, early_stopping = FALSE, kl_warmup = 0.2, threads = 2, progress = FALSE)
      share <- attr(modality_attribution(m, sce), "share")
      expect_true(all(is.finite(share)))
      mean(share[, "ATAC"])
    }, 0))
  }
  only_atac <- share_atac(2)
  expect_gt(only_atac, 0.5)
  expect_gt(only_atac, share_atac(0) + 0.02)
})

test_that("lists, Seurat and MultiAssayExperiment inputs give the same model as a SingleCellExperiment", {
  skip_if_not_installed("SingleCellExperiment")
  sce <- sim_multiome(300, 2, atac_only = 0, seed = 3)
  fit <- function(x, ...) fit_multimodal(x, max_epochs = 3, early_stopping = FALSE, threads = 2, progress = FALSE, ...)
  z <- latent(fit(sce, batch = "batch"))
  lst <- list(RNA = SingleCellExperiment::counts(sce), ATAC = peaks_of(sce))
  expect_equal(latent(fit(lst, batch = sce$batch)), z)
  if (requireNamespace("SeuratObject", quietly = TRUE)) {
    so <- SeuratObject::CreateSeuratObject(counts = lst$RNA, assay = "RNA", meta.data = as.data.frame(SummarizedExperiment::colData(sce)))
    so[["ATAC"]] <- SeuratObject::CreateAssayObject(counts = lst$ATAC)
    expect_equal(latent(fit(so, batch = "batch")), z)
    so <- add_latent(so, fit(so, batch = "batch"))
    expect_true(all(c("multimodal", "multimodal_ATAC") %in% SeuratObject::Reductions(so)))
  }
  if (requireNamespace("MultiAssayExperiment", quietly = TRUE)) {
    mae <- MultiAssayExperiment::MultiAssayExperiment(
      experiments = list(RNA = lst$RNA, ATAC = lst$ATAC), colData = S4Vectors::DataFrame(SummarizedExperiment::colData(sce)))
    expect_equal(latent(fit(mae, batch = "batch")), z)
  }
})

test_that("bad multimodal input gives clear errors", {
  skip_if_not_installed("SingleCellExperiment")
  sce <- sim_multiome(300, 2, atac_only = 0, seed = 4)
  rna <- SingleCellExperiment::counts(sce)
  atac <- peaks_of(sce)
  go <- function(x, ...) fit_multimodal(x, max_epochs = 2, threads = 2, progress = FALSE, ...)
  expect_error(go(list(RNA = rna, ATAC = atac[, 1:250])),
               "0 cell\\(s\\) have RNA but no ATAC.*250 shared")
  expect_error(go(list(rna, atac)), "must be named")
  expect_error(go(SingleCellExperiment::SingleCellExperiment(list(counts = rna))), "no ATAC modality")
  bad <- atac
  bad@x[1] <- 0.5
  expect_error(go(list(RNA = rna, ATAC = bad)), "modality 'ATAC'.*integer")
  expect_error(go(sce, batch = "plate"), "'plate' is not a column")
  expect_error(go(sce, n_latent = c(RNA = 5)), "no value for ATAC")
  expect_error(go(sce, combine = "mean", n_latent = c(RNA = 5, ATAC = 8)), "same `n_latent`")
  expect_error(go(sce, ambient_modalities = "protein"), "'protein' not among the modalities")
  expect_error(go(rna), "needs paired modalities")
  m <- go(sce, batch = "batch")
  expect_error(modality_attribution(fit_vae(rna[, 1:200], max_epochs = 2, threads = 2), sce), "needs a multimodal")
  expect_error(sample_counts(m, sce), "not available for multimodal models")
  expect_error(differential_expression(m, sce, "cell_type", "Group1"), "not available for multimodal models")
  # New cells must carry the model's features.
  expect_error(latent(m, list(RNA = rna[-1, ], ATAC = atac)), "1 of")
})

test_that("the same seed gives the same multimodal model", {
  skip_if_not_installed("SingleCellExperiment")
  sce <- sim_multiome(300, 2, atac_only = 0, seed = 5)
  fit <- function(seed) fit_multimodal(sce, batch = "batch", max_epochs = 3, early_stopping = FALSE, seed = seed,
                                       threads = 2, progress = FALSE)
  expect_identical(latent(fit(0)), latent(fit(0)))
  expect_false(identical(latent(fit(0)), latent(fit(1))))
})
