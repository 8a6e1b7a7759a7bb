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
#' @section Precision:
#' Models train in f32. `options(scdistill.bf16 = FALSE)` also keeps in f32
#' the few ranking steps that use bf16 products on CPUs with native bf16
#' arithmetic (see the section "Precision" of [align_species()]).
#'
#' @section Loading:
#' `library(scdistill)` is quick: the compiled code, and with it libtorch and
#' its CUDA libraries (hundreds of MB), is loaded on first use.
#'
#' @keywords internal
#' @importFrom methods as is new
#' @importClassesFrom Matrix dgCMatrix
#' @importFrom Matrix colSums sparseMatrix
"_PACKAGE"
