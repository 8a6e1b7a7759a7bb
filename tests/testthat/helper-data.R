# Small count matrices with known content for the tests.

toy_counts <- function(n_genes = 30, n_cells = 12, seed = 1) {
  set.seed(seed)
  m <- matrix(rpois(n_genes * n_cells, 3), n_genes, n_cells,
              dimnames = list(paste0("gene", seq_len(n_genes)), paste0("cell", seq_len(n_cells))))
  m[1, ] <- m[1, ] + 1 # no empty cells
  m
}

toy_dgc <- function(...) as(as(as(toy_counts(...), "dMatrix"), "generalMatrix"), "CsparseMatrix")

shared_data <- function(...) {
  path <- file.path(testthat::test_path(), "..", "..", "..", "shared", "data", ...)
  alt <- file.path(Sys.getenv("SCDISTILL_SHARED_DATA", "/nonexistent"), ...)
  if (file.exists(path)) return(normalizePath(path))
  if (file.exists(alt)) return(normalizePath(alt))
  testthat::skip("../shared/data is not available (an installed package does not have it)")
}
