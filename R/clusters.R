# Soft k-means clustering of a latent space (DiffBio's clustering stage).

#' Soft k-means clustering
#'
#' Clusters cells in a latent space (a PCA, Harmony or model latent space)
#' with learnable centroids and soft assignments, as DiffBio's soft k-means
#' stage: cell i belongs to cluster k with probability
#' softmax_k(log pi_k - ||z_i - mu_k||^2 / T), and the centroids mu_k and
#' weights pi_k are trained (Adam) on soft k-means' compactness objective,
#' -log sum_k pi_k exp(-||z_i - mu_k||^2 / T) per cell; by default each
#' cluster has its own `T` (`per_cluster`). Distances are measured in the
#' metric of the clusters' shared covariance (`covariance = "shared"`):
#' ||z_i - mu_k||^2 is (z_i - mu_k)' M (z_i - mu_k), with M the inverse of the
#' pooled within-cluster covariance of the initial clusters, scaled to its
#' mean variance per dimension, so the mixture is a Gaussian mixture with one
#' covariance matrix for all clusters (as linear discriminant analysis).
#' Cell types in a PCA or latent space share elongated shapes (sequencing
#' depth, cell cycle) that Euclidean distances cut across: on 12 weakly
#' separated simulated types, Euclidean soft k-means reached an ARI of
#' 0.43-0.55 against 0.88 with the shared covariance. The centroids start at the means of Leiden
#' clusters of the 15-nearest-neighbour graph: at `resolution` when
#' `n_clusters` is `NULL` (as Seurat's `FindClusters()` and `bluster` do,
#' so the number of clusters comes from the data), else at the resolution
#' that gives `n_clusters` clusters (k-means when none does). A graph start
#' keeps cell types of unequal size apart, where k-means splits large ones
#' and merges small ones.
#'
#' With `labels`, the clustering is supervised: one centroid per label,
#' started at the labelled cells' mean, trained so that each labelled cell's
#' own label is its most probable cluster (cross-entropy); unlabelled cells
#' still pull the centroids through the compactness loss. The result is a
#' nearest-centroid cell-type classifier, and [predict()] labels new cells.
#'
#' @param x A `SingleCellExperiment`, a `Seurat` object, or a numeric cells x
#'   dimensions matrix.
#' @param reduction For containers: the embedding to cluster (e.g. `"PCA"`,
#'   `"HARMONY"`, or the latent space written by [add_latent()]).
#' @param n_clusters Number of clusters; `NULL`: as many as Leiden finds at
#'   `resolution`.
#' @param temperature T, the softness of the assignments; `NULL`: twice the
#'   pooled within-cluster variance per dimension of the initial clusters
#'   (the assignments are then a Gaussian mixture's posteriors).
#' @param per_cluster With `temperature = NULL`, give each cluster its own
#'   temperature, twice its initial cells' variance per dimension (shrunk
#'   toward the pooled one, within a factor 4 of it): a Gaussian mixture
#'   with one spherical variance per cluster, where cell types of different
#'   spread keep their own boundaries (the logits become
#'   `log pi_k - ||z_i - mu_k||^2 / T_k - (d / 2) log(T_k / T)` in `d`
#'   dimensions). `FALSE`: one shared `T`, soft k-means proper.
#' @param covariance `"shared"`: distances in the metric of the clusters'
#'   pooled covariance (estimated once, from the initial clusters; shrunk
#'   toward a sphere on few cells); `"spherical"`: Euclidean distances (soft
#'   k-means proper, and clusterings fitted before this option).
#' @param labels Known labels (a column of the cell metadata or one value per
#'   cell) for a supervised clustering; `NA` (and `unlabeled` values) mark
#'   cells without a label.
#' @param unlabeled Values of `labels` that mean "no label".
#' @param resolution Leiden resolution when `n_clusters` is `NULL`.
#' @param name Name of the cluster column written back, and prefix of its
#'   companions (see Value).
#' @param max_epochs,batch_size,lr,early_stopping,patience,validation_fraction
#'   Training of the centroids.
#' @param seed Seed of k-means, Leiden and training; the same seed gives the
#'   same clusters.
#' @param threads Threads.
#' @param progress Show a progress bar.
#' @return A `SingleCellExperiment` or `Seurat` object gets cell metadata
#'   columns `name` (a factor of clusters) and `<name>_confidence` (the
#'   probability of that cluster), the assignment matrix (cells x clusters)
#'   as the reduction `name` (Seurat: `<name>_probabilities`, as a reduction
#'   may not share a metadata column's name), and the fitted clustering, for [predict()], in
#'   `metadata(x)[[name]]` (SingleCellExperiment) or `Misc(x, name)`
#'   (Seurat). A matrix gets that fitted clustering (a `scdistill_clusters`
#'   object) itself, with `$clusters` and `$probabilities` of its cells.
#' @examples
#' sce <- example_cellbench()
#' sce <- run_pca(sce, n_pcs = 10, n_hvg = 1000)
#' sce <- soft_clusters(sce, n_clusters = 5, threads = 2)
#' table(sce$soft_cluster, sce$cell_line)
#' summary(sce$soft_cluster_confidence)
#' @export
soft_clusters <- function(x, reduction = "PCA", n_clusters = NULL, temperature = NULL, per_cluster = TRUE,
                          covariance = c("shared", "spherical"), labels = NULL, unlabeled = NA, resolution = 1, name = "soft_cluster", max_epochs = 50, batch_size = 256,
                          lr = 1e-2, early_stopping = TRUE, patience = 10, validation_fraction = 0.1, seed = 1,
                          threads = NULL, progress = interactive()) {
  input <- reduction_input(x, reduction)
  z <- input$embedding
  if (nrow(z) < 2) stop("`x` has ", nrow(z), " cell(s): clustering needs at least 2", call. = FALSE)
  if (anyNA(z) || any(!is.finite(z))) stop("the embedding '", reduction, "' has missing or infinite values", call. = FALSE)
  cells <- rownames(z) %||% as.character(seq_len(nrow(z)))
  if (!is.null(n_clusters)) {
    n_clusters <- check_count(n_clusters, "n_clusters")
    if (n_clusters > nrow(z)) {
      stop("`n_clusters` = ", n_clusters, " is more than the ", nrow(z), " cells", call. = FALSE)
    }
  }
  sup <- NULL
  if (!is.null(labels)) {
    y <- as.character(resolve_cell_factor(labels, input$cell_data, cells, arg = "labels", allow_na = TRUE))
    y[y %in% as.character(unlabeled[!is.na(unlabeled)])] <- NA
    lv <- sort(unique(y[!is.na(y)]))
    if (length(lv) < 2) stop("`labels` must have at least two classes for a supervised clustering", call. = FALSE)
    if (!is.null(n_clusters) && n_clusters != length(lv)) {
      stop("`n_clusters` = ", n_clusters, " but `labels` has ", length(lv), " classes: give one or the other",
           call. = FALSE)
    }
    sup <- list(codes = match(y, lv), levels = lv)
  }
  config <- list(n_clusters = n_clusters %||% 0L, resolution = check_positive(resolution, "resolution"),
                 temperature = if (is.null(temperature)) 0 else check_positive(temperature, "temperature"),
                 per_cluster = check_flag(per_cluster, "per_cluster"),
                 shared_covariance = choose_arg(covariance, "covariance") == "shared")
  tc <- train_settings(nrow(z), max_epochs, batch_size, lr, 0, 0, early_stopping, patience, 0, validation_fraction,
                       seed)
  bar <- if (check_flag(progress, "progress")) training_bar(tc$max_epochs) else NULL
  if (!is.null(bar)) on.exit(bar$done(), add = TRUE)
  fit <- rust(rs_fit_clusters(unclass_matrix(z), ncol(z), sup$codes, sup$levels, config, tc, resolve_threads(threads),
                              bar$update))
  levels <- unlist(fit$info$levels)
  dimnames(fit$probabilities) <- list(cells, levels)
  dimnames(fit$centroids) <- list(levels, colnames(z))
  out <- structure(list(bytes = fit$bytes, info = fit$info, levels = levels, centroids = fit$centroids,
                        temperature = fit$info$temperature, temperatures = unlist(fit$info$temperatures),
                        reduction = if (is.matrix(x)) NULL else reduction,
                        supervised = !is.null(sup), history = as.data.frame(fit$info$history %||% list())),
                   class = "scdistill_clusters")
  if (is.matrix(x) || is.data.frame(x)) {
    out$probabilities <- fit$probabilities
    out$clusters <- hard_clusters(fit$probabilities, levels)
    return(out)
  }
  x <- write_clusters(x, fit$probabilities, levels, name)
  store_fit(x, name, out)
}

