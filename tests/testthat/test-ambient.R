# Ambient RNA: the simulator's truth, removal closer to the clean counts, every source of the profile, errors.

ambient_sim <- function() {
  simulate_counts(n_cells = 800, n_genes = 300, n_groups = 3, n_batches = 1,
                  ambient = list(fraction = 0.15, n_empty = 1000), seed = 4)
}

count_error <- function(a, b) sum(abs(a - b)) / sum(b)

test_that("simulate_counts(ambient = ) adds known ambient molecules and empty droplets", {
  sim <- ambient_sim()
  clean <- SummarizedExperiment::assay(sim, "true_counts")
  obs <- SingleCellExperiment::counts(sim)
  expect_equal(unname(Matrix::colSums(obs) - Matrix::colSums(clean)), sim$ambient_umis)
  expect_equal(sim$ambient_fraction, unname(sim$ambient_umis / Matrix::colSums(obs)))
  expect_true(all(obs >= clean))
  expect_equal(mean(sim$ambient_fraction), 0.15, tolerance = 0.2)
  amb <- S4Vectors::metadata(sim)$ambient
  expect_equal(sum(amb$profile), 1)
  expect_equal(unname(amb$profile), unname(Matrix::rowSums(clean) / sum(clean)))
  expect_equal(dim(amb$empty_droplets), c(300, 1000))
  # Without ambient, the same seed gives the clean counts.
  plain <- simulate_counts(n_cells = 800, n_genes = 300, n_groups = 3, n_batches = 1, seed = 4)
  expect_identical(SingleCellExperiment::counts(plain), clean)
  expect_error(simulate_counts(n_cells = 50, ambient = list(fraction = 2)), "`ambient\\$fraction` must be a number in \\(0, 1\\)")
})

test_that("remove_ambient() brings counts closer to the clean ones, from empty droplets or a raw matrix", {
  sim <- ambient_sim()
  clean <- SummarizedExperiment::assay(sim, "true_counts")
  empty <- S4Vectors::metadata(sim)$ambient$empty_droplets
  out <- remove_ambient(sim, empty_droplets = empty, threads = 2)
  dec <- SummarizedExperiment::assay(out, "decontaminated")
  expect_equal(dim(dec), dim(clean))
  expect_true(all(dec@x == round(dec@x)) && all(dec@x > 0))
  expect_true(all(dec <= SingleCellExperiment::counts(sim)))
  before <- count_error(SingleCellExperiment::counts(sim), clean)
  expect_lt(count_error(dec, clean), 0.75 * before)
  expect_equal(mean(out$ambient_fraction), mean(sim$ambient_fraction), tolerance = 0.35)
  expect_true(all(out$ambient_removed >= 0 & out$ambient_removed < 1))
  fit <- S4Vectors::metadata(out)$ambient
  expect_output(print(fit), "800 cells x 300 genes, profile from empty droplets \\(1,000\\)")
  # A raw droplet matrix holding cells and empty droplets: the droplets
  # outside `x` with at most `empty_max_umi` counts are the empty ones
  # (these hold ~350 molecules, above DropletUtils' 100).
  raw <- cbind(SingleCellExperiment::counts(sim), empty)
  from_raw <- remove_ambient(SingleCellExperiment::counts(sim), raw = raw, empty_max_umi = 500, threads = 2)
  expect_s3_class(from_raw, "scdistill_ambient")
  expect_equal(from_raw$n_empty, sum(Matrix::colSums(empty) <= 500))
  expect_lt(count_error(from_raw$counts, clean), 0.75 * before)
  # New cells through the fitted model.
  again <- scdistill:::apply_ambient(fit, SingleCellExperiment::counts(sim)[, 1:50])
  expect_identical(again$counts, dec[, 1:50])
  expect_error(scdistill:::apply_ambient(fit, SingleCellExperiment::counts(sim)[1:100, ]),
               "lack 200 of the ambient model's genes")
})

test_that("remove_ambient() takes a given profile and refuses missing or mismatched sources", {
  sim <- ambient_sim()
  m <- SingleCellExperiment::counts(sim)
  prof <- S4Vectors::metadata(sim)$ambient$profile
  given <- remove_ambient(m, ambient = prof, expected_fraction = 0.15, threads = 2)
  expect_lt(count_error(given$counts, SummarizedExperiment::assay(sim, "true_counts")),
            0.75 * count_error(m, SummarizedExperiment::assay(sim, "true_counts")))
  expect_error(remove_ambient(m), "no empty droplets given and no profile")
  other <- stats::setNames(prof, paste0("other", seq_along(prof)))
  expect_error(remove_ambient(m, ambient = other), "`ambient` is on other genes: 300 of the 300 genes")
  expect_error(remove_ambient(m, raw = m), "`raw` has no empty droplets")
  expect_error(remove_ambient(m, ambient = -prof), "must be non-negative")
})
