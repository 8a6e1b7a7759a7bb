# Differential expression: Bayesian (from a model's expression scales) and
# pseudobulk (raw counts summed per sample, tested with DESeq2 or edgeR).

#' Differential expression between two groups of cells
#'
#' Compares the expression of every gene between `group1` and `group2`.
#' Four Bayesian methods use a trained model (from [fit_vae()] or
#' [distill()]): three compare cells, one (`"samples"`) compares samples;
#' the pseudobulk method sums raw counts per sample and tests them with
#' DESeq2 or edgeR.
#'
#' @section Methods:
#' - `"change"` (default; scvi-tools' change mode, Boyeau et al. 2019):
#'   `n_samples` draws of the expression scale ρ per group (random cells of
#'   the group, one posterior draw each), `n_pairs` random pairs of draws
#'   across the groups and the log fold change
#'   LFC = log2(ρ1 + ε) − log2(ρ2 + ε) of each pair. A gene's probability of
#'   being DE is `proba_de` = max(P(LFC ≥ δ), P(LFC ≤ −δ)), its Bayes
#'   factor log(p / (1 − p)). This is the posterior of the fold change
#'   between single cells: when the groups mix cell types (e.g. treated
#'   against control cells of every type), pairs of cells of different types
#'   widen it and few genes reach `fdr_target`. For such population-level
#'   comparisons `"pseudobulk"` (with samples) and `"mc_dropout"` estimate
#'   the fold change of the group means instead (simulator benchmark:
#'   `bench/RESULTS.md` in the source repository).
#' - `"vanilla"`: the probability that ρ1 > ρ2 over the same pairs;
#'   `bayes_factor` = log P(ρ1 > ρ2) − log P(ρ1 ≤ ρ2) (signed), `proba_de`
#'   the larger of the two probabilities.
#' - `"mc_dropout"` (scDistill's Bayesian mode): `n_samples` passes over all
#'   cells of both groups with dropout on (Monte Carlo dropout). The LFC of
#'   the group means is Gaussian with variance from the model (across
#'   passes) plus the data (across cells, over their number), carried to the
#'   log scale by the delta method. Only per-pass group means are kept, so
#'   memory does not grow with the number of cells. Needs a model trained
#'   with `dropout > 0`. The variance covers neither the decoder's own
#'   errors nor the count noise of rarely detected genes, so with thousands
#'   of cells it can be over-confident: on the simulator, a VAE's calls were
#'   mostly false (a distilled model's 10-17%), many of them genes with a
#'   mean count below 0.1.
#' - `"samples"` (replicate-aware; for "does the gene change between
#'   conditions, across samples"): the samples (`sample_key`) are the
#'   replicates and the model is the batch correction. Each cell's counts
#'   are multiplied gene by gene by the ratio of its expression scale
#'   decoded under the model's batches (averaged; `batch_correction`) to
#'   that under its own batch, from posterior draws of z, and summed per
#'   sample. A sample's level is log2 of its share of the corrected counts
#'   (½ count added), centred by the sample's median over the detected genes
#'   (as DESeq2's median of ratios). Per gene, a linear model of the levels
#'   over samples (`~ covariates + group`) gives the LFC and the
#'   between-sample variance, moderated by an empirical-Bayes prior that
#'   follows the mean level (limma-trend; Smyth 2004). The model learnt the
#'   batch effects from the same samples, so its correction costs the
#'   residuals one degree of freedom per batch beyond the first, as a batch
#'   term in the design would (none when `covariates` already hold the
#'   batch: the design's columns take them). Adaptive shrinkage
#'   (Stephens 2017) then learns the distribution of true LFCs over genes (a
#'   point mass at 0 and centred normals) and gives each gene its
#'   posterior: `lfc_mean`, `lfc_median`, `lfc_sd` and the 95% interval
#'   describe it (shrunk toward 0 when the evidence is weak), `proba_de` =
#'   max(P(LFC > δ), P(LFC < −δ)), δ = 0 unless given. `pvalue` and `padj`
#'   are the moderated t-test of LFC = 0 (Benjamini–Hochberg). The model's
#'   correction has errors of its own, gene by gene, shared by the samples
#'   of a batch, which the residuals do not see: on the simulator 8-12% of
#'   unchanged genes fell below p = 0.05, more the higher their expression.
#'   So after the correction the z-scores are widened by the spread of
#'   their centre, where unchanged genes dominate, fitted in up to three
#'   bands of mean level (Efron's empirical null, central matching; never
#'   narrowed; `attr(, "params")$null_sd`). The calls, `is_de`, are
#'   `padj < fdr_target`; with a given `delta` > 0 they are the posterior
#'   expected FDR rule of |LFC| > δ (the posterior rule at δ = 0 let 8%
#'   false calls through at a nominal 5% on the simulator, and an
#'   estimated δ found a sixth fewer changed genes than pseudobulk).
#'   The levels are the data's, not
#'   the decoder's: decoded expression pools cells across samples and
#'   understates how much samples differ (on the simulator with donor
#'   variation, a test on decoded sample means had an FDP of 0.5). Needs at
#'   least two samples of `min_cells` cells per group, each sample wholly in
#'   one group. Because the model removes the batch, it also works where
#'   the batch is confounded with the groups, which a pseudobulk design
#'   with the batch as a covariate cannot separate. There, distil with a
#'   teacher that protects the groups, or the batch effects absorb part of
#'   the group difference in the batches that hold one group only (a message
#'   says so): `distill(teacher = harmony_teacher(protect = "condition"))`.
#'   On the simulator with 100/50/0% treated per batch (three simulations)
#'   this raised the F1 of the calls from 0.80 to 0.86 (pseudobulk with
#'   the batch: 0.85 DESeq2, 0.86 edgeR), and with donor variation from
#'   0.59 to 0.70 (pseudobulk 0.64), at an FDP of at most 0.04. Giving a VAE
#'   the condition as a covariate (`categorical_covariates`) also raised its
#'   F1 there (0.78 to 0.82, 0.55 to 0.68), but it is not advised: its
#'   decoder must then guess the batch x condition pairs it never saw, and
#'   the false calls follow (FDP up to 0.08 on the simulator's designs, and
#'   22 of 59 calls on a small confounded simulation).
#' - `"pseudobulk"`: raw counts summed per `sample_key` × group (samples
#'   with fewer than `min_cells` cells of a group are left out; each group
#'   needs at least two samples), then DESeq2's Wald test or edgeR's
#'   quasi-likelihood F test with design `~ covariates + group`. By default
#'   the batch is a covariate whenever the cells carry one (see
#'   `covariates`): without it, batch effects confounded with the groups are
#'   called as differences (on the simulator's confounded design, FDP 0.67
#'   without the batch against 0.06 with it). With
#'   `on = "corrected"`, the pseudobulks are sums of the model's corrected
#'   expression (each cell decoded to `reference_batch`, times its library
#'   size, rounded): labelled as such in the parameters.
#'
#' @section Cell-level and population-level questions:
#' The Bayesian methods compare cells; "does this gene change between
#' conditions, across samples" is a question about samples. When the
#' groups are a property of samples (each sample wholly in one group) and
#' the cells carry samples (`sample_key`, or a column named `sample`,
#' `sample_id`, `donor` or `replicate`), a cell-level method warns and
#' points to `method = "samples"` and `method = "pseudobulk"`, which treat
#' samples as the replicates.
#'
#' @section Decision rules:
#' - **Pseudocount ε** (change, vanilla, MC dropout): in each group, the
#'   genes with a mean count below 0.01 are treated as absent; the largest
#'   scale the model gives each of them is a measure of the scale of
#'   "nothing": ε is the 0.9-quantile of those maxima, the larger of the
#'   two groups', divided by the number of genes as scvi-tools 1.4.2 does
#'   (and at least 1e-10). Give `pseudocount` to fix it.
#' - **Threshold δ** (change, vanilla, MC dropout; samples test LFC ≠ 0
#'   unless δ is given): unless given, a three-component Gaussian mixture is
#'   fitted to the genes' mean LFCs (down, unchanged, up; started from a
#'   k-means split, as scikit-learn's `GaussianMixture`) and δ is 0.6 times
#'   the mean absolute value of its two extreme means, but at least
#'   `delta_floor` (0.1).
#' - **Calls**: genes are sorted by `proba_de` and the top k are called DE,
#'   for the largest k whose posterior expected false discovery proportion,
#'   the mean of 1 − `proba_de` over them, is at most `fdr_target`.
#'   Pseudobulk calls, and samples calls at δ = 0 (the default), are
#'   `padj < fdr_target` (Benjamini–Hochberg).
#'
#' @param model A model from [fit_vae()] or [distill()]; may be `NULL` for
#'   `method = "pseudobulk"` on raw counts.
#' @param x The cells: a `SingleCellExperiment`, Seurat object or count
#'   matrix (see [as_counts()]), on the model's genes (matched by name); or
#'   counts on disk (an `.h5ad` or 10x `.h5` file, an [h5_counts()]
#'   description, or an experiment whose counts are an HDF5-backed
#'   `DelayedMatrix`), whose cells are read a chunk at a time, never all at
#'   once: the Bayesian methods for a VAE give the same table as for the
#'   same cells in memory, and pseudobulk sums blocks of 20,000 cells. The
#'   groups, samples and covariates are then columns of the experiment's
#'   `colData` or of the `.h5ad` file's `obs`.
#' @param groupby A column of the cell metadata (or one label per cell)
#'   whose values `group1` and `group2` name; `NULL` to give the groups as
#'   cell indices, logical vectors or cell names.
#' @param group1 Value(s) of `groupby` (or cells) of the first group: the
#'   numerator of the fold change.
#' @param group2 Value(s) (or cells) of the second group; `NULL` for all
#'   other cells.
#' @param method `"change"`, `"vanilla"`, `"mc_dropout"`, `"samples"` or
#'   `"pseudobulk"`.
#' @param batch Batch of each cell, as in [normalized_expression()]; by
#'   default the model's batch column.
#' @param batch_correction `FALSE`: each cell is decoded in its own batch.
#'   `TRUE`: every cell is decoded under every batch of the model (or give
#'   the batches to use) and draws are paired within a batch (averaged over
#'   the batches for MC dropout and samples), so that batch effects
#'   confounded with the groups do not enter the fold changes. `NULL`
#'   (default): `TRUE` for `"samples"`, `FALSE` for the others.
#' @param n_samples Scale draws per group (change, vanilla; default 5000,
#'   split across the decoding batches), dropout passes (MC dropout;
#'   default 100) or posterior draws per cell for the batch correction (samples; default
#'   10; one for a distilled model, whose encoder is deterministic).
#' @param n_pairs Pairs of draws compared (change, vanilla).
#' @param delta δ, the smallest |LFC| that counts as a change; `NULL` to
#'   estimate it (change, vanilla, MC dropout) or 0 (samples: LFC ≠ 0).
#' @param delta_floor Lower bound of an estimated δ.
#' @param pseudocount ε; `NULL` to estimate it.
#' @param fdr_target Target false discovery rate of the calls.
#' @param sample_key Samples and pseudobulk: column of the cell metadata (or
#'   one value per cell) naming each cell's sample (donor, replicate). For
#'   `"samples"`, `NULL` looks for a column named `sample`, `sample_id`,
#'   `donor` or `replicate`.
#' @param test Pseudobulk: `"DESeq2"` (default) or `"edgeR"`.
#' @param covariates Pseudobulk: columns of the cell metadata, each
#'   constant within a sample, added to the design. `NULL` (default): the
#'   batch, when the cells carry one (`batch`, else the model's batch column,
#'   else a column named `batch`) and it is constant within samples; a
#'   batch collinear with the groups (every batch holding one group only) is
#'   an error that says what to do, a partly confounded one a message.
#'   `character()`: no covariate. For `"samples"`, columns constant within
#'   samples added to the sample-level model; `NULL` (default) adds none,
#'   as the model's batch correction removes the batch.
#' @param on Pseudobulk: `"counts"` (raw counts, default) or `"corrected"`
#'   (the model's corrected expression).
#' @param reference_batch Pseudobulk on corrected expression: the batch(es)
#'   to decode to (default: the model's first).
#' @param min_cells Samples and pseudobulk: fewest cells of a group for a
#'   sample to count.
#' @param seed Seed of the random draws: the same seed gives the same table.
#' @param threads CPU threads.
#' @param ... Passed to [as_counts()].
#' @return A `data.frame` of class `scdistill_de`, one row per gene in the
#'   model's order, with columns `gene`, `lfc_mean`, `lfc_median`,
#'   `lfc_sd`, `lfc_lower`, `lfc_upper` (95% interval), `proba_de`,
#'   `bayes_factor`, `is_de`, `scale1`, `scale2` (mean expression scale of
#'   each group), `pvalue`, `padj`, and for change and vanilla `lfc_min`,
#'   `lfc_max`; columns a method does not produce are `NA`.
#'   `attr(, "params")` records the method and its settings, including the
#'   δ and ε used. Plot it with [plot.scdistill_de()].
#' @references Boyeau P. et al. (2019) Deep generative models for detecting
#'   differential expression in single cells. bioRxiv 794289.
#' @examples
#' sim <- simulation_scenario("s1", n_cells = 1200, seed = 2)
#' sim <- sim[, sim$cell_type == "Group1"]
#' model <- fit_vae(sim, batch = "batch", max_epochs = 30, threads = 2)
#' de <- differential_expression(model, sim, "condition", "treated", "control", threads = 2)
#' head(de[order(-de$proba_de), c("gene", "lfc_mean", "proba_de", "is_de")])
#' # Against the simulator's truth:
#' table(called = de$is_de, true = SummarizedExperiment::rowData(sim)$is_de_Group1)
#' plot(de)
#' @export
differential_expression <- function(model, x, groupby = NULL, group1, group2 = NULL,
                                    method = c("change", "vanilla", "mc_dropout", "samples", "pseudobulk"),
                                    batch = NULL, batch_correction = NULL, n_samples = NULL, n_pairs = 10000,
                                    delta = NULL, delta_floor = 0.1, pseudocount = NULL, fdr_target = 0.05,
                                    sample_key = NULL, test = c("DESeq2", "edgeR"), covariates = NULL,
                                    on = c("counts", "corrected"), reference_batch = NULL, min_cells = 10,
                                    seed = 0, threads = NULL, ...) {
  method <- choose_arg(method, "method")
  test <- choose_arg(test, "test")
  on <- choose_arg(on, "on")
  if (!is.null(model) || method != "pseudobulk") check_model(model)
  check_fraction(fdr_target, "fdr_target")
  seed <- check_seed(seed)
  if (method != "pseudobulk" && inherits(model, "scdistill_multimodal")) bayesian_de_unavailable(model)
  disk <- as_disk(x, ...)
  cnt <- if (is.null(disk)) as_counts(x, ...) else disk_cells_table(disk)
  groups <- de_groups(groupby, group1, group2, cnt)
  if (method == "pseudobulk") {
    if (is.null(covariates)) covariates <- default_batch_covariate(model, cnt, batch, sample_key)
    return(pseudobulk_de(model, cnt, groups, sample_key = sample_key, test = test,
                         covariates = covariates, on = on, reference_batch = reference_batch,
                         min_cells = check_count(min_cells, "min_cells"), fdr_target = fdr_target,
                         threads = threads))
  }
  n_samples <- check_count(n_samples %||% switch(method, mc_dropout = 100, samples = 10, 5000), "n_samples")
  if (method == "mc_dropout" && !(model$info$config$dropout > 0)) {
    stop("`method = \"mc_dropout\"` needs a model trained with dropout > 0; this one has none", call. = FALSE)
  }
  levels <- model$info$batch_levels
  if (is.null(levels)) bayesian_de_unavailable(model)
  batches <- de_batches(batch_correction %||% (method == "samples"), levels)
  if (!is.null(disk) && !inherits(model, "scdistill_vae")) {
    stop("Bayesian differential_expression() of counts on disk is available for VAEs (fit_vae()); for a ",
         class(model)[1], " model read the two groups' cells into memory (as_counts(h5_counts(file), cells = ...)) ",
         "or use method = \"pseudobulk\"", call. = FALSE)
  }
  cells <- if (is.null(disk)) model_cells(model, cnt, batch) else disk_model_cells(model, cnt$disk, batch)
  distilled <- inherits(model, "scdistill_distill")
  if (is.null(cells$batch)) {
    if (distilled && length(batches)) cells$batch <- rep(levels[1], length(cells$cells))
    else stop("the cells' batch is needed: pass `batch` (a column of the cell metadata or one value per cell), ",
              "or use `batch_correction = TRUE`", call. = FALSE)
  }
  settings <- list(method = method, n_samples = n_samples, n_pairs = check_count(n_pairs, "n_pairs"),
                   batches = as.list(batches), delta = de_optional(delta, "delta"),
                   delta_floor = check_positive(delta_floor, "delta_floor", zero_ok = TRUE),
                   pseudocount = de_optional(pseudocount, "pseudocount"), low_count = 0.01,
                   fdr_target = fdr_target, seed = seed)
  reps <- NULL
  if (method == "samples") {
    reps <- de_replicates(cnt, groups, sample_key, covariates, check_count(min_cells, "min_cells"))
    groups$idx1 <- reps$idx1
    groups$idx2 <- reps$idx2
    # The model's batch effects were learnt from these samples: their
    # degrees of freedom are not the residuals' (see ?differential_expression).
    n_batches <- if (length(batches)) length(unique(as.character(cells$batch)[c(reps$idx1, reps$idx2)])) else 1L
    # Unless the design's covariates already span the batches: their
    # columns then take those degrees of freedom.
    batch_df <- if (n_batches > 1 && design_spans_batches(reps, cells$batch)) 0L else n_batches - 1L
    settings <- c(settings, list(sample_of = reps$codes, design = as.vector(reps$design),
                                 design_columns = ncol(reps$design), batch_df = batch_df))
    if (length(batches)) note_unprotected(model, groupby, groups, cells$batch)
  } else {
    warn_cell_level(method, cnt, groups, sample_key)
  }
  i1 <- groups$idx1 - 1L
  i2 <- groups$idx2 - 1L
  bar <- pass_bar()
  on.exit(bar$done(), add = TRUE)
  res <- if (is.null(disk)) {
    rust(rs_model_de(model_ptr(model), cells, i1, i2, settings, resolve_threads(threads), bar$update))
  } else {
    rust(rs_vae_de_disk(model_ptr(model), disk_spec(disk), disk$genes, cells$batch, cells$categorical,
                        cells$continuous, i1, i2, settings, resolve_threads(threads), bar$update))
  }
  change <- method %in% c("change", "vanilla")
  out <- de_table(model$info$genes, res, change = change)
  params <- c(list(method = method, model = if (distilled) "distill" else "vae"), groups$labels,
              list(n_cells1 = length(i1), n_cells2 = length(i2), batch_correction = batches %||% FALSE,
                   n_samples = n_samples, n_pairs = if (change) settings$n_pairs,
                   delta = res$delta, delta_estimated = is.null(delta) && method != "samples",
                   pseudocount = res$pseudocount,
                   pseudocount_estimated = is.null(pseudocount), fdr_target = fdr_target, seed = seed),
              if (!is.null(reps)) list(sample_key = reps$key, samples1 = reps$n1, samples2 = reps$n2,
                                       dropped_samples = reps$dropped, design = reps$formula,
                                       residual_df = res$residual_df, prior_df = res$prior_df %||% Inf,
                                       null_weight = res$null_weight,
                                       null_sd = if (length(res$null_sd)) unlist(res$null_sd)))
  structure(out, params = params, class = c("scdistill_de", "data.frame"))
}

