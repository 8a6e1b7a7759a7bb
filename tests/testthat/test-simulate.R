test_that("simulate_counts returns counts and truth where Bioconductor users look", {
  skip_if_not_installed("SingleCellExperiment")
  sim <- simulate_counts(n_cells = 600, n_genes = 300, n_groups = 3, n_batches = 3,
                         treated_fraction = c(0.7, 0.5, 0.3), seed = 5)
  expect_s4_class(sim, "SingleCellExperiment")
  expect_identical(dim(sim), c(300L, 600L))
  expect_identical(as.integer(table(sim$batch)), c(200L, 200L, 200L))
  expect_identical(as.integer(table(sim$batch, sim$condition)[, "treated"]), c(140L, 100L, 60L))
  rd <- SummarizedExperiment::rowData(sim)
  expect_true(all(c("is_de", "true_lfc", "is_de_Group1", "true_lfc_Group3", "batch_factor_Batch2", "base_mean") %in% names(rd)))
  expect_identical(rd$is_de, rd$is_de_Group1 | rd$is_de_Group2 | rd$is_de_Group3)
  # samples are nested in batch x condition
  expect_true(all(startsWith(as.character(sim$sample), paste0(sim$batch, "_", sim$condition))))
  # the counts pass the package's own validation
  expect_s3_class(as_counts(sim, batch = "batch"), "scdistill_counts")
})

test_that("the same seed gives the same counts; another seed does not", {
  a <- simulate_counts(n_cells = 300, n_genes = 100, seed = 9, format = "list", threads = 1)
  b <- simulate_counts(n_cells = 300, n_genes = 100, seed = 9, format = "list", threads = 2)
  c <- simulate_counts(n_cells = 300, n_genes = 100, seed = 10, format = "list")
  expect_identical(a$counts, b$counts)
  expect_false(identical(a$counts, c$counts))
})

test_that("true log fold changes are recovered from the simulated counts", {
  sim <- simulate_counts(n_cells = 4000, n_genes = 400, n_groups = 1, n_batches = 1,
                         treated_fraction = 0.5, condition_de_prob = 0.2, seed = 3, format = "list")
  m <- sim$counts
  norm <- t(t(as.matrix(m)) / Matrix::colSums(m))
  treated <- sim$cell_data$condition == "treated"
  obs <- log2(rowMeans(norm[, treated]) / rowMeans(norm[, !treated]))
  de <- sim$gene_data$is_de_Group1 & rowMeans(as.matrix(m)) > 0.5
  expect_gt(sum(de), 20)
  expect_gt(stats::cor(obs[de], sim$gene_data$true_lfc_Group1[de]), 0.95)
})

test_that("batch effects grow with batch_effect and cell types separate", {
  lib_spread <- function(effect) {
    s <- simulate_counts(n_cells = 1000, n_genes = 200, n_batches = 2, batch_effect = effect,
                         seed = 2, format = "list")
    unname(diff(tapply(log(s$cell_data$library_size), s$cell_data$batch, mean)))
  }
  expect_lt(abs(lib_spread("none")), 0.05)
  expect_gt(lib_spread("strong"), 0.6)
  none <- simulate_counts(n_cells = 200, n_genes = 100, batch_effect = "none", format = "list")
  expect_true(all(as.matrix(none$gene_data[, grep("^batch_factor_", names(none$gene_data))]) == 1))
})

test_that("zero inflation adds zeros", {
  a <- simulate_counts(n_cells = 500, n_genes = 200, seed = 4, format = "list")
  z <- simulate_counts(n_cells = 500, n_genes = 200, seed = 4, zero_inflation = TRUE, format = "list")
  expect_lt(length(z$counts@x), 0.9 * length(a$counts@x))
})

