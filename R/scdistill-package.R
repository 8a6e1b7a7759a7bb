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
#' On a CPU with native bf16 arithmetic (AVX512-BF16: AMD Zen 4 and later,
#' Intel Xeon from Sapphire Rapids), [fit_vae()] (with [map_query()]),
#' [distill()] and [align_species()] train in mixed precision, as PyTorch's
#' autocast does:
#' the matrix products that read or write every gene (the encoders' first
#' layers, the decoder's output layers) take bf16 inputs and accumulate in
#' f32, while the weights, the optimiser, the likelihood and the other
#' layers stay in f32. An epoch is then about 1.4 to 1.7 times faster, and
#' the held-out losses moved by less than 0.5% in our measurements (see
#' `bench/RESULTS.md` in the sources). Inference ([latent()],
#' [normalized_expression()], differential expression) is always f32; the
#' same seed gives the same model on the same CPU; `summary(model)` shows
#' under "Training" whether bf16 was used. Other CPUs and GPUs train in f32.
#' `options(scdistill.bf16 = FALSE)` keeps every product in f32, in training
#' and in the ranking steps of [align_species()] (its section "Precision").
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
