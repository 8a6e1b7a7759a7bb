#' Counts as the Rust core takes them
#'
#' `as_counts()` turns single-cell data into a validated `scdistill_counts`
#' object: the raw counts as a sparse genes × cells `dgCMatrix` (never made
#' dense), the cell metadata, and an optional batch factor. Every function of
#' the package calls it on its input, so you rarely need it yourself; it is
#' exported to check data early and to see what the package will use.
#'
#' Counts must be finite, non-negative whole numbers, at most 2^24
#' (16,777,216: the core stores counts as single-precision floats, which
#' hold every whole number up to there exactly). Cells with no counts
#' are refused (rather than silently dropped, which would misalign results
#' with your object): remove them first. Genes need unique names; cells
#' without names are called `cell_1`, `cell_2`, ...
#'
#' @param x A `dgCMatrix` or other `Matrix`, a base `matrix`, a
#'   `SingleCellExperiment` (or `SummarizedExperiment`), a `Seurat` object, a
#'   `DelayedMatrix` (read in blocks of cells), or a `scdistill_counts`.
#'   Genes are rows, cells are columns.
#' @param batch `NULL`, the name of a column of the cell metadata
#'   (`colData(x)`, or the Seurat `meta.data`), or a vector with one value per
#'   cell. Every batch needs at least two cells; `NA` is not allowed.
#' @param assay.type For `SingleCellExperiment`/`SummarizedExperiment`: the
#'   assay holding raw counts.
#' @param assay For `Seurat`: the assay holding raw counts (default: the
#'   default assay); its `counts` layer is used.
#' @param block_cells For `DelayedMatrix`: cells read per block (default:
#'   about 10^7 values per block).
#' @param ... Passed on to methods.
#' @return An object of class `scdistill_counts`: a list with `counts`
#'   (genes × cells `dgCMatrix`), `cell_data` (a `data.frame`, possibly with no
#'   columns) and `batch` (a factor or `NULL`).
#' @examples
#' m <- Matrix::rsparsematrix(50, 20, density = 0.3, rand.x = function(n) rpois(n, 5) + 1)
#' dimnames(m) <- list(paste0("gene", 1:50), paste0("cell", 1:20))
#' cts <- as_counts(m, batch = rep(c("a", "b"), each = 10))
#' cts
#' try(as_counts(-m))
#' @export
as_counts <- function(x, ...) UseMethod("as_counts")

#' @rdname as_counts
#' @export
as_counts.default <- function(x, ...) {
  stop("as_counts() does not know objects of class '", class(x)[1], "'; pass a ",
       "dgCMatrix, matrix, SingleCellExperiment, Seurat object, DelayedMatrix, or an .h5ad or 10x .h5 file",
       call. = FALSE)
}

#' @rdname as_counts
#' @export
as_counts.scdistill_counts <- function(x, batch = NULL, ...) {
  if (!is.null(batch)) {
    x$batch <- resolve_batch(batch, x$cell_data, colnames(x$counts))
  }
  x
}

#' @rdname as_counts
#' @export
as_counts.dgCMatrix <- function(x, batch = NULL, ...) {
  new_counts(x, batch, cell_data = NULL)
}

#' @rdname as_counts
#' @export
as_counts.Matrix <- function(x, batch = NULL, ...) {
  new_counts(to_dgc(x), batch, cell_data = NULL)
}

#' @rdname as_counts
#' @export
as_counts.matrix <- function(x, batch = NULL, ...) {
  if (!is.numeric(x) && !is.logical(x)) {
    stop("`x` is a ", typeof(x), " matrix; counts must be numeric", call. = FALSE)
  }
  new_counts(to_dgc(x), batch, cell_data = NULL)
}

#' @rdname as_counts
#' @export
as_counts.SummarizedExperiment <- function(x, batch = NULL, assay.type = "counts", ...) {
  need("SummarizedExperiment")
  available <- SummarizedExperiment::assayNames(x)
  if (!is.character(assay.type) || length(assay.type) != 1 || !assay.type %in% available) {
    stop("`assay.type` = ", deparse(assay.type), " is not an assay of `x`; it has: ",
         if (length(available)) paste(available, collapse = ", ") else "no named assays",
         call. = FALSE)
  }
  m <- SummarizedExperiment::assay(x, assay.type, withDimnames = TRUE)
  cell_data <- as.data.frame(SummarizedExperiment::colData(x))
  inner <- as_counts(m)
  new_counts(inner$counts, batch, cell_data = cell_data, checked = TRUE)
}

