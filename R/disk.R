#' Counts that stay on disk
#'
#' Describes a count matrix in an HDF5 file so that [fit_vae()],
#' [distill()], [fit_multimodal()] (a file per modality, or one 10x
#' multiome file), [latent()] (and [add_latent()], for a VAE, a distilled
#' or a multimodal model), [differential_expression()], [elbo()], [highly_variable_genes()]
#' and [run_pca()] read it in blocks of cells instead of
#' loading it: training streams minibatches from the file with bounded
#' memory, whatever the number of cells. You rarely need to call this
#' yourself: those functions accept the file's path, or a
#' `SingleCellExperiment` whose counts are an HDF5-backed `DelayedMatrix`
#' (`HDF5Array::TENxMatrix()`, `HDF5Array::HDF5Array()`,
#' `HDF5Array::H5ADMatrix()`), and call it for you.
#'
#' Files read:
#' * **AnnData** (`.h5ad`): `X` (or `layers/<layer>`, or `raw/X` with
#'   `layer = "raw"`) stored as a CSR matrix (cells as rows, AnnData's
#'   default) or dense; genes from `var`, cells and cell columns from `obs`.
#'   A CSC-stored `X` is refused: its cells are not contiguous on disk.
#' * **10x Genomics** HDF5 (`filtered_feature_bc_matrix.h5`, or a TENx group
#'   written by `HDF5Array::writeTENxMatrix()`): the `matrix` group (or
#'   `group`); genes are the feature IDs.
#' * A dense genes × cells dataset written by `HDF5Array::writeHDF5Array()`
#'   (give `group`, the dataset's name).
#'
#' How training reads the file: the cells are cut into about 1,000 blocks
#' of consecutive cells (16 to 1,024 cells each). The validation cells are
#' whole blocks (a seeded `validation_fraction` of them). Each epoch visits
#' the training blocks in a random order, in windows of about 32,768 cells
#' (fewer when the cells hold more than about 1,000 stored values each, as
#' ATAC peaks do, or a dense dataset of more than 1,000 genes: a window
#' holds at most 2^25 values, or 16 blocks) whose
#' cells are shuffled together, while a second thread reads the next
#' window: at most four windows are in memory at once. Before training,
#' one pass over the file computes each cell's library size and checks the
#' counts (finite, whole, non-negative; no empty cells).
#'
#' @param path An HDF5 file.
#' @param layer For an `.h5ad` file: `NULL` for `X`, `"raw"` for `raw/X`,
#'   or the name of a layer (`layers/<layer>`).
#' @param group For other HDF5 files: the group of a 10x/TENx sparse matrix
#'   (default `"matrix"`) or the name of a dense dataset.
#' @return A `scdistill_h5` object: the file, its layout, gene and cell
#'   names. `print()` shows its size.
#' @examples
#' f <- tempfile(fileext = ".h5ad")
#' sim <- simulate_counts(n_cells = 2000, n_genes = 300, file = f)
#' h5 <- h5_counts(f)
#' h5
#' model <- fit_vae(f, batch = "batch", max_epochs = 5, threads = 2)
#' dim(latent(model))
#' @export
h5_counts <- function(path, layer = NULL, group = NULL) {
  if (!is.character(path) || length(path) != 1 || is.na(path)) {
    stop("`path` must be one file name", call. = FALSE)
  }
  if (!file.exists(path)) stop("'", path, "' does not exist", call. = FALSE)
  path <- normalizePath(path)
  has <- function(name) rust(rs_h5_exists(path, name))
  out <- if (any(has(c("X", "obs")))) h5ad_spec(path, layer, has) else tenx_spec(path, group %||% "matrix", has)
  out$path <- path
  structure(out, class = "scdistill_h5")
}

# HDF5 metadata are read by the package's own reader (not rhdf5: see
# rs_h5_exists()).
h5_attr <- function(path, obj, attr) rust(rs_h5_attr(path, obj, attr))
h5_strings <- function(path, name) rust(rs_h5_strings(path, name))

