#' log2(CPM + 1) normalization
#'
#' Divides each cell's counts by its library size (total counts), multiplies
#' by 10^6 and takes log2(x + 1). The result stays sparse.
#'
#' @inheritParams as_counts
#' @param name For a `SingleCellExperiment`: the assay to store the result in.
#' @param threads Number of threads (see [torch_config()]).
#' @return For a `SingleCellExperiment`/`SummarizedExperiment`, `x` with the
#'   assay `name` added; otherwise a genes × cells `dgCMatrix`.
#' @examples
#' sce <- example_cellbench()
#' sce <- log2_cpm(sce)
#' SummarizedExperiment::assay(sce, "log2cpm")[1:3, 1:3]
#' @export
log2_cpm <- function(x, ...) UseMethod("log2_cpm")

#' @rdname log2_cpm
#' @export
log2_cpm.default <- function(x, threads = NULL, ...) {
  cnt <- as_counts(x, ...)
  s <- slots(cnt)
  csr_to_dgc(rust(rs_log2_cpm(s, resolve_threads(threads))), s$genes, s$cells)
}

#' @rdname log2_cpm
#' @export
log2_cpm.SummarizedExperiment <- function(x, name = "log2cpm", assay.type = "counts", threads = NULL, ...) {
  SummarizedExperiment::assay(x, name) <- log2_cpm.default(as_counts(x, assay.type = assay.type), threads = threads)
  x
}
