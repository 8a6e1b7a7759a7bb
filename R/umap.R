# Parametric UMAP of a latent space, and the projection of new cells.

#' UMAP of a latent space, parametric or not
#'
#' Computes a 2-D (or `n_components`-D) map of a latent space. With
#' `parametric = TRUE` (the default), a neural network (3 layers of 100
#' units, as umap-learn's parametric UMAP) is trained with UMAP's fuzzy
#' cross-entropy on the k-nearest-neighbour graph of the latent space
#' (Sainburg et al. 2021): the map is a function of the latent
#' coordinates, so [project_umap()] places new cells where the same
#' training would have put them, in one pass, without re-running the
#' layout. With `parametric = FALSE` the layout is `uwot::umap()`'s, and
#' new cells go through `uwot::umap_transform()`.
#'
#' Each epoch draws `edges_per_epoch` edges of the graph in proportion to
#' their weight (as UMAP samples them) with `negative_sample_rate`
#' repulsive pairs per edge. By default training draws about 2 * 10^7
#' edges in all (between 10 and 200 epochs): on 2,000 real PBMCs that keeps
#' 0.37 of the 15 nearest neighbours where uwot keeps 0.39 (fewer draws
#' keep fewer). The budget does not grow past ~10^5 cells, which is where a
#' parametric map gets faster than uwot; see `bench/pipeline.R`.
#'
#' @param x A `SingleCellExperiment`, a `Seurat` object, or a numeric cells x
#'   dimensions matrix.
#' @param reduction For containers: the latent space to map.
#' @param parametric Train a parametric map (`TRUE`) or call `uwot::umap()`.
#' @param n_neighbors Neighbours of the graph, counting the cell (UMAP's).
#' @param n_components Dimensions of the map.
#' @param min_dist,spread UMAP's curve parameters.
#' @param name Name of the reduction written back (`"UMAP"`; `"umap"` for Seurat).
#' @param n_hidden,n_layers The network.
#' @param negative_sample_rate Repulsive pairs per edge.
#' @param edges_per_epoch Edges drawn per epoch; `NULL`: the graph's
#'   (directed) edge count, at most 10^6.
#' @param max_epochs Epochs; `NULL`: enough for about 2 * 10^7 edges in all,
#'   between 10 and 200.
#' @param batch_size,lr Minibatch of edges and Adam's learning rate.
#' @param seed Seed; the same seed gives the same map (CPU).
#' @param threads Threads.
#' @param progress Show a progress bar.
#' @return A container gets the map as the reduction `name` and the fitted
#'   map (for [project_umap()]) in `metadata(x)[[name]]` or `Misc(x, name)`.
#'   A matrix gets the fitted map (a `scdistill_umap` object) with the
#'   coordinates in `$embedding`.
#' @examples
#' sce <- example_cellbench()
#' sce <- run_pca(sce, n_pcs = 10, n_hvg = 1000)
#' sce <- run_umap(sce, max_epochs = 20, threads = 2)
#' um <- SingleCellExperiment::reducedDim(sce, "UMAP")
#' plot(um, col = factor(sce$cell_line), pch = 16, cex = 0.5)
#' @export
run_umap <- function(x, reduction = "PCA", parametric = TRUE, n_neighbors = 15, n_components = 2, min_dist = 0.1,
                     spread = 1, name = NULL, n_hidden = 100, n_layers = 3, negative_sample_rate = 5,
                     edges_per_epoch = NULL, max_epochs = NULL, batch_size = 4096, lr = 1e-2, seed = 1,
                     threads = NULL, progress = interactive()) {
  input <- reduction_input(x, reduction)
  z <- input$embedding
  if (anyNA(z) || any(!is.finite(z))) stop("the embedding '", reduction, "' has missing or infinite values", call. = FALSE)
  n_neighbors <- check_count(n_neighbors, "n_neighbors", min = 2)
  if (n_neighbors > nrow(z)) {
    stop("`n_neighbors` = ", n_neighbors, " is more than the ", nrow(z), " cells", call. = FALSE)
  }
  check_positive(spread, "spread")
  check_positive(min_dist, "min_dist", zero_ok = TRUE)
  if (min_dist > spread) stop("`min_dist` must be at most `spread`", call. = FALSE)
  seed <- check_seed(seed)
  fit <- if (check_flag(parametric, "parametric")) {
    parametric_umap(z, n_neighbors, check_count(n_components, "n_components"), min_dist, spread,
                    check_count(n_hidden, "n_hidden"), check_count(n_layers, "n_layers"),
                    check_count(negative_sample_rate, "negative_sample_rate"), edges_per_epoch, max_epochs,
                    batch_size, lr, seed, threads, progress)
  } else {
    need("uwot")
    model <- withr_seed(seed, uwot::umap(z, n_neighbors = n_neighbors, n_components = n_components,
                                         min_dist = min_dist, spread = spread, ret_model = TRUE,
                                         n_threads = resolve_threads(threads), verbose = FALSE))
    structure(list(uwot = model, embedding = model$embedding, n_in = ncol(z), dims = colnames(z)),
              class = "scdistill_umap")
  }
  rownames(fit$embedding) <- rownames(z)
  colnames(fit$embedding) <- paste0("UMAP", seq_len(ncol(fit$embedding)))
  fit$reduction <- if (is.matrix(x) || is.data.frame(x)) NULL else reduction
  if (is.matrix(x) || is.data.frame(x)) return(fit)
  name <- name %||% reduction_name(x, "UMAP")
  coords <- fit$embedding
  fit$embedding <- NULL
  store_fit(write_back(x, coords, name), name, fit)
}

