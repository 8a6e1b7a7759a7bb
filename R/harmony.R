#' Harmony batch correction of an embedding
#'
#' Harmony (Korsunsky et al. 2019) computed by the Rust core, with the
#' defaults of the R package `harmony` 2.x and harmonypy 2.1: soft k-means
#' on cosine-normalized coordinates with a diversity penalty `theta`, then a
#' mixture-of-experts ridge regression per cluster that removes the batch
#' terms, repeated until the objective falls by less than the fraction
#' `epsilon_harmony` (a rise does not stop it, as in harmonypy 2.1). The ridge penalty is estimated in each cluster as
#' `alpha` times the expected number of the batch's cells there (`lambda =
#' NULL`) or fixed. Several batch variables can be corrected at once.
#'
#' Covariates named in `protect` (for example a treatment `condition`) are
#' held fixed while the batch terms are estimated and are never subtracted:
#' when a condition is unevenly spread over batches, plain Harmony removes
#' part of the condition effect along with the batch; protected, it stays.
#' They take part in the clustering's diversity statistics with penalty
#' `protect_theta` (0 by default: clusters are not pushed to mix conditions).
#'
#' The result depends on `seed`, not on `threads`.
#'
#' @param x A `SingleCellExperiment` (uses `reducedDim(x, reduction)`), a
#'   `Seurat` object (uses the reduction `reduction`), or a cells ×
#'   dimensions numeric matrix (e.g. principal components).
#' @param batch The batch variable(s): column name(s) of the cell metadata,
#'   a vector with one value per cell, or a data frame of such columns.
#' @param theta Diversity penalty: one value, or one per batch variable.
#' @param lambda `NULL` (estimated per cluster from `alpha`) or a fixed ridge
#'   penalty (one value, or one per batch variable).
#' @param sigma Width of the soft k-means kernel.
#' @param n_clusters Number of clusters; `NULL`: min(round(N / 30), 100).
#' @param max_iter Harmony iterations at most.
#' @param max_iter_cluster Clustering rounds per iteration.
#' @param epsilon_cluster,epsilon_harmony Convergence tolerances of the
#'   clustering and of Harmony.
#' @param block_size Fraction of cells updated together in a clustering round.
#' @param alpha Scale of the estimated ridge penalty.
#' @param tau Protection of small batches against over-correction (0: off).
#' @param protect Biological covariates to keep (column names or a data frame).
#' @param protect_theta Diversity penalty of the protected covariates.
#' @param reduction For containers: the embedding to correct.
#' @param name For containers: name of the corrected reduction written back
#'   (`"HARMONY"`; `"harmony"` for Seurat).
#' @param seed Seed of the initial clustering and the update order.
#' @param threads CPU threads.
#' @param progress Show a progress bar.
#' @param memberships For a matrix `x`: also return the soft cluster
#'   memberships (cells × clusters; 800 MB as doubles at 10^6 cells and 100
#'   clusters, so off by default).
#' @param sketch `NULL` (fit on all cells) or a number of cells: Harmony is
#'   fitted on a random sample of about that many cells (each batch of the
#'   first batch variable in proportion, at least 500 of its cells), and the
#'   other cells are corrected with the fitted clusters and batch terms, as
#'   the sampled cells were (their memberships to the fitted centroids, with
#'   the diversity penalty, then the batch terms; three rounds, as in
#'   Symphony's mapping to a Harmony reference). Memory then grows with the
#'   sample instead of the data: the clusters × cells matrices take about
#'   2.3 GB at 10^6 cells. The corrected cells are written straight into
#'   the result, so the input and the result (cells × dimensions each) are
#'   all that grows with the cells. Not with `memberships = TRUE`. See
#'   "Sketch".
#' @section Sketch:
#' With `sketch`, the sampled cells get Harmony's fit on the sample, and the
#' rest are placed by it. On cells that Harmony was fitted on, this placement
#' reproduces the fit (relative squared error below 10^-6 in the package's
#' tests). On simulated data of six types in three batches, a sketch of a
#' quarter of the cells corrected all cells to a relative squared error of
#' 2.5·10^-5 from the full run. On the 50 PCs of 10^6 simulated cells (10
#' types, 3 batches), a sketch of 200,000 gave 9.6·10^-5 (every dimension
#' correlated above 0.9997 with the full run's), the same iLISI, kBET and
#' Leiden clusters, and a process peak of 2.0 GB against 2.8 GB. On harder
#' designs the sketch mixes batches a little less: with a sketch of about a
#' fifth of the cells, kBET fell by 0.02 (types down to 0.8%, batches with
#' their own proportions) and by 0.05 (each batch lacking three of twelve
#' types), iLISI by 0.006, while the Leiden clusters stayed. Keep the sketch
#' large: `distill()`'s Harmony teacher uses 200,000 cells, and only on
#' larger data (`harmony_teacher(sketch =)`).
#' @return For a container, `x` with the corrected embedding added; for a
#'   matrix, the corrected matrix, with attribute `harmony`: a list with the
#'   objective per iteration, the number of iterations, whether it
#'   converged, the number of clusters, the cells it was fitted on
#'   (`fitted_cells`: all, or the sketch) and, with `memberships = TRUE`, the
#'   soft cluster memberships (cells × clusters, computed in single
#'   precision as in harmonypy 2.1).
#' @references Korsunsky I. et al. (2019) Fast, sensitive and accurate
#'   integration of single-cell data with Harmony. Nature Methods 16, 1289–1296.
#' @examples
#' sce <- example_cellbench()
#' sce <- run_pca(sce, n_pcs = 20, batch = "batch")
#' sce <- run_harmony(sce, batch = "batch")
#' integration_metrics(sce, batch = "batch", label = "cell_line",
#'                     reduction = c("PCA", "HARMONY"))[, c("ilisi", "clisi")]
#' @export
run_harmony <- function(x, batch, theta = 2, lambda = NULL, sigma = 0.1, n_clusters = NULL, max_iter = 10,
                        max_iter_cluster = 4, epsilon_cluster = 1e-3, epsilon_harmony = 1e-2, block_size = 0.05,
                        alpha = 0.2, tau = 0, protect = NULL, protect_theta = 0, reduction = "PCA", name = NULL,
                        seed = 1, threads = NULL, progress = interactive(), memberships = FALSE, sketch = NULL) {
  input <- reduction_input(x, reduction)
  emb <- input$embedding
  z <- harmony_fit(emb, input$cell_data, batch, protect, theta = theta, lambda = lambda, sigma = sigma,
                   n_clusters = n_clusters, max_iter = max_iter, max_iter_cluster = max_iter_cluster,
                   epsilon_cluster = epsilon_cluster, epsilon_harmony = epsilon_harmony, block_size = block_size,
                   alpha = alpha, tau = tau, protect_theta = protect_theta, seed = seed, threads = threads,
                   progress = progress, memberships = is.matrix(x) && check_flag(memberships, "memberships"),
                   sketch = sketch)
  if (is.matrix(x)) return(z)
  # The record dropped in place: `attr<-` copied all of Z* here.
  z <- shape_in_place(z, dimnames = dimnames(z), harmony = NULL)
  write_back(x, z, name %||% reduction_name(x, "HARMONY"))
}

