# differential_expression(): the decision rules are tested in the core
# (cargo test: de::tests, with hand-computed answers); here the R API, the
# pseudobulk path against known truths, and the Bayesian methods against the
# simulator's ground truth.

# One cell type, strong condition effects on 10% of 400 genes.
# The Bayesian methods on the simulator's conditions, which are a property
# of samples: the warning that points to pseudobulk is tested on its own.
de_cells <- function(...) {
  withCallingHandlers(differential_expression(...), warning = function(w) {
    if (grepl("property of samples", conditionMessage(w))) invokeRestart("muffleWarning")
  })
}

de_sim <- function(seed = 3) {
  simulate_counts(n_cells = 1200, n_genes = 400, n_groups = 1, n_batches = 2, treated_fraction = 0.5,
                  condition_de_prob = 0.1, condition_lfc = 1.5, seed = seed)
}

test_that("pseudobulk DESeq2 recovers the ERCC spike-ins' known fold changes", {
  skip_if_not_installed("DESeq2")
  e <- new.env()
  load(shared_data("ercc_spikein", "ERCC.RData"), envir = e)
  info <- utils::read.delim(shared_data("ercc_spikein", "ercc_info.txt"), check.names = FALSE)
  m <- e$ERCC
  # Bulk samples: each "cell" is a sample.
  cd <- data.frame(group = sub("_.*", "", colnames(m)), sample = colnames(m), row.names = colnames(m))
  sce <- SingleCellExperiment::SingleCellExperiment(list(counts = m), colData = cd)
  de <- differential_expression(NULL, sce, "group", "A", "B", method = "pseudobulk", sample_key = "sample",
                                min_cells = 1)
  i <- match(de$gene, info[["ERCC ID"]])
  err <- tapply(de$lfc_mean - info[["log2(Mix 1/Mix 2)"]][i], info$subgroup[i], median, na.rm = TRUE)
  expect_equal(names(err), c("A", "B", "C", "D"))
  expect_true(all(abs(err) < 0.3))
  expect_identical(attr(de, "params")$test, "DESeq2")
  expect_identical(names(de)[1:13], c("gene", "lfc_mean", "lfc_median", "lfc_sd", "lfc_lower", "lfc_upper", "proba_de",
                                      "bayes_factor", "is_de", "scale1", "scale2", "pvalue", "padj"))
  # Subgroup A (4-fold) is called, B (no change) mostly not.
  expect_gt(mean(de$is_de[info$subgroup[i] == "A"]), 0.8)
})

test_that("pseudobulk sums raw counts per sample and group, and checks its input", {
  skip_if_not_installed("edgeR")
  sim <- de_sim()
  cnt <- SingleCellExperiment::counts(sim)
  de <- differential_expression(NULL, sim, "condition", "treated", "control", method = "pseudobulk",
                                sample_key = "sample", test = "edgeR")
  pb <- attr(de, "pseudobulk")
  s <- colnames(pb)[1]
  parts <- strsplit(s, ":")[[1]]
  cond <- if (parts[2] == "group1") "treated" else "control"
  cells <- sim$sample == parts[1] & sim$condition == cond
  expect_equal(unname(pb[, s]), unname(as.integer(Matrix::rowSums(cnt[, cells]))))
  truth <- SummarizedExperiment::rowData(sim)$is_de_Group1
  expect_lt(1 - sum(de$is_de & truth) / max(1, sum(de$is_de)), 0.1)
  expect_true(is.na(de$proba_de[1]) && !is.na(de$padj[1]))
  expect_error(differential_expression(NULL, sim, "condition", "treated", method = "pseudobulk"),
               "needs `sample_key`")
  expect_error(differential_expression(NULL, sim, "condition", "treated", method = "pseudobulk",
                                       sample_key = "sample", min_cells = 10000), "at least 2 samples per group")
  expect_error(differential_expression(NULL, sim, "condition", "treated", method = "pseudobulk",
                                       sample_key = "nope"), "not a column")
  expect_error(differential_expression(NULL, sim, "condition", "treated", method = "pseudobulk",
                                       sample_key = "sample", covariates = "batch", on = "corrected"),
               "needs a model")
})

