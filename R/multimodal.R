#' Fit a multimodal (RNA + ATAC) variational autoencoder
#'
#' Trains one model on paired modalities measured in the same cells (10x
#' multiome RNA and ATAC, or any paired count modalities), after
#' regularizedvi (Kleshchevnikov et al.). Each modality has its own encoder
#' on log1p(counts); the joint latent space concatenates the modalities'
#' latent spaces (or averages them, `combine = "mean"`), and every
#' modality's decoder sees the whole joint latent. The counts of feature g of
#' a modality follow a negative binomial with mean
#' `exp(l) * (softplus(f(z)) + s_g) * y_g`:
#'
#' * `s`, the **ambient** background (RNA by default): one value per feature and
#'   level of `ambient_covariates`, started at 0.2 × the level's mean
#'   normalized expression; with `ambient_prior = TRUE` it has a Gamma(1, 100) prior.
#' * `y`, **feature scaling** (ATAC by default): `softplus(gamma) / 0.7` per
#'   feature and level of `feature_scaling_covariates`, with a Gamma(200, 200)
#'   prior that keeps it near 1 unless the data insist.
#' * The inverse dispersion θ has a variational LogNormal per feature and
#'   level of `dispersion_key`, with the "containment" prior 1/√θ ~ Exp(λ),
#'   λ ~ Gamma(9, 3): overdispersion is kept small unless needed. θ is drawn
#'   while training and its posterior mean is used afterwards.
#' * The library size `l` is learned by a small encoder per modality, with a
#'   log-normal prior per level of `library_size_key` whose variance is half
#'   that of the data (`library_prior_scale`); or observed.
#'
#' The decoders get no batch: batch effects act through the ambient term,
#' feature scaling, dispersion and library size (`batch =` sets all four keys
#' except feature scaling; give `nn_conditioning_covariates` to condition
#' the decoders as well). Global prior terms (and a ridge penalty
#' `decoder_l2 * sum(W^2)` on the decoder weights) are divided by the number
#' of training cells, so the loss is a per-cell quantity whatever the
#' minibatch size.
#'
#' Strong per-gene batch effects are not removed by those channels alone: a
#' batch-free decoder leaves the encoder free to keep batches apart. Give
#' `nn_conditioning_covariates = "batch"` too when the joint latent space
#' should mix batches (on simulated data with two "medium" batches it
#' raised iLISI from 0 to 0.80 at the same ARI).
#'
#' Training, early stopping, progress bar and Ctrl-C work as in [fit_vae()].
#' By default early stopping uses regularizedvi's `min_delta` of 0.0002 per
#' feature (summed over modalities).
#'
#' @param x Paired counts: a `SingleCellExperiment` with RNA as its main
#'   experiment and the peaks in `altExp(x, "ATAC")` (or `"peaks"`), a
#'   `MultiAssayExperiment`, a `Seurat` object with `RNA` and `ATAC` (or
#'   `peaks`) assays, or a named list of count matrices (features × cells)
#'   sharing cell names. Cells measured in only one modality are refused.
#'
#'   **On disk**, for data larger than memory: a named list of files (or
#'   [h5_counts()] objects, or HDF5-backed matrices) holding the same cells
#'   in the same order, e.g. `list(RNA = "rna.h5ad", ATAC = "atac.h5ad")`;
#'   one 10x multiome file (`filtered_feature_bc_matrix.h5`, or an `.h5ad`
#'   file with `var/feature_types`) split by its features' types ("Gene
#'   Expression" becomes RNA, "Peaks" ATAC); or a `SingleCellExperiment`
#'   whose counts and `altExp` counts are HDF5-backed. Training streams
#'   minibatches from every modality in step, as [fit_vae()] does from one
#'   file (see [h5_counts()]); cell columns come from the first file's `obs`
#'   or the experiment's `colData`. [latent()], [add_latent()],
#'   [normalized_expression()], [elbo()] and [modality_attribution()] read
#'   such files in blocks of 20,000 cells; other functions need the cells in
#'   memory.
#' @param batch `NULL`, a column of the cell metadata, or one value per cell:
#'   the default of `ambient_covariates`, `dispersion_key` and `library_size_key`.
#' @param modalities Names of the modalities to use, in order (default: RNA
#'   first, then ATAC or peaks; for a list, its names).
#' @param n_latent,n_hidden Latent dimensions and hidden units per
#'   modality: one number for all, or a named vector (`c(RNA = 20, ATAC = 10)`).
#' @param n_layers Hidden layers of every encoder and decoder.
#' @param dropout Dropout rate of the encoders.
#' @param combine `"concatenate"` (joint latent = the modalities' latents side
#'   by side) or `"mean"` (weighted mean of their posteriors; needs equal `n_latent`).
#' @param modality_weights Weights of the modalities in `combine = "mean"`.
#' @param ambient_covariates,feature_scaling_covariates,dispersion_key,library_size_key
#'   Cell metadata columns (several are combined into their interaction)
#'   whose levels get their own ambient profile, feature scaling, dispersion
#'   and library prior; `NULL` for one shared level (`batch` fills the ambient,
#'   dispersion and library keys).
#' @param nn_conditioning_covariates,encoder_covariates Categorical cell
#'   metadata columns given one-hot to every decoder layer, or to the first
#'   encoder layer. None by default.
#' @param ambient_modalities,feature_scaling_modalities Modalities with an
#'   ambient term (default: the first, RNA) and with feature scaling (default:
#'   the others, ATAC).
#' @param ambient_prior Put the Gamma(1, 100) prior on the ambient term.
#' @param library_size `"learned"` or `"observed"` (log total counts).
#' @param library_prior_scale Variance of the library prior relative to the data's.
#' @param decoder_l2 Weight of the ridge penalty on the decoders' weights.
#' @param norm Normalisation of hidden layers: `"layer"` (regularizedvi's
#'   default), `"batch"` or `"none"`.
#' @param early_stopping,patience Stop when the validation loss has not
#'   improved for `patience` epochs, keeping the best weights.
#' @param min_delta Smallest improvement of the validation loss that resets
#'   early stopping; `NULL` means 0.0002 per feature.
#' @inheritParams fit_vae
#' @return A `scdistill_multimodal` model (a `scdistill_model`): use
#'   [latent()] (joint, or `modality = "ATAC"`), [normalized_expression()]
#'   with `modality =`, [modality_attribution()], [add_latent()], `plot()`,
#'   [save_model()].
#' @examples
#' mo <- example_multiome()
#' mo
#' model <- fit_multimodal(mo, max_epochs = 40, threads = 2)
#' model
#' dim(latent(model))
#'
#' # The same cells from two files on disk
#' rna <- tempfile(fileext = ".h5ad")
#' atac <- tempfile(fileext = ".h5ad")
#' write_h5ad(mo, rna)
#' write_h5ad(SingleCellExperiment::altExp(mo, "ATAC"), atac)
#' from_disk <- fit_multimodal(list(RNA = rna, ATAC = atac), max_epochs = 10, threads = 2)
#' dim(latent(from_disk))
#' @export
fit_multimodal <- function(x, batch = NULL, modalities = NULL, n_latent = 10, n_hidden = 128, n_layers = 1,
                           dropout = 0.1, combine = c("concatenate", "mean"), modality_weights = NULL,
                           ambient_covariates = NULL, nn_conditioning_covariates = NULL,
                           feature_scaling_covariates = NULL, dispersion_key = NULL, library_size_key = NULL,
                           encoder_covariates = NULL, ambient_modalities = NULL, feature_scaling_modalities = NULL,
                           ambient_prior = FALSE, library_size = c("learned", "observed"),
                           library_prior_scale = 0.5, decoder_l2 = 0.1, norm = c("layer", "batch", "none"),
                           max_epochs = NULL, batch_size = 128, lr = 1e-3, weight_decay = 1e-6, kl_warmup = 0.5,
                           early_stopping = TRUE, patience = 45, min_delta = NULL, validation_fraction = 0.1,
                           seed = 0, device = "auto", threads = NULL, progress = interactive(), train = NULL,
                           workers = 1) {
  if (check_count(workers, "workers") > 1) {
    return(run_workers("fit_multimodal", called_with(match.call(), parent.frame()), workers, threads))
  }
  apply_train_params(train, environment(), names(match.call())[-1], "fit_multimodal")
  combine <- choose_arg(combine, "combine")
  library_size <- choose_arg(library_size, "library_size")
  norm <- choose_arg(norm, "norm")
  check_fraction(dropout, "dropout")
  check_positive(library_prior_scale, "library_prior_scale")
  check_positive(decoder_l2, "decoder_l2", zero_ok = TRUE)
  mo <- multimodal_counts(x, modalities)
  mods <- names(mo$slots)
  cells <- mo$cells
  n_cells <- length(cells)

  per_modality <- function(v, arg, check) {
    if (!is.null(names(v))) {
      unknown <- setdiff(names(v), mods)
      if (length(unknown)) stop("`", arg, "` names unknown modalities: ", paste(unknown, collapse = ", "), call. = FALSE)
      missing <- setdiff(mods, names(v))
      if (length(missing)) stop("`", arg, "` gives no value for ", paste(missing, collapse = ", "), call. = FALSE)
      v <- v[mods]
    } else if (length(v) == 1) {
      v <- rep(v, length(mods))
    } else if (length(v) != length(mods)) {
      stop("`", arg, "` needs one value or one per modality (", paste(mods, collapse = ", "), ")", call. = FALSE)
    }
    stats::setNames(vapply(seq_along(v), function(i) check(v[[i]], arg), numeric(1)), mods)
  }
  n_latent <- per_modality(n_latent, "n_latent", check_count)
  n_hidden <- per_modality(n_hidden, "n_hidden", check_count)
  weights <- per_modality(modality_weights %||% 1, "modality_weights", function(v, a) check_positive(v, a))
  ambient_mods <- check_modalities(ambient_modalities %||% mods[1], mods, "ambient_modalities")
  scaling_mods <- check_modalities(feature_scaling_modalities %||% mods[-1], mods, "feature_scaling_modalities")
  if (combine == "mean" && length(unique(n_latent)) > 1) {
    stop("`combine = \"mean\"` averages the modalities' latent spaces: give them the same `n_latent`", call. = FALSE)
  }
  specs <- lapply(mods, function(m) {
    list(n_latent = n_latent[[m]], n_hidden = n_hidden[[m]], ambient = m %in% ambient_mods,
         feature_scaling = m %in% scaling_mods, weight = weights[[m]])
  })
  names(specs) <- mods

  # A batch given as one value per cell becomes the metadata column "batch",
  # under which new cells give it (as for fit_vae()).
  if (!is.null(batch) && !(is.character(batch) && length(batch) >= 1 && length(batch) < n_cells &&
                           all(batch %in% colnames(mo$cell_data)))) {
    mo$cell_data$batch <- resolve_cell_factor(batch, mo$cell_data, cells, "batch")
    batch <- "batch"
  }
  batch_cols <- batch
  key <- function(cols, arg) covariate_key(cols, mo$cell_data, cells, arg)
  covariates <- list(ambient = key(ambient_covariates %||% batch_cols, "ambient_covariates"),
                     scaling = key(feature_scaling_covariates, "feature_scaling_covariates"),
                     dispersion = key(dispersion_key %||% batch_cols, "dispersion_key"),
                     library = key(library_size_key %||% batch_cols, "library_size_key"),
                     decoder = lapply(nn_conditioning_covariates, function(c) key(c, "nn_conditioning_covariates")),
                     encoder = lapply(encoder_covariates, function(c) key(c, "encoder_covariates")))
  config <- list(combine = combine, n_layers = check_count(n_layers, "n_layers"), dropout = dropout, norm = norm,
                 learn_library = library_size == "learned", library_prior_scale = library_prior_scale,
                 ambient_prior = check_flag(ambient_prior, "ambient_prior"), decoder_l2 = decoder_l2)
  n_features <- sum(lengths(lapply(mo$slots, `[[`, "genes")))
  min_delta <- min_delta %||% (2e-4 * n_features)
  tc <- train_settings(n_cells, max_epochs, batch_size, lr, weight_decay, kl_warmup, early_stopping, patience,
                       min_delta, validation_fraction, seed)
  config$modalities <- unname(Map(function(spec, m) c(list(name = m), spec), specs, mods))

  join_group(mo$disk %||% mo$counts, list(config, tc, covariates))
  bar <- if (check_flag(progress, "progress")) training_bar(tc$max_epochs) else NULL
  if (!is.null(bar)) on.exit(bar$done(), add = TRUE)
  fit <- rust(rs_fit_multimodal(unname(mo$slots), covariates, config, tc, check_device(device),
                                resolve_threads(threads), bar$update))
  model <- new_model(fit$ptr, mo$counts)
  if (!is.null(mo$disk)) model$fingerprint <- lapply(mo$disk, disk_fingerprint)
  model$covariates$batch <- batch_cols
  finish_fit(model, fit$latent, cells)
}