# The samples of the replicate-aware method: each cell's sample code
# (0-based, group1's cells then group2's), the groups without the cells of
# samples too small to count, and the sample-level design (intercept,
# covariates, group indicator last).
de_replicates <- function(cnt, groups, sample_key, covariates, min_cells) {
  cells <- cell_names(cnt)
  key <- sample_column(sample_key, cnt)
  if (is.null(key)) {
    stop("method = \"samples\" needs `sample_key`: the column of the cell metadata naming each cell's sample ",
         "(donor, replicate); none was given and no column is named sample, sample_id, donor or replicate",
         call. = FALSE)
  }
  s <- as.character(resolve_cell_factor(key, cnt$cell_data, cells, "sample_key"))
  s1 <- s[groups$idx1]
  s2 <- s[groups$idx2]
  both <- intersect(s1, s2)
  if (length(both)) {
    stop("method = \"samples\" compares groups of whole samples, but sample(s) ",
         paste0("'", utils_head(both, 3), "'", collapse = ", "), " have cells in both groups; ",
         "compare conditions that are properties of samples, or use method = \"change\" to compare cells",
         call. = FALSE)
  }
  size1 <- table(s1)
  size2 <- table(s2)
  keep1 <- names(size1)[size1 >= min_cells]
  keep2 <- names(size2)[size2 >= min_cells]
  dropped <- c(setdiff(names(size1), keep1), setdiff(names(size2), keep2))
  if (length(keep1) < 2 || length(keep2) < 2) {
    stop("method = \"samples\" needs at least 2 samples per group with >= ", min_cells, " cells; found ",
         length(keep1), " for group1 and ", length(keep2), " for group2 (lower `min_cells`, or use a ",
         "cell-level method)", call. = FALSE)
  }
  if (length(dropped)) {
    message("samples: ", length(dropped), " sample(s) with fewer than ", min_cells, " cells left out (",
            paste(utils_head(dropped, 5), collapse = ", "), ")")
  }
  idx1 <- groups$idx1[s1 %in% keep1]
  idx2 <- groups$idx2[s2 %in% keep2]
  levels <- c(sort(keep1), sort(keep2))
  codes <- match(s[c(idx1, idx2)], levels) - 1L
  design_data <- data.frame(group = factor(rep(c("group1", "group2"), c(length(keep1), length(keep2))),
                                           levels = c("group2", "group1")), row.names = levels)
  design_data <- with_covariates(design_data, covariates, cnt, c(idx1, idx2),
                                 factor(codes, levels = seq_along(levels) - 1L), "sample-level")
  formula <- design_formula(design_data)
  design <- stats::model.matrix(formula, design_data)
  list(idx1 = idx1, idx2 = idx2, codes = as.integer(codes), design = unname(design), formula = paste(deparse(formula), collapse = ""),
       key = if (is.character(key) && length(key) == 1) key else "(given)", n1 = length(keep1), n2 = length(keep2),
       dropped = dropped)
}

