# One model interface: every accessor honours or refuses each argument,
# and the defects found by trying every exported function with bad and
# unusual input stay fixed.

cellbench_small <- function(n_genes = 300) {
  sce <- example_cellbench()
  hvg <- highly_variable_genes(sce, n_hvg = n_genes, batch = "batch")
  sce[hvg$highly_variable, ]
}

test_that("every model kind has its own class and the shared generics dispatch on it", {
  x <- cellbench_small()
  vae <- fit_vae(x, batch = "batch", max_epochs = 3, threads = 2)
  d <- distill(x, batch = "batch", n_latent = 5, max_epochs_encoder = 3, max_epochs_decoder = 3, threads = 2,
               teacher = harmony_teacher(n_hvg = 200))
  mm <- fit_multimodal(example_multiome(), max_epochs = 3, threads = 2)
  expect_s3_class(vae, c("scdistill_vae", "scdistill_model"), exact = TRUE)
  expect_s3_class(d, c("scdistill_distill", "scdistill_model"), exact = TRUE)
  expect_s3_class(mm, c("scdistill_multimodal", "scdistill_model"), exact = TRUE)
  for (m in list(vae, d, mm)) {
    expect_identical(m$info$kind, sub("scdistill_", "", class(m)[1]))
    f <- tempfile(fileext = ".safetensors")
    save_model(m, f)
    expect_s3_class(load_model(f), class(m)[1])
  }
  expect_output(print(vae), "scdistill VAE")
  expect_output(print(d), "distilled model")
  expect_output(print(mm), "multimodal VAE")
})

test_that("a distilled model decodes each cell in its own batch when transform_batch is NULL", {
  x <- cellbench_small()
  d <- distill(x, batch = "batch", n_latent = 5, max_epochs_encoder = 5, max_epochs_decoder = 5, threads = 2,
               teacher = harmony_teacher(n_hvg = 200))
  own <- normalized_expression(d, x)
  b <- as.character(x$batch)
  per <- lapply(levels(x$batch), function(l) normalized_expression(d, x, transform_batch = l))
  names(per) <- levels(x$batch)
  # Each cell's column equals its own batch's decoding, not the average over batches.
  for (l in levels(x$batch)) expect_equal(own[, b == l], per[[l]][, b == l], tolerance = 1e-6)
  avg <- Reduce(`+`, per) / length(per)
  expect_gt(max(abs(own - avg)), 1e-4)
  # An explicit batch vector overrides the column.
  flipped <- normalized_expression(d, x, batch = rep(levels(x$batch)[1], ncol(x)))
  expect_equal(flipped, per[[1]], tolerance = 1e-6)
  # Arguments a distilled model cannot honour are refused, not ignored.
  expect_error(normalized_expression(d, x, n_samples = 3), "n_samples.*deterministic")
  expect_error(latent(d, x, give_mean = FALSE), "give_mean = FALSE.*deterministic")
  expect_error(normalized_expression(d, x, transform_batch = "nonexistent"), "'nonexistent' is not a batch")
  expect_error(elbo(d, x), "not available for distilled models")
  expect_error(sample_counts(d, x), "not available for distilled models")
})

