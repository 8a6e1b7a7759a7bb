# Ambient RNA removal (CellBender's model) with the profile from empty droplets.

#' Remove ambient RNA
#'
#' Every droplet catches some of the free-floating (ambient) RNA of the
#' suspension, so each cell's counts are its own plus a share of the
#' ambient profile. `remove_ambient()` fits CellBender's picture of this
#' (Fleming et al. 2023) as a VAE on the cells: the expected counts of cell
#' n are l_n * ((1 - a_n) * rho(z_n) + a_n * p), with p the ambient profile,
#' rho the cell's own expression (the decoder) and a_n its ambient share.
#' The empty droplets say how much ambient RNA a droplet holds: their counts
#' set the prior of a_n * l_n (log-normal, their mean and spread), as
#' CellBender's empty-droplet size prior does. Each count is then split
#' between the cell and the soup by their shares of its expected value and
#' rounded: the result is integer counts.
#'
#' The ambient profile comes from, in this order: `ambient` (a profile per
#' gene, e.g. `DropletUtils::estimateAmbience()`'s), `empty_droplets` (their
#' counts), or `raw` (a raw droplet matrix, e.g. `DropletUtils::read10xCounts()`
#' of `raw_feature_bc_matrix`: barcodes not in `x` with at most
#' `empty_max_umi` counts are the empty droplets, DropletUtils' `lower`).
#' With a profile but no empty droplets, the prior is that a median cell is
#' `expected_fraction` ambient.
#'
#' @param x Cells (a `SingleCellExperiment`, `Seurat` object or counts
#'   matrix, genes x cells) of raw counts.
#' @param empty_droplets Counts of empty droplets (genes x droplets), with
#'   gene names.
#' @param ambient An ambient profile: a numeric vector named by gene
#'   (proportions or counts), covering the genes of `x`.
#' @param raw A raw droplet matrix (genes x barcodes) holding the cells of
#'   `x` and the empty droplets.
#' @param batch Batch (channel); the cells' decoder is batch-aware.
#' @param empty_max_umi With `raw`: droplets with 1 to this many counts are empty.
#' @param expected_fraction Without empty droplets: the prior ambient share
#'   of a median cell.
#' @param n_latent,n_hidden,n_layers The VAE.
#' @param max_epochs Epochs; `NULL`: scvi-tools' rule for the number of
#'   cells (400 up to 20,000 cells). Stopped too early, the model still
#'   hands counts its decoder cannot yet explain to the soup and removes too
#'   much (800 simulated cells: 40% removed after 150 epochs, 14% after 400,
#'   truth 15%).
#' @param batch_size,lr Training.
#' @param name Name of the assay of decontaminated counts.
#' @param seed,threads,progress As in [fit_vae()].
#' @return For a `SingleCellExperiment`, `x` with the assay `name`
#'   (integer counts, genes x cells), `colData` columns `ambient_fraction`
#'   (a_n, the estimated ambient share) and `ambient_removed` (the share of
#'   the cell's counts removed), and the fit in `metadata(x)$ambient`; for
#'   a `Seurat` object, an assay `name` and the same metadata columns (fit in
#'   `Misc(x, "ambient")`). For a matrix, the fit (a `scdistill_ambient`
#'   object) with `$counts`, `$fraction` and `$removed`.
#' @examples
#' sim <- simulate_counts(n_cells = 800, n_genes = 300, n_groups = 3, n_batches = 1,
#'                        ambient = list(fraction = 0.15, n_empty = 1000), seed = 1)
#' empty <- S4Vectors::metadata(sim)$ambient$empty_droplets
#' truth <- sim$ambient_fraction   # the simulator's; remove_ambient() writes its estimate there
#' sim <- remove_ambient(sim, empty_droplets = empty, threads = 2)
#' c(true = mean(truth), estimated = mean(sim$ambient_fraction), removed = mean(sim$ambient_removed))
#' plot(S4Vectors::metadata(sim)$ambient)
#' @export
remove_ambient <- function(x, empty_droplets = NULL, ambient = NULL, raw = NULL, batch = NULL, empty_max_umi = 100,
                           expected_fraction = 0.05, n_latent = 10, n_hidden = 128, n_layers = 1, max_epochs = NULL,
                           batch_size = 128, lr = 1e-3, name = "decontaminated", seed = 0, threads = NULL,
                           progress = interactive()) {
  cnt <- as_counts(x, batch = batch)
  genes <- rownames(cnt$counts)
  src <- ambient_source(genes, colnames(cnt$counts), empty_droplets, ambient, raw, empty_max_umi)
  lib <- colSums(cnt$counts)
  prior <- if (is.null(src$sizes)) {
    check_fraction(expected_fraction, "expected_fraction")
    c(log(expected_fraction * stats::median(lib)), 0.5)
  } else {
    ls <- log(src$sizes[src$sizes > 0])
    c(mean(ls), if (length(ls) > 1) max(stats::sd(ls), 0.1) else 0.5)
  }
  config <- list(n_latent = check_count(n_latent, "n_latent"), n_hidden = check_count(n_hidden, "n_hidden"),
                 n_layers = check_count(n_layers, "n_layers"), prior_log_mean = prior[1], prior_log_sd = prior[2])
  tc <- train_settings(length(lib), max_epochs, batch_size, lr, 0, 0.5, FALSE, 1, 0, 0, seed)
  b <- batch_args(cnt$batch)
  bar <- if (check_flag(progress, "progress")) training_bar(tc$max_epochs) else NULL
  if (!is.null(bar)) on.exit(bar$done(), add = TRUE)
  res <- rust(rs_fit_ambient(slots(cnt), b$codes, b$levels, src$profile, config, tc, resolve_threads(threads),
                             bar$update))
  fit <- structure(list(bytes = attr(res, "bytes"), info = attr(res, "info"), genes = genes,
                        batch_levels = b$levels, fraction = stats::setNames(res$share, colnames(cnt$counts)),
                        removed = res$removed, source = src$what, n_empty = src$n_empty,
                        history = as.data.frame(attr(res, "info")$history %||% list())),
                   class = "scdistill_ambient")
  clean <- csr_to_dgc(res$counts, genes, colnames(cnt$counts))
  if (!(inherits(x, "SummarizedExperiment") || inherits(x, "Seurat"))) {
    fit$counts <- clean
    return(fit)
  }
  x <- add_cell_columns(x, data.frame(ambient_fraction = res$share, ambient_removed = res$removed))
  if (inherits(x, "Seurat")) {
    need("SeuratObject")
    x[[name]] <- SeuratObject::CreateAssayObject(counts = clean)
  } else {
    SummarizedExperiment::assay(x, name, withDimnames = FALSE) <- clean[rownames(x), colnames(x)]
  }
  store_fit(x, "ambient", fit)
}

