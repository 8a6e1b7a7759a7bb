#' A small real example: five lung cancer cell lines on three plates
#'
#' 571 singlet cells of five human lung adenocarcinoma cell lines (A549,
#' H1975, H2228, H838, HCC827) sequenced with CEL-seq2 on three plates, a
#' classic benchmark for batch correction because the true labels are known
#' (CellBench; Tian et al. 2019, Nature Methods; GEO GSE118767; MIT licence).
#' Doublets (by demuxlet) and ERCC spike-ins were removed and the 3,000 genes
#' with the highest mean count among those detected in at least 5% of cells
#' were kept; see `tools/make_example_data.R` in the source repository.
#'
#' @param format `"sce"` for a `SingleCellExperiment` (needs that
#'   package), `"list"` for `list(counts = <dgCMatrix>, cell_data = <data.frame>)`.
#' @return Raw counts (genes × cells, Ensembl ids) with the cell metadata
#'   `batch` (plate: `p1`, `p2`, `p3`) and `cell_line` (the truth).
#' @examples
#' sce <- example_cellbench()
#' sce
#' table(sce$cell_line, sce$batch)
#' @export
example_cellbench <- function(format = c("sce", "list")) {
  format <- choose_arg(format, "format")
  path <- system.file("extdata", "cellbench_sng.rds", package = "scdistill", mustWork = TRUE)
  data <- readRDS(path)
  if (format == "list") return(data)
  need("SingleCellExperiment")
  SingleCellExperiment::SingleCellExperiment(
    assays = list(counts = data$counts),
    colData = S4Vectors_DataFrame(data$cell_data))
}

S4Vectors_DataFrame <- function(df) methods::as(df, "DataFrame")