# Whether the sample-level design of de_replicates() spans the cells'
# batches: every sample in one batch, and the batch indicators within the
# column space of the design (a batch covariate, or one finer than it).
design_spans_batches <- function(reps, batch) {
  b <- as.character(batch)[c(reps$idx1, reps$idx2)]
  per_sample <- tapply(b, reps$codes, function(v) if (length(unique(v)) == 1) v[1] else NA_character_)
  if (anyNA(per_sample)) return(FALSE)
  indicators <- stats::model.matrix(~ factor(per_sample))
  qr(cbind(reps$design, indicators))$rank == qr(reps$design)$rank
}

# Cell indices (1-based) of the two groups and their labels.
de_groups <- function(groupby, group1, group2, cnt) {
  cells <- cell_names(cnt)
  n <- length(cells)
  if (missing(group1) || is.null(group1) || !length(group1)) stop("`group1` is missing", call. = FALSE)
  if (!is.null(groupby)) {
    labels <- as.character(resolve_cell_factor(groupby, cnt$cell_data, cells, "groupby"))
    known <- unique(labels)
    for (g in list(list(group1, "group1"), list(group2, "group2"))) {
      bad <- setdiff(as.character(g[[1]]), known)
      if (length(bad)) {
        stop("`", g[[2]], "` value(s) ", paste0("'", utils_head(bad, 3), "'", collapse = ", "), " not found in `groupby`",
             "; its values: ", paste0("'", utils_head(sort(known), 10), "'", collapse = ", "), call. = FALSE)
      }
    }
    idx1 <- which(labels %in% as.character(group1))
    idx2 <- if (is.null(group2)) which(!labels %in% as.character(group1)) else which(labels %in% as.character(group2))
    if (length(intersect(as.character(group1), as.character(group2)))) {
      stop("`group1` and `group2` share value(s): ", paste(intersect(group1, group2), collapse = ", "), call. = FALSE)
    }
    lab <- list(groupby = if (is.character(groupby) && length(groupby) == 1) groupby else "(given)",
                group1 = paste(group1, collapse = "+"), group2 = if (is.null(group2)) "rest" else paste(group2, collapse = "+"))
  } else {
    idx1 <- cell_index(group1, cells, "group1")
    idx2 <- if (is.null(group2)) setdiff(seq_len(n), idx1) else cell_index(group2, cells, "group2")
    if (length(intersect(idx1, idx2))) {
      stop("`group1` and `group2` share ", length(intersect(idx1, idx2)), " cell(s); the groups must be disjoint",
           call. = FALSE)
    }
    lab <- list(groupby = NULL, group1 = "group1", group2 = if (is.null(group2)) "rest" else "group2")
  }
  if (!length(idx1)) stop("`group1` has no cells", call. = FALSE)
  if (!length(idx2)) stop("`group2` has no cells", call. = FALSE)
  list(idx1 = idx1, idx2 = idx2, labels = lab)
}

