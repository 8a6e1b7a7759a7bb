# map_query(), fit_labels(), predict_labels(), confusion_matrix().

mapping_data <- local({
  cache <- NULL
  function() {
    if (is.null(cache)) {
      sim <- simulate_counts(n_cells = 1200, n_genes = 300, n_batches = 3, n_groups = 4, seed = 3)
      types <- levels(factor(sim$cell_type))
      ref <- sim[, sim$batch != "Batch3" & sim$cell_type != types[4]]
      query <- sim[, sim$batch == "Batch3"]
      model <- fit_vae(ref, batch = "batch", max_epochs = 40, threads = 2, progress = FALSE)
      cache <<- list(sim = sim, ref = ref, query = query, model = model, novel = types[4])
    }
    cache
  }
})

test_that("map_query() adds the query's batches and leaves the reference latent space bit-identical", {
  d <- mapping_data()
  mapped <- map_query(d$model, d$query, batch = "batch", max_epochs = 30, threads = 2, progress = FALSE)
  expect_s3_class(mapped, "scdistill_vae")
  expect_equal(unlist(mapped$info$batch_levels), c("Batch1", "Batch2", "Batch3"))
  expect_equal(unlist(mapped$info$query_batches), "Batch3")
  expect_identical(latent(mapped, d$ref), latent(d$model, d$ref))
  expect_identical(rownames(latent(mapped)), colnames(d$query))
  expect_equal(nrow(mapped$reference_latent), ncol(d$ref))
  # The query decodes under its own batch, and as a reference batch.
  own <- normalized_expression(mapped, d$query, transform_batch = "Batch3")
  as_ref <- normalized_expression(mapped, d$query, transform_batch = "Batch1")
  expect_equal(dim(own), c(300L, ncol(d$query)))
  expect_gt(max(abs(own - as_ref)), 1e-4)
  expect_output(print(mapped), "query batch Batch3")
  # Saved and loaded, the mapped model keeps its batches.
  f <- tempfile(fileext = ".safetensors")
  save_model(mapped, f)
  expect_equal(unlist(load_model(f)$info$batch_levels), c("Batch1", "Batch2", "Batch3"))
})

test_that("map_query() refuses a known batch, a query without its batch, too many missing genes and other models", {
  d <- mapping_data()
  expect_error(map_query(d$model, d$ref, batch = "batch", max_epochs = 2, threads = 2, progress = FALSE),
               "query batch 'Batch1' is also a batch of the reference")
  q <- SingleCellExperiment::counts(d$query)
  expect_error(map_query(d$model, q, max_epochs = 2, threads = 2, progress = FALSE), "give the query's batch")
  expect_error(map_query(d$model, d$query[1:200, ], batch = "batch", max_epochs = 2, threads = 2, progress = FALSE),
               "lacks 100 of the model's 300 genes")
  expect_warning(m <- map_query(d$model, d$query[1:290, ], batch = "batch", max_epochs = 2, threads = 2,
                                progress = FALSE),
                 "lacks 10 of the model's 300 genes .* read as zeros")
  expect_equal(nrow(latent(m)), ncol(d$query))
  expect_error(map_query(list(), d$query), "must be a scdistill model")
})

test_that("map_query() reads a Seurat query, its batch from meta.data", {
  skip_if_not_installed("SeuratObject")
  d <- mapping_data()
  seu <- suppressWarnings(SeuratObject::CreateSeuratObject(SingleCellExperiment::counts(d$query)))
  seu$batch <- as.character(d$query$batch)
  mapped <- map_query(d$model, seu, max_epochs = 2, threads = 2, progress = FALSE)
  expect_equal(unlist(mapped$info$query_batches), "Batch3")
  seu <- add_latent(seu, mapped)
  expect_equal(dim(SeuratObject::Embeddings(seu, "scVI")), c(ncol(d$query), 10L))
})

test_that("a distilled model maps by its batch embedding; its latent space does not move", {
  d <- mapping_data()
  dm <- distill(d$ref, batch = "batch", max_epochs_encoder = 10, max_epochs_decoder = 10, threads = 2,
                progress = FALSE)
  mapped <- map_query(dm, d$query, batch = "batch", max_epochs = 10, threads = 2, progress = FALSE)
  expect_s3_class(mapped, "scdistill_distill")
  expect_identical(latent(mapped, d$ref), latent(dm, d$ref))
  expect_identical(normalized_expression(mapped, d$ref), normalized_expression(dm, d$ref))
})