check_modalities <- function(m, mods, arg) {
  if (length(m) && !is.character(m)) stop("`", arg, "` must be modality names", call. = FALSE)
  unknown <- setdiff(m, mods)
  if (length(unknown)) {
    stop("`", arg, "`: ", paste0("'", unknown, "'", collapse = ", "), " not among the modalities (",
         paste(mods, collapse = ", "), ")", call. = FALSE)
  }
  m
}

# A covariate key of the model from cell metadata columns (several: their
# interaction) or one value per cell; NULL gives one shared level.
covariate_key <- function(cols, cell_data, cells, arg) {
  if (is.null(cols)) {
    return(list(name = "", codes = rep(1L, length(cells)), levels = "all"))
  }
  if (is.character(cols) && length(cols) > 1 && length(cols) != length(cells)) {
    parts <- lapply(cols, function(c) as.character(resolve_cell_factor(c, cell_data, cells, arg)))
    f <- droplevels(factor(do.call(paste, c(parts, sep = ":"))))
    name <- paste(cols, collapse = ":")
  } else {
    f <- resolve_cell_factor(cols, cell_data, cells, arg)
    name <- if (is.character(cols) && length(cols) == 1 && length(cells) != 1) cols else arg
  }
  list(name = name, codes = as.integer(f), levels = levels(f))
}

