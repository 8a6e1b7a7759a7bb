# One call from counts to clusters (DiffBio's single-cell pipeline), and new cells through it.

#' Run the single-cell pipeline: counts to clusters in one call
#'
#' Runs the chosen stages in order on a `SingleCellExperiment` or `Seurat`
#' object, writes every result back, and keeps the fitted stages in one
#' object (`metadata(x)$pipeline`, `Misc(x, "pipeline")`) that [project()]
#' runs new cells through. The stages, each also usable alone:
#'
#' 1. `"ambient"`: [remove_ambient()] (needs `empty_droplets`, `raw` or
#'    `ambient`); later stages read the decontaminated counts.
#' 2. `"vae"`: [fit_vae()] on the `n_hvg` most variable genes (batch-aware):
#'    the latent space `"VAE"`.
#' 3. `"doublets"`: [find_doublets()] with that VAE (or its own); with
#'    `remove_doublets = TRUE` the called doublets leave the later stages
#'    (they stay in `x`, with `NA` there).
#' 4. `"harmony"`: Harmony on the VAE latent space (on PCA without
#'    `"vae"`), distilled into a network ([distill()] with
#'    [given_teacher()]) so that new cells get the corrected coordinates
#'    without re-running Harmony: the reduction `"HARMONY"`.
#' 5. `"umap"`: a parametric UMAP ([run_umap()]) of the last latent space.
#' 6. `"clusters"`: soft k-means ([soft_clusters()]) of the last latent space.
#'
#' With `joint = TRUE` the VAE and the clusters of its latent space are then
#' fine-tuned together ([fine_tune_clusters()], arguments in `args$joint`),
#' and the UMAP is drawn from the tuned latent space; this needs the `"vae"`
#' and `"clusters"` stages and no `"harmony"` stage (the clusters must be of
#' the VAE's latent space).
#'
#' @param x A `SingleCellExperiment`, `Seurat` object or counts matrix.
#' @param batch Batch (sample, channel): a column of the cell metadata or one
#'   value per cell.
#' @param steps The stages to run, in the order above whatever the order given.
#' @param empty_droplets,ambient,raw The ambient RNA source (see [remove_ambient()]).
#' @param n_hvg Highly variable genes the VAE and Harmony stages use.
#' @param n_clusters Clusters (`NULL`: Leiden's number; see [soft_clusters()]).
#' @param remove_doublets Leave called doublets out of the later stages.
#' @param joint Fine-tune the VAE and the clusters jointly (see above).
#' @param args Extra arguments per stage: a list with any of `ambient`,
#'   `vae`, `doublets`, `harmony` (for [distill()]), `umap`, `clusters`,
#'   `joint` (for [fine_tune_clusters()]), each a list of arguments of that
#'   stage's function.
#' @param seed,threads,progress As in the stages.
#' @return `x` with every stage's results: assay `decontaminated`; cell
#'   metadata `ambient_fraction`, `ambient_removed`, `doublet_score`,
#'   `doublet_call`, `soft_cluster`, `soft_cluster_confidence`; reductions
#'   `VAE`, `HARMONY`, `UMAP`, `soft_cluster`; and the pipeline (a
#'   `scdistill_pipeline` object, whose `$seconds` are each stage's wall
#'   seconds, printed with it). A matrix becomes a `SingleCellExperiment`.
#' @examples
#' sim <- simulate_counts(n_cells = 600, n_genes = 300, n_groups = 4, ambient = TRUE, seed = 1)
#' empty <- S4Vectors::metadata(sim)$ambient$empty_droplets
#' sim <- run_pipeline(sim, batch = "batch", empty_droplets = empty, n_clusters = 4, threads = 2,
#'                     args = list(vae = list(max_epochs = 50), harmony = list(max_epochs_encoder = 20,
#'                                 max_epochs_decoder = 20), umap = list(max_epochs = 20)))
#' table(sim$soft_cluster, sim$cell_type)
#' plot(S4Vectors::metadata(sim)$pipeline, sim)
#' @export
run_pipeline <- function(x, batch = NULL, steps = c("ambient", "doublets", "vae", "harmony", "umap", "clusters"),
                         empty_droplets = NULL, ambient = NULL, raw = NULL, n_hvg = 2000, n_clusters = NULL,
                         remove_doublets = FALSE, joint = FALSE, args = list(), seed = 0, threads = NULL,
                         progress = interactive()) {
  all_steps <- c("ambient", "doublets", "vae", "harmony", "umap", "clusters")
  if (!is.character(steps) || !length(steps) || !all(steps %in% all_steps)) {
    stop("`steps` must be some of ", paste0("\"", all_steps, "\"", collapse = ", "), call. = FALSE)
  }
  # Run order: the doublet stage reuses the VAE.
  run_order <- c("ambient", "vae", "doublets", "harmony", "umap", "clusters")
  steps <- run_order[run_order %in% steps]
  known <- setdiff(names(args), c(all_steps, "joint"))
  if (!is.list(args) || (length(args) && is.null(names(args))) || length(known)) {
    stop("`args` must be a list named by stage (", paste(c(all_steps, "joint"), collapse = ", "), ")", call. = FALSE)
  }
  check_flag(remove_doublets, "remove_doublets")
  if (check_flag(joint, "joint") && (!all(c("vae", "clusters") %in% steps) || "harmony" %in% steps)) {
    stop("`joint = TRUE` fine-tunes the VAE with the clusters of its latent space: it needs the \"vae\" and ",
         "\"clusters\" steps and no \"harmony\" step", call. = FALSE)
  }
  if ("ambient" %in% steps && is.null(empty_droplets) && is.null(ambient) && is.null(raw)) {
    stop("the \"ambient\" stage needs `empty_droplets`, `raw` or `ambient` (no empty droplets given and no ",
         "profile); leave it out of `steps` otherwise", call. = FALSE)
  }
  seurat <- inherits(x, "Seurat")
  cnt <- as_counts(x, batch = batch)
  sce <- SingleCellExperiment::SingleCellExperiment(list(counts = cnt$counts),
                                                    colData = S4Vectors_DataFrame(cnt$cell_data))
  b <- cnt$batch
  if (!is.null(b)) sce$.batch <- b
  bname <- if (is.null(b)) NULL else ".batch"
  # Wall seconds per stage, kept in the fit (`$seconds`) and printed with it.
  seconds <- numeric()
  timed <- function(name, expr) {
    t0 <- proc.time()[["elapsed"]]
    value <- expr
    seconds[name] <<- sum(seconds[name], proc.time()[["elapsed"]] - t0, na.rm = TRUE)
    value
  }
  stage <- function(name, f, ...) {
    if (isTRUE(progress)) cli::cli_inform("Pipeline: {name}")
    timed(name, do.call(f, c(list(...), args[[name]] %||% list())))
  }
  fit <- list(steps = steps, genes = rownames(sce), batch_levels = levels(b), seed = seed)
  if ("ambient" %in% steps) {
    sce <- stage("ambient", remove_ambient, sce, empty_droplets = empty_droplets, ambient = ambient, raw = raw,
                 batch = bname, seed = seed, threads = threads, progress = progress)
    fit$ambient <- S4Vectors::metadata(sce)$ambient
  }
  counts_now <- if ("ambient" %in% steps) "decontaminated" else "counts"
  work <- SingleCellExperiment::SingleCellExperiment(list(counts = SummarizedExperiment::assay(sce, counts_now)),
                                                     colData = SummarizedExperiment::colData(sce))
  hvg <- timed("hvg", highly_variable_genes(work, n_hvg = min(n_hvg, nrow(work)), batch = bname, threads = threads))
  fit$hvg <- rownames(work)[hvg$highly_variable]
  work <- work[fit$hvg, ]
  empty_cells <- Matrix::colSums(SingleCellExperiment::counts(work)) == 0
  if (any(empty_cells)) {
    stop(sum(empty_cells), " cell(s) have no counts on the ", length(fit$hvg), " most variable genes (e.g. '",
         colnames(work)[which(empty_cells)[1]], "'): filter cells with few counts first", call. = FALSE)
  }
  if ("vae" %in% steps) {
    fit$vae <- stage("vae", fit_vae, work, batch = bname, seed = seed, threads = threads, progress = progress)
  }
  if ("doublets" %in% steps) {
    d <- stage("doublets", find_doublets, work, batch = bname, model = fit$vae, seed = seed, threads = threads,
               progress = progress)
    sce$doublet_score <- d$doublet_score
    sce$doublet_call <- d$doublet_call
  }
  keep <- if (remove_doublets && "doublets" %in% steps) !sce$doublet_call else rep(TRUE, ncol(sce))
  z <- if ("vae" %in% steps) {
    timed("vae", latent_of_object(fit$vae, work))
  } else {
    timed("pca", SingleCellExperiment::reducedDim(run_pca(work, n_pcs = 30, n_hvg = nrow(work), batch = bname,
                                                          seed = seed, threads = threads), "PCA"))
  }
  put <- function(name, m) {
    full <- matrix(NA_real_, ncol(sce), ncol(m), dimnames = list(colnames(sce), colnames(m)))
    full[rownames(m), ] <- m
    SingleCellExperiment::reducedDim(sce, name) <<- full
  }
  put(if ("vae" %in% steps) "VAE" else "PCA", z)
  fit$embedding <- if ("vae" %in% steps) "VAE" else "PCA"
  z <- z[keep, , drop = FALSE]
  if ("harmony" %in% steps) {
    if (is.null(b)) stop("the \"harmony\" stage needs `batch`", call. = FALSE)
    h <- timed("harmony", run_harmony(z, batch = b[keep], seed = max(seed, 1), threads = threads, progress = FALSE))
    attr(h, "harmony") <- NULL
    fit$harmony <- stage("harmony", distill, work[, keep], batch = bname, teacher = given_teacher(h),
                         seed = max(seed, 1), threads = threads, progress = progress)
    z <- timed("harmony", latent_of_object(fit$harmony, work[, keep]))
    put("HARMONY", z)
    fit$embedding <- "HARMONY"
  }
  clusters_stage <- function(z) {
    fit$clusters <<- stage("clusters", soft_clusters, z, n_clusters = n_clusters, seed = max(seed, 1),
                           threads = threads, progress = progress)
  }
  if (joint) {
    clusters_stage(z)
    tuned <- stage("joint", fine_tune_clusters, fit$vae, fit$clusters, work[, keep], batch = bname, seed = seed,
                   threads = threads, progress = progress)
    fit$vae <- tuned$model
    fit$clusters <- tuned$clusters
    z <- timed("joint", latent_of_object(fit$vae, work))
    put("VAE", z)
    z <- z[keep, , drop = FALSE]
  }
  if ("umap" %in% steps) {
    fit$umap <- stage("umap", run_umap, z, seed = max(seed, 1), threads = threads, progress = progress)
    put("UMAP", fit$umap$embedding)
  }
  if ("clusters" %in% steps) {
    if (!joint) clusters_stage(z)
    cl <- factor(rep(NA, ncol(sce)), levels = fit$clusters$levels)
    cl[keep] <- fit$clusters$clusters
    sce$soft_cluster <- cl
    conf <- rep(NA_real_, ncol(sce))
    conf[keep] <- apply(fit$clusters$probabilities, 1, max)
    sce$soft_cluster_confidence <- conf
    put("soft_cluster", fit$clusters$probabilities)
  }
  sce$.batch <- NULL
  fit$seconds <- seconds
  fit <- structure(fit, class = "scdistill_pipeline")
  if (seurat) return(pipeline_to_seurat(x, sce, fit))
  if (inherits(x, "SummarizedExperiment")) {
    x <- as(x, "SingleCellExperiment")
    for (nm in setdiff(SummarizedExperiment::assayNames(sce), "counts")) {
      SummarizedExperiment::assay(x, nm, withDimnames = FALSE) <- SummarizedExperiment::assay(sce, nm)
    }
    new_cols <- setdiff(colnames(SummarizedExperiment::colData(sce)), colnames(SummarizedExperiment::colData(x)))
    for (nm in new_cols) SummarizedExperiment::colData(x)[[nm]] <- SummarizedExperiment::colData(sce)[[nm]]
    for (nm in SingleCellExperiment::reducedDimNames(sce)) {
      SingleCellExperiment::reducedDim(x, nm) <- SingleCellExperiment::reducedDim(sce, nm)
    }
    sce <- x
  }
  store_fit(sce, "pipeline", fit)
}