test_that("the six scenarios have their designs and can be resized", {
  s5 <- simulation_scenario("s5", n_cells = 900, format = "list")
  tab <- table(s5$cell_data$batch, s5$cell_data$condition)
  expect_identical(unname(tab[, "treated"] / rowSums(tab)), c(1, 0.5, 0))
  s3 <- simulation_scenario("s3", n_cells = 1000, format = "list")
  expect_identical(as.integer(table(s3$cell_data$batch)), c(400L, 300L, 200L, 100L))
  expect_true("age_group" %in% names(s3$cell_data))
  expect_identical(dim(s3$counts), c(3000L, 1000L))
  # A strong treatment response shared by the cell types: one truth per gene.
  g <- s5$gene_data
  expect_identical(g$is_de_Group1, g$is_de_Group4)
  expect_identical(g$is_de, g$is_de_Group1)
  expect_gt(median(abs(g$true_lfc[g$is_de])), 1)
  expect_equal(mean(g$is_de), 0.1, tolerance = 0.02)
  # The scenario's settings can be overridden.
  weak <- simulation_scenario("s1", n_cells = 300, condition_shared = FALSE, format = "list")$gene_data
  expect_false(identical(weak$is_de_Group1, weak$is_de_Group2))
  expect_error(simulation_scenario("s7"), "`scenario` must be one of")
})

test_that("bad simulation parameters are named", {
  expect_error(simulate_counts(n_cells = 1), "`n_cells` must be a whole number >= 2")
  expect_error(simulate_counts(treated_fraction = 0.5, condition_shared = NA), "condition_shared")
  expect_error(simulate_counts(n_batches = 3, treated_fraction = c(0.5, 0.5)), "one value per batch \\(3\\), not 2")
  expect_error(simulate_counts(n_cells = 100, bogus = 1), "unknown simulation parameter `bogus`")
  expect_error(simulate_counts(n_cells = 100, lib_scale = -1), "`lib_scale` must be >= 0")
  expect_error(simulate_counts(n_cells = 100, age_de_prob = 0.1), "needs a condition")
})

test_that("the ATAC modality goes to altExp with its truth", {
  skip_if_not_installed("SingleCellExperiment")
  sim <- simulate_counts(n_cells = 600, n_genes = 200, n_groups = 3, n_batches = 2, atac = TRUE,
                         n_peaks = 400, atac_only_groups = 1, seed = 8)
  atac <- SingleCellExperiment::altExp(sim, "ATAC")
  expect_identical(dim(atac), c(400L, 600L))
  expect_identical(colnames(atac), colnames(sim))
  pd <- SummarizedExperiment::rowData(atac)
  linked <- !is.na(pd$linked_gene)
  expect_true(all(pd$linked_gene[linked] %in% rownames(sim)))
  expect_gt(mean(linked), 0.35)
  rd <- SummarizedExperiment::rowData(sim)
  # Group3 is RNA-identical to Group1 but not in ATAC
  expect_identical(rd$de_factor_Group3, rd$de_factor_Group1)
  expect_gt(sum(abs(pd$atac_factor_Group3 - pd$atac_factor_Group1) > 1e-9), 30)
  # a linked peak inherits its gene's cell-type factor
  g <- match(pd$linked_gene[linked], rownames(sim))
  expect_equal(pd$atac_factor_Group2[linked], rd$de_factor_Group2[g])
  bin <- simulate_counts(n_cells = 200, n_genes = 100, atac = TRUE, n_peaks = 300, atac_binary = TRUE, format = "list")
  expect_true(all(bin$atac@x == 1))
  expect_error(simulate_counts(n_cells = 100, n_groups = 2, atac = TRUE, atac_only_groups = 2),
               "`atac_only_groups` must be smaller than the number of cell types \\(2\\)")
})