test_that("pseudobulk DESeq2 tests with gene-wise dispersions when their trend cannot be fitted", {
  skip_if_not_installed("DESeq2")
  # Samples without biological variation (as corrected expression can be):
  # every gene's dispersion is ~0, so DESeq2 cannot fit its trend. Genes
  # 1-5 are 3x higher in the treated samples.
  n_genes <- 60
  sample <- rep(paste0("s", 1:8), each = 40)
  treated <- sample %in% paste0("s", 1:4)
  x <- matrix(5, n_genes, length(sample), dimnames = list(paste0("g", 1:n_genes), paste0("c", seq_along(sample))))
  x[1:5, treated] <- 15
  x[, sample == "s2"] <- x[, sample == "s2"] + rep(c(1, 0), each = 30)
  sce <- SingleCellExperiment::SingleCellExperiment(list(counts = x))
  sce$sample <- sample
  sce$condition <- ifelse(treated, "treated", "control")
  expect_message(de <- differential_expression(NULL, sce, "condition", "treated", "control", method = "pseudobulk",
                                               sample_key = "sample"), "gene-wise dispersion")
  expect_true(all(de$is_de[1:5]))
  expect_lte(sum(de$is_de[-(1:5)]), 2)
  expect_equal(de$lfc_mean[1:5], rep(log2(3), 5), tolerance = 0.1)
})

test_that("group selection: values, the rest, indices, and clear errors", {
  sim <- de_sim()
  cnt <- as_counts(sim)
  g <- de_groups("condition", "treated", NULL, cnt)
  expect_equal(g$idx1, which(sim$condition == "treated"))
  expect_equal(g$idx2, which(sim$condition != "treated"))
  g <- de_groups(NULL, 1:10, 11:20, cnt)
  expect_equal(g$idx2, 11:20)
  g <- de_groups(NULL, sim$condition == "treated", NULL, cnt)
  expect_equal(g$idx2, which(sim$condition == "control"))
  g <- de_groups(NULL, colnames(sim)[1:3], NULL, cnt)
  expect_equal(g$idx1, 1:3)
  expect_error(de_groups("condition", "cured", NULL, cnt), "'cured' not found in `groupby`")
  expect_error(de_groups("condition", "treated", "treated", cnt), "share value")
  expect_error(de_groups(NULL, 1:10, 5:20, cnt), "share 6 cell")
  expect_error(de_groups(NULL, 0:3, NULL, cnt), "cell indices in 1..1200")
  expect_error(de_groups(NULL, "CellX", NULL, cnt), "not in `x`")
  expect_error(de_groups("nothere", "a", NULL, cnt), "not a column")
})

test_that("change mode finds the simulator's DE genes with a VAE, reproducibly", {
  sim <- de_sim()
  model <- fit_vae(sim, batch = "batch", max_epochs = 150, threads = 2)
  truth <- SummarizedExperiment::rowData(sim)$is_de_Group1
  true_lfc <- SummarizedExperiment::rowData(sim)$true_lfc_Group1
  de <- de_cells(model, sim, "condition", "treated", "control", n_samples = 2000, seed = 1,
                                threads = 2)
  expect_s3_class(de, "scdistill_de")
  expect_identical(de$gene, rownames(sim))
  # Calls are mostly right, LFCs follow the truth in sign and size. With
  # scvi-tools' pseudocount (divided by the number of genes) this seed gives
  # 22 of 42 true DE genes at FDP 0.31 and r 0.73; the undivided one shrank
  # LFCs to 16 calls at FDP 0 and r 0.68. Seeds 4-6: FDP 0.14, 0.05, 0.00.
  # This seed's normalization shift is -0.42: every unchanged gene's scale
  # moves by more than delta, and the low-count genes' scales follow the
  # decoder more than the data.
  expect_gt(sum(de$is_de & truth), 18)
  expect_lt(1 - sum(de$is_de & truth) / sum(de$is_de), 0.35)
  expect_gt(cor(de$lfc_mean[truth], true_lfc[truth]), 0.7)
  expect_true(all(de$lfc_lower <= de$lfc_median & de$lfc_median <= de$lfc_upper))
  p <- attr(de, "params")
  expect_true(p$delta >= 0.1 && p$delta_estimated && p$pseudocount > 0)
  # The expected-FDR rule holds for the calls.
  expect_lte(mean(1 - de$proba_de[de$is_de]), 0.05)
  # Same seed, same table; given delta is used as is.
  again <- de_cells(model, sim, "condition", "treated", "control", n_samples = 2000, seed = 1,
                                   threads = 2)
  expect_identical(again$lfc_mean, de$lfc_mean)
  fixed <- de_cells(model, sim, "condition", "treated", "control", n_samples = 500, delta = 0.5,
                                   batch_correction = TRUE, seed = 1, threads = 2)
  expect_identical(attr(fixed, "params")$delta, 0.5)
  expect_identical(attr(fixed, "params")$batch_correction, c("Batch1", "Batch2"))
  # Vanilla: P(rho1 > rho2) is high for genes the truth says go up.
  van <- de_cells(model, sim, "condition", "treated", "control", method = "vanilla",
                                 n_samples = 1000, threads = 2)
  up <- truth & true_lfc > 1
  expect_gt(mean(van$bayes_factor[up] > 0), 0.8)
  # MC dropout: Gaussian posterior, no range columns.
  mc <- de_cells(model, sim, "condition", "treated", "control", method = "mc_dropout",
                                n_samples = 20, threads = 2)
  expect_false("lfc_min" %in% names(mc))
  expect_gt(cor(mc$lfc_mean[truth], true_lfc[truth]), 0.6)
  expect_equal(mc$lfc_median, mc$lfc_mean)
  f <- tempfile(fileext = ".png")
  grDevices::png(f)
  expect_identical(plot(de), de)
  grDevices::dev.off()
  expect_error(de_cells(model, sim, "condition", "treated", batch_correction = "BatchZ"),
               "batches of the model")
  expect_error(de_cells(model, sim[1:50, ], "condition", "treated"), "genes")
})