# AnnData's layout (on-disk format 0.1/0.2).
h5ad_spec <- function(path, layer, has) {
  where <- if (is.null(layer)) "X" else if (identical(layer, "raw")) "raw/X" else paste0("layers/", layer)
  if (!has(where)) {
    stop("'", path, "' has no '", where, "'", if (!is.null(layer)) " (check `layer`)", call. = FALSE)
  }
  var_group <- if (identical(layer, "raw")) "raw/var" else "var"
  index_of <- function(g) paste0(g, "/", h5_attr(path, g, "_index") %||% "_index")
  genes <- h5_strings(path, index_of(var_group))
  cells <- h5_strings(path, index_of("obs"))
  kind <- h5_attr(path, where, "encoding-type")
  if (identical(kind, "csc_matrix") || identical(h5_attr(path, where, "h5sparse_format"), "csc")) {
    stop("'", path, "': '", where, "' is stored column-compressed (CSC), so each cell's counts are spread over ",
         "the whole file. Streaming needs cells as rows (CSR, AnnData's default): in Python, ",
         "adata.X = adata.X.tocsr(); adata.write_h5ad(...)", call. = FALSE)
  }
  spec <- if (has(paste0(where, "/indptr"))) {
    list(layout = "sparse", data = paste0(where, "/data"), indices = paste0(where, "/indices"),
         indptr = paste0(where, "/indptr"))
  } else {
    list(layout = "dense", dataset = where)
  }
  c(spec, list(n_cells = length(cells), n_genes = length(genes), genes = genes, cells = cells, format = "h5ad",
               cell_columns = as.character(h5_attr(path, "obs", "column-order"))))
}

# One obs column of an .h5ad file: a factor for categorical columns
# (codes + categories; code -1 is NA), else the values.
h5ad_column <- function(path, name, group = "obs") {
  g <- paste0(group, "/", name)
  if (identical(h5_attr(path, g, "encoding-type"), "categorical")) {
    codes <- as.integer(rust(rs_h5_numbers(path, paste0(g, "/codes"))))
    levels <- h5_strings(path, paste0(g, "/categories"))
    codes[codes < 0] <- NA
    return(factor(levels[codes + 1L], levels = levels))
  }
  if (rust(rs_h5_shape(path, g))$numeric) rust(rs_h5_numbers(path, g)) else h5_strings(path, g)
}

# A 10x Genomics / TENx group (column-compressed genes x cells), or a dense
# dataset (genes x cells in R, cells x genes in the file).
tenx_spec <- function(path, group, has) {
  if (has(paste0(group, "/indptr"))) {
    shape <- rust(rs_h5_numbers(path, paste0(group, "/shape")))
    genes <- if (has(paste0(group, "/features/id"))) {
      h5_strings(path, paste0(group, "/features/id"))
    } else if (has(paste0(group, "/genes"))) {
      h5_strings(path, paste0(group, "/genes"))
    } else {
      paste0("gene_", seq_len(shape[1]))
    }
    cells <- if (has(paste0(group, "/barcodes"))) h5_strings(path, paste0(group, "/barcodes")) else
      paste0("cell_", seq_len(shape[2]))
    return(list(layout = "sparse", data = paste0(group, "/data"), indices = paste0(group, "/indices"),
                indptr = paste0(group, "/indptr"), n_cells = shape[2], n_genes = shape[1], genes = genes,
                cells = cells, format = "10x", cell_columns = character()))
  }
  if (has(group)) {
    dims <- rust(rs_h5_shape(path, group))$dims
    if (length(dims) != 2) stop("'", path, "': '", group, "' is not a 2-D dataset", call. = FALSE)
    # The file's cells x genes is R's genes x cells.
    return(list(layout = "dense", dataset = group, n_cells = dims[1], n_genes = dims[2],
                genes = paste0("gene_", seq_len(dims[2])), cells = paste0("cell_", seq_len(dims[1])),
                format = "hdf5", cell_columns = character()))
  }
  stop("'", path, "' is neither an .h5ad file nor holds a 10x matrix group '", group, "' (give `group`)",
       call. = FALSE)
}

#' @method print scdistill_h5
#' @export
print.scdistill_h5 <- function(x, ...) {
  cat(sprintf("<scdistill_h5> %s genes x %s cells on disk (%s, %s): %s\n", fmt_int(x$n_genes), fmt_int(x$n_cells),
              x$format, x$layout, x$path))
  if (length(x$cell_columns)) cat("cell columns:", paste(utils_head(x$cell_columns, 8), collapse = ", "), "\n")
  invisible(x)
}

#' @method dim scdistill_h5
#' @export
dim.scdistill_h5 <- function(x) c(x$n_genes, x$n_cells)