#' Paired modalities of the same cells
#'
#' Reads the modalities of `x` (see [fit_multimodal()]) as validated count
#' matrices with the same cells in the same order.
#'
#' @inheritParams fit_multimodal
#' @return A list with `counts` (a named list of features × cells
#'   `dgCMatrix`), `slots` (what the Rust core reads) and `cell_data`.
#' @keywords internal
#' @noRd
multimodal_counts <- function(x, modalities = NULL) {
  on_disk <- multimodal_disk(x, modalities)
  if (!is.null(on_disk)) return(on_disk)
  cell_data <- NULL
  if (is(x, "SingleCellExperiment")) {
    exps <- sce_modalities(x, modalities)
    mats <- mapply(function(m, y) modality_counts(m, as_counts(y)), names(exps), exps, SIMPLIFY = FALSE)
    cell_data <- as.data.frame(SummarizedExperiment::colData(x))
  } else if (is(x, "MultiAssayExperiment")) {
    need("MultiAssayExperiment")
    exps <- MultiAssayExperiment::experiments(x)
    modalities <- modalities %||% default_modalities(names(exps))
    missing <- setdiff(modalities, names(exps))
    if (length(missing)) {
      stop("`modalities`: ", paste(missing, collapse = ", "), " not among the experiments (",
           paste(names(exps), collapse = ", "), ")", call. = FALSE)
    }
    smap <- as.data.frame(MultiAssayExperiment::sampleMap(x))
    mats <- lapply(modalities, function(m) {
      e <- exps[[m]]
      cnt <- modality_counts(m, as_counts(e))
      rows <- smap[smap$assay == m, ]
      colnames(cnt) <- as.character(rows$primary[match(colnames(cnt), rows$colname)])
      cnt
    })
    names(mats) <- modalities
    cell_data <- as.data.frame(MultiAssayExperiment::colData(x))
  } else if (inherits(x, "Seurat")) {
    need("SeuratObject")
    assays <- SeuratObject::Assays(x)
    modalities <- modalities %||% default_modalities(assays)
    mats <- lapply(modalities, function(m) {
      if (!m %in% assays) {
        stop("`modalities`: '", m, "' is not an assay of `x` (", paste(assays, collapse = ", "), ")", call. = FALSE)
      }
      modality_counts(m, as_counts(x, assay = m))
    })
    names(mats) <- modalities
    cell_data <- x[[]]
  } else if (is.list(x) && !is.data.frame(x)) {
    cell_data <- attr(x, "cell_data")
    if (is.null(names(x)) || any(!nzchar(names(x)))) {
      stop("a list of modalities must be named (e.g. list(RNA = rna, ATAC = atac))", call. = FALSE)
    }
    modalities <- modalities %||% names(x)
    mats <- lapply(modalities, function(m) {
      if (is.null(x[[m]])) stop("`modalities`: no element '", m, "' in `x`", call. = FALSE)
      modality_counts(m, as_counts(x[[m]]))
    })
    names(mats) <- modalities
  } else {
    stop("fit_multimodal() needs paired modalities: a SingleCellExperiment with altExp(x, \"ATAC\"), a ",
         "MultiAssayExperiment, a Seurat object with RNA and ATAC assays, or a named list of count matrices; not ",
         class(x)[1], call. = FALSE)
  }
  if (length(mats) < 1) stop("no modality to model", call. = FALSE)
  # Paired cells only: every modality must hold the same cells.
  cells <- colnames(mats[[1]])
  for (m in names(mats)[-1]) {
    other <- colnames(mats[[m]])
    only_first <- sum(!cells %in% other)
    only_other <- sum(!other %in% cells)
    if (only_first || only_other) {
      stop(sprintf(paste("modalities must be measured in the same cells: %s cell(s) have %s but no %s, and %s",
                         "have %s but no %s (fit_multimodal() models paired cells only: subset to the %s shared ones)"),
                   fmt_int(only_first), names(mats)[1], m, fmt_int(only_other), m, names(mats)[1],
                   fmt_int(sum(cells %in% other))), call. = FALSE)
    }
    # Reordered only when the order differs: subsetting copies the matrix.
    if (!identical(other, cells)) mats[[m]] <- mats[[m]][, match(cells, other), drop = FALSE]
  }
  if (!is.null(cell_data) && nrow(cell_data) && !is.null(rownames(cell_data)) && all(cells %in% rownames(cell_data))) {
    cell_data <- cell_data[cells, , drop = FALSE]
  } else if (is.null(cell_data) || nrow(cell_data) != length(cells)) {
    cell_data <- data.frame(row.names = cells)
  }
  slots <- lapply(mats, function(m) list(p = m@p, i = m@i, x = m@x, genes = rownames(m), cells = colnames(m)))
  list(counts = mats, slots = slots, cell_data = cell_data, cells = cells)
}