#' @rdname as_counts
#' @export
as_counts.Seurat <- function(x, batch = NULL, assay = NULL, ...) {
  need("SeuratObject")
  assay <- assay %||% SeuratObject::DefaultAssay(x)
  if (!assay %in% SeuratObject::Assays(x)) {
    stop("`assay` = '", assay, "' is not an assay of `x`; it has: ",
         paste(SeuratObject::Assays(x), collapse = ", "), call. = FALSE)
  }
  m <- if ("LayerData" %in% getNamespaceExports("SeuratObject")) {
    layer_data <- getExportedValue("SeuratObject", "LayerData") # Seurat v5
    layer_data(x, assay = assay, layer = "counts")
  } else {
    SeuratObject::GetAssayData(x, slot = "counts", assay = assay) # Seurat v4
  }
  inner <- as_counts(m)
  new_counts(inner$counts, batch, cell_data = x[[]], checked = TRUE)
}

#' @rdname as_counts
#' @export
as_counts.DelayedMatrix <- function(x, batch = NULL, block_cells = NULL, ...) {
  n <- ncol(x)
  block_cells <- block_cells %||% max(1L, floor(1e7 / max(1, nrow(x))))
  starts <- seq.int(1L, max(n, 1L), by = block_cells)
  bar <- if (length(starts) > 4) cli::cli_progress_bar("Reading blocks of cells", total = length(starts))
  blocks <- lapply(starts, function(s) {
    j <- s:min(n, s + block_cells - 1L)
    block <- to_dgc(as.matrix(x[, j, drop = FALSE]))
    if (!is.null(bar)) cli::cli_progress_update(id = bar)
    block
  })
  m <- if (n == 0) to_dgc(as.matrix(x)) else do.call(cbind, blocks)
  dimnames(m) <- dimnames(x)
  new_counts(m, batch, cell_data = NULL)
}

#' @method print scdistill_counts
#' @export
print.scdistill_counts <- function(x, ...) {
  m <- x$counts
  nnz <- length(m@x)
  cat(sprintf("<scdistill_counts> %s genes x %s cells, %s non-zero (%.1f%%)\n",
              fmt_int(nrow(m)), fmt_int(ncol(m)), fmt_int(nnz),
              100 * nnz / (as.numeric(nrow(m)) * ncol(m))))
  if (!is.null(x$batch)) {
    tab <- table(x$batch)
    shown <- paste0(names(tab), ": ", tab)
    if (length(shown) > 6) shown <- c(shown[1:6], "...")
    cat(sprintf("batch: %d levels (%s)\n", nlevels(x$batch), paste(shown, collapse = ", ")))
  }
  invisible(x)
}

# Validates and wraps a genes x cells dgCMatrix. Structure and names are
# checked here; values (NA, negative, non-integer, empty cells, duplicated
# genes) are checked again by the Rust core.
new_counts <- function(m, batch, cell_data, checked = FALSE) {
  if (ncol(m) == 0) stop("`x` has no cells (0 columns)", call. = FALSE)
  if (nrow(m) == 0) stop("`x` has no genes (0 rows)", call. = FALSE)
  if (is.null(rownames(m))) {
    stop("`x` has no row names: every gene needs a name (set rownames(x))", call. = FALSE)
  }
  if (is.null(colnames(m))) colnames(m) <- paste0("cell_", seq_len(ncol(m)))
  if (!checked) rust(rs_validate_counts(list(p = m@p, i = m@i, x = m@x, genes = rownames(m), cells = colnames(m))))
  structure(
    list(counts = m,
         cell_data = cell_data %||% data.frame(row.names = colnames(m)),
         batch = resolve_batch(batch, cell_data, colnames(m))),
    class = "scdistill_counts")
}

# A batch given as a column name or a vector, as a factor without unused
# levels; NULL stays NULL. Every level needs two cells.
resolve_batch <- function(batch, cell_data, cells, arg = "batch") {
  if (is.null(batch)) return(NULL)
  batch <- resolve_cell_factor(batch, cell_data, cells, arg)
  sizes <- table(batch)
  if (any(sizes < 2)) {
    lone <- names(sizes)[sizes < 2]
    stop("`", arg, "` level(s) with a single cell: ", paste0("'", utils_head(lone, 3), "'", collapse = ", "),
         "; merge them with another level or drop those cells", call. = FALSE)
  }
  batch
}