# Cells given as indices, a logical vector or cell names.
cell_index <- function(v, cells, arg) {
  n <- length(cells)
  if (is.logical(v)) {
    if (length(v) != n || anyNA(v)) stop("`", arg, "` as a logical vector needs one TRUE/FALSE per cell (", n, ")",
                                         call. = FALSE)
    return(which(v))
  }
  if (is.character(v)) {
    i <- match(v, cells)
    if (anyNA(i)) stop("`", arg, "`: cell(s) not in `x`: ", paste0("'", utils_head(v[is.na(i)], 3), "'", collapse = ", "),
                       call. = FALSE)
    return(unique(i))
  }
  if (!is.numeric(v) || anyNA(v) || any(v != round(v)) || any(v < 1 | v > n)) {
    stop("`", arg, "` must be cell indices in 1..", n, ", a logical vector or cell names ",
         "(or pass `groupby` to name groups by a metadata column)", call. = FALSE)
  }
  unique(as.integer(v))
}

de_batches <- function(batch_correction, levels) {
  if (isTRUE(batch_correction)) return(levels)
  if (isFALSE(batch_correction)) return(NULL)
  b <- as.character(batch_correction)
  bad <- setdiff(b, levels)
  if (!length(b) || length(bad)) {
    stop("`batch_correction` must be TRUE, FALSE or batches of the model (", paste(levels, collapse = ", "), ")",
         call. = FALSE)
  }
  b
}

