#' Human–mouse orthologs (HCOP)
#'
#' The human–mouse ortholog pairs of the HGNC Comparison of Orthology
#' Predictions (HCOP), as packaged by babelgene (MIT licence): one row per
#' pair, many-to-many, with the number of databases that support it. Gene
#' pairs for [align_species()].
#'
#' @param min_support Keep pairs supported by at least this many databases.
#' @return A data.frame with `human` and `mouse` (gene symbols), `human_ensembl`,
#'   `mouse_ensembl` and `support` (number of supporting databases), 29,614 rows
#'   at `min_support = 1`.
#' @examples
#' orth <- example_orthologs()
#' head(orth)
#' # Human cells as the target, mouse cells as the context:
#' homologs <- data.frame(target = orth$human, context = orth$mouse)
#' @export
example_orthologs <- function(min_support = 1) {
  path <- system.file("extdata", "human_mouse_orthologs_hcop.csv.gz", package = "scdistill", mustWork = TRUE)
  t <- utils::read.csv(gzfile(path), stringsAsFactors = FALSE)
  out <- data.frame(human = t$human_symbol, mouse = t$symbol, human_ensembl = t$human_ensembl,
                    mouse_ensembl = t$ensembl, support = t$support_n, stringsAsFactors = FALSE)
  out[out$support >= min_support, , drop = FALSE]
}
