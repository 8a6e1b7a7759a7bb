# fit_vae() and the model accessors, on the shipped CellBench example
# (571 cells of 5 cell lines on 3 plates), on its 300 most variable genes.

vae_data <- local({
  cache <- NULL
  function() {
    if (is.null(cache)) {
      sce <- example_cellbench()
      hvg <- highly_variable_genes(sce, n_hvg = 300, batch = "batch", threads = 2)
      cache <<- sce[hvg$highly_variable, ]
    }
    cache
  }
})

fit_small <- function(..., max_epochs = 40) {
  fit_vae(vae_data(), batch = "batch", max_epochs = max_epochs, threads = 2, device = "cpu", progress = FALSE, ...)
}

test_that("the latent space separates cell lines and mixes plates", {
  sce <- vae_data()
  m <- fit_small(max_epochs = 120)
  expect_s3_class(m, "scdistill_model")
  z <- latent(m)
  expect_equal(dim(z), c(ncol(sce), 10))
  expect_identical(rownames(z), colnames(sce))
  expect_equal(nrow(m$history), 120)
  # Training lowered the held-out loss.
  expect_lt(tail(m$history$validation_elbo, 1), 0.8 * m$history$validation_elbo[1])
  s <- integration_metrics(z, batch = sce$batch, label = sce$cell_line, threads = 2)
  expect_gt(s$ari_kmeans, 0.9)
  expect_gt(s$clisi, 0.95)
  out <- capture.output(print(m))
  expect_match(out[1], "300 genes -> 10 latent dimensions")
  # Early stopping keeps the best validation ELBO once the KL weight is 1,
  # and summary() says which epoch that was.
  h <- m$history
  best <- m$info$best_epoch
  expect_lte(h$validation_elbo[best], min(h$validation_elbo[h$kl_weight >= 1]))
  expect_match(paste(capture.output(summary(m)), collapse = "\n"), sprintf("kept epoch %d:", best))
})

test_that("the same seed gives the same model; another seed another", {
  a <- fit_small(max_epochs = 5, seed = 3)
  b <- fit_small(max_epochs = 5, seed = 3)
  c <- fit_small(max_epochs = 5, seed = 4)
  expect_identical(latent(a), latent(b))
  expect_false(isTRUE(all.equal(latent(a), latent(c))))
})

test_that("mixed precision is used where the CPU has bf16, reaches f32's held-out ELBO, and can be turned off", {
  has_bf16 <- any(grepl("\\bavx512_bf16\\b", tryCatch(readLines("/proc/cpuinfo", warn = FALSE), error = function(e) "")))
  mixed <- fit_small(max_epochs = 40, seed = 2)
  old <- options(scdistill.bf16 = FALSE)
  plain <- fit_small(max_epochs = 40, seed = 2)
  options(old)
  expect_false(plain$info$train$bf16)
  expect_match(paste(capture.output(summary(plain)), collapse = " "), "bf16")
  if (!has_bf16) skip("this CPU has no native bf16: both models trained in f32")
  expect_true(mixed$info$train$bf16)
  expect_false(isTRUE(all.equal(latent(mixed), latent(plain))))
  last <- function(m) tail(m$history$validation_elbo, 1)
  expect_lt(abs(last(mixed) / last(plain) - 1), 0.01)
  # Inference is f32: the fitted model (bf16 still switched on for
  # training) and its reloaded copy (never switched on) encode alike.
  f <- tempfile(fileext = ".safetensors")
  save_model(mixed, f)
  expect_identical(latent(mixed, vae_data()), latent(load_model(f), vae_data()))
  unlink(f)
})

test_that("normalized expression sums to the library size and decodes to other batches", {
  sce <- vae_data()
  m <- fit_small(max_epochs = 20)
  own <- normalized_expression(m, sce, library_size = 1e4)
  expect_equal(dim(own), dim(sce))
  expect_equal(unname(colSums(own)), rep(1e4, ncol(sce)), tolerance = 1e-4)
  p1 <- normalized_expression(m, sce, transform_batch = "p1")
  p2 <- normalized_expression(m, sce, transform_batch = "p2")
  both <- normalized_expression(m, sce, transform_batch = c("p1", "p2"))
  expect_false(isTRUE(all.equal(p1, p2)))
  expect_equal(both, (p1 + p2) / 2, tolerance = 1e-5)
  # Cells already in p1 decode the same with and without transform_batch = "p1".
  in_p1 <- sce$batch == "p1"
  expect_equal(p1[, in_p1], own[, in_p1] / 1e4, tolerance = 1e-5)
  expect_error(normalized_expression(m, sce, transform_batch = "p9"), "not a batch of the model.*'p1', 'p2', 'p3'")
  expect_equal(normalized_expression(m, sce, log1p = TRUE, library_size = 1e4), log1p(own))
})