# `x` as on-disk counts when it is (a path, an scdistill_h5, an HDF5-backed
# DelayedMatrix or an experiment with one as its counts), else NULL.
# Cell metadata come from the experiment's colData, or from the file.
as_disk <- function(x, assay.type = "counts", ...) {
  if (inherits(x, "scdistill_h5")) return(x)
  if (is.character(x) && length(x) == 1 && !is.na(x)) return(h5_counts(x))
  if (methods::is(x, "SummarizedExperiment")) {
    if (!assay.type %in% SummarizedExperiment::assayNames(x)) return(NULL)
    d <- delayed_disk(SummarizedExperiment::assay(x, assay.type, withDimnames = TRUE))
    if (is.null(d)) return(NULL)
    d$cell_data <- as.data.frame(SummarizedExperiment::colData(x))
    return(d)
  }
  delayed_disk(x)
}

# An HDF5-backed DelayedMatrix, possibly with its genes subset (other
# delayed operations, or a subset of cells, are read into memory instead),
# whose cells lie contiguously on disk.
delayed_disk <- function(x) {
  if (!methods::is(x, "DelayedMatrix") || !requireNamespace("DelayedArray", quietly = TRUE)) return(NULL)
  node <- tryCatch(DelayedArray::simplify(x)@seed, error = function(e) NULL)
  rows <- NULL
  repeat {
    if (methods::is(node, "DelayedSetDimnames")) {
      node <- node@seed
    } else if (methods::is(node, "DelayedSubset") && is.null(rows)) {
      if (!is.null(node@index[[2]])) return(NULL)
      rows <- node@index[[1]]
      node <- node@seed
    } else {
      break
    }
  }
  if (is.null(node) || !"filepath" %in% methods::slotNames(node)) return(NULL)
  slot_of <- function(nm) if (nm %in% methods::slotNames(node)) methods::slot(node, nm)
  path <- normalizePath(slot_of("filepath"))
  dims <- dim(node)
  d <- if (methods::is(node, "CSC_H5SparseMatrixSeed") || class(node)[1] %in% c("TENxMatrixSeed", "CSC_H5ADMatrixSeed")) {
    tenx_like(path, slot_of("group"), dims)
  } else if (methods::is(node, "HDF5ArraySeed")) {
    list(layout = "dense", dataset = slot_of("name"), n_cells = dims[2], n_genes = dims[1], format = "hdf5",
         cell_columns = character(), path = path)
  } else {
    return(NULL)
  }
  # The names are the DelayedMatrix's (the seed's genes, subset); `keep` the
  # file's genes it holds.
  d$genes <- rownames(x) %||% paste0("gene_", if (is.null(rows)) seq_len(dims[1]) else rows)
  d$cells <- colnames(x) %||% paste0("cell_", seq_len(dims[2]))
  d$keep <- rows
  structure(d, class = "scdistill_h5")
}

tenx_like <- function(path, group, dims) {
  list(layout = "sparse", data = paste0(group, "/data"), indices = paste0(group, "/indices"),
       indptr = paste0(group, "/indptr"), n_cells = dims[2], n_genes = dims[1], format = "10x",
       cell_columns = character(), path = path)
}

# What the glue's open_disk() reads (`keep`: the file's genes used, 1-based).
disk_spec <- function(d) {
  s <- d[c("path", "layout", intersect(c("data", "indices", "indptr", "dataset"), names(d)))]
  s$n_cells <- as.double(d$n_cells)
  s$n_genes <- as.double(d$n_genes)
  if (!is.null(d$keep)) s$keep <- as.integer(d$keep)
  s
}

# A cell column of on-disk counts: from the experiment's colData, or the
# .h5ad file's obs; a vector of one value per cell is itself.
disk_cell_values <- function(d, spec, arg) {
  if (is.null(spec)) return(NULL)
  if (is.character(spec) && length(spec) == 1 && d$n_cells != 1) {
    if (!is.null(d$cell_data) && spec %in% colnames(d$cell_data)) return(d$cell_data[[spec]])
    if (spec %in% d$cell_columns) return(h5ad_column(d$path, spec))
    known <- c(colnames(d$cell_data), d$cell_columns)
    stop("`", arg, "` = \"", spec, "\" is not a cell column of '", d$path, "'",
         if (length(known)) paste0(" (columns: ", paste(utils_head(known, 10), collapse = ", "), ")") else
           " (it has no cell columns: pass one value per cell)", call. = FALSE)
  }
  if (length(spec) != d$n_cells) {
    stop("`", arg, "` has ", length(spec), " values but the file has ", fmt_int(d$n_cells), " cells", call. = FALSE)
  }
  spec
}