test_that("a second species comes with a one-to-one homolog map and the same cell types", {
  one <- simulate_counts(n_cells = 300, n_genes = 200, seed = 5, threads = 2)
  two <- simulate_counts(n_cells = 300, n_genes = 200, seed = 5, threads = 2,
                         species = list(n_cells = 250, n_genes = 150, homolog_fraction = 0.6))
  # The first species is unchanged by adding the second.
  expect_identical(SingleCellExperiment::counts(two), SingleCellExperiment::counts(one))
  sp <- two@metadata$species2
  expect_s4_class(sp, "SingleCellExperiment")
  expect_equal(dim(sp), c(150, 250))
  expect_true(all(startsWith(rownames(sp), "Sp2Gene")))
  hom <- SummarizedExperiment::rowData(sp)$homolog
  expect_equal(sum(!is.na(hom)), 90)
  expect_false(anyDuplicated(hom[!is.na(hom)]) > 0)
  expect_true(all(hom[!is.na(hom)] %in% rownames(two)))
  expect_setequal(levels(sp$cell_type), levels(two$cell_type))
  # Homologs' base means follow the first species' (log-normal divergence, sd 0.3).
  rd1 <- SummarizedExperiment::rowData(two)
  rd2 <- SummarizedExperiment::rowData(sp)
  keep <- !is.na(hom)
  expect_gt(cor(log(rd2$base_mean[keep]), log(rd1[hom[keep], "base_mean"])), 0.9)
  lst <- simulate_counts(n_cells = 300, n_genes = 200, seed = 5, threads = 2, species = TRUE, format = "list")
  expect_equal(dim(lst$species2$counts), c(2000, 2000))
  expect_true("homolog" %in% names(lst$species2$gene_data))
  expect_error(simulate_counts(n_cells = 50, n_genes = 20, species = list(n_cell = 5)), "`species` must be")
})

test_that("cell types can be missing from a species, and the homolog truth has its documented shape", {
  skip_if_not_installed("SingleCellExperiment")
  sim <- simulate_counts(n_cells = 600, n_genes = 200, seed = 6, threads = 2,
                         species = list(n_cells = 600, n_genes = 150, homolog_fraction = 0.6, only_first = 1))
  sp <- sim@metadata$species2
  # only_first = 1: the last type, Group5, is the first species' only.
  expect_true("Group5" %in% sim$cell_type)
  expect_false("Group5" %in% sp$cell_type)
  expect_identical(levels(sp$cell_type), paste0("Group", 1:4))
  expect_identical(levels(sim$cell_type), paste0("Group", 1:5))
  # One row per second-species gene with a homolog, one column per shared type.
  lfc <- sp@metadata$homolog_lfc
  hom <- SummarizedExperiment::rowData(sp)$homolog
  expect_true(is.matrix(lfc))
  expect_identical(dim(lfc), c(90L, 4L))
  expect_identical(rownames(lfc), rownames(sp)[!is.na(hom)])
  expect_identical(colnames(lfc), levels(sp$cell_type))
  expect_true(all(is.finite(lfc)))
  # It is the log2 ratio of homologs' shares of base mean x cell-type factor.
  rd1 <- SummarizedExperiment::rowData(sim)
  rd2 <- SummarizedExperiment::rowData(sp)[!is.na(hom), ]
  m1 <- rd1[hom[!is.na(hom)], "base_mean"] * rd1[hom[!is.na(hom)], "de_factor_Group2"]
  m2 <- rd2$base_mean * rd2$de_factor_Group2
  expect_equal(unname(lfc[, "Group2"]), log2((m2 / sum(m2)) / (m1 / sum(m1))))
  # Most homologs differ little; some by more than 2-fold.
  expect_lt(median(abs(lfc)), 0.5)
  expect_gt(sum(abs(lfc) > 1), 4)
  # only_second = 1 as well: Group4 is the second species' only, the truth
  # keeps the three shared types.
  both <- simulate_counts(n_cells = 300, n_genes = 100, seed = 6, format = "list",
                          species = list(n_cells = 300, n_genes = 100, only_first = 1, only_second = 1))
  expect_false("Group4" %in% both$cell_data$cell_type)
  expect_true("Group4" %in% both$species2$cell_data$cell_type)
  expect_identical(colnames(both$species2$homolog_lfc), paste0("Group", 1:3))
  expect_identical(nrow(both$species2$homolog_lfc), sum(!is.na(both$species2$gene_data$homolog)))
  expect_error(simulate_counts(n_cells = 100, n_genes = 50, n_groups = 3,
                               species = list(only_first = 1, only_second = 1)), "at least 2 must be shared")
  expect_error(simulate_counts(n_cells = 100, species = list(only_first = 0.5)), "`only_first` must be a whole number")
})