de_optional <- function(v, arg) {
  if (is.null(v)) return(NULL)
  check_positive(v, arg, zero_ok = TRUE)
}

# The stable columns; those a method does not give are NA.
de_table <- function(genes, res, change) {
  na <- rep(NA_real_, length(genes))
  out <- data.frame(gene = genes, lfc_mean = res$lfc_mean, lfc_median = res$lfc_median, lfc_sd = res$lfc_sd,
                    lfc_lower = res$lfc_lower, lfc_upper = res$lfc_upper, proba_de = res$proba_de,
                    bayes_factor = res$bayes_factor, is_de = res$is_de, scale1 = res$scale1, scale2 = res$scale2,
                    pvalue = if (length(res$pvalue)) res$pvalue else na,
                    padj = if (length(res$padj)) res$padj else na, stringsAsFactors = FALSE)
  if (change) {
    out$lfc_min <- res$lfc_min
    out$lfc_max <- res$lfc_max
  }
  rownames(out) <- genes
  out
}

pseudobulk_de <- function(model, cnt, groups, sample_key, test, covariates, on, reference_batch, min_cells,
                          fdr_target, threads) {
  if (is.null(sample_key)) {
    stop("pseudobulk DE needs `sample_key`: the column of the cell metadata naming each cell's sample ",
         "(donor, replicate)", call. = FALSE)
  }
  need(test)
  cells <- cell_names(cnt)
  sample <- as.character(resolve_cell_factor(sample_key, cnt$cell_data, cells, "sample_key"))
  x_genes <- cnt$genes %||% rownames(cnt$counts)
  genes <- if (is.null(model)) x_genes else model$info$genes
  missing_genes <- setdiff(genes, x_genes)
  if (length(missing_genes)) {
    stop("`x` lacks ", length(missing_genes), " of the model's genes (e.g. '", missing_genes[1], "')", call. = FALSE)
  }
  if (on == "corrected") {
    if (is.null(model)) stop("`on = \"corrected\"` needs a model", call. = FALSE)
    reference_batch <- as.character(reference_batch %||% model$info$batch_levels[1])
  }
  # The (sample, group) sums of the cells `at`'s counts or corrected counts.
  values_of <- function(part) {
    if (on == "counts") return(part$counts[genes, , drop = FALSE])
    rho <- normalized_expression(model, part, transform_batch = reference_batch, threads = threads)
    sweep(rho, 2, Matrix::colSums(part$counts), `*`)
  }
  # Pseudobulk columns: (sample, group) with enough cells.
  grp <- rep(NA_character_, length(cells))
  grp[groups$idx1] <- "group1"
  grp[groups$idx2] <- "group2"
  keep <- !is.na(grp)
  key <- paste(sample, grp, sep = "\r")
  sizes <- table(key[keep])
  ok <- names(sizes)[sizes >= min_cells]
  cols <- sort(ok)
  col_group <- sub(".*\r", "", cols)
  n1 <- sum(col_group == "group1")
  n2 <- sum(col_group == "group2")
  if (n1 < 2 || n2 < 2) {
    stop("pseudobulk DE needs at least 2 samples per group with >= ", min_cells, " cells; found ", n1,
         " for group1 and ", n2, " for group2 (lower `min_cells`, or use a Bayesian method)", call. = FALSE)
  }
  member <- match(key, cols)
  sel <- which(!is.na(member))
  pb <- pseudobulk_sums(cnt, sel, member, length(cols), values_of, genes)
  dimnames(pb) <- list(genes, sub("\r", ":", cols))
  if (on == "corrected") pb <- round(pb)
  storage.mode(pb) <- "integer"
  design_data <- data.frame(group = factor(col_group, levels = c("group2", "group1")), row.names = colnames(pb))
  design_data <- with_covariates(design_data, covariates, cnt, sel, member[sel], "pseudobulk")
  design <- design_formula(design_data)
  res <- if (test == "DESeq2") pseudobulk_deseq2(pb, design_data, design) else pseudobulk_edger(pb, design_data, design)
  props <- sweep(pb, 2, pmax(colSums(pb), 1), `/`)
  na <- rep(NA_real_, length(genes))
  z <- stats::qnorm(0.975)
  out <- data.frame(gene = genes, lfc_mean = res$lfc, lfc_median = res$lfc, lfc_sd = res$se,
                    lfc_lower = res$lfc - z * res$se, lfc_upper = res$lfc + z * res$se, proba_de = na,
                    bayes_factor = na, is_de = !is.na(res$padj) & res$padj < fdr_target,
                    scale1 = rowMeans(props[, col_group == "group1", drop = FALSE]),
                    scale2 = rowMeans(props[, col_group == "group2", drop = FALSE]),
                    pvalue = res$pvalue, padj = res$padj, stringsAsFactors = FALSE, row.names = genes)
  params <- c(list(method = "pseudobulk", test = test,
                   on = if (on == "corrected") paste0("corrected expression (decoded to ", paste(reference_batch, collapse = "+"), ")") else "raw counts"),
              groups$labels,
              list(n_cells1 = length(groups$idx1), n_cells2 = length(groups$idx2), samples1 = n1, samples2 = n2,
                   design = paste(deparse(design), collapse = ""), min_cells = min_cells, fdr_target = fdr_target))
  structure(out, params = params, pseudobulk = pb, class = c("scdistill_de", "data.frame"))
}