# fit_vae() on counts on disk: the covariates resolved against the file's
# cell columns; the genes all the file's.
fit_vae_disk <- function(d, batch, categorical_covariates, continuous_covariates, config, max_epochs, batch_size, lr,
                         weight_decay, kl_warmup, early_stopping, patience, min_delta, validation_fraction, seed,
                         device, threads, progress, h5 = NULL) {
  n_cells <- d$n_cells
  check_disk_genes(d)
  tc <- train_settings(n_cells, max_epochs, batch_size, lr, weight_decay, kl_warmup, early_stopping, patience,
                       min_delta %||% 0, validation_fraction, seed)
  tc$bf16 <- use_bf16()
  batch_f <- disk_batch(d, batch)
  batch_name <- if (is.null(batch_f)) "" else if (is.character(batch) && length(batch) == 1) batch else "batch"
  batch_f <- batch_f %||% factor(rep("all", n_cells))
  cell_data <- d$cell_data %||% data.frame(row.names = seq_len(0))
  pick <- function(spec, arg) {
    if (is.null(spec)) return(NULL)
    if (is.data.frame(spec)) return(spec)
    stats::setNames(as.data.frame(lapply(spec, function(nm) disk_cell_values(d, nm, arg)),
                                  stringsAsFactors = FALSE, optional = TRUE), spec)
  }
  covs <- cell_covariates(list(counts = NULL, cells = d$cells, cell_data = cell_data),
                          pick(categorical_covariates, "categorical_covariates"),
                          pick(continuous_covariates, "continuous_covariates"))
  join_group(d, list(config, tc))
  bar <- if (check_flag(progress, "progress")) training_bar(tc$max_epochs) else NULL
  if (!is.null(bar)) on.exit(bar$done(), add = TRUE)
  fit <- latent_into(h5, d$cells, config$n_latent, function(file) {
    rust(rs_fit_vae(c(disk_spec(d), list(genes = d$genes)), factor_arg(batch_f, batch_name),
                    covs$categorical_r, covs$continuous, config, tc, check_device(device),
                    resolve_threads(threads), file, bar$update))
  })
  model <- new_model(fit$ptr, NULL)
  model$fingerprint <- disk_fingerprint(d)
  finish_fit(model, fit$latent, d$cells)
}

check_disk_genes <- function(d) {
  if (anyDuplicated(d$genes)) {
    stop("'", d$path, "' names ", sum(duplicated(d$genes)), " gene(s) twice (first: '",
         d$genes[duplicated(d$genes)][1], "'); genes must be unique", call. = FALSE)
  }
}

# The batch of on-disk cells as a factor (NULL for none): a cell column of
# the experiment or file, or one value per cell.
disk_batch <- function(d, batch) {
  b <- disk_cell_values(d, batch, "batch")
  if (is.null(b)) NULL else resolve_batch(b, NULL, d$cells)
}

# Highly variable genes of on-disk counts (and, with n_pcs > 0, the PCA of
# their log2 counts per `scale_factor` + 1), read in blocks; the result as
# rs_run_pca()'s.
disk_hvg_pca <- function(d, batch_f, n_hvg, span, n_pcs, scale, threads, scores_file = NULL, scale_factor = 1e4) {
  bar <- pass_bar()
  on.exit(bar$done(), add = TRUE)
  b <- batch_args(batch_f)
  rust(rs_disk_hvg_pca(disk_spec(d), b$codes, b$levels, n_hvg, span, as.integer(n_pcs), scale,
                       as.numeric(scale_factor), resolve_threads(threads), scores_file, bar$update))
}

# The identity of on-disk counts: the file, its size and time, the layout.
disk_fingerprint <- function(d) {
  info <- file.info(d$path)
  list(path = d$path, size = info$size, mtime = as.numeric(info$mtime), spec = disk_spec(d))
}