# A per-cell factor given as a column name of `cell_data` or as one value per
# cell, without NA and without unused levels.
resolve_cell_factor <- function(values, cell_data, cells, arg, allow_na = FALSE) {
  n <- length(cells)
  if (is.character(values) && length(values) == 1 && n != 1) {
    if (is.null(cell_data) || ncol(cell_data) == 0) {
      stop("`", arg, "` = '", values, "' names a column, but `x` has no cell metadata; ",
           "pass a vector with one value per cell", call. = FALSE)
    }
    if (!values %in% colnames(cell_data)) {
      stop("`", arg, "` = '", values, "' is not a column of the cell metadata; available: ",
           paste(utils_head(colnames(cell_data), 10), collapse = ", "), call. = FALSE)
    }
    values <- cell_data[[values]]
  }
  if (length(values) != n) {
    stop("`", arg, "` has ", length(values), " values but `x` has ", n, " cells", call. = FALSE)
  }
  if (anyNA(values) && !allow_na) {
    stop("`", arg, "` has ", sum(is.na(values)), " missing value(s) (first in cell '",
         cells[which(is.na(values))[1]], "'); give them a level or drop those cells",
         call. = FALSE)
  }
  droplevels(as.factor(values))
}

# Any numeric matrix-like object as a dgCMatrix.
to_dgc <- function(x) {
  if (is(x, "dgCMatrix")) return(x)
  if (is.matrix(x) && is.logical(x)) storage.mode(x) <- "double"
  as(as(as(x, "dMatrix"), "generalMatrix"), "CsparseMatrix")
}

#' Write a result back into the object it came from
#'
#' Puts a cells × dimensions matrix where users of each container look for
#' it: `reducedDim(x, name)` for a `SingleCellExperiment` (a
#' `SummarizedExperiment` is converted), a `DimReduc` named `name` for a
#' `Seurat` object. Other inputs get the matrix itself back.
#'
#' @param x The object the data came from.
#' @param value A matrix with one row per cell of `x` (row names = cell names).
#'   Attributes `rotation` (loadings, genes × dimensions) and `sdev` are
#'   carried over where the container has a place for them.
#' @param name Name of the reduction.
#' @param ... Passed on to methods.
#' @return `x` with the result added, or `value`.
#' @examples
#' if (requireNamespace("SingleCellExperiment", quietly = TRUE)) {
#'   sce <- example_cellbench()
#'   emb <- matrix(rnorm(ncol(sce) * 2), ncol = 2, dimnames = list(colnames(sce), NULL))
#'   sce <- write_back(sce, emb, "random")
#'   SingleCellExperiment::reducedDimNames(sce)
#' }
#' @export
write_back <- function(x, value, name, ...) UseMethod("write_back")

#' @rdname write_back
#' @export
write_back.default <- function(x, value, name, ...) value

#' @rdname write_back
#' @export
write_back.SummarizedExperiment <- function(x, value, name, ...) {
  need("SingleCellExperiment")
  if (!is(x, "SingleCellExperiment")) x <- as(x, "SingleCellExperiment")
  check_cells_match(value, colnames(x))
  SingleCellExperiment::reducedDim(x, name) <- value
  x
}

#' @rdname write_back
#' @param assay For `Seurat`: the assay the reduction was computed from.
#' @export
write_back.Seurat <- function(x, value, name, assay = NULL, ...) {
  need("SeuratObject")
  check_cells_match(value, colnames(x))
  key <- paste0(gsub("[^[:alnum:]]", "", name), "_")
  colnames(value) <- paste0(key, seq_len(ncol(value)))
  loadings <- attr(value, "rotation")
  if (!is.null(loadings)) colnames(loadings) <- colnames(value)
  reduction <- SeuratObject::CreateDimReducObject(
    embeddings = unclass_matrix(value),
    loadings = if (is.null(loadings)) new("matrix") else loadings,
    stdev = attr(value, "sdev") %||% numeric(),
    key = key,
    assay = assay %||% SeuratObject::DefaultAssay(x))
  x[[name]] <- reduction
  x
}

check_cells_match <- function(value, cells) {
  if (nrow(value) != length(cells) || (!is.null(rownames(value)) && !identical(rownames(value), cells))) {
    stop("the result has ", nrow(value), " rows that do not match the ", length(cells),
         " cells of `x`", call. = FALSE)
  }
}

unclass_matrix <- function(m) {
  out <- matrix(as.numeric(m), nrow = nrow(m), dimnames = dimnames(m))
  out
}