test_that("multimodal and regularized models honour transform_batch, n_samples, seed and batch", {
  x <- cellbench_small(200)
  rv <- fit_vae(x, batch = "batch", regularized = TRUE, max_epochs = 5, threads = 2)
  expect_s3_class(rv, "scdistill_multimodal")
  # The batch keeps its column name: new cells find it there (it was stored as `ambient_covariates`).
  amb <- normalized_expression(rv, x, ambient = TRUE)
  expect_equal(dim(amb), c(nrow(x), ncol(x)))
  expect_true(is.finite(elbo(rv, x)))
  expect_error(normalized_expression(rv, x, transform_batch = "nonexistent"), "'nonexistent' is not a batch")
  p1 <- normalized_expression(rv, x, transform_batch = "p1", ambient = TRUE)
  p2 <- normalized_expression(rv, x, transform_batch = "p2", ambient = TRUE)
  expect_gt(max(abs(p1 - p2)), 1e-6) # the ambient term differs by batch
  both <- normalized_expression(rv, x, transform_batch = c("p1", "p2"), ambient = TRUE)
  expect_equal(both, (p1 + p2) / 2, tolerance = 1e-5)
  # Draws: the seed matters, and the same seed repeats.
  a <- normalized_expression(rv, x, n_samples = 3, seed = 1)
  expect_identical(a, normalized_expression(rv, x, n_samples = 3, seed = 1))
  expect_gt(max(abs(a - normalized_expression(rv, x, n_samples = 3, seed = 2))), 0)
  expect_gt(max(abs(a - normalized_expression(rv, x))), 0)
  # A batch given as one value per cell is named "batch"; new cells give it the same way.
  v <- as.character(x$batch)
  y <- x
  SummarizedExperiment::colData(y)$batch <- NULL
  rv2 <- fit_vae(y, batch = v, regularized = TRUE, max_epochs = 3, threads = 2)
  expect_identical(rv2$info$ambient$name, "batch")
  expect_error(normalized_expression(rv2, y, ambient = TRUE), "covariate `batch`")
  expect_equal(dim(normalized_expression(rv2, y, batch = v, ambient = TRUE)), c(nrow(x), ncol(x)))
  expect_error(sample_counts(rv, x), "not available for multimodal models")
})

test_that("add_latent() reuses the training latent space only for the training data itself", {
  x <- cellbench_small()
  vae <- fit_vae(x, batch = "batch", max_epochs = 5, threads = 2)
  same <- add_latent(x, vae)
  expect_identical(SingleCellExperiment::reducedDim(same, "scVI"), latent(vae))
  # Same barcodes, other counts (10x barcodes repeat across samples).
  other <- x
  m <- SingleCellExperiment::counts(other)
  SummarizedExperiment::assay(other, "counts", withDimnames = FALSE) <- m[, sample(ncol(m))]
  z <- SingleCellExperiment::reducedDim(add_latent(other, vae), "scVI")
  expect_equal(z, latent(vae, other), tolerance = 1e-6)
  expect_gt(max(abs(z - latent(vae))), 0.05)
})

test_that("threads beyond the machine's cores are capped with a message, not a hang", {
  x <- cellbench_small(100)
  expect_message(m <- fit_vae(x, batch = "batch", max_epochs = 1, threads = 1e6), "more than the .* core")
  expect_s3_class(m, "scdistill_vae")
  expect_message(run_pca(x, n_pcs = 5, n_hvg = 50, threads = 1e6), "more than the .* core")
})

test_that("a diverging loss stops training with an error that names the epoch, keeping finite weights", {
  x <- cellbench_small(100)
  err <- tryCatch(fit_vae(x, batch = "batch", lr = 1e6, max_epochs = 10, threads = 2), error = identity)
  expect_s3_class(err, "scdistill_diverged")
  expect_match(conditionMessage(err), "infinite or NaN at epoch [0-9]+.*smaller `lr`")
  m <- err$model
  expect_s3_class(m, "scdistill_vae")
  expect_true(all(is.finite(latent(m, x))))
  expect_lt(nrow(m$history), 10)
})