# The pipeline's results written into the Seurat object they came from.
pipeline_to_seurat <- function(x, sce, fit) {
  need("SeuratObject")
  if ("decontaminated" %in% SummarizedExperiment::assayNames(sce)) {
    x[["decontaminated"]] <- SeuratObject::CreateAssayObject(counts = SummarizedExperiment::assay(sce, "decontaminated"))
  }
  cols <- intersect(c("ambient_fraction", "ambient_removed", "doublet_score", "doublet_call", "soft_cluster",
                      "soft_cluster_confidence"), colnames(SummarizedExperiment::colData(sce)))
  x <- add_cell_columns(x, as.data.frame(SummarizedExperiment::colData(sce))[, cols, drop = FALSE])
  for (nm in SingleCellExperiment::reducedDimNames(sce)) {
    to <- if (nm == "soft_cluster") cluster_reduction_name(x, nm) else tolower(nm)
    x <- write_back(x, SingleCellExperiment::reducedDim(sce, nm), to)
  }
  store_fit(x, "pipeline", fit)
}

#' @method print scdistill_pipeline
#' @export
print.scdistill_pipeline <- function(x, ...) {
  cat("scdistill pipeline:", paste(x$steps, collapse = " -> "), "\n")
  cat(sprintf("  %s genes (%s highly variable)%s; last latent space: %s\n", fmt_int(length(x$genes)),
              fmt_int(length(x$hvg)), if (length(x$batch_levels)) paste0(", ", length(x$batch_levels), " batches") else "",
              x$embedding))
  if (!is.null(x$clusters)) cat(sprintf("  %d clusters\n", length(x$clusters$levels)))
  if (length(x$seconds)) {
    cat(sprintf("  seconds: %s (%.1f in all)\n", paste(sprintf("%s %.1f", names(x$seconds), x$seconds), collapse = ", "),
                sum(x$seconds)))
  }
  invisible(x)
}