# Sums over the cells `sel` of `values_of(part)` (genes x cells of a part
# of the cells, as `as_counts()` gives it) into the pseudobulk columns
# `member[sel]`: in one go in memory; for counts on disk, blocks of 20,000
# cells read in turn, so the cells are never all in memory.
pseudobulk_sums <- function(cnt, sel, member, n_cols, values_of, genes) {
  if (is.null(cnt$disk)) {
    agg <- Matrix::sparseMatrix(i = sel, j = member[sel], x = 1, dims = c(length(cell_names(cnt)), n_cols))
    return(as.matrix(values_of(cnt) %*% agg))
  }
  sums <- for_blocks(cnt$disk, NULL, "Pseudobulk", function(part, b, at) {
    agg <- Matrix::sparseMatrix(i = seq_along(at), j = member[at], x = 1, dims = c(length(at), n_cols))
    as.matrix(values_of(part) %*% agg)
  }, cells = sel)
  Reduce(`+`, sums)
}

# `design_data` (one row per sample) with each covariate added: its value
# for the cells `at` (indices into the cells of `cnt`), which `column` maps
# to the rows; a covariate that varies within a row is an error. Checked by
# check_design().
with_covariates <- function(design_data, covariates, cnt, at, column, kind) {
  cells <- cell_names(cnt)
  for (cv in names(covariates) %||% covariates) {
    v <- if (is.list(covariates)) covariates[[cv]] else resolve_cell_factor(cv, cnt$cell_data, cells, "covariates")
    per <- tapply(as.character(v)[at], column, function(z) unique(z))
    if (any(lengths(per) > 1)) {
      stop("covariate '", cv, "' varies within a sample; ", kind, " covariates must be constant per sample",
           call. = FALSE)
    }
    design_data[[cv]] <- factor(unlist(per))
  }
  check_design(design_data)
  design_data
}

# ~ covariates + group, the group last.
design_formula <- function(design_data) {
  stats::as.formula(paste("~", paste(c(setdiff(names(design_data), "group"), "group"), collapse = " + ")))
}

# The batch of the cells as a pseudobulk covariate (list(batch = factor)),
# when they carry one that is constant within samples; else none.
default_batch_covariate <- function(model, cnt, batch, sample_key) {
  cells <- cell_names(cnt)
  col <- batch %||% (if (!is.null(model)) model$covariates$batch) %||%
    (if ("batch" %in% colnames(cnt$cell_data)) "batch")
  if (is.character(col) && length(col) == 1 && !col %in% colnames(cnt$cell_data)) col <- NULL
  if (is.null(col) || is.null(sample_key)) return(character())
  b <- resolve_cell_factor(col, cnt$cell_data, cells, "batch")
  if (nlevels(b) < 2) return(character())
  s <- as.character(resolve_cell_factor(sample_key, cnt$cell_data, cells, "sample_key"))
  if (any(tapply(as.character(b), s, function(z) length(unique(z))) > 1)) {
    message("pseudobulk: the batch varies within samples, so it is not added to the design ",
            "(give `covariates` to choose)")
    return(character())
  }
  list(batch = b)
}

# Refuses a pseudobulk design whose covariates are collinear with the
# groups, and says when they are partly confounded.
check_design <- function(design_data) {
  covs <- setdiff(names(design_data), "group")
  if (!length(covs)) return(invisible())
  full <- stats::model.matrix(stats::as.formula(paste("~", paste(c(covs, "group"), collapse = " + "))), design_data)
  if (qr(full)$rank < ncol(full)) {
    for (cv in covs) {
      one <- tapply(design_data$group, design_data[[cv]], function(g) length(unique(g)) == 1)
      if (all(one)) {
        stop("pseudobulk: `", cv, "` and the groups are collinear (each ", cv, " holds samples of one group ",
             "only), so the design cannot separate them. Give `covariates = character()` to test without it ",
             "(the calls then include ", cv, " effects), or compare within one ", cv, call. = FALSE)
      }
    }
    stop("pseudobulk: the design ~ ", paste(c(covs, "group"), collapse = " + "), " is not of full rank; ",
         "choose other `covariates`", call. = FALSE)
  }
  for (cv in covs) {
    one <- tapply(design_data$group, design_data[[cv]], function(g) length(unique(g)) == 1)
    if (any(one)) {
      message("pseudobulk: ", cv, " ", paste0("'", names(one)[one], "'", collapse = ", "),
              " hold(s) samples of one group only; the group effect is estimated from the others")
    }
  }
  invisible()
}