parametric_umap <- function(z, n_neighbors, n_components, min_dist, spread, n_hidden, n_layers, negative_sample_rate,
                            edges_per_epoch, max_epochs, batch_size, lr, seed, threads, progress) {
  edges <- if (is.null(edges_per_epoch)) 0L else check_count(edges_per_epoch, "edges_per_epoch")
  # The directed edges of a fuzzy k-NN graph number about 1.6 * n * (k - 1).
  per_epoch <- if (edges > 0) edges else min(1.6 * nrow(z) * (n_neighbors - 1), 1e6)
  epochs <- max_epochs %||% round(min(max(2e7 / per_epoch, 10), 200))
  config <- list(n_neighbors = n_neighbors, n_components = n_components, min_dist = min_dist, spread = spread,
                 n_hidden = n_hidden, n_layers = n_layers, negative_sample_rate = negative_sample_rate,
                 edges_per_epoch = edges)
  tc <- train_settings(nrow(z), epochs, batch_size, lr, 0, 0, FALSE, 1, 0, 0, seed)
  bar <- if (check_flag(progress, "progress")) training_bar(tc$max_epochs) else NULL
  if (!is.null(bar)) on.exit(bar$done(), add = TRUE)
  fit <- rust(rs_fit_umap(unclass_matrix(z), ncol(z), config, tc, resolve_threads(threads), bar$update))
  structure(list(bytes = fit$bytes, info = fit$info, embedding = fit$coords, n_in = ncol(z), dims = colnames(z),
                 history = as.data.frame(fit$info$history %||% list())),
            class = "scdistill_umap")
}

#' @method print scdistill_umap
#' @export
print.scdistill_umap <- function(x, ...) {
  if (!is.null(x$uwot)) {
    cat(sprintf("scdistill UMAP (uwot) of a %d-dimensional space%s\n", x$n_in,
                if (is.null(x$reduction)) "" else paste0(" ('", x$reduction, "')")))
    return(invisible(x))
  }
  i <- x$info
  cat(sprintf("scdistill parametric UMAP: %d -> %d dimensions%s, %d x %d hidden units\n", x$n_in,
              i$config$n_components, if (is.null(x$reduction)) "" else paste0(" ('", x$reduction, "')"),
              i$config$n_layers, i$config$n_hidden))
  cat(sprintf("  %s cells, %s graph edges; %d epochs of %s edges; a = %.3f, b = %.3f\n", fmt_int(i$n_cells),
              fmt_int(i$n_edges), nrow(x$history), fmt_int(i$config$edges_per_epoch), i$a, i$b))
  invisible(x)
}