# The embedding to correct and the cell metadata of `x`.
reduction_input <- function(x, reduction) {
  if (is.matrix(x) || is.data.frame(x)) {
    emb <- as.matrix(x)
    if (!is.numeric(emb)) stop("`x` must be a numeric matrix of cells x dimensions", call. = FALSE)
    return(list(embedding = emb, cell_data = NULL))
  }
  if (!is(x, "SingleCellExperiment") && !is(x, "Seurat")) {
    stop("`x` must be a SingleCellExperiment, a Seurat object or a numeric matrix, not ", class(x)[1], call. = FALSE)
  }
  all <- embeddings_all(x)
  red <- if (is(x, "Seurat") && !reduction %in% names(all)) tolower(reduction) else reduction
  if (!red %in% names(all)) {
    stop("`x` has no reduction '", reduction, "'",
         if (length(all)) paste0(" (it has: ", paste(names(all), collapse = ", "), ")") else "",
         "; compute one first, e.g. x <- run_pca(x)", call. = FALSE)
  }
  cell_data <- if (is(x, "Seurat")) x[[]] else as.data.frame(SummarizedExperiment::colData(x))
  list(embedding = as.matrix(all[[red]]), cell_data = cell_data)
}

# Covariates (batch variables, then protected ones) in the glue's layout.
harmony_covariates <- function(values, cell_data, cells, arg, theta, lambda, protected) {
  if (is.null(values)) return(list())
  if (is.data.frame(values)) {
    cols <- as.list(values)
  } else if (is.character(values) && length(values) < length(cells) && length(values) >= 1) {
    # Column names of the cell metadata (several: one batch variable each).
    unknown <- setdiff(values, colnames(cell_data) %||% character())
    if (length(values) > 1 && length(unknown)) {
      stop("`", arg, "` has ", length(values), " values but `x` has ", length(cells), " cells, and ",
           paste0("'", utils_head(unknown, 3), "'", collapse = ", "), " ",
           if (length(unknown) == 1) "is not a column" else "are not columns", " of the cell metadata",
           call. = FALSE)
    }
    cols <- stats::setNames(as.list(values), values)
  } else {
    cols <- list(values)
    names(cols) <- arg
  }
  per <- function(v, what) {
    if (is.null(v)) return(rep(NA_real_, length(cols)))
    if (!is.numeric(v) || !(length(v) %in% c(1, length(cols))) || anyNA(v) || any(v < 0)) {
      stop("`", what, "` must be one non-negative number or one per ", arg, " variable (", length(cols), ")",
           call. = FALSE)
    }
    rep_len(as.numeric(v), length(cols))
  }
  theta <- per(theta, if (protected) "protect_theta" else "theta")
  lambda <- per(lambda, "lambda")
  mapply(function(col, nm, th, la) {
    f <- resolve_batch(col, cell_data, cells, arg = arg)
    cov <- list(name = nm, codes = as.integer(f), n_levels = nlevels(f), theta = th, protected = protected)
    if (!is.na(la)) cov$lambda <- la # absent: estimated per cluster
    cov
  }, cols, names(cols), theta, lambda, SIMPLIFY = FALSE, USE.NAMES = FALSE)
}