test_that("held-out ELBO, reconstruction error and posterior predictive counts", {
  sce <- vae_data()
  m <- fit_small(likelihood = "nb", max_epochs = 40)
  held <- sce[, m$validation_cells]
  e <- elbo(m, held)
  r <- reconstruction_error(m, held)
  expect_true(is.finite(e) && r < e)
  # Counts shuffled across genes fit the model worse.
  shuffled <- held
  SummarizedExperiment::assay(shuffled, "counts", withDimnames = FALSE) <-
    SummarizedExperiment::assay(held, "counts")[sample(nrow(held)), ]
  expect_gt(elbo(m, shuffled), e)
  x <- sample_counts(m, sce, seed = 1)
  expect_s4_class(x, "dgCMatrix")
  expect_identical(dimnames(x), dimnames(sce))
  ratio <- sum(x) / sum(SingleCellExperiment::counts(sce))
  expect_gt(ratio, 0.9)
  expect_lt(ratio, 1.1)
  draws <- sample_counts(m, sce[, 1:20], n_samples = 2, seed = 1)
  expect_length(draws, 2)
  expect_false(identical(draws[[1]], draws[[2]]))
})

test_that("models round-trip through save_model()/load_model() and saveRDS()", {
  sce <- vae_data()
  m <- fit_small(max_epochs = 5, library_size = "learned", dispersion = "gene-batch")
  f <- tempfile(fileext = ".safetensors")
  save_model(m, f)
  expect_error(save_model(m, f), "exists")
  back <- load_model(f, device = "cpu")
  expect_equal(latent(back, sce), latent(m))
  expect_equal(back$history, m$history)
  expect_equal(normalized_expression(back, sce[, 1:30], transform_batch = "p2"),
               normalized_expression(m, sce[, 1:30], transform_batch = "p2"))
  rds <- tempfile(fileext = ".rds")
  saveRDS(m, rds)
  again <- readRDS(rds)
  expect_equal(latent(again, sce), latent(m))
  # The file is plain safetensors: an 8-byte header length, then JSON naming the format.
  bytes <- readBin(f, "raw", 200)
  expect_match(rawToChar(bytes[9:200][bytes[9:200] != as.raw(0)]), "\"dtype\"|scdistill-model")
  junk <- tempfile()
  writeBin(charToRaw("this is not a model"), junk)
  expect_error(load_model(junk), "not a scdistill model file")
  expect_error(load_model(tempfile()), "no file")
})

test_that("new cells are matched by gene name; bad input is refused clearly", {
  sce <- vae_data()
  m <- fit_small(max_epochs = 3)
  rev_sce <- sce[rev(seq_len(nrow(sce))), ]
  expect_equal(latent(m, rev_sce), latent(m, sce))
  expect_error(latent(m, sce[-(1:7), ]), "7 of the model's 300 genes are missing")
  expect_error(fit_vae(sce, batch = "plate", progress = FALSE), "not a column of the cell metadata")
  bad <- SingleCellExperiment::counts(sce)
  bad[1, 1] <- -1
  expect_error(fit_vae(bad, progress = FALSE), "negative")
  expect_error(fit_small(likelihood = "gaussian"), "`likelihood` must be one of")
  expect_error(fit_small(kl_warmup = 2), "kl_warmup")
  expect_error(latent("model"), "must be a scdistill model")
  expect_error(elbo(m, sce, batch = rep("p7", ncol(sce))), "'p7' was not seen in training")
})

test_that("covariates reach the decoder and are required for new cells", {
  sce <- vae_data()
  sce$depth <- log10(Matrix::colSums(SingleCellExperiment::counts(sce)))
  m <- fit_vae(sce, batch = "batch", categorical_covariates = "cell_line", continuous_covariates = "depth",
               max_epochs = 3, threads = 2, progress = FALSE)
  expect_equal(m$covariates$categorical, "cell_line")
  expect_true(is.finite(elbo(m, sce)))
  plain <- sce
  plain$depth <- NULL
  expect_error(elbo(m, plain), "covariate `depth`")
  expect_error(fit_vae(sce, continuous_covariates = "cell_line", max_epochs = 1, progress = FALSE), "not numeric")
})

test_that("add_latent() stores the latent space where Bioconductor users look", {
  sce <- vae_data()
  m <- fit_small(max_epochs = 3)
  sce <- add_latent(sce, m)
  expect_true("scVI" %in% SingleCellExperiment::reducedDimNames(sce))
  expect_equal(SingleCellExperiment::reducedDim(sce, "scVI"), latent(m))
  skip_if_not_installed("SeuratObject")
  so <- suppressWarnings(SeuratObject::CreateSeuratObject(counts = SingleCellExperiment::counts(sce)))
  so <- add_latent(so, m, "scvi")
  emb <- SeuratObject::Embeddings(so, "scvi")
  expect_equal(unname(emb), unname(latent(m)))
  expect_identical(rownames(emb), colnames(sce))
})

test_that("plot() draws the training history", {
  m <- fit_small(max_epochs = 5)
  f <- tempfile(fileext = ".png")
  grDevices::png(f)
  expect_invisible(plot(m))
  plot(m, which = "kl")
  grDevices::dev.off()
  expect_gt(file.size(f), 1000)
})