# The most probable cluster of each cell, as a factor of `levels`.
hard_clusters <- function(p, levels) {
  factor(levels[max.col(p, ties.method = "first")], levels = levels)
}

# Cluster, confidence and assignment matrix of cells, written into `x`.
write_clusters <- function(x, p, levels, name) {
  best <- max.col(p, ties.method = "first")
  df <- data.frame(factor(levels[best], levels = levels), p[cbind(seq_len(nrow(p)), best)])
  names(df) <- c(name, paste0(name, "_confidence"))
  write_back(add_cell_columns(x, df), p, cluster_reduction_name(x, name))
}

# Where the assignment matrix goes: a Seurat reduction may not share the
# name of a metadata column (the cluster column would replace it).
cluster_reduction_name <- function(x, name) if (inherits(x, "Seurat")) paste0(name, "_probabilities") else name

# A fitted stage kept with the data: metadata(x) or Misc(x).
store_fit <- function(x, name, fit) {
  if (is(x, "Seurat")) {
    x@misc[[name]] <- fit
  } else {
    S4Vectors::metadata(x)[[name]] <- fit
  }
  x
}

#' Fine-tune a VAE and its soft clusters jointly
#'
#' Trains a [fit_vae()] model further on its negative ELBO plus `weight`
#' times a clustering loss of its latent space, with a clustering of it
#' (from [soft_clusters()]), so that the two stages are trained end to end as
#' in DiffBio's pipeline. The loss is DEC's self-training (Xie et al. 2016):
#' the Kullback-Leibler divergence from each cell's soft assignments
#' softmax_k(log pi_k - ||z_i - mu_k||^2 / T), at its posterior mean z_i, to
#' sharpened targets (the squared assignments, renormalised), which draws
#' cells toward the cluster they already lean to. Targets, centroids and
#' weights are fixed within an epoch and updated at its start (the centroids
#' and weights as one EM step: the weighted means of the cells and the mean
#' assignments); T stays the clustering's. The validation ELBO, and early
#' stopping on it, are the VAE's own. The model and clustering given are
#' left as they were.
#'
#' On labelled data it has not helped so far (see `bench/RESULTS.md`): it
#' keeps the clusters a well-trained VAE gives and moves few cells; a
#' clustering that is wrong at the start is reinforced, not corrected.
#'
#' @param model A VAE from [fit_vae()].
#' @param clusters An unsupervised [soft_clusters()] fit of `model`'s latent
#'   space (for containers: `metadata(sce)$soft_cluster`).
#' @param x The counts the model was trained on (or other cells of the same
#'   genes), as for [latent()].
#' @param weight The weight of the clustering loss per cell, against the
#'   negative ELBO (summed over genes); 0 trains the VAE alone.
#' @param batch As for [latent()].
#' @param max_epochs,batch_size,lr,early_stopping,patience,validation_fraction
#'   Training (a few epochs from the fitted weights, at the VAE's learning rate).
#' @param seed Seed; the same seed gives the same models.
#' @param threads Threads.
#' @param progress Show a progress bar.
#' @param ... Passed to [as_counts()].
#' @return A list of class `scdistill_joint`: `model`, the fine-tuned VAE
#'   (its `latent()` is the new latent space of `x`'s cells); `clusters`, the
#'   clustering with the moved centroids and, as for a matrix given to
#'   [soft_clusters()], `$clusters` and `$probabilities` of `x`'s cells.
#' @examples
#' sim <- simulate_counts(n_cells = 600, n_genes = 200, n_groups = 3, seed = 1)
#' model <- fit_vae(sim, batch = "batch", max_epochs = 40, threads = 2)
#' cl <- soft_clusters(latent(model), n_clusters = 3, threads = 2)
#' joint <- fine_tune_clusters(model, cl, sim, weight = 20, max_epochs = 10, threads = 2)
#' table(joint$clusters$clusters, sim$cell_type)
#' @export
fine_tune_clusters <- function(model, clusters, x, weight = 10, batch = NULL, max_epochs = 20, batch_size = 128,
                               lr = 1e-3, early_stopping = FALSE, patience = 10, validation_fraction = 0.1, seed = 0,
                               threads = NULL, progress = interactive(), ...) {
  check_model(model)
  if (!inherits(model, "scdistill_vae")) {
    stop("fine_tune_clusters() needs a VAE from fit_vae(), not ", class(model)[1], call. = FALSE)
  }
  if (!inherits(clusters, "scdistill_clusters")) {
    stop("`clusters` must be a soft_clusters() fit, not ", class(clusters)[1], call. = FALSE)
  }
  if (isTRUE(clusters$supervised)) {
    stop("`clusters` was fitted on labels (a classifier): joint fine-tuning needs an unsupervised clustering",
         call. = FALSE)
  }
  weight <- check_positive(weight, "weight", zero_ok = TRUE)
  cnt <- as_counts(x, ...)
  cells <- model_cells(model, cnt, batch)
  tc <- train_settings(length(cells$cells), max_epochs, batch_size, lr, 0, 0, early_stopping, patience, 0,
                       validation_fraction, seed)
  bar <- if (check_flag(progress, "progress")) training_bar(tc$max_epochs) else NULL
  if (!is.null(bar)) on.exit(bar$done(), add = TRUE)
  fit <- rust(rs_fine_tune_clusters(model_ptr(model), clusters$bytes, cells, weight, tc, resolve_threads(threads),
                                    bar$update))
  tuned <- new_model(fit$ptr, cnt$counts)
  tuned$covariates <- model$covariates
  tuned <- finish_fit(tuned, fit$latent, cells$cells)
  cl <- clusters
  cl$bytes <- fit$clusters$bytes
  cl$info <- fit$clusters$info
  cl$centroids[] <- fit$clusters$centroids
  dimnames(fit$clusters$probabilities) <- list(cells$cells, cl$levels)
  cl$probabilities <- fit$clusters$probabilities
  cl$clusters <- hard_clusters(cl$probabilities, cl$levels)
  structure(list(model = tuned, clusters = cl), class = "scdistill_joint")
}