# The cells' sample: `sample_key` when given, else the first column named
# sample, sample_id, donor or replicate; NULL when there is none.
sample_column <- function(sample_key, cnt) {
  if (!is.null(sample_key)) return(sample_key)
  found <- intersect(c("sample", "sample_id", "donor", "replicate"), colnames(cnt$cell_data))
  if (length(found)) found[1] else NULL
}

# A Bayesian (cell-level) method on groups that are a property of samples:
# warns that pseudobulk answers the population-level question.
warn_cell_level <- function(method, cnt, groups, sample_key) {
  cells <- cell_names(cnt)
  key <- sample_column(sample_key, cnt)
  if (is.null(key)) return(invisible())
  s <- tryCatch(as.character(resolve_cell_factor(key, cnt$cell_data, cells, "sample_key")), error = function(e) NULL)
  if (is.null(s)) return(invisible())
  g <- rep(NA_character_, length(cells))
  g[groups$idx1] <- "1"
  g[groups$idx2] <- "2"
  inside <- !is.na(g)
  per_sample <- tapply(g[inside], s[inside], function(z) length(unique(z)))
  if (length(per_sample) >= 4 && all(per_sample == 1)) {
    warning("method = \"", method, "\" compares cells, but the groups are a property of samples ('",
            if (is.character(key)) key else "sample_key", "', ", length(per_sample), " of them): for the ",
            "question \"does the gene change across samples\", method = \"samples\" (counts corrected by the model) or ",
            "\"pseudobulk\" (raw counts) with sample_key treat samples as the replicates", call. = FALSE)
  }
  invisible()
}

# method = "samples" where a batch holds cells of one group only: the model
# learnt that batch's effect from one group, so the correction can take part
# of the group difference with it, unless the teacher of a distilled model
# protected the groups. Says so, with the recipe. (A VAE given the groups as
# a covariate is not offered: its decoder must then guess batch x group
# pairs it never saw, and on a small confounded simulation 22 of its 59
# calls were false; see ?differential_expression and bench/RESULTS.md.)
note_unprotected <- function(model, groupby, groups, batch) {
  if (!is.character(groupby) || length(groupby) != 1 || is.null(batch)) return(invisible())
  b <- as.character(batch)
  in1 <- unique(b[groups$idx1])
  in2 <- unique(b[groups$idx2])
  only <- sort(setdiff(union(in1, in2), intersect(in1, in2)))
  if (!length(only)) return(invisible())
  distilled <- inherits(model, "scdistill_distill")
  if (distilled && groupby %in% teacher_protects(model)) return(invisible())
  message("samples: batch(es) ", paste0("'", only[seq_len(min(3, length(only)))], "'", collapse = ", "),
          if (length(only) > 3) sprintf(" and %d more", length(only) - 3), " hold cells of one group only, so the ",
          "model learnt their batch effects from one group and its correction may remove part of the group ",
          "difference (fewer calls, smaller LFCs). A distilled model whose teacher protects them keeps it: ",
          sprintf("distill(..., teacher = harmony_teacher(protect = \"%s\"))", groupby),
          if (!distilled) "; or method = \"pseudobulk\" with the batch as a covariate" else "")
  invisible()
}

# The covariates a distilled model's Harmony teacher protected: from the
# teacher, else from the model's description (a loaded model), else, for a
# model file from before they were recorded there, from the teacher's name.
teacher_protects <- function(model) {
  if (!is.null(model$teacher)) return(if (is.character(model$teacher$protect)) model$teacher$protect else character())
  if ("teacher_protects" %in% names(model$info)) return(as.character(unlist(model$info$teacher_protects)))
  name <- model$info$teacher %||% ""
  hit <- regmatches(name, regexpr("protecting [^,]+", name))
  if (!length(hit)) return(character())
  strsplit(sub("^protecting ", "", hit), " + ", fixed = TRUE)[[1]]
}

pseudobulk_deseq2 <- function(pb, design_data, design) {
  dds <- suppressMessages(DESeq2::DESeqDataSetFromMatrix(pb, design_data, design))
  dds <- tryCatch(suppressMessages(DESeq2::DESeq(dds, quiet = TRUE)), error = function(e) {
    if (!grepl("within 2 orders of magnitude", conditionMessage(e))) stop(e)
    # DESeq2's own advice when the dispersion trend cannot be fitted.
    message("pseudobulk: DESeq2 cannot fit its dispersion trend (the genes' dispersions are all alike); ",
            "testing with the gene-wise dispersion estimates")
    dds <- suppressMessages(DESeq2::estimateDispersionsGeneEst(DESeq2::estimateSizeFactors(dds)))
    DESeq2::dispersions(dds) <- SummarizedExperiment::rowData(dds)$dispGeneEst
    suppressMessages(DESeq2::nbinomWaldTest(dds, quiet = TRUE))
  })
  r <- DESeq2::results(dds, contrast = c("group", "group1", "group2"))
  list(lfc = r$log2FoldChange, se = r$lfcSE, pvalue = r$pvalue, padj = r$padj)
}

pseudobulk_edger <- function(pb, design_data, design) {
  mm <- stats::model.matrix(design, design_data)
  y <- edgeR::DGEList(pb)
  y <- edgeR::calcNormFactors(y)
  y <- edgeR::estimateDisp(y, mm)
  fit <- edgeR::glmQLFit(y, mm)
  tt <- edgeR::topTags(edgeR::glmQLFTest(fit, coef = "groupgroup1"), n = Inf, sort.by = "none")$table
  list(lfc = tt$logFC, se = rep(NA_real_, nrow(tt)), pvalue = tt$PValue, padj = tt$FDR)
}