harmony_fit <- function(emb, cell_data, batch, protect, theta, lambda, sigma, n_clusters, max_iter,
                        max_iter_cluster, epsilon_cluster, epsilon_harmony, block_size, alpha, tau,
                        protect_theta, seed, threads, progress, memberships = FALSE, sketch = NULL,
                        in_place = FALSE) {
  # `emb` may be list(path, name, cells, d): cells x d in an HDF5 file
  # (rs_h5_cells_write()'s layout), corrected there (distill(h5_file =));
  # the core checks its values as it reads them.
  in_file <- is.list(emb)
  n <- if (in_file) length(emb$cells) else nrow(emb)
  d <- if (in_file) emb$d else ncol(emb)
  if (n < 2 || d < 1) stop("the embedding needs at least 2 cells and 1 dimension", call. = FALSE)
  if (!in_file && anyNA(emb)) stop("the embedding has ", sum(is.na(emb)), " missing value(s)", call. = FALSE)
  cells <- if (in_file) emb$cells else rownames(emb) %||% paste0("cell_", seq_len(n))
  check_positive(sigma, "sigma")
  check_fraction(block_size, "block_size", upper_open = FALSE)
  check_positive(alpha, "alpha")
  check_positive(tau, "tau", zero_ok = TRUE)
  covs <- c(harmony_covariates(batch, cell_data, cells, "batch", theta, lambda, FALSE),
            harmony_covariates(protect, cell_data, cells, "protect", protect_theta, lambda, TRUE))
  if (!length(covs) || all(vapply(covs, function(c) c$protected, logical(1)))) {
    stop("`batch` is required: the variable(s) to correct for", call. = FALSE)
  }
  params <- list(sigma = sigma, n_clusters = if (!is.null(n_clusters)) check_count(n_clusters, "n_clusters"),
                 max_iter = check_count(max_iter, "max_iter"),
                 max_iter_cluster = check_count(max_iter_cluster, "max_iter_cluster"),
                 epsilon_cluster = epsilon_cluster, epsilon_harmony = epsilon_harmony, block_size = block_size,
                 alpha = alpha, tau = tau, seed = check_seed(seed), memberships = memberships,
                 sketch = if (!is.null(sketch)) check_count(sketch, "sketch", min = 2))
  bar <- NULL
  if (check_flag(progress, "progress")) {
    id <- cli::cli_progress_bar(total = params$max_iter, clear = FALSE,
                                format = "Harmony {cli::pb_bar} iteration {cli::pb_current}/{cli::pb_total} | {cli::pb_elapsed}")
    on.exit(cli::cli_progress_done(id = id), add = TRUE)
    bar <- function(i) cli::cli_progress_update(id = id, set = i)
  }
  # The core reads R's column-major values as they are: no copy of the
  # embedding (400 MB at 10^6 cells and 50 dimensions) unless it is integer.
  # `in_place`: the embedding is overwritten by its correction, only for a
  # matrix nothing else refers to (distill()'s own PCs).
  if (in_file) {
    spec <- list(path = emb$path, name = emb$name)
  } else if (!is.double(emb)) {
    storage.mode(emb) <- "double"
  }
  res <- rust(rs_run_harmony(if (in_file) spec else emb, n, d, covs, params, resolve_threads(threads), bar, in_place))
  fit <- list(objective = res$objective, n_iter = res$n_iter, converged = res$converged,
              n_clusters = res$n_clusters, cluster_rounds = res$cluster_rounds, fitted_cells = res$fitted_cells)
  if (in_file) return(structure(emb, harmony = fit))
  # The results arrive as matrices and get their names in place: `res`
  # still holds them, so `dimnames<-` or `attr<-` would copy them (400 MB
  # at 10^6 cells and 50 dimensions; the memberships twice that).
  if (memberships) fit$memberships <- shape_in_place(res$r, dimnames = list(rownames(emb), NULL))
  shape_in_place(res$z, dimnames = list(rownames(emb), colnames(emb) %||% paste0("harmony_", seq_len(ncol(emb)))),
                 harmony = fit)
}