test_that("a model file inconsistent with its tensors is refused at load, naming the problem", {
  x <- cellbench_small(100)
  vae <- fit_vae(x, batch = "batch", max_epochs = 2, threads = 2)
  bytes <- vae$bytes
  n <- sum(as.integer(bytes[1:8]) * 256^(0:7))
  header <- rawToChar(bytes[9:(8 + n)])
  # Drop one gene from the description (the JSON header is stored as a string).
  gene <- vae$info$genes[1]
  edited <- sub(paste0('\\\\"', gene, '\\\\",'), "", header)
  expect_false(identical(edited, header))
  edited <- paste0(edited, strrep(" ", nchar(header) - nchar(edited)))
  bad <- c(bytes[1:8], charToRaw(edited), bytes[(9 + n):length(bytes)])
  f <- tempfile(fileext = ".safetensors")
  writeBin(bad, f)
  expect_error(load_model(f), "inconsistent.*genes")
  # A missing tensor is named.
  name <- "z_encoder.mean.bias"
  expect_true(grepl(name, header, fixed = TRUE))
  renamed <- sub(name, "z_encoder.mean.xxxx", header, fixed = TRUE)
  writeBin(c(bytes[1:8], charToRaw(renamed), bytes[(9 + n):length(bytes)]), f)
  expect_error(load_model(f), "lacks tensor\\(s\\) `z_encoder.mean.bias`")
})

test_that("files, paths, seeds and choices give messages that name the problem", {
  x <- cellbench_small(100)
  vae <- fit_vae(x, batch = "batch", max_epochs = 1, threads = 2, seed = 2^53)
  expect_identical(vae$info$train$seed, 2^53)
  expect_error(save_model(vae, file.path(tempdir(), "no-such-folder", "m.safetensors")), "folder .* does not exist")
  expect_error(save_model(vae, tempdir()), "is a folder")
  expect_error(load_model(tempdir()), "is a folder")
  expect_error(load_model(file.path(tempdir(), "absent.safetensors")), "no file")
  expect_error(fit_vae(x, batch = "batch", likelihood = "gamma"), "`likelihood` must be one of \"zinb\", \"nb\"")
  expect_error(normalized_expression(vae, x, transform_batch = "nope"), "`transform_batch` 'nope' is not a batch")
  emb <- matrix(rnorm(ncol(x) * 3), ncol(x))
  expect_error(run_harmony(emb, batch = c("a", "b", "c")), "3 values .* has 571 cells")
})

test_that("harmony_teacher() passes run_harmony()'s settings and refuses the ones that do not apply", {
  expect_error(harmony_teacher(reduction = "PCA"), "`reduction`.*own PCA")
  expect_error(harmony_teacher(nonsense = 1), "`nonsense`")
  x <- cellbench_small(300)
  a <- distill(x, batch = "batch", n_latent = 5, max_epochs_encoder = 2, max_epochs_decoder = 1, threads = 2,
               teacher = harmony_teacher(n_hvg = 200, seed = 3))
  b <- distill(x, batch = "batch", n_latent = 5, max_epochs_encoder = 2, max_epochs_decoder = 1, threads = 2,
               teacher = harmony_teacher(n_hvg = 200, seed = 4))
  expect_gt(max(abs(teacher_latent(a) - teacher_latent(b))), 0)
})

test_that("train_params() is shared by the models and cannot be given twice", {
  x <- cellbench_small(100)
  tp <- train_params(max_epochs = 2, lr = 5e-4, seed = 9, threads = 2)
  expect_output(print(tp), "lr")
  vae <- fit_vae(x, batch = "batch", train = tp)
  expect_identical(nrow(vae$history), 2L)
  expect_equal(vae$info$train$lr, 5e-4)
  expect_equal(vae$info$train$seed, 9)
  d <- distill(x, batch = "batch", n_latent = 5, teacher = harmony_teacher(n_hvg = 80), train = tp)
  expect_identical(d$info$train_encoder$max_epochs, 2L)
  expect_identical(d$info$train_decoder$max_epochs, 2L)
  expect_error(fit_vae(x, batch = "batch", lr = 1e-3, train = tp), "`lr` is given both")
  expect_error(distill(x, batch = "batch", train = train_params(kl_warmup = 0.3)), "kl_warmup.*does not apply")
  expect_error(fit_vae(x, train = list(lr = 1)), "train_params\\(\\)")
})