# latent() of on-disk cells: streamed by the core for a VAE; for another
# model, in blocks of 20,000 cells read in turn (its latent space of each
# block, stacked), so the cells are never all in memory either.
latent_disk <- function(model, d, batch, give_mean, seed, threads) {
  if (!inherits(model, "scdistill_vae")) return(latent_blocks(model, d, batch, give_mean, seed, threads))
  cells <- disk_model_cells(model, d, batch)
  bar <- pass_bar()
  on.exit(bar$done(), add = TRUE)
  z <- rust(rs_vae_latent_disk(model_ptr(model), disk_spec(d), d$genes, cells$batch, cells$categorical,
                               cells$continuous, give_mean, check_seed(seed), resolve_threads(threads), bar$update))
  latent_matrix(z, d$cells, ncol(z))
}

latent_blocks <- function(model, d, batch, give_mean, seed, threads) {
  do.call(rbind, for_blocks(d, batch, "Encoding the cells", function(part, b, at) {
    latent(model, part, batch = b, give_mean = give_mean, seed = seed, threads = threads)
  }))
}

# elbo_parts() of on-disk cells (`src` from disk_source()): the per-cell
# means of each block of 20,000 cells read in turn, weighted by the blocks'
# sizes. Block k draws from seed + k - 1, as sample_counts() and
# normalized_expression() of a file do, so that blocks do not repeat one
# another's draws of z.
elbo_blocks <- function(model, src, batch, seed, threads) {
  total <- 0
  seed <- check_seed(seed)
  src$blocks(batch, "Scoring the cells", function(part, b, at, k) {
    cells <- model_cells(model, part, b)
    v <- rust(rs_model_elbo(model_ptr(model), cells, seed + k - 1, resolve_threads(threads)))
    total <<- total + v * length(at)
  })
  stats::setNames(total / src$n_cells, c("elbo", "reconstruction", "kl"))
}

# Calls `f(part, batch, at)` on blocks of 20,000 of the cells `cells` of `d`
# (default all; indices) read in turn: `part` as as_counts() gives it,
# `batch` the block's values of `batch` (or NULL), `at` the block's cells.
# A progress bar labelled `label` shows when there are several blocks.
# Returns f's values as a list.
for_blocks <- function(d, batch, label, f, cells = seq_len(d$n_cells)) {
  d <- disk_cells_table(d)$disk  # the cell metadata read once
  b <- disk_cell_values(d, batch, "batch")
  block <- getOption("scdistill.disk_block", 20000L)  # an option for the tests
  starts <- seq(1L, length(cells), by = block)
  bar <- new.env()
  if (length(starts) > 1) {
    id <- cli::cli_progress_bar(total = length(cells), clear = TRUE, .envir = bar,
                                format = paste(label, "{cli::pb_bar} {cli::pb_current}/{cli::pb_total} cells | {cli::pb_eta}"))
    on.exit(cli::cli_progress_done(id = id, .envir = bar), add = TRUE)
  }
  lapply(starts, function(s) {
    at <- cells[s:min(s + block - 1L, length(cells))]
    out <- f(as_counts(d, cells = at), if (!is.null(b)) b[at], at)
    if (length(starts) > 1) cli::cli_progress_update(id = id, set = min(s + block - 1L, length(cells)), .envir = bar)
    out
  })
}

# The cells of on-disk counts as the functions that read cell metadata take
# them (as_counts()'s shape without the matrix): names, the genes, the cell
# metadata (the experiment's colData, else the .h5ad file's obs columns),
# and the description to read cells with (`disk`).
disk_cells_table <- function(d) {
  cd <- disk_cell_data(d) %||% data.frame(row.names = seq_len(d$n_cells))[, 0, drop = FALSE]
  rownames(cd) <- d$cells
  d$cell_data <- cd
  list(counts = NULL, cells = d$cells, genes = d$genes, cell_data = cd, disk = d)
}

# The cell metadata of on-disk counts: the experiment's colData, else the
# .h5ad file's obs columns, else NULL.
disk_cell_data <- function(d) {
  if (!is.null(d$cell_data) || !length(d$cell_columns)) return(d$cell_data)
  as.data.frame(lapply(stats::setNames(d$cell_columns, d$cell_columns), function(nm) h5ad_column(d$path, nm)),
                optional = TRUE)
}

# The cells' names, of counts in memory or of disk_cells_table().
cell_names <- function(cnt) cnt$cells %||% colnames(cnt$counts)