#' Plot a pipeline's results
#'
#' Where a user looks after [run_pipeline()]: the estimated ambient share
#' per cell (histogram), the doublet score by cluster, and the clusters on
#' the UMAP (each panel when its stage ran).
#'
#' @param x A `scdistill_pipeline` (`metadata(sce)$pipeline`).
#' @param y The object [run_pipeline()] returned (the cells' values).
#' @param ... Unused.
#' @return `x`, invisibly.
#' @method plot scdistill_pipeline
#' @export
plot.scdistill_pipeline <- function(x, y, ...) {
  if (missing(y)) stop("give the object run_pipeline() returned: plot(pipeline, sce)", call. = FALSE)
  cd <- if (inherits(y, "Seurat")) y[[]] else as.data.frame(SummarizedExperiment::colData(y))
  um <- if (inherits(y, "Seurat")) SeuratObject::Embeddings(y, "umap") else SingleCellExperiment::reducedDim(y, "UMAP")
  panels <- c(!is.null(cd$ambient_fraction), !is.null(cd$doublet_score), !is.null(um) && !is.null(cd$soft_cluster))
  old <- graphics::par(mfrow = c(1, max(sum(panels), 1)), mar = c(4, 4, 2.5, 1))
  on.exit(graphics::par(old))
  if (panels[1]) {
    graphics::hist(cd$ambient_fraction, breaks = 40, col = "#6c8ebf", border = "white",
                   xlab = "Estimated ambient share", main = "Ambient RNA per cell")
  }
  if (panels[2]) {
    g <- if (!is.null(cd$soft_cluster)) droplevels(cd$soft_cluster) else factor(rep("all", nrow(cd)))
    graphics::boxplot(cd$doublet_score ~ g, xlab = "Cluster", ylab = "Doublet score", main = "Doublet score by cluster",
                      col = "grey90", outline = FALSE)
  }
  if (panels[3]) {
    pal <- grDevices::hcl.colors(max(nlevels(cd$soft_cluster), 2), "Dark 3")
    graphics::plot(um[, 1], um[, 2], col = pal[as.integer(cd$soft_cluster)], pch = 16, cex = 0.4, xlab = "UMAP 1",
                   ylab = "UMAP 2", main = "Clusters on the UMAP")
    graphics::legend("topright", levels(cd$soft_cluster), col = pal, pch = 16, bty = "n", cex = 0.7)
  }
  invisible(x)
}