# The experiments of a SingleCellExperiment that hold `modalities` (the main
# experiment's name, or altExp names), named by modality; by default the
# main experiment and the first altExp named ATAC or Peaks.
sce_modalities <- function(x, modalities) {
  need("SingleCellExperiment")
  main <- SingleCellExperiment::mainExpName(x) %||% "RNA"
  alts <- SingleCellExperiment::altExpNames(x)
  if (is.null(modalities)) {
    atac <- alts[toupper(alts) %in% c("ATAC", "PEAKS")]
    if (!length(atac)) {
      stop("`x` has no ATAC modality: put the peak counts in altExp(x, \"ATAC\") (it has: ",
           if (length(alts)) paste(alts, collapse = ", ") else "no altExps", ")", call. = FALSE)
    }
    modalities <- c(main, atac[1])
  }
  exps <- lapply(modalities, function(m) {
    if (identical(m, main)) return(x)
    if (!m %in% alts) {
      stop("`modalities`: '", m, "' is neither the main experiment ('", main, "') nor an altExp (",
           paste(alts, collapse = ", "), ")", call. = FALSE)
    }
    SingleCellExperiment::altExp(x, m)
  })
  names(exps) <- modalities
  exps
}

# Paired modalities that stay on disk, as multimodal_counts() returns them
# with `disk` (the modalities' scdistill_h5 descriptions) in place of
# `counts`; NULL when `x` is not on disk. `x`: a named list of files,
# scdistill_h5 objects or HDF5-backed matrices; a SingleCellExperiment whose
# counts and altExp counts are HDF5-backed; or one file (or scdistill_h5)
# whose features carry their types, as a 10x multiome matrix does.
multimodal_disk <- function(x, modalities) {
  disk_like <- function(e) {
    (is.character(e) && length(e) == 1) || inherits(e, "scdistill_h5") || methods::is(e, "DelayedMatrix")
  }
  cell_data <- NULL
  if (is.list(x) && !is.data.frame(x) && !inherits(x, "scdistill_h5") && !is.null(names(x)) &&
      any(vapply(x, disk_like, logical(1)))) {
    disk <- lapply(x, function(e) if (disk_like(e)) as_disk(e))
    on <- !vapply(disk, is.null, logical(1))
    if (!all(on)) {
      stop("modalities ", paste(names(x)[on], collapse = ", "), " are on disk but ",
           paste(names(x)[!on], collapse = ", "), " not: give every modality as a file (or all in memory)",
           call. = FALSE)
    }
    modalities <- modalities %||% names(x)
    missing <- setdiff(modalities, names(x))
    if (length(missing)) stop("`modalities`: no element ", paste0("'", missing, "'", collapse = ", "), " in `x`",
                              call. = FALSE)
    ds <- disk[modalities]
    cell_data <- attr(x, "cell_data")
  } else if (methods::is(x, "SingleCellExperiment")) {
    main_disk <- as_disk(x)
    if (is.null(main_disk)) return(NULL)
    exps <- sce_modalities(x, modalities)
    main <- SingleCellExperiment::mainExpName(x) %||% "RNA"
    ds <- mapply(function(m, y) {
      if (identical(m, main)) return(main_disk)
      as_disk(y) %||%
        stop("the counts of `x` are on disk (HDF5) but those of altExp '", m, "' are not: keep both on disk, ",
             "or both in memory", call. = FALSE)
    }, names(exps), exps, SIMPLIFY = FALSE)
    cell_data <- as.data.frame(SummarizedExperiment::colData(x))
  } else if ((is.character(x) && length(x) == 1) || inherits(x, "scdistill_h5")) {
    ds <- split_feature_types(as_disk(x), modalities)
  } else {
    return(NULL)
  }
  for (m in names(ds)) check_disk_genes(ds[[m]])
  cells <- ds[[1]]$cells
  for (m in names(ds)[-1]) {
    if (!identical(ds[[m]]$cells, cells)) {
      other <- ds[[m]]$cells
      stop(sprintf(paste("modalities on disk must hold the same cells in the same order (they are read in step):",
                         "%s has %s cells, %s has %s, %s of them shared"),
                   names(ds)[1], fmt_int(length(cells)), m, fmt_int(length(other)),
                   fmt_int(sum(cells %in% other))), call. = FALSE)
    }
  }
  cell_data <- cell_data %||% disk_cell_data(ds[[1]]) %||% data.frame(row.names = seq_along(cells))[, 0]
  if (nrow(cell_data) != length(cells)) {
    stop("the cell metadata have ", nrow(cell_data), " rows for ", fmt_int(length(cells)), " cells", call. = FALSE)
  }
  rownames(cell_data) <- cells
  slots <- lapply(ds, function(d) c(disk_spec(d), list(genes = d$genes)))
  list(counts = NULL, disk = ds, slots = slots, cell_data = cell_data, cells = cells)
}