# model_cells() for cells on disk: their covariates (the model's batch
# column by default) resolved against the file's cell columns; no counts.
disk_model_cells <- function(model, d, batch) {
  cov <- model$covariates
  if (is.null(batch) && isTRUE(cov$batch_given) && !is.null(cov$batch) &&
      cov$batch %in% c(colnames(d$cell_data), d$cell_columns)) {
    batch <- cov$batch
  }
  b <- disk_cell_values(d, batch, "batch")
  b <- if (!is.null(b)) as.character(b) else if (!isTRUE(cov$batch_given)) rep("all", d$n_cells)
  column <- function(nm) disk_cell_values(d, nm, nm)
  list(batch = b, categorical = lapply(cov$categorical, function(nm) as.character(column(nm))),
       continuous = lapply(cov$continuous, function(nm) as.double(column(nm))), cells = d$cells)
}

#' Write counts to an AnnData file
#'
#' Writes the counts of `x` to an `.h5ad` file (AnnData's on-disk format,
#' readable by scanpy and anndata, and streamed by [fit_vae()] and
#' [latent()]): `X` as a CSR matrix of cells × genes (float32), the gene and
#' cell names, and categorical cell columns. The matrix is written in
#' blocks of 65,536 cells.
#'
#' @param x Raw counts (see [as_counts()]).
#' @param file The file to write (replaced if it exists).
#' @param columns Cell metadata columns to write (as categorical columns);
#'   by default every factor and character column.
#' @param ... Passed to [as_counts()].
#' @return `file`, invisibly.
#' @examples
#' sce <- simulate_counts(n_cells = 500, n_genes = 100)
#' f <- write_h5ad(sce, tempfile(fileext = ".h5ad"))
#' h5_counts(f)
#' @export
write_h5ad <- function(x, file, columns = NULL, ...) {
  if (!is.character(file) || length(file) != 1 || is.na(file)) stop("`file` must be one file name", call. = FALSE)
  if (!dir.exists(dirname(file))) stop("the folder of `file` ('", dirname(file), "') does not exist", call. = FALSE)
  cnt <- as_counts(x, ...)
  cd <- cnt$cell_data
  columns <- columns %||% names(cd)[vapply(cd, function(v) is.factor(v) || is.character(v), TRUE)]
  missing <- setdiff(columns, names(cd))
  if (length(missing)) {
    stop("`columns`: '", missing[1], "' is not a cell metadata column of `x`", call. = FALSE)
  }
  cols <- lapply(columns, function(nm) {
    f <- factor(cd[[nm]])
    if (anyNA(f)) stop("cell column '", nm, "' has missing values; .h5ad categoricals here need none", call. = FALSE)
    list(codes = as.integer(f), levels = levels(f))
  })
  names(cols) <- columns
  rust(rs_write_h5ad(path.expand(file), slots(cnt), cols))
  invisible(file)
}

#' @rdname as_counts
#' @param cells For counts on disk: the cells to read (names or indices);
#'   `NULL` reads every cell into memory.
#' @export
as_counts.scdistill_h5 <- function(x, batch = NULL, cells = NULL, ...) {
  idx <- NULL
  if (!is.null(cells)) {
    idx <- if (is.character(cells)) match(cells, x$cells) else as.integer(cells)
    if (anyNA(idx) || any(idx < 1 | idx > x$n_cells)) {
      stop("`cells` names or indexes cells that are not in '", x$path, "'", call. = FALSE)
    }
  }
  csr <- rust(rs_read_h5_cells(disk_spec(x), idx, resolve_threads(NULL)))
  names <- if (is.null(idx)) x$cells else x$cells[idx]
  m <- csr_to_dgc(csr, x$genes, names)
  cd <- disk_cell_data(x)
  if (!is.null(cd)) {
    cd <- cd[if (is.null(idx)) seq_len(x$n_cells) else idx, , drop = FALSE]
    rownames(cd) <- names
  }
  new_counts(m, batch, cell_data = cd, checked = FALSE)
}

#' @rdname as_counts
#' @export
as_counts.character <- function(x, batch = NULL, ...) {
  as_counts(h5_counts(x), batch = batch, ...)
}

# Names of the rows and columns of an HDF5 dataset, as HDF5Array stores
# them. rhdf5 writes each as one chunk and, past 10^6 names, says so in a
# message meant for someone choosing chunks: not for our users.
h5_dimnames <- function(dimnames, path, name) {
  suppressMessages(HDF5Array::h5writeDimnames(dimnames, path, name))
}