#' Run new cells through a fitted pipeline
#'
#' `project()` sends new cells through the fitted stages of
#' [run_pipeline()]: ambient RNA removal with the fitted model (for batches
#' it was fitted on), the VAE's and the distilled Harmony's latent spaces,
#' the parametric UMAP and the fitted centroids. Doublet detection runs per
#' sample and is not projected: call [find_doublets()] on new samples.
#' The new cells' batches must be ones the pipeline was fitted on; map new
#' batches onto its VAE with [map_query()] first.
#'
#' @param object A `scdistill_pipeline` (`metadata(sce)$pipeline`).
#' @param x New cells: a `SingleCellExperiment`, `Seurat` object or counts
#'   matrix with (at least) the pipeline's genes.
#' @param batch The new cells' batch.
#' @param threads Threads.
#' @param ... Unused.
#' @return A `SingleCellExperiment` with the reductions and cell metadata
#'   the pipeline writes (a matrix becomes one).
#' @examples
#' sim <- simulate_counts(n_cells = 800, n_genes = 300, n_groups = 4, seed = 2)
#' fit_on <- sim[, 1:600]
#' quick <- list(vae = list(max_epochs = 50), umap = list(max_epochs = 20))
#' fit_on <- run_pipeline(fit_on, batch = "batch", steps = c("vae", "umap", "clusters"),
#'                        n_clusters = 4, threads = 2, args = quick)
#' new <- project(S4Vectors::metadata(fit_on)$pipeline, sim[, 601:800], batch = "batch")
#' table(new$soft_cluster, new$cell_type)
#' @export
project <- function(object, x, ...) UseMethod("project")