test_that("scaled_lr() raises the learning rate with the minibatch, by the linear or square-root rule", {
  expect_equal(scaled_lr(128), 1e-3)
  expect_equal(scaled_lr(512), 4e-3)
  expect_equal(scaled_lr(512, rule = "sqrt"), 2e-3)
  expect_equal(scaled_lr(64, base_lr = 4e-3, base_batch_size = 256), 1e-3)
  expect_error(scaled_lr(1000.5), "`batch_size`")
  expect_error(scaled_lr(512, rule = "cube"), "`rule` must be one of")
  expect_error(scaled_lr(512, base_lr = -1), "`base_lr`")
  tp <- train_params(batch_size = 256, lr = scaled_lr(256), max_epochs = 1, threads = 2)
  vae <- fit_vae(cellbench_small(100), batch = "batch", train = tp)
  expect_equal(vae$info$train$lr, 2e-3)
  expect_identical(vae$info$train$batch_size, 256L)
})

test_that("an interrupt stops a script but returns the model interactively", {
  skip_on_os("windows")
  rscript <- file.path(R.home("bin"), "Rscript")
  out <- tempfile()
  script <- tempfile(fileext = ".R")
  writeLines(c(
    "suppressPackageStartupMessages(library(scdistill))",
    "sce <- example_cellbench()",
    "pid <- Sys.getpid()",
    "system(sprintf('(sleep 12; kill -INT %d) >/dev/null 2>&1 &', pid))",
    "res <- tryCatch(fit_vae(sce, batch = 'batch', max_epochs = 400, early_stopping = FALSE, threads = 1),",
    "  scdistill_interrupted = function(e) class(e$model)[1], interrupt = function(e) 'plain interrupt')",
    sprintf("writeLines(as.character(res), '%s')", out)), script)
  system2(rscript, script, stdout = FALSE, stderr = FALSE, timeout = 120)
  expect_true(file.exists(out))
  expect_identical(readLines(out), "scdistill_vae")
})

test_that("plot() of integration metrics draws every score, kBET and Leiden included", {
  sce <- run_pca(example_cellbench(), n_pcs = 10, n_hvg = 500, batch = "batch", threads = 2)
  m <- integration_metrics(sce, batch = "batch", label = "cell_line", reduction = "PCA", threads = 2)
  drawn <- unlist(scdistill:::metric_groups(m))
  expect_true(all(c("kbet", "nmi_leiden", "ari_leiden", "ilisi", "total") %in% drawn))
  expect_setequal(drawn, intersect(names(m), drawn))
  pdf(NULL)
  on.exit(dev.off())
  expect_identical(plot(m), m)
})

test_that("harmony_teacher() takes run_pca()'s `method`; `pca_method` still works with a warning", {
  expect_identical(harmony_teacher(method = "pearson_residuals")$method, "pearson_residuals")
  expect_warning(t <- harmony_teacher(pca_method = "standard"), "now `method`")
  expect_identical(t[c("method", "scale_factor")], list(method = "log", scale_factor = 1e6))
  # The default: log2 counts per 10^4 + 1, named in what the teacher prints.
  expect_identical(harmony_teacher()[c("method", "scale_factor")], list(method = "log", scale_factor = 1e4))
  expect_output(print(harmony_teacher()), "30 PCs \\(log2 CP10k\\)")
  expect_output(print(harmony_teacher(method = "log2cpm")), "\\(log2 CPM\\)")
  expect_output(print(harmony_teacher(scale_factor = 5000)), "\\(log2 per 5,000\\)")
})

test_that("a model trained without validation cells saves and loads (its NaN history survives)", {
  x <- cellbench_small(100)
  m <- fit_vae(x, batch = "batch", max_epochs = 2, validation_fraction = 0, threads = 2)
  expect_true(all(is.nan(m$history$validation_elbo)))
  f <- tempfile(fileext = ".safetensors")
  save_model(m, f)
  back <- load_model(f)
  expect_true(all(is.nan(back$history$validation_elbo)))
  expect_equal(back$history$train_loss, m$history$train_loss)
})