# Undoes results that were not finished: the file, where it was created for
# them, else the datasets `names` and their names' groups (HDF5Array's
# ".<name>_dimnames"), so that the user's file holds what it held before
# and the same call can be made again.
h5_forget <- function(path, names, created) {
  if (created) return(invisible(unlink(path)))
  if (!file.exists(path)) return(invisible())
  there <- tryCatch(rhdf5::h5ls(path, recursive = FALSE)$name, error = function(e) character())
  for (name in intersect(c(names, paste0(".", names, "_dimnames")), there)) {
    try(rhdf5::h5delete(path, name), silent = TRUE)
  }
  invisible()
}

# Where a dense result is to be written: NULL (nowhere: the result stays in
# memory), else list(path, name), checked.
h5_target <- function(h5_file, h5_name) {
  if (is.null(h5_file)) return(NULL)
  if (!is.character(h5_file) || length(h5_file) != 1 || is.na(h5_file) || !nzchar(h5_file)) {
    stop("`h5_file` must be one file path", call. = FALSE)
  }
  if (!is.character(h5_name) || length(h5_name) != 1 || is.na(h5_name) || !nzchar(h5_name) ||
      grepl("/", h5_name, fixed = TRUE)) {
    stop("`h5_name` must be one dataset name, without '/'", call. = FALSE)
  }
  # Installed, not loaded: its packages take 0.19 GB, which a fit would
  # carry through training; it is loaded when the result is opened.
  if (!nzchar(system.file(package = "HDF5Array"))) {
    stop("`h5_file` needs the Bioconductor package HDF5Array (Debian: r-bioc-hdf5array) to read the result back",
         call. = FALSE)
  }
  list(path = path.expand(h5_file), name = h5_name)
}

# The `.h5ad` files of sample_counts(h5ad_file =): one new file per draw,
# in folders that exist; NULL when none is asked for.
h5ad_targets <- function(h5ad_file, n_samples) {
  if (is.null(h5ad_file)) return(NULL)
  if (!is.character(h5ad_file) || anyNA(h5ad_file) || !all(nzchar(h5ad_file))) {
    stop("`h5ad_file` must be file paths", call. = FALSE)
  }
  if (length(h5ad_file) != n_samples) {
    stop("`h5ad_file` needs one file per draw: ", n_samples, " for n_samples = ", n_samples, ", got ",
         length(h5ad_file), call. = FALSE)
  }
  files <- path.expand(h5ad_file)
  if (anyDuplicated(files)) stop("`h5ad_file` names the same file twice: '", files[duplicated(files)][1], "'", call. = FALSE)
  there <- files[file.exists(files)]
  if (length(there)) {
    stop("`h5ad_file`: '", there[1], "' exists; remove it or choose another name (files are never overwritten)",
         call. = FALSE)
  }
  folders <- dirname(files)
  if (!all(dir.exists(folders))) {
    stop("`h5ad_file`: the folder '", folders[!dir.exists(folders)][1], "' does not exist", call. = FALSE)
  }
  files
}

# A features x cells result written to dataset `name` of `path` one block of
# cells at a time (write(m, first): m the block's columns, `first` the
# position of its first cell); finish(features, cells) stores the names and
# returns the HDF5-backed DelayedMatrix. The values are stored as 4-byte
# floats (the model's precision), one row of the dataset per cell, as
# HDF5Array stores an R matrix. abandon() (on exit) removes what the sink
# wrote when the result was not finished (the file, if it made it).
h5_sink <- function(h5, n_features, n_cells) {
  created <- !file.exists(h5$path)
  done <- FALSE
  rust(rs_h5_dense_create(h5$path, h5$name, n_cells, n_features))
  list(
    write = function(m, first) {
      storage.mode(m) <- "double"
      rust(rs_h5_dense_write(h5$path, h5$name, first, m))
    },
    finish = function(features, cells) {
      h5_dimnames(list(features, cells), h5$path, h5$name)
      done <<- TRUE
      HDF5Array::HDF5Array(h5$path, h5$name)
    },
    abandon = function() if (!done) h5_forget(h5$path, h5$name, created)
  )
}

# An in-memory result written to `h5` (from h5_target()) and returned as
# the HDF5-backed DelayedMatrix.
h5_write_matrix <- function(h5, m) {
  sink <- h5_sink(h5, nrow(m), ncol(m))
  on.exit(sink$abandon(), add = TRUE)
  if (ncol(m) > 0) sink$write(m, 1)
  sink$finish(rownames(m), colnames(m))
}