test_that("a distilled model gives Bayesian DE too", {
  sim <- de_sim(4)
  model <- distill(sim, batch = "batch", teacher = harmony_teacher(n_pcs = 20), n_latent = 10,
                   max_epochs_encoder = 60, max_epochs_decoder = 100, threads = 2)
  truth <- SummarizedExperiment::rowData(sim)$is_de_Group1
  true_lfc <- SummarizedExperiment::rowData(sim)$true_lfc_Group1
  de <- de_cells(model, sim, "condition", "treated", "control", batch_correction = TRUE,
                                n_samples = 1000, threads = 2)
  expect_gt(cor(de$lfc_mean[truth], true_lfc[truth]), 0.7)
  expect_gt(sum(de$is_de & truth), 5)
  expect_identical(attr(de, "params")$model, "distill")
  # The samples method with the student's (deterministic) batch correction.
  reps <- differential_expression(model, sim, "condition", "treated", "control", method = "samples",
                                  sample_key = "sample", threads = 2)
  expect_gte(sum(reps$is_de & truth) / sum(truth), 0.5)
  expect_lte(sum(reps$is_de & !truth) / max(sum(reps$is_de), 1), 0.1)
  expect_gt(cor(reps$lfc_mean[truth], true_lfc[truth]), 0.7)
})

test_that("pseudobulk puts the batch in the design by default and refuses a collinear one", {
  skip_if_not_installed("edgeR")
  # Condition confounded with batch 100/50/0 %: the batch effect leaks into
  # the calls without the batch in the design.
  sim <- simulate_counts(n_cells = 1500, n_genes = 300, n_groups = 1, n_batches = 3,
                         treated_fraction = c(1, 0.5, 0), condition_de_prob = 0.1, condition_lfc = 1.5,
                         batch_effect = "strong", seed = 4)
  truth <- SummarizedExperiment::rowData(sim)$is_de_Group1
  fdp <- function(de) 1 - sum(de$is_de & truth) / max(1, sum(de$is_de))
  expect_message(with_batch <- differential_expression(NULL, sim, "condition", "treated", "control",
                                                       method = "pseudobulk", sample_key = "sample", test = "edgeR"),
                 "hold\\(s\\) samples of one group only")
  expect_match(attr(with_batch, "params")$design, "~batch \\+ group")
  without <- differential_expression(NULL, sim, "condition", "treated", "control", method = "pseudobulk",
                                     sample_key = "sample", test = "edgeR", covariates = character())
  expect_match(attr(without, "params")$design, "~group")
  expect_lt(fdp(with_batch), fdp(without))
  expect_lt(fdp(with_batch), 0.15)
  # Fully confounded: every batch holds one condition.
  two <- sim[, sim$batch != levels(factor(sim$batch))[2]]
  expect_error(differential_expression(NULL, two, "condition", "treated", "control", method = "pseudobulk",
                                       sample_key = "sample", test = "edgeR"),
               "`batch` and the groups are collinear.*covariates = character\\(\\)")
})