# The modalities of one on-disk matrix whose features carry their types
# (a 10x multiome file's `features/feature_type`, or an .h5ad file's
# `var/feature_types`): "Gene Expression" becomes RNA, "Peaks" ATAC.
split_feature_types <- function(d, modalities) {
  tenx_types <- paste0(sub("/data$", "", d$data %||% "matrix/data"), "/features/feature_type")
  types <- if (identical(d$format, "10x") && rust(rs_h5_exists(d$path, tenx_types))) {
    h5_strings(d$path, tenx_types)
  } else if (identical(d$format, "h5ad") && rust(rs_h5_exists(d$path, "var/feature_types"))) {
    as.character(h5ad_column(d$path, "feature_types", group = "var"))
  }
  if (!is.null(types) && !is.null(d$keep)) types <- types[d$keep]
  if (is.null(types) || length(unique(types)) < 2) {
    stop("'", d$path, "' holds one modality (its features carry no types such as \"Gene Expression\" and ",
         "\"Peaks\"): give the modalities as a named list of files, e.g. list(RNA = \"rna.h5ad\", ATAC = ",
         "\"atac.h5ad\")", call. = FALSE)
  }
  named <- c("Gene Expression" = "RNA", "Peaks" = "ATAC")
  label <- ifelse(types %in% names(named), named[types], types)
  modalities <- modalities %||% default_modalities(unique(label))
  missing <- setdiff(modalities, label)
  if (length(missing)) {
    stop("`modalities`: ", paste0("'", missing, "'", collapse = ", "), " not among the feature types of '", d$path,
         "' (", paste(unique(label), collapse = ", "), ")", call. = FALSE)
  }
  out <- lapply(modalities, function(m) {
    idx <- which(label == m)
    part <- d
    part$keep <- if (is.null(d$keep)) idx else d$keep[idx]
    part$genes <- d$genes[idx]
    part
  })
  names(out) <- modalities
  out
}

# The counts of modality `m` (`expr` is evaluated here, so that its errors
# name the modality).
modality_counts <- function(m, expr) {
  tryCatch(expr, error = function(e) stop("modality '", m, "': ", conditionMessage(e), call. = FALSE))$counts
}

default_modalities <- function(available) {
  rna <- available[toupper(available) %in% c("RNA", "GEX", "GENE EXPRESSION")]
  atac <- available[toupper(available) %in% c("ATAC", "PEAKS")]
  if (!length(rna) || !length(atac)) {
    stop("could not tell the RNA and ATAC modalities among: ", paste(available, collapse = ", "),
         "; name them with `modalities =`", call. = FALSE)
  }
  c(rna[1], atac[1])
}

# The latent spaces from the glue (list(joint, parts)) as the joint matrix
# with each modality's own in attribute "modalities".
multimodal_latents <- function(values, cells, model) {
  per <- lapply(names(values$parts), function(m) {
    z <- values$parts[[m]]
    shape_in_place(z, dimnames = list(cells, paste0(m, "_", seq_len(ncol(z)))))
  })
  names(per) <- names(values$parts)
  latent_matrix(values$joint, cells, ncol(values$joint), modalities = per)
}

modality_names <- function(model) as.character(model$info$config$modalities$name)

# The model's batch: the metadata column it was trained with, or (for a
# model read from a file) the name of its ambient key, which the batch sets.
multimodal_batch_name <- function(model) model$covariates$batch %||% model$info$ambient$name

