#' scdistill: deep generative models of single-cell counts on libtorch
#'
#' A Rust core on libtorch trains the models; this R layer converts
#' `SingleCellExperiment`, `Seurat` and sparse matrices to it and writes the
#' results back (`reducedDim()`, assays, Seurat reductions, data frames).
#'
#' Start with [example_cellbench()], [run_pca()] and [torch_config()].
#'
#' @section Threads:
#' Computations use `threads` threads when a function has that argument;
#' otherwise the option `scdistill.threads`; otherwise every core the process
#' may use. The environment variable `OMP_THREAD_LIMIT`, when set, caps all of
#' these.
#'
#' @keywords internal
#' @useDynLib scdistill, .registration = TRUE
#' @importFrom methods as is
#' @importClassesFrom Matrix dgCMatrix
#' @importFrom Matrix colSums sparseMatrix
"_PACKAGE"