test_that("a Bayesian cell-level method warns when the groups are a property of samples", {
  sim <- de_sim()
  # The simulator's samples are nested in batch and condition.
  expect_true(all(tapply(as.character(sim$condition), sim$sample, function(z) length(unique(z))) == 1))
  m <- fit_vae(sim, batch = "batch", max_epochs = 2, threads = 2)
  expect_warning(differential_expression(m, sim, "condition", "treated", "control", n_samples = 200,
                                         n_pairs = 200, threads = 2),
                 "property of samples.*pseudobulk")
  # Groups mixed within samples: a cell-level question, no warning.
  sim$half <- rep(c("a", "b"), length.out = ncol(sim))
  expect_no_warning(differential_expression(m, sim, "half", "a", "b", n_samples = 200, n_pairs = 200, threads = 2))
})

test_that("the samples method treats samples as replicates: calibrated calls, known truth, clear errors", {
  # Donor-to-donor variation (sample_sd) on every gene: cell-level methods
  # call it; the samples method must not. 6 samples per condition.
  sim <- simulate_counts(n_cells = 2400, n_genes = 400, n_groups = 2, n_batches = 2, treated_fraction = 0.5,
                         condition_de_prob = 0.1, condition_shared = TRUE, condition_lfc = 1.2,
                         samples_per_batch = 3, sample_sd = 0.25, seed = 4)
  truth <- SummarizedExperiment::rowData(sim)$is_de
  model <- fit_vae(sim, batch = "batch", max_epochs = 40, threads = 2)
  de <- differential_expression(model, sim, "condition", "treated", "control", method = "samples",
                                sample_key = "sample", threads = 2)
  p <- attr(de, "params")
  expect_identical(c(p$samples1, p$samples2), c(6L, 6L))
  # 12 samples, intercept + group, and one batch contrast the model learnt.
  expect_identical(p$residual_df, 9)
  expect_identical(p$batch_correction, levels(factor(sim$batch)))
  called <- de$is_de
  expect_gte(sum(called & truth) / sum(truth), 0.6)
  expect_lte(sum(called & !truth) / max(sum(called), 1), 0.1)
  # The called genes move the way the truth does.
  true_lfc <- SummarizedExperiment::rowData(sim)$true_lfc
  expect_true(all(sign(de$lfc_mean[called & truth]) == sign(true_lfc[called & truth])))
  expect_false(anyNA(de$pvalue))
  expect_true(all(de$padj >= de$pvalue))
  # LFC != 0 by default, called at the FDR target of the moderated t-test
  # after the empirical null (widened, never narrowed).
  expect_identical(p$delta, 0)
  expect_false(p$delta_estimated)
  expect_identical(de$is_de, de$padj <= 0.05)
  expect_true(length(p$null_sd) %in% 1:3 && all(p$null_sd > 0.5))
  expect_output(summary(de), "empirical null sd")
  expect_output(summary(de), "tested: LFC != 0")
  f <- tempfile(fileext = ".png")
  grDevices::png(f)
  expect_identical(plot(de), de)
  grDevices::dev.off()
  unlink(f)
  # A given delta asks |LFC| > delta of the posterior: fewer calls, each
  # with most of its posterior beyond delta.
  strict <- differential_expression(model, sim, "condition", "treated", "control", method = "samples",
                                    sample_key = "sample", delta = 1, threads = 2)
  expect_identical(attr(strict, "params")$delta, 1)
  expect_lt(sum(strict$is_de), sum(de$is_de))
  expect_true(all(strict$proba_de[strict$is_de] > 0.5))
  expect_identical(strict$pvalue, de$pvalue)
  # The batch as a covariate as well: its column takes the correction's
  # degree of freedom once, not twice (12 samples - 3 columns).
  with_batch <- differential_expression(model, sim, "condition", "treated", "control", method = "samples",
                                        sample_key = "sample", covariates = "batch", threads = 2)
  expect_match(attr(with_batch, "params")$design, "~batch \\+ group")
  expect_identical(attr(with_batch, "params")$residual_df, 9)
  expect_length(attr(with_batch, "params")$null_sd, length(p$null_sd))
  # Reproducible for a seed.
  again <- differential_expression(model, sim, "condition", "treated", "control", method = "samples",
                                   sample_key = "sample", threads = 2)
  expect_identical(again$lfc_mean, de$lfc_mean)
  # Errors that name the problem.
  no_key <- sim
  no_key$sample <- NULL
  expect_error(differential_expression(model, no_key, "condition", "treated", method = "samples"),
               "needs `sample_key`")
  sim$half <- rep(c("a", "b"), length.out = ncol(sim))
  expect_error(differential_expression(model, sim, "half", "a", "b", method = "samples", sample_key = "sample"),
               "have cells in both groups")
  expect_error(differential_expression(model, sim, "condition", "treated", method = "samples",
                                       sample_key = "sample", min_cells = 1000),
               "at least 2 samples per group")
})