# Covariate labels of (new) cells for each key of the model, in the core's
# order; NULL where the key has one level or is absent from the cell data.
# `batch` (a column or one value per cell) gives the keys made from the batch.
multimodal_labels <- function(model, cell_data, cells, batch = NULL) {
  i <- model$info
  keys <- c(list(i$ambient, i$scaling, i$dispersion, i$library), i$decoder, i$encoder)
  batch_name <- multimodal_batch_name(model)
  batch_values <- if (!is.null(batch)) as.character(resolve_cell_factor(batch, cell_data, cells, "batch"))
  lapply(keys, function(k) {
    if (length(k$levels) == 1 || !nzchar(k$name)) return(NULL)
    if (!is.null(batch_values) && identical(k$name, batch_name)) return(batch_values)
    cols <- strsplit(k$name, ":", fixed = TRUE)[[1]]
    if (!all(cols %in% colnames(cell_data))) return(NULL)
    as.character(do.call(paste, c(lapply(cols, function(c) as.character(cell_data[[c]])), sep = ":")))
  })
}

#' @export
model_cells.scdistill_multimodal <- function(model, x, batch = NULL, ...) {
  if (is.null(x)) stop("pass `x`, the paired counts of the cells", call. = FALSE)
  mo <- multimodal_counts(x, modality_names(model))
  if (!is.null(mo$disk)) {
    stop("of paired modalities on disk, fit_multimodal(), latent(), add_latent(), normalized_expression(), ",
         "elbo() and modality_attribution() read the files in blocks; this function would read them whole. ",
         "Read the cells you need into memory, e.g. lapply(files, function(f) as_counts(f, cells = 1:5000)$counts)",
         call. = FALSE)
  }
  cells <- mo$cells
  list(counts = unname(mo$slots), categorical = multimodal_labels(model, mo$cell_data, cells, batch), cells = cells)
}

#' @export
model_features.scdistill_multimodal <- function(model, modality = NULL) {
  model$info$features[[match(modality %||% modality_names(model)[1], modality_names(model))]]
}

check_modality <- function(model, modality, joint_ok) {
  mods <- modality_names(model)
  if (is.null(modality) && joint_ok) return(NULL)
  modality <- modality %||% mods[1]
  if (!(is.character(modality) && length(modality) == 1 && modality %in% mods)) {
    stop("`modality` must be one of ", paste(mods, collapse = ", "),
         if (joint_ok) " (or NULL for the joint latent space)", call. = FALSE)
  }
  modality
}

#' @rdname latent
#' @export
latent.scdistill_multimodal <- function(model, x = NULL, batch = NULL, give_mean = TRUE, seed = 0, threads = NULL,
                                        modality = NULL, ...) {
  give_mean <- check_flag(give_mean, "give_mean")
  modality <- check_modality(model, modality, joint_ok = TRUE)
  mo <- if (!is.null(x)) multimodal_counts(x, modality_names(model))
  z <- if (give_mean && !is.null(model$latent) && (is.null(x) || same_training_disk(model, mo))) {
    model$latent
  } else if (!is.null(mo$disk)) {
    multimodal_disk_latent(model, mo, batch, give_mean, seed, threads)
  } else {
    cells <- model_cells(model, x, batch)
    v <- rust(rs_model_latent(model_ptr(model), cells, list(give_mean = give_mean, seed = check_seed(seed)),
                              resolve_threads(threads)))
    multimodal_latents(v, cells$cells, model)
  }
  if (is.null(modality)) {
    attr(z, "modalities") <- NULL
    return(z)
  }
  attr(z, "modalities")[[modality]]
}

#' @rdname normalized_expression
#' @export
normalized_expression.scdistill_multimodal <- function(model, x, batch = NULL, transform_batch = NULL,
                                                       library_size = 1, n_samples = 1, log1p = FALSE, seed = 0,
                                                       threads = NULL, modality = NULL, ambient = FALSE,
                                                       genes = NULL, h5_file = NULL, h5_name = "normalized", ...) {
  modality <- check_modality(model, modality, joint_ok = FALSE)
  opts <- list(transform_batch = transform_batch, library_size = library_size, n_samples = n_samples, seed = seed,
               modality = match(modality, modality_names(model)) - 1L, ambient = check_flag(ambient, "ambient"))
  expression_of(model, x, batch, opts, log1p, threads, modality = modality, genes = genes,
                h5 = h5_target(h5_file, h5_name))
}

#' @rdname add_latent
#' @export
add_latent.scdistill_multimodal <- function(x, model, name = NULL, ...) {
  name <- name %||% "multimodal"
  z <- NULL
  mo <- multimodal_counts(x, modality_names(model))
  if (!is.null(model$latent)) {
    same <- if (is.null(mo$disk)) identical(data_fingerprint(mo$counts), model$fingerprint) else
      same_training_disk(model, mo)
    if (same) z <- model$latent
  }
  if (is.null(z) && !is.null(mo$disk)) z <- multimodal_disk_latent(model, mo, NULL, TRUE, 0, NULL)
  if (is.null(z)) {
    cells <- model_cells(model, x, ...)
    z <- multimodal_latents(rust(rs_model_latent(model_ptr(model), cells, list(give_mean = TRUE, seed = 0),
                                                 resolve_threads(NULL))), cells$cells, model)
  }
  per <- attr(z, "modalities")
  attr(z, "modalities") <- NULL
  x <- write_back(x, z, name)
  for (m in names(per)) x <- write_back(x, per[[m]], paste0(name, "_", m))
  x
}

# Whether the paired modalities on disk `mo` are the files the model was
# trained on, unchanged.
same_training_disk <- function(model, mo) {
  !is.null(mo$disk) && identical(unname(lapply(mo$disk, disk_fingerprint)), unname(model$fingerprint))
}