#' @method print scdistill_joint
#' @export
print.scdistill_joint <- function(x, ...) {
  ft <- x$model$info$fine_tuned
  cat(sprintf("scdistill VAE and %d soft clusters fine-tuned jointly (weight %s, %d epochs)\n",
              length(x$clusters$levels), format(ft$weight), length(ft$training$history$epoch)))
  print(table(cluster = x$clusters$clusters))
  invisible(x)
}

#' @method print scdistill_clusters
#' @export
print.scdistill_clusters <- function(x, ...) {
  temp <- if (length(x$temperatures)) {
    sprintf("temperatures %s to %s (per cluster; pooled %s)", format(min(x$temperatures), digits = 3),
            format(max(x$temperatures), digits = 3), format(x$temperature, digits = 3))
  } else paste("temperature", format(x$temperature, digits = 3))
  metric <- if (length(x$info$metric)) "; distances in the clusters' shared covariance" else ""
  cat(sprintf("scdistill soft clustering: %d %s on a %d-dimensional space%s, %s%s\n",
              length(x$levels), if (x$supervised) "labelled centroids" else "clusters", ncol(x$centroids),
              if (is.null(x$reduction)) "" else paste0(" ('", x$reduction, "')"), temp, metric))
  cat(sprintf("  trained on %s cells; %d epochs\n", fmt_int(x$info$n_cells), nrow(x$history)))
  if (!is.null(x$clusters)) print(table(cluster = x$clusters))
  invisible(x)
}