# The ambient profile (on `genes`) and the empty droplets' sizes, from
# whichever source was given.
ambient_source <- function(genes, cells, empty_droplets, ambient, raw, empty_max_umi) {
  on_genes <- function(m, what) {
    if (is.null(rownames(m))) stop("`", what, "` has no gene names (row names)", call. = FALSE)
    missing <- setdiff(genes, rownames(m))
    if (length(missing)) {
      stop("`", what, "` is on other genes: ", length(missing), " of the ", length(genes), " genes of `x` are ",
           "not in it (e.g. ", paste(utils_head(missing, 3), collapse = ", "), ")", call. = FALSE)
    }
    m[genes, , drop = FALSE]
  }
  if (!is.null(ambient)) {
    if (!is.numeric(ambient) || is.null(names(ambient))) {
      stop("`ambient` must be a numeric vector named by gene", call. = FALSE)
    }
    if (anyNA(ambient) || any(ambient < 0)) stop("`ambient` must be non-negative, without NA", call. = FALSE)
    p <- on_genes(matrix(ambient, dimnames = list(names(ambient), NULL)), "ambient")[, 1]
    if (sum(p) <= 0) stop("`ambient` is zero on every gene of `x`", call. = FALSE)
    sizes <- if (!is.null(empty_droplets)) colSums(on_genes(to_dgc(empty_droplets), "empty_droplets")) else NULL
    return(list(profile = as.numeric(p), sizes = sizes, what = "given profile", n_empty = length(sizes)))
  }
  if (is.null(empty_droplets) && !is.null(raw)) {
    raw <- to_dgc(raw)
    if (is.null(colnames(raw))) stop("`raw` has no barcodes (column names)", call. = FALSE)
    tot <- colSums(raw)
    keep <- !(colnames(raw) %in% cells) & tot >= 1 & tot <= empty_max_umi
    if (!any(keep)) {
      stop("`raw` has no empty droplets: no barcode outside `x` has 1 to ", empty_max_umi, " counts",
           call. = FALSE)
    }
    empty_droplets <- raw[, keep, drop = FALSE]
  }
  if (is.null(empty_droplets)) {
    stop("no empty droplets given and no profile: give `empty_droplets`, `raw` (a raw droplet matrix) or ",
         "`ambient` (e.g. DropletUtils::estimateAmbience())", call. = FALSE)
  }
  e <- on_genes(to_dgc(empty_droplets), "empty_droplets")
  sizes <- colSums(e)
  if (sum(sizes) == 0) stop("the empty droplets have no counts on the genes of `x`", call. = FALSE)
  list(profile = as.numeric(Matrix::rowSums(e)), sizes = sizes, what = "empty droplets", n_empty = ncol(e))
}

