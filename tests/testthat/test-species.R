# align_species(): the scSpecies-style cross-species model and its analyses.

two_species <- function(n = 600, seed = 2, ...) {
  sim <- simulate_counts(n_cells = n, n_genes = 300, n_groups = 4, species = list(n_cells = n, n_genes = 280, ...),
                         seed = seed, threads = 2)
  target <- S4Vectors::metadata(sim)$species2
  hom <- data.frame(target = rownames(target), context = SummarizedExperiment::rowData(target)$homolog)
  list(context = sim, target = target, homologs = hom[!is.na(hom$context), ])
}

fit_two <- function(d, ...) {
  align_species(d$context, d$target, d$homologs, batch_context = "batch", batch_target = "batch", threads = 2,
                progress = FALSE, verbose = FALSE, ...)
}

test_that("labels carry across species, the latent spaces are shared, and one file holds both models", {
  skip_if_not_installed("SingleCellExperiment")
  d <- two_species(only_first = 1)
  fit <- fit_two(d) # the default epochs for 600 cells: 400, warm-up 200
  expect_s3_class(fit, "scdistill_species")
  expect_equal(nrow(fit$history), 800)
  expect_output(print(fit), "homologous genes")
  # Group4 exists only in the context: the target has three types.
  expect_setequal(levels(droplevels(d$target$cell_type)), c("Group1", "Group2", "Group3"))

  tgt <- transfer_labels(fit, d$target)
  expect_true(all(c("scSpecies_label", "scSpecies_confidence", "scSpecies_similarity") %in%
                    names(SummarizedExperiment::colData(tgt))))
  acc <- label_transfer_accuracy(tgt$scSpecies_label, tgt$cell_type)
  expect_gt(acc$balanced_accuracy, 0.9)
  expect_equal(unname(rowSums(acc$confusion)), rep(100, 3))
  expect_true(all(tgt$scSpecies_confidence > 0 & tgt$scSpecies_confidence <= 1))

  # The species of new cells is read from their genes; both land in one space:
  # a target cell's nearest context cell is of its own type.
  zc <- latent(fit, d$context)
  zt <- latent(fit, d$target)
  expect_equal(dim(zt), c(ncol(d$target), 10))
  expect_identical(zc, fit$latent$context)
  d2 <- as.matrix(dist(rbind(zt, zc)))[seq_len(nrow(zt)), nrow(zt) + seq_len(nrow(zc))]
  nearest <- as.character(d$context$cell_type)[apply(d2, 1, which.min)]
  expect_gt(mean(nearest == as.character(d$target$cell_type)), 0.85)
  sce <- add_latent(d$target, fit)
  expect_true("scSpecies" %in% SingleCellExperiment::reducedDimNames(sce))
  # Decoded expression of the target's own genes, or of a few of them.
  rho <- normalized_expression(fit, d$target[, 1:50])
  expect_equal(dimnames(rho), list(rownames(d$target), colnames(d$target)[1:50]))
  expect_equal(unname(colSums(rho)), rep(1, 50), tolerance = 1e-5)
  few <- rownames(d$target)[c(3, 1)]
  expect_equal(normalized_expression(fit, d$target[, 1:50], genes = few), rho[few, ])

  # Similarity: each target type is closest to its own context type.
  # (60 target x 20 context cells left Group3 within 0.6 of Group4 on one
  # machine: the modal difference of a small sample is noisy.)
  s <- species_similarity(fit, d$target, labels = "cell_type", max_target = 200, max_context = 100)
  expect_s3_class(s, "scdistill_species_similarity")
  expect_equal(colnames(s)[apply(unclass(s), 1, which.max)], rownames(s))

  # Fold changes against the simulator's truth, on the shared types.
  fc <- homolog_fold_changes(fit, d$target, labels = "cell_type", n_samples = 3000)
  truth <- S4Vectors::metadata(d$target)$homolog_lfc
  expect_setequal(names(fc), colnames(truth))
  est <- unlist(lapply(names(fc), function(ty) fc[[ty]][rownames(truth), "lfc"]))
  tru <- as.vector(truth[, names(fc)])
  # On 600 + 600 cells r spans 0.59-0.76 over data and model seeds (0.59-0.62
  # on this data set); the 0.9 target is the benchmark's, at 5,000 cells and up.
  expect_gt(cor(est, tru), 0.5)
  expect_true(all(c("lfc", "p", "lfc_rand", "p_rand", "context_gene") %in% names(fc[[1]])))

  f <- tempfile(fileext = ".safetensors")
  save_model(fit, f)
  back <- load_model(f, device = "cpu")
  expect_s3_class(back, "scdistill_species")
  expect_equal(latent(back, d$target), zt)
  expect_equal(transfer_labels(back, d$target)$scSpecies_label, tgt$scSpecies_label)
  expect_error(latent(back, toy_dgc()), "cannot tell which species")
})

test_that("the same seed gives the same model", {
  d <- two_species(n = 300, seed = 3)
  a <- fit_two(d, max_epochs = 3, seed = 5)
  b <- fit_two(d, max_epochs = 3, seed = 5)
  expect_identical(latent(a, d$target), latent(b, d$target))
  expect_identical(latent(a, d$context), latent(b, d$context))
})

test_that("bad input gives errors and warnings that name the problem", {
  d <- two_species(n = 200, seed = 4)
  expect_error(align_species(d$context, d$target, data.frame(target = "x", context = "y"), verbose = FALSE),
               "no homologous genes in common: of 1 homolog pairs, 0 name a gene of the target")
  swapped <- data.frame(a = d$homologs$context, b = d$homologs$target)
  expect_error(align_species(d$context, d$target, swapped, verbose = FALSE), "columns look swapped")
  expect_error(align_species(d$context, d$target, "genes"), "must be a data.frame of gene pairs")
  expect_error(align_species(d$context, d$target, d$homologs, context_labels = "tissue"),
               "'tissue' is not a column of the cell metadata")
  one <- d$context
  one$cell_type <- "T cell"
  expect_error(align_species(one, d$target, d$homologs, verbose = FALSE), "single cell type \\('T cell'\\)")
  gap <- d$context
  gap$cell_type[3] <- NA
  expect_error(align_species(gap, d$target, d$homologs, verbose = FALSE), "missing value")
  expect_message(expect_warning(
    align_species(d$context, d$target, rbind(d$homologs[1:50, ], data.frame(target = "nope", context = "Gene1")),
                  max_epochs = 1, threads = 2, progress = FALSE),
    "only about 50 one-to-one homologous genes"), "50 of 51 pairs")
  zero <- d$target
  SummarizedExperiment::assay(zero, "counts")[d$homologs$target, ] <- 0
  expect_error(align_species(d$context, zero, d$homologs, verbose = FALSE),
               "no target cell has counts on the homologous genes|no cells|empty")
  expect_error(transfer_labels(fit_vae(d$context, max_epochs = 1, threads = 2, progress = FALSE), d$target),
               "must be a cross-species model")
  expect_error(label_transfer_accuracy(c("a", "b"), "a"), "2 labels but `truth` has 1")
  acc <- label_transfer_accuracy(c("a", "a", "b", "b"), c("a", "b", "b", "c"))
  expect_equal(acc$balanced_accuracy, mean(c(1, 0.5)))
  expect_equal(acc$n_cells, 3)
})