#' Assign new cells to fitted soft clusters
#'
#' @param object A `scdistill_clusters` object from [soft_clusters()] (for
#'   containers: `metadata(sce)$soft_cluster` or `Misc(seurat, "soft_cluster")`).
#' @param newdata New cells in the same space: a container with the same
#'   reduction, or a cells x dimensions matrix.
#' @param reduction For containers: the embedding of the new cells.
#' @param name As in [soft_clusters()].
#' @param threads Threads.
#' @param ... Unused.
#' @return For a container, `newdata` with the columns and reduction that
#'   [soft_clusters()] writes; for a matrix, a data.frame with `cluster` and
#'   `confidence`, the assignment matrix in its `"probabilities"` attribute.
#' @examples
#' sce <- example_cellbench()
#' sce <- run_pca(sce, n_pcs = 10, n_hvg = 1000)
#' pcs <- SingleCellExperiment::reducedDim(sce, "PCA")
#' fit <- soft_clusters(pcs[sce$batch != "p3", ], n_clusters = 5, threads = 2)
#' new <- predict(fit, pcs[sce$batch == "p3", ])
#' table(new$cluster, sce$cell_line[sce$batch == "p3"])
#' @export
predict.scdistill_clusters <- function(object, newdata, reduction = object$reduction %||% "PCA",
                                       name = "soft_cluster", threads = NULL, ...) {
  z <- reduction_input(newdata, reduction)$embedding
  if (nrow(z) == 0) stop("`newdata` has no cells", call. = FALSE)
  check_same_space(z, ncol(object$centroids), colnames(object$centroids), "the clustering")
  p <- rust(rs_assign_clusters(object$bytes, unclass_matrix(z), ncol(z), resolve_threads(threads)))
  dimnames(p) <- list(rownames(z), object$levels)
  if (!(is.matrix(newdata) || is.data.frame(newdata))) return(write_clusters(newdata, p, object$levels, name))
  cl <- hard_clusters(p, object$levels)
  structure(data.frame(cluster = cl, confidence = p[cbind(seq_len(nrow(p)), as.integer(cl))],
                       row.names = rownames(z)), probabilities = p)
}