#' Place new cells on a fitted UMAP
#'
#' Runs new cells through a map from [run_umap()]: the trained network
#' (parametric) or `uwot::umap_transform()`.
#'
#' @param fit A `scdistill_umap` object: `metadata(sce)$UMAP`,
#'   `Misc(seurat, "umap")`, or [run_umap()]'s result for a matrix.
#' @param x The new cells, in the same latent space: a container with
#'   `reduction`, or a cells x dimensions matrix.
#' @param reduction For containers: the new cells' latent space.
#' @param name Name of the reduction written back.
#' @param threads Threads.
#' @return A container with the reduction `name`; for a matrix, the
#'   coordinates (cells x `n_components`).
#' @examples
#' sce <- example_cellbench()
#' sce <- run_pca(sce, n_pcs = 10, n_hvg = 1000)
#' pcs <- SingleCellExperiment::reducedDim(sce, "PCA")
#' fit <- run_umap(pcs[sce$batch != "p3", ], max_epochs = 20, threads = 2)
#' new <- project_umap(fit, pcs[sce$batch == "p3", ])
#' plot(fit$embedding, col = "grey", pch = 16, cex = 0.5)
#' points(new, col = factor(sce$cell_line[sce$batch == "p3"]), pch = 16, cex = 0.5)
#' @export
project_umap <- function(fit, x, reduction = fit$reduction %||% "PCA", name = NULL, threads = NULL) {
  if (!inherits(fit, "scdistill_umap")) {
    stop("`fit` must be a UMAP from run_umap(), not ", class(fit)[1], call. = FALSE)
  }
  z <- reduction_input(x, reduction)$embedding
  if (nrow(z) == 0) stop("`x` has no cells", call. = FALSE)
  check_same_space(z, fit$n_in, fit$dims, "the UMAP")
  y <- if (!is.null(fit$uwot)) {
    need("uwot")
    uwot::umap_transform(unclass_matrix(z), fit$uwot, n_threads = resolve_threads(threads))
  } else {
    rust(rs_project_umap(fit$bytes, unclass_matrix(z), ncol(z), resolve_threads(threads)))
  }
  dimnames(y) <- list(rownames(z), paste0("UMAP", seq_len(ncol(y))))
  if (is.matrix(x) || is.data.frame(x)) return(y)
  write_back(x, y, name %||% reduction_name(x, "UMAP"))
}

#' How well a map keeps a latent space's neighbourhoods
#'
#' The mean over cells of the fraction of a cell's `k` nearest neighbours in
#' `x` that are also among its `k` nearest neighbours in `y`: 1 when the
#' map keeps every neighbourhood, about `k / n` for a random map.
#'
#' @param x,y Cells x dimensions matrices of the same cells (e.g. a latent
#'   space and its UMAP).
#' @param k Neighbours.
#' @param seed Seed of the approximate neighbour search used above 50,000 cells.
#' @param threads Threads.
#' @return A number between 0 and 1.
#' @examples
#' z <- matrix(rnorm(2000), 200)
#' neighbor_preservation(z, z[, 1:2])
#' neighbor_preservation(z, prcomp(z)$x[, 1:2])
#' @export
neighbor_preservation <- function(x, y, k = 15, seed = 1, threads = NULL) {
  x <- as.matrix(x)
  y <- as.matrix(y)
  if (!is.numeric(x) || !is.numeric(y)) stop("`x` and `y` must be numeric matrices", call. = FALSE)
  if (nrow(x) != nrow(y)) stop("`x` has ", nrow(x), " cells and `y` ", nrow(y), call. = FALSE)
  k <- check_count(k, "k")
  if (k >= nrow(x)) stop("`k` must be less than the number of cells (", nrow(x), ")", call. = FALSE)
  if (anyNA(x) || anyNA(y)) stop("`x` and `y` must not have missing values", call. = FALSE)
  rust(rs_neighbor_preservation(unclass_matrix(x), ncol(x), unclass_matrix(y), ncol(y), nrow(x), k, check_seed(seed),
                                resolve_threads(threads)))
}