#' @method print scdistill_ambient
#' @export
print.scdistill_ambient <- function(x, ...) {
  cat(sprintf("scdistill ambient RNA model: %s cells x %s genes, profile from %s%s\n", fmt_int(length(x$fraction)),
              fmt_int(length(x$genes)), x$source, if (x$n_empty) paste0(" (", fmt_int(x$n_empty), ")") else ""))
  cat(sprintf("  ambient share per cell: median %.3f (%.3f-%.3f); counts removed: %.1f%%\n",
              stats::median(x$fraction), min(x$fraction), max(x$fraction),
              100 * mean(x$removed)))
  invisible(x)
}

#' @method plot scdistill_ambient
#' @export
plot.scdistill_ambient <- function(x, ...) {
  graphics::hist(x$fraction, breaks = 40, col = "#6c8ebf", border = "white", xlab = "Estimated ambient share",
                 main = "Ambient RNA per cell", ...)
  graphics::abline(v = stats::median(x$fraction), lty = 2)
  invisible(x)
}

# Decontaminates new cells with a fitted model (their genes as the model's).
apply_ambient <- function(fit, x, batch = NULL, threads = NULL) {
  cnt <- as_counts(x, batch = batch)
  missing <- setdiff(fit$genes, rownames(cnt$counts))
  if (length(missing)) {
    stop("the new cells lack ", length(missing), " of the ambient model's genes (e.g. ",
         paste(utils_head(missing, 3), collapse = ", "), ")", call. = FALSE)
  }
  m <- cnt$counts[fit$genes, , drop = FALSE]
  codes <- if (length(fit$batch_levels) > 1) {
    if (is.null(cnt$batch)) stop("give the batch of the new cells: the ambient model has batches", call. = FALSE)
    unknown <- setdiff(levels(cnt$batch), fit$batch_levels)
    if (length(unknown)) stop("batch '", unknown[1], "' is not one the ambient model knows", call. = FALSE)
    match(as.character(cnt$batch), fit$batch_levels)
  }
  res <- rust(rs_apply_ambient(fit$bytes, slots(list(counts = m)), codes,
                               if (is.null(codes)) NULL else fit$batch_levels, resolve_threads(threads)))
  list(counts = csr_to_dgc(res$counts, fit$genes, colnames(m)), fraction = res$share, removed = res$removed)
}