# latent() of paired modalities on disk: blocks of 20,000 cells read in
# turn from every modality, encoded, stacked (the modalities' own latent
# spaces as the "modalities" attribute, as for cells in memory).
multimodal_disk_latent <- function(model, mo, batch, give_mean, seed, threads) {
  blocks <- multimodal_blocks(mo, batch, "Encoding the cells", function(block, b, at) {
    cells <- model_cells(model, block, b)
    v <- rust(rs_model_latent(model_ptr(model), cells, list(give_mean = give_mean, seed = check_seed(seed)),
                              resolve_threads(threads)))
    multimodal_latents(v, cells$cells, model)
  })
  z <- do.call(rbind, blocks)
  per <- lapply(names(attr(blocks[[1]], "modalities")), function(m) {
    do.call(rbind, lapply(blocks, function(k) attr(k, "modalities")[[m]]))
  })
  names(per) <- names(attr(blocks[[1]], "modalities"))
  attr(z, "modalities") <- per
  z
}

# Calls `f(block, batch, at)` on blocks of 20,000 cells of the paired
# modalities on disk `mo` (from multimodal_disk()), read in turn from every
# modality: `block` the block's counts as model_cells() takes them (a named
# list, the cell metadata as attribute "cell_data"), `batch` the block's
# values of `batch` (or NULL), `at` its cells. Returns f's values as a list.
multimodal_blocks <- function(mo, batch, label, f) {
  b <- if (!is.null(batch)) as.character(resolve_cell_factor(batch, mo$cell_data, mo$cells, "batch"))
  for_blocks(mo$disk[[1]], NULL, label, function(part, ignored, at) {
    block <- c(list(part$counts), lapply(mo$disk[-1], function(d) as_counts(d, cells = at)$counts))
    names(block) <- names(mo$disk)
    attr(block, "cell_data") <- mo$cell_data[at, , drop = FALSE]
    f(block, if (!is.null(b)) b[at], at)
  })
}

#' @method print scdistill_multimodal
#' @export
print.scdistill_multimodal <- function(x, ...) {
  i <- x$info
  spec <- i$config$modalities
  mods <- vapply(seq_along(spec$name), function(k) {
    sprintf("%s (%s features, %d latent%s%s)", spec$name[k], fmt_int(spec$n_features[k]), spec$n_latent[k],
            if (isTRUE(spec$ambient[k])) ", ambient" else "", if (isTRUE(spec$feature_scaling[k])) ", scaled" else "")
  }, character(1))
  cat(sprintf("scdistill multimodal VAE: %s -> %d joint latent dimensions (%s)\n",
              paste(mods, collapse = " + "),
              if (identical(i$config$combine, "mean")) spec$n_latent[1] else sum(spec$n_latent), i$config$combine))
  keys <- vapply(i[c("ambient", "scaling", "dispersion", "library")],
                 function(k) if (nzchar(k$name)) sprintf("%s (%d)", k$name, length(k$levels)) else "-", character(1))
  cat(sprintf("  trained on %s cells; ambient: %s, scaling: %s, dispersion: %s, library (%s): %s\n",
              fmt_int(i$n_cells), keys[1], keys[2], keys[3],
              if (isTRUE(i$config$learn_library)) "learned" else "observed", keys[4]))
  h <- x$history
  if (nrow(h)) {
    state <- if (isTRUE(i$interrupted)) "interrupted" else if (isTRUE(i$stopped_early)) "stopped early" else "done"
    cat(sprintf("  %d epochs (%s), weights of epoch %d; validation -ELBO %.2f per cell; %.1f s\n",
                nrow(h), state, i$best_epoch, h$validation_elbo[max(i$best_epoch, 1)], sum(h$seconds)))
  }
  invisible(x)
}

#' Modality attribution of a multimodal model
#'
#' How much each modality's decoder depends on each latent dimension, cell
#' by cell: at the cell's posterior mean z, the mean absolute Jacobian of
#' the modality's decoded mean per unit library with respect to each latent
#' dimension, divided by the mean decoded value so that modalities with
#' different count scales compare (the relative change of the modality's
#' expected counts per unit of z). Computed exactly by automatic
#' differentiation, one pass per latent dimension.
#'
#' @param model A model from [fit_multimodal()].
#' @param x The paired counts of the cells (usually the training data): in
#'   memory, or paired files on disk as [fit_multimodal()] takes them, read
#'   in blocks of 20,000 cells.
#' @param threads CPU threads.
#' @return An array cells × modalities × latent dimensions, of class
#'   `scdistill_attribution`, with attribute `share`: per cell, each
#'   modality's part of the total attribution (rows sum to 1). `plot()`
#'   draws the share of a modality on a UMAP of the joint latent space.
#' @examples
#' mo <- example_multiome()
#' model <- fit_multimodal(mo, max_epochs = 30, threads = 2)
#' a <- modality_attribution(model, mo)
#' summary(attr(a, "share"))
#' @export
modality_attribution <- function(model, x, threads = NULL) {
  check_multimodal(model, "modality_attribution()")
  mods <- modality_names(model)
  attribute <- function(inp) {
    list(v = rust(rs_multimodal_attribution(model_ptr(model), inp, resolve_threads(threads))), cells = inp$cells)
  }
  mo <- multimodal_disk(x, mods)
  inp <- if (is.null(mo)) {
    attribute(model_cells(model, x))
  } else {
    # Paired files: blocks of cells in turn. The core's buffer is row-major
    # with the cells first, so the blocks' buffers are joined end to end.
    parts <- multimodal_blocks(mo, NULL, "Attributing the cells", function(block, b, at) {
      attribute(model_cells(model, block))
    })
    list(v = unlist(lapply(parts, `[[`, "v")), cells = unlist(lapply(parts, `[[`, "cells")))
  }
  v <- inp$v
  d <- length(v) / length(mods) / max(length(inp$cells), 1)
  n <- length(inp$cells)
  # The core's buffer is row-major [cells, modalities, latent].
  a <- aperm(array(v, dim = c(d, length(mods), n)), c(3, 2, 1))
  dimnames(a) <- list(inp$cells, mods, paste0("latent_", seq_len(d)))
  totals <- apply(a, c(1, 2), sum)
  share <- totals / rowSums(totals)
  structure(a, share = share, latent = if (identical(rownames(model$latent), inp$cells)) model$latent,
            class = "scdistill_attribution")
}