test_that("a multimodal model maps every key made from the batch; its reference latent space does not move", {
  d <- mapping_data()
  mm <- fit_vae(d$ref, batch = "batch", regularized = TRUE, max_epochs = 10, threads = 2, progress = FALSE)
  mapped <- map_query(mm, d$query, batch = "batch", max_epochs = 10, threads = 2, progress = FALSE)
  expect_s3_class(mapped, "scdistill_multimodal")
  for (key in c("ambient", "dispersion", "library")) {
    expect_equal(unlist(mapped$info[[key]]$levels), c("Batch1", "Batch2", "Batch3"))
  }
  expect_identical(latent(mapped, d$ref), latent(mm, d$ref))
  expect_equal(dim(latent(mapped)), c(ncol(d$query), ncol(latent(mm))))
  own <- normalized_expression(mapped, d$query, transform_batch = "Batch3")
  expect_equal(dim(own), c(300L, ncol(d$query)))
  expect_error(map_query(mm, d$ref, batch = "batch", max_epochs = 2, threads = 2, progress = FALSE),
               "query batch 'Batch1' is also a batch of the reference")  # Labels on a multimodal model's latent space, carried to its mapped query.
  lab <- fit_labels(mm, d$ref, labels = "cell_type", max_epochs = 30, threads = 2, progress = FALSE)
  pred <- predict_labels(lab, d$query, model = mapped)
  known <- d$query$cell_type != d$novel
  expect_gt(mean(pred$predicted_best[known] == d$query$cell_type[known]), 0.8)
})

test_that("labels fitted on the reference carry to the mapped query; an unseen type lies farther away", {
  d <- mapping_data()
  y <- as.character(d$ref$cell_type)
  y[seq(2, length(y), 2)] <- "?"
  lab <- fit_labels(d$model, d$ref, labels = y, unlabeled = "?", threads = 2, progress = FALSE)
  expect_s3_class(lab, "scdistill_labels")
  expect_equal(lab$info$n_labelled, sum(y != "?"))
  mapped <- map_query(d$model, d$query, batch = "batch", max_epochs = 30, threads = 2, progress = FALSE)
  out <- predict_labels(lab, d$query, model = mapped)
  expect_s4_class(out, "SingleCellExperiment")
  known <- d$query$cell_type != d$novel
  cm <- confusion_matrix(out$predicted_best[known], d$query$cell_type[known])
  expect_gt(attr(cm, "balanced_accuracy"), 0.9)
  expect_gt(median(out$predicted_distance[!known]), 1.3 * median(out$predicted_distance[known]))
  df <- predict_labels(lab, SingleCellExperiment::counts(d$query), model = mapped, distance_quantile = 1)
  expect_equal(df$best, out$predicted_best)
  expect_equal(dim(attr(df, "probabilities")), c(ncol(d$query), 3L))
  expect_equal(unname(rowSums(attr(df, "probabilities"))), rep(1, ncol(d$query)), tolerance = 1e-5)
  expect_true(all(df$label[df$confidence < 0.5] == "unknown"))
  expect_error(fit_labels(d$model, d$ref, labels = rep("a", ncol(d$ref))), "one class only")
  expect_error(fit_labels(d$model, d$ref, labels = rep(NA, ncol(d$ref))), "every cell is unlabelled")
  expect_error(fit_labels(d$model, d$ref, labels = "nope"), "'nope' is not a column")
  expect_error(predict_labels(list(), d$query), "must come from fit_labels")
  # The mapping drawn: reference cells first, then the query's.
  grDevices::pdf(NULL)
  on.exit(grDevices::dev.off(), add = TRUE)
  u <- plot_mapping(mapped, out, reference_labels = d$ref$cell_type)
  expect_equal(dim(u), c(ncol(d$ref) + ncol(d$query), 2L))
  expect_error(plot_mapping(d$model), "not a mapped model")
  expect_error(plot_mapping(mapped, df[1:5, ]), "has 5 cells where the query has")
  expect_error(plot_mapping(mapped, out, reference_labels = 1:3), "`reference_labels` has 3 values")
  # Seurat in, Seurat out: the predictions in meta.data.
  skip_if_not_installed("SeuratObject")
  seu <- suppressWarnings(SeuratObject::CreateSeuratObject(SingleCellExperiment::counts(d$query)))
  seu <- predict_labels(lab, seu, model = mapped)
  expect_s4_class(seu, "Seurat")
  expect_equal(unname(seu$predicted_best), out$predicted_best)
})

test_that("confusion_matrix() counts and gives the balanced accuracy", {
  cm <- confusion_matrix(c("a", "a", "b", "unknown"), c("a", "b", "b", "b"))
  expect_equal(cm["b", "b"], 1)
  expect_equal(attr(cm, "balanced_accuracy"), (1 + 1 / 3) / 2)
  expect_error(confusion_matrix("a", c("a", "b")), "1 labels and `truth` 2")
})