#' Volcano plot of a differential expression table
#'
#' Log fold change against the evidence: the Bayes factor for the Bayesian
#' methods, −log10 of the adjusted p-value for pseudobulk. Called genes are
#' coloured by direction, the thresholds drawn, and the strongest calls
#' labelled.
#'
#' @param x A table from [differential_expression()].
#' @param n_labels Number of called genes to label.
#' @param ... Passed to [graphics::plot()].
#' @return `x`, invisibly.
#' @method plot scdistill_de
#' @examples
#' sim <- simulation_scenario("s1", n_cells = 1200, seed = 2)
#' sim <- sim[, sim$cell_type == "Group1"]
#' model <- fit_vae(sim, batch = "batch", max_epochs = 30, threads = 2)
#' plot(differential_expression(model, sim, "condition", "treated", threads = 2))
#' @export
plot.scdistill_de <- function(x, n_labels = 10, ...) {
  p <- attr(x, "params")
  # The axis of the calls: adjusted p-values for pseudobulk and for samples
  # at delta = 0 (called by BH), Bayes factors otherwise.
  pb <- identical(p$method, "pseudobulk") || (identical(p$method, "samples") && !isTRUE(p$delta > 0))
  y <- if (pb) -log10(pmax(x$padj, 1e-300)) else x$bayes_factor
  ylab <- if (pb) "-log10 adjusted p-value" else if (p$method == "vanilla") "log Bayes factor (group1 > group2)" else "log Bayes factor"
  col <- ifelse(x$is_de & x$lfc_mean > 0, "#d1495b", ifelse(x$is_de, "#1b6ca8", "grey70"))
  graphics::plot(x$lfc_mean, y, pch = 19, cex = 0.5, col = col, xlab = sprintf("log2 fold change (%s / %s)", p$group1, p$group2),
                 ylab = ylab, main = sprintf("%s: %d of %d genes called", p$method, sum(x$is_de, na.rm = TRUE), nrow(x)), ...)
  if (!pb && is.numeric(p$delta) && p$method != "vanilla") graphics::abline(v = c(-1, 1) * p$delta, lty = 3, col = "grey40")
  if (pb && is.numeric(p$fdr_target)) graphics::abline(h = -log10(p$fdr_target), lty = 3, col = "grey40")
  top <- utils::head(order(-y * x$is_de, -abs(x$lfc_mean)), n_labels)
  top <- top[x$is_de[top] %in% TRUE]
  if (length(top)) graphics::text(x$lfc_mean[top], y[top], x$gene[top], pos = 3, cex = 0.7)
  graphics::legend("topleft", c("up", "down", "not called"), col = c("#d1495b", "#1b6ca8", "grey70"), pch = 19,
                   bty = "n", cex = 0.8)
  invisible(x)
}

#' Summarise a differential expression table
#'
#' How many genes each direction has called, and the settings behind the
#' calls: the method and groups, δ and the FDR target (Bayesian methods),
#' the samples and degrees of freedom (samples, pseudobulk).
#'
#' @param object A table from [differential_expression()].
#' @param ... Unused.
#' @return `object`, invisibly; the summary is printed.
#' @method summary scdistill_de
#' @examples
#' sim <- simulate_counts(n_cells = 1200, n_genes = 300, n_groups = 1, treated_fraction = 0.5,
#'                        condition_lfc = 1.5, seed = 3)
#' pb <- differential_expression(NULL, sim, "condition", "treated", "control", method = "pseudobulk",
#'                               sample_key = "sample")
#' summary(pb)
#' @export
summary.scdistill_de <- function(object, ...) {
  p <- attr(object, "params")
  called <- object$is_de %in% TRUE
  up <- sum(called & object$lfc_mean > 0, na.rm = TRUE)
  down <- sum(called & object$lfc_mean < 0, na.rm = TRUE)
  cat(sprintf("differential expression, method \"%s\"%s: %s vs %s (%s and %s cells)\n", p$method,
              if (!is.null(p$model)) sprintf(" (%s model)", p$model) else "", p$group1, p$group2,
              format(p$n_cells1, big.mark = ","), format(p$n_cells2, big.mark = ",")))
  cat(sprintf("  %d of %d genes called at FDR %g: %d up, %d down\n", sum(called), nrow(object),
              p$fdr_target, up, down))
  if (identical(p$method, "samples") && !isTRUE(p$delta > 0)) {
    cat("  tested: LFC != 0 (moderated t-test over samples, Benjamini-Hochberg)\n")
  } else if (is.numeric(p$delta)) {
    cat(sprintf("  delta %.3g (%s)\n", p$delta, if (isTRUE(p$delta_estimated)) "estimated" else "given"))
  }
  if (!is.null(p$samples1)) {
    cat(sprintf("  samples: %d vs %d", p$samples1, p$samples2))
    if (!is.null(p$design)) cat(sprintf(", design %s", p$design))
    if (!is.null(p$residual_df)) {
      cat(sprintf(", residual df %g, prior df %s, prior weight at LFC 0 %.2f", p$residual_df,
                  if (is.finite(p$prior_df)) format(signif(p$prior_df, 3)) else "Inf", p$null_weight))
    }
    cat("\n")
    if (length(p$null_sd)) {
      cat(sprintf("  empirical null sd of the z-scores after batch correction (low to high expression): %s\n",
                  paste(sprintf("%.2f", p$null_sd), collapse = ", ")))
    }
    if (length(p$dropped_samples)) cat("  left out (too few cells):", paste(p$dropped_samples, collapse = ", "), "\n")
  }
  if (!is.null(p$on)) cat("  on", p$on, "\n")
  invisible(object)
}

bayesian_de_unavailable <- function(model) {
  stop("Bayesian differential_expression() is not available for ", sub("scdistill_", "", class(model)[1]),
       " models; use `method = \"pseudobulk\"`", call. = FALSE)
}