#' @method print scdistill_attribution
#' @export
print.scdistill_attribution <- function(x, ...) {
  d <- dim(x)
  cat(sprintf("Modality attribution: %s cells x %d modalities x %d latent dimensions\n", fmt_int(d[1]), d[2], d[3]))
  cat("Mean share per modality:\n")
  print(round(colMeans(attr(x, "share")), 3))
  cat("Mean attribution per latent dimension:\n")
  print(round(apply(unclass(x), c(2, 3), mean), 4))
  invisible(x)
}

#' Draw modality attribution on a UMAP
#'
#' @param x A `scdistill_attribution` from [modality_attribution()].
#' @param modality The modality whose share is coloured (default: the second, ATAC).
#' @param umap A cells × 2 matrix of coordinates; by default a UMAP
#'   (`uwot`) of the model's joint latent space.
#' @param ... Passed to [graphics::plot()].
#' @return The coordinates, invisibly.
#' @method plot scdistill_attribution
#' @export
plot.scdistill_attribution <- function(x, modality = NULL, umap = NULL, ...) {
  share <- attr(x, "share")
  modality <- modality %||% colnames(share)[min(2, ncol(share))]
  if (!modality %in% colnames(share)) {
    stop("`modality` must be one of ", paste(colnames(share), collapse = ", "), call. = FALSE)
  }
  if (is.null(umap)) {
    z <- attr(x, "latent")
    if (is.null(z)) stop("give `umap` coordinates (the attribution was computed on cells the model does not keep)",
                         call. = FALSE)
    need("uwot")
    umap <- withr_seed(1, uwot::umap(z, n_neighbors = min(15, nrow(z) - 1), n_threads = 1))
  }
  if (nrow(umap) != nrow(share)) stop("`umap` has ", nrow(umap), " rows for ", nrow(share), " cells", call. = FALSE)
  v <- share[, modality]
  pal <- grDevices::hcl.colors(100, "Viridis")
  col <- pal[pmax(1, pmin(100, round(99 * (v - min(v)) / max(diff(range(v)), 1e-12)) + 1))]
  graphics::plot(umap[, 1], umap[, 2], col = col, pch = 16, cex = 0.6, xlab = "UMAP 1", ylab = "UMAP 2",
                 main = paste0("Share of attribution: ", modality), ...)
  graphics::legend("topright", legend = sprintf("%.2f", stats::quantile(v, c(1, 0.5, 0))),
                   col = pal[c(100, 50, 1)], pch = 16, bty = "n", cex = 0.8)
  invisible(umap)
}

# Evaluates `expr` with the random seed `seed`, restoring the caller's stream.
withr_seed <- function(seed, expr) {
  old <- if (exists(".Random.seed", envir = globalenv())) get(".Random.seed", envir = globalenv())
  on.exit(if (is.null(old)) rm(".Random.seed", envir = globalenv()) else assign(".Random.seed", old, envir = globalenv()))
  set.seed(seed)
  expr
}

check_multimodal <- function(model, what) {
  check_model(model)
  if (!inherits(model, "scdistill_multimodal")) {
    stop(what, " needs a multimodal model (fit_multimodal())", call. = FALSE)
  }
}

#' A small real multiome data set
#'
#' PBMCs from a 10x multiome run (RNA and ATAC measured in the same
#' cells; a subset of 45 genes and 174 peaks of 1,000 cells, from the muon
#' test data, BSD-3): a `SingleCellExperiment` with the peaks in
#' `altExp(x, "ATAC")`. The cells with no counts in either modality (19
#' have none of the 45 genes) are left out.
#'
#' @return A `SingleCellExperiment`.
#' @examples
#' example_multiome()
#' @export
example_multiome <- function() {
  need("SingleCellExperiment")
  dir <- system.file("extdata", "pbmc_multiome_small", package = "scdistill")
  if (!nzchar(dir)) stop("the package's example data are missing; reinstall scdistill", call. = FALSE)
  read <- function(m) {
    counts <- methods::as(Matrix::readMM(gzfile(file.path(dir, m, "counts.mtx.gz"))), "CsparseMatrix")
    features <- utils::read.csv(gzfile(file.path(dir, m, "features.csv.gz")))
    cells <- utils::read.csv(gzfile(file.path(dir, m, "cells.csv.gz")), header = FALSE, skip = 1)[[1]]
    if (nrow(counts) != nrow(features)) counts <- Matrix::t(counts)
    dimnames(counts) <- list(make.unique(as.character(features[[1]])), as.character(cells))
    counts
  }
  rna <- read("rna")
  atac <- read("atac")
  # With 45 genes, some cells have no RNA counts: keep cells seen in both.
  keep <- Matrix::colSums(rna) > 0 & Matrix::colSums(atac) > 0
  rna <- rna[, keep]
  atac <- atac[, keep]
  sce <- SingleCellExperiment::SingleCellExperiment(list(counts = rna))
  SingleCellExperiment::altExp(sce, "ATAC") <- SingleCellExperiment::SingleCellExperiment(list(counts = atac))
  SingleCellExperiment::mainExpName(sce) <- "RNA"
  sce
}