#' @rdname project
#' @export
project.scdistill_pipeline <- function(object, x, batch = NULL, threads = NULL, ...) {
  cnt <- as_counts(x, batch = batch)
  missing <- setdiff(object$genes, rownames(cnt$counts))
  if (length(missing)) {
    stop("the new cells are on other genes: ", length(missing), " of the pipeline's ", length(object$genes),
         " genes are missing (e.g. ", paste(utils_head(missing, 3), collapse = ", "), ")", call. = FALSE)
  }
  b <- cnt$batch
  if (length(object$batch_levels)) {
    if (is.null(b)) stop("give `batch`, the new cells' batch: the pipeline was fitted with batches", call. = FALSE)
    unknown <- setdiff(levels(b), object$batch_levels)
    if (length(unknown)) {
      stop("batch '", unknown[1], "' is not one the pipeline was fitted on; map new batches onto its VAE with ",
           "map_query() first", call. = FALSE)
    }
  }
  m <- cnt$counts[object$genes, , drop = FALSE]
  out <- SingleCellExperiment::SingleCellExperiment(list(counts = m), colData = S4Vectors_DataFrame(cnt$cell_data))
  if (!is.null(object$ambient)) {
    a <- apply_ambient(object$ambient, m, batch = b, threads = threads)
    m <- a$counts
    SummarizedExperiment::assay(out, "decontaminated") <- m
    out$ambient_fraction <- a$fraction
    out$ambient_removed <- a$removed
  }
  m <- m[object$hvg, , drop = FALSE]
  z <- NULL
  if (!is.null(object$vae)) {
    z <- latent(object$vae, m, batch = b, threads = threads)
    SingleCellExperiment::reducedDim(out, "VAE") <- z
  }
  if (!is.null(object$harmony)) {
    z <- latent(object$harmony, m, batch = b, threads = threads)
    SingleCellExperiment::reducedDim(out, "HARMONY") <- z
  }
  if (is.null(z)) {
    stop("the pipeline's latent space is a PCA, which has no projection for new cells: ",
         "build it with the \"vae\" or \"harmony\" stage", call. = FALSE)
  }
  if (!is.null(object$umap)) SingleCellExperiment::reducedDim(out, "UMAP") <- project_umap(object$umap, z, threads = threads)
  if (!is.null(object$clusters)) {
    p <- attr(stats::predict(object$clusters, z, threads = threads), "probabilities")
    out <- write_clusters(out, p, object$clusters$levels, "soft_cluster")
  }
  out
}