test_that("the samples method says when batches hold one group only and the groups were not protected", {
  # 100/50/0% treated: the first and last batch hold one condition each.
  sim <- simulate_counts(n_cells = 1500, n_genes = 300, n_groups = 2, n_batches = 3, treated_fraction = c(1, 0.5, 0),
                         condition_de_prob = 0.1, condition_shared = TRUE, condition_lfc = 1.2, seed = 4)
  de <- function(m, x = sim) differential_expression(m, x, "condition", "treated", "control", method = "samples",
                                                     sample_key = "sample", threads = 2)
  fit <- function(...) distill(sim, batch = "batch", max_epochs_encoder = 5, max_epochs_decoder = 5, threads = 2, ...)
  plain <- fit()
  expect_message(de(plain), paste0("batch\\(es\\) 'Batch1', 'Batch3' hold cells of one group only.*LFCs\\)\\. A ",
                                   "distilled model .*harmony_teacher\\(protect = \"condition\"\\)"))
  protected <- fit(teacher = harmony_teacher(protect = "condition"))
  expect_identical(protected$teacher$protect, "condition")
  expect_no_message(de(protected))
  # A loaded model keeps what its teacher protected in the teacher's name.
  expect_match(protected$info$teacher, "protecting condition$")
  f <- tempfile(fileext = ".scdistill")
  save_model(protected, f)
  expect_no_message(de(load_model(f)))
  save_model(plain, f, overwrite = TRUE)
  expect_message(de(load_model(f)), "hold cells of one group only")
  two <- fit(teacher = harmony_teacher(protect = c("cell_type", "condition")))
  expect_match(two$info$teacher, "protecting cell_type \\+ condition$")
  two$teacher <- NULL
  expect_identical(unlist(two$info$teacher_protects), c("cell_type", "condition"))
  two$info$teacher <- "renamed" # the description, not the name, says what was protected
  expect_identical(scdistill:::teacher_protects(two), c("cell_type", "condition"))
  unprotected <- plain
  unprotected$teacher <- NULL
  expect_identical(scdistill:::teacher_protects(unprotected), character())
  # A model file from before the description recorded them: read from the name.
  two$info$teacher_protects <- NULL
  two$info$teacher <- "harmony (theta 2) on 50 PCs (log2cpm) of 2000 HVGs, protecting cell_type + condition"
  expect_identical(scdistill:::teacher_protects(two), c("cell_type", "condition"))
  # A VAE is pointed to a protecting teacher or to pseudobulk.
  vae <- fit_vae(sim, batch = "batch", max_epochs = 2, threads = 2)
  expect_message(de(vae), "or method = \"pseudobulk\" with the batch")
  # Every batch holds both groups: nothing to say.
  mixed <- sim[, sim$batch == "Batch2"]
  expect_no_message(de(plain, mixed))
})

test_that("summary() of a DE table counts the calls by direction and shows the design", {
  sim <- de_sim()
  pb <- differential_expression(NULL, sim, "condition", "treated", "control", method = "pseudobulk",
                                sample_key = "sample")
  out <- capture.output(res <- summary(pb))
  expect_identical(res, pb)
  n_up <- sum(pb$is_de & pb$lfc_mean > 0)
  n_down <- sum(pb$is_de & pb$lfc_mean < 0)
  expect_true(any(grepl(sprintf("%d of %d genes called at FDR 0.05: %d up, %d down", n_up + n_down, nrow(pb),
                                n_up, n_down), out, fixed = TRUE)))
  expect_true(any(grepl("samples: 4 vs 4, design ~batch + group", out, fixed = TRUE)))
})
