#' Simulate single-cell counts with known truth
#'
#' A Splatter-style simulator (Zappia et al. 2017) in the Rust core:
#' gamma-distributed gene means with outliers, log-normal library sizes,
#' cell types with log-normal differential expression, technical batches with
#' per-gene multiplicative factors and batch-specific library sizes, an
#' optional treatment condition with per-cell-type effects whose true log2
#' fold changes are recorded, samples nested in batch x condition (for
#' pseudobulk), an optional age group, and gamma-Poisson (negative binomial)
#' counts whose overdispersion follows Splatter's biological coefficient of
#' variation, with optional dropout (zero inflation). Counts go straight into
#' a sparse matrix.
#'
#' `batch_effect` sets the per-gene batch factors, LogNormal(loc, scale) with
#' loc/scale 0/0 (`"none"`), 0.05/0.05 (`"mild"`), 0.1/0.1 (`"medium"`,
#' Splatter's default) or 0.3/0.2 (`"strong"`), and shifts the log library
#' size of the batches evenly over +-0, 0.1, 0.2 or 0.4.
#'
#' `true_lfc_<type>` in `rowData` is the log2 ratio of the batch-free
#' normalized expression of treated over control cells of that cell type:
#' what a batch-corrected DE method should estimate. Genes without a
#' condition effect share one small constant (the normalization shift);
#' `is_de_<type>` marks the genes with an effect. `true_lfc` is the same
#' ratio for all cells together (the cell-type mixture in proportions
#' `group_prob`): the truth for treated against control cells of every type,
#' for genes marked by `is_de`.
#'
#' @param n_cells,n_genes Size of the data.
#' @param n_groups Number of cell types (`group_prob` overrides).
#' @param n_batches Number of batches (`batch_prob` overrides).
#' @param batch_effect `"none"`, `"mild"`, `"medium"` or `"strong"`.
#' @param group_prob,batch_prob Proportions of cell types and of batches
#'   (batch sizes are exact; cell types are drawn per cell).
#' @param treated_fraction `NULL` for no condition, else the fraction of
#'   treated cells in each batch (one number, recycled, or one per batch):
#'   `c(0.7, 0.5, 0.3)` confounds condition with batch.
#' @param condition_de_prob Fraction of genes with a condition effect in each
#'   cell type.
#' @param condition_shared `FALSE`: each cell type draws its own condition
#'   effects; `TRUE`: one set of effects shared by every cell type (a
#'   population-level treatment response, as in the scDistill scenarios).
#' @param condition_lfc Log-normal location of the condition effect factor
#'   (natural log; 0.5 is a median fold change of 1.65).
#' @param samples_per_batch Samples per batch and condition.
#' @param sample_sd Biological variation between samples (donors): every
#'   sample's gene means are multiplied by its own LogNormal(0, `sample_sd`)
#'   factors (natural log; 0.25 is a typical donor-to-donor spread). The
#'   truth (`true_lfc`, `is_de`) is the population's, so a method that
#'   treats cells as replicates calls these differences; 0 for none.
#' @param age_de_prob Fraction of genes affected by an age group
#'   (young/old, alternating over samples); 0 for none.
#' @param zero_inflation Add logistic dropout (Splatter's, midpoint 0, shape
#'   -1 on the log mean): counts become zero-inflated.
#' @param atac Also simulate chromatin accessibility of the same cells,
#'   returned as `altExp(x, "ATAC")`: half the peaks are linked to a random
#'   gene and follow its cell-type and condition program, 20% of the others
#'   have cell-type effects of their own; Poisson counts (or 0/1 with
#'   `atac_binary`), per-peak batch factors.
#' @param n_peaks Number of peaks.
#' @param atac_only_groups The last this-many cell types copy the first one's
#'   RNA program and differ from it only in their peaks: a known case where
#'   ATAC carries the signal.
#' @param atac_binary Report peaks as 0/1 rather than counts.
#' @param species `NULL`, `TRUE`, or a list with any of `n_cells` (2000),
#'   `n_genes` (2000), `homolog_fraction` (0.8), `mean_divergence` (0.3),
#'   `de_conservation` (0.8), `species_de_prob` (0.05), `species_de_fac_loc`
#'   (1), `species_de_fac_scale` (0.4), `only_first` (0), `only_second` (0):
#'   also simulate a second species with the same cell types, for
#'   cross-species alignment. That fraction of its genes are one-to-one
#'   homologs of the first species' genes: their base means differ by a
#'   log-normal factor (sd `mean_divergence` on the log scale), each keeps its
#'   cell-type factor with probability `de_conservation` (redrawn otherwise),
#'   and, with probability `species_de_prob` per cell type, gets a
#'   species-specific factor LogNormal(`species_de_fac_loc`,
#'   `species_de_fac_scale`) (median 2.7-fold), up or down with equal odds.
#'   The last `only_first` cell types exist in the first species only, the
#'   `only_second` before them in the second species only (proportion 0 in
#'   the other species, the other types' proportions renormalised); at least
#'   two types must be in both. Both species label a cell type alike in
#'   `cell_type`. The second species has its own cells, batches and library
#'   sizes, no condition, and is returned as `metadata(x)$species2` (a
#'   `SingleCellExperiment` whose `rowData` column `homolog` names the first
#'   species' gene, `NA` for none), with the truth for homologs' expression
#'   differences in `metadata(species2)$homolog_lfc` (see Value). The first
#'   species' counts are the same with or without it when `only_second` is 0.
#' @param ambient `NULL`, `TRUE`, or a list with any of `fraction` (0.1) and
#'   `n_empty` (2000): contaminate the counts with ambient RNA, as
#'   CellBender's model pictures it. The soup's profile is the cells' pooled
#'   expression; every droplet captures LogNormal(log m, 0.4) ambient
#'   molecules (Poisson, genes by the profile), independently of its cell,
#'   with m such that a cell of median size is `fraction` ambient; `n_empty`
#'   empty droplets hold ambient molecules only. `counts` are then the
#'   contaminated counts, the assay `true_counts` the clean ones, `colData`
#'   gains `ambient_umis` and `ambient_fraction` (the truth per cell), and
#'   `metadata(x)$ambient` holds `profile` (per gene) and `empty_droplets`
#'   (genes x droplets). Added after the rest, so the clean counts do not
#'   change.
#' @param seed Random seed; the same seed gives the same counts.
#' @param format `"sce"` (a `SingleCellExperiment`) or `"list"`.
#' @param file `NULL`, or an `.h5ad` file to write the counts to, block of
#'   cells by block (16,384 at a time), so that simulations larger than
#'   memory can be made. The cells are the same as without `file`. The
#'   result is then the `"list"` format with `counts` an [h5_counts()]
#'   object pointing at the file; the file's cell columns are `cell_type`,
#'   `batch` (and `condition`, `sample` when simulated). Readable by
#'   AnnData/scanpy. With `atac`, two files, `c(RNA = , ATAC = )` (unnamed:
#'   RNA first): the peaks go to the second, with the same cells and
#'   columns, and `atac` in the result is its [h5_counts()] object, so that
#'   `fit_multimodal(list(RNA = s$counts, ATAC = s$atac))` trains on the
#'   pair from disk. Not with `species` or `ambient`.
#' @param threads Number of threads (see [torch_config()]).
#' @param ... Splatter-level parameters by name: `mean_shape` (0.6),
#'   `mean_rate` (0.3), `lib_loc` (7.6, about 2,000 counts per cell; Splatter
#'   uses 11), `lib_scale` (0.25), `out_prob` (0.05), `out_fac_loc` (4),
#'   `out_fac_scale` (0.5), `de_prob` (0.2; Splatter 0.1), `de_down_prob` (0.5),
#'   `de_fac_loc` (0.5; Splatter 0.1), `de_fac_scale` (0.4), `bcv_common` (0.1), `bcv_df`
#'   (60), `condition_fac_scale` (0.4), `condition_de_down_prob` (0.5).
#' @return A `SingleCellExperiment` with assay `counts`; `colData` columns
#'   `cell_type`, `batch`, `library_size` and, with a condition, `condition`,
#'   `sample` (and `age_group`); `rowData` with `base_mean`, `is_de` (any cell
#'   type), `true_lfc` (all cells), `is_de_<type>`, `true_lfc_<type>`, `de_factor_<type>`,
#'   `batch_factor_<batch>`; the parameters in `metadata(x)$simulation`. With
#'   `atac`, `altExp(x, "ATAC")` holds the peak counts and, in its `rowData`,
#'   `linked_gene` (`NA` for unlinked peaks) and `atac_factor_<type>`. With
#'   `format = "list"`: `counts`, `cell_data`, `gene_data`, `params` (and
#'   `atac`, `peak_data`).
#'
#'   With `species`, `metadata(x)$species2` is the second species (with
#'   `format = "list"`: `x$species2`, a list as above whose `gene_data` has
#'   `homolog`). Its `metadata(species2)$homolog_lfc` (list: its
#'   `homolog_lfc`) is a matrix with one row per second-species gene that has
#'   a homolog (in `rowData` order, named by gene) and one column per cell
#'   type present in both species (named as the `cell_type` labels): the true
#'   log2 fold change, second species over first, of the homologs' batch-free
#'   normalized expression restricted to the homologous genes. With
#'   \eqn{m_s(t, g)} a gene's base mean times its cell-type factor in species
#'   \eqn{s} (before batch factors, condition at control, library size) and
#'   \eqn{p_s(t, g) = m_s(t, g) / \sum_{g'} m_s(t, g')}{p_s(t, g) = m_s(t, g)
#'   / sum_g' m_s(t, g')} over that species' homologous genes, the entry for
#'   gene \eqn{g_2} with homolog \eqn{g_1} is
#'   \eqn{\log_2(p_2(t, g_2) / p_1(t, g_1))}{log2(p_2(t, g_2) / p_1(t, g_1))}:
#'   about 0 for conserved genes (up to `mean_divergence`), beyond +-1 for
#'   some 8% of homologs per type with the defaults (non-conserved and
#'   species-specific factors).
#' @seealso [simulation_scenario()] for the six benchmark designs.
#' @examples
#' sim <- simulate_counts(n_cells = 2000, n_genes = 500, n_batches = 3,
#'                        treated_fraction = c(0.7, 0.5, 0.3), seed = 42)
#' sim
#' table(sim$batch, sim$condition)
#' head(SummarizedExperiment::rowData(sim)[, c("is_de_Group1", "true_lfc_Group1")])
#' @export
simulate_counts <- function(n_cells = 5000, n_genes = 2000, n_groups = 5, n_batches = 2,
                            batch_effect = c("medium", "none", "mild", "strong"),
                            group_prob = NULL, batch_prob = NULL, treated_fraction = NULL,
                            condition_de_prob = 0.1, condition_shared = FALSE, condition_lfc = 0.5,
                            samples_per_batch = 2, sample_sd = 0,
                            age_de_prob = 0, zero_inflation = FALSE, atac = FALSE, n_peaks = 5000,
                            atac_only_groups = 0, atac_binary = FALSE, species = NULL, ambient = NULL, seed = 1,
                            format = c("sce", "list"), file = NULL, threads = NULL, ...) {
  batch_effect <- choose_arg(batch_effect, "batch_effect")
  format <- choose_arg(format, "format")
  group_prob <- group_prob %||% rep(1, check_count(n_groups, "n_groups"))
  batch_prob <- batch_prob %||% rep(1, check_count(n_batches, "n_batches"))
  n_b <- length(batch_prob)
  strength <- list(none = c(0, 0, 0), mild = c(0.05, 0.05, 0.1), medium = c(0.1, 0.1, 0.2),
                   strong = c(0.3, 0.2, 0.4))[[batch_effect]]
  params <- list(n_cells = check_count(n_cells, "n_cells", min = 2),
                 n_genes = check_count(n_genes, "n_genes", min = 2),
                 seed = check_seed(seed),
                 group_prob = as.numeric(group_prob), batch_prob = as.numeric(batch_prob),
                 batch_fac_loc = strength[1], batch_fac_scale = strength[2],
                 batch_lib_shift = if (n_b > 1) strength[3] * (2 * (seq_len(n_b) - 1) / (n_b - 1) - 1) else 0)
  if (!is.null(treated_fraction)) {
    if (length(treated_fraction) == 1) treated_fraction <- rep(treated_fraction, n_b)
    if (length(treated_fraction) != n_b) {
      stop("`treated_fraction` needs one value per batch (", n_b, "), not ", length(treated_fraction), call. = FALSE)
    }
    params <- c(params, list(treated_fraction = as.numeric(treated_fraction),
                             condition_de_prob = condition_de_prob,
                             condition_shared = as.numeric(check_flag(condition_shared, "condition_shared")),
                             condition_fac_loc = condition_lfc,
                             samples_per_batch = check_count(samples_per_batch, "samples_per_batch"),
                             age_de_prob = age_de_prob,
                             sample_sd = check_positive(sample_sd, "sample_sd", zero_ok = TRUE)))
  } else if (age_de_prob > 0) {
    stop("`age_de_prob` needs a condition (`treated_fraction`): ages belong to samples", call. = FALSE)
  } else if (sample_sd > 0) {
    stop("`sample_sd` needs a condition (`treated_fraction`): it is variation between samples", call. = FALSE)
  }
  if (isTRUE(zero_inflation)) params$dropout <- c(0, -1)
  if (isTRUE(atac)) {
    params <- c(params, list(n_peaks = check_count(n_peaks, "n_peaks", min = 2),
                             atac_only_groups = check_count(atac_only_groups, "atac_only_groups", min = 0),
                             atac_binary = as.numeric(isTRUE(atac_binary))))
  }
  if (!is.null(species) && !isFALSE(species)) {
    params <- c(params, species_params(species))
  }
  extra <- list(...)
  if (length(extra) && (is.null(names(extra)) || any(names(extra) == ""))) {
    stop("parameters in `...` must be named", call. = FALSE)
  }
  params[names(extra)] <- lapply(extra, as.numeric)
  params <- lapply(params, as.numeric)
  amb <- ambient_params(ambient)
  if (!is.null(file)) return(simulate_to_file(params, file, atac, species, amb, threads))
  res <- rust(rs_simulate(params, resolve_threads(threads)))
  out <- simulation_result(res, params, format)
  if (is.null(amb)) return(out)
  add_ambient(out, amb, params$seed, format, threads)
}

# simulate_counts(file = ): the counts written to an .h5ad file in blocks,
# never held (with ATAC, the peaks to a second file); the truth returned as
# format "list" with `counts` (and `atac`) the files.
simulate_to_file <- function(params, file, atac, species, amb, threads) {
  n_files <- if (isTRUE(atac)) 2L else 1L
  if (!is.character(file) || length(file) != n_files || anyNA(file) || any(!nzchar(file))) {
    stop(if (n_files == 2) "with `atac`, `file` must be two file names, c(RNA = , ATAC = )" else
      "`file` must be one file name", call. = FALSE)
  }
  if (n_files == 2 && !is.null(names(file))) {
    if (!setequal(names(file), c("RNA", "ATAC"))) {
      stop("`file` must be named RNA and ATAC (or unnamed, RNA first), not ", paste(names(file), collapse = ", "),
           call. = FALSE)
    }
    file <- file[c("RNA", "ATAC")]
  }
  if (n_files == 2 && path.expand(file[[1]]) == path.expand(file[[2]])) {
    stop("`file` names the same file for RNA and ATAC", call. = FALSE)
  }
  if ((!is.null(species) && !isFALSE(species)) || !is.null(amb)) {
    stop("`file` writes one species' counts: it cannot be combined with `species` or `ambient`", call. = FALSE)
  }
  for (f in file) {
    if (!dir.exists(dirname(f))) stop("the folder of `file` ('", dirname(f), "') does not exist", call. = FALSE)
  }
  atac_file <- if (n_files == 2) path.expand(file[[2]]) else ""
  res <- rust(rs_simulate_file(params, path.expand(file[[1]]), atac_file, resolve_threads(threads)))
  empty <- list(p = integer(length(res$cells) + 1), i = integer(), x = numeric())
  res$counts <- empty
  if (!is.null(res$atac)) res$atac$counts <- empty
  out <- simulation_result(res, params, "list")
  out$counts <- h5_counts(file[[1]])
  if (n_files == 2) out$atac <- h5_counts(file[[2]])
  out
}

ambient_params <- function(ambient) {
  if (is.null(ambient) || isFALSE(ambient)) return(NULL)
  a <- if (isTRUE(ambient)) list() else ambient
  if (!is.list(a) || (length(a) && (is.null(names(a)) || !all(names(a) %in% c("fraction", "n_empty"))))) {
    stop("`ambient` must be TRUE or a list with any of fraction, n_empty", call. = FALSE)
  }
  fraction <- a$fraction %||% 0.1
  if (!is.numeric(fraction) || length(fraction) != 1 || !(fraction > 0 && fraction < 1)) {
    stop("`ambient$fraction` must be a number in (0, 1)", call. = FALSE)
  }
  list(fraction = fraction, n_empty = check_count(a$n_empty %||% 2000, "ambient$n_empty", min = 0))
}

# Contaminates a simulation's counts with ambient RNA (the truth kept beside them).
add_ambient <- function(out, amb, seed, format, threads) {
  clean <- if (format == "list") out$counts else SingleCellExperiment::counts(out)
  s <- slots(list(counts = clean))
  res <- rust(rs_contaminate(s, amb$fraction, amb$n_empty, seed, resolve_threads(threads)))
  observed <- csr_to_dgc(res$observed, rownames(clean), colnames(clean))
  empty <- csr_to_dgc(res$empty, rownames(clean), paste0("empty_", seq_len(amb$n_empty)))
  truth <- list(profile = stats::setNames(res$profile, rownames(clean)), empty_droplets = empty)
  if (format == "list") {
    out$true_counts <- clean
    out$counts <- observed
    out$cell_data$ambient_umis <- res$ambient_counts
    out$cell_data$ambient_fraction <- res$fraction
    out$ambient <- truth
    return(out)
  }
  SummarizedExperiment::assay(out, "true_counts") <- clean
  SingleCellExperiment::counts(out) <- observed
  out$ambient_umis <- res$ambient_counts
  out$ambient_fraction <- res$fraction
  S4Vectors::metadata(out)$ambient <- truth
  out
}

# The second species' parameters, as the core names them, from
# `simulate_counts(species = TRUE or list(...))`.
species_params <- function(species) {
  sp <- if (isTRUE(species)) list() else species
  known <- c("n_cells", "n_genes", "homolog_fraction", "mean_divergence", "de_conservation", "only_first",
             "only_second", "species_de_prob", "species_de_fac_loc", "species_de_fac_scale")
  if (!is.list(sp) || (length(sp) && (is.null(names(sp)) || !all(names(sp) %in% known)))) {
    stop("`species` must be TRUE or a list with any of ", paste(known, collapse = ", "), call. = FALSE)
  }
  list(species_n_cells = sp$n_cells %||% 2000, species_n_genes = sp$n_genes %||% 2000,
       homolog_fraction = sp$homolog_fraction %||% 0.8,
       mean_divergence = sp$mean_divergence %||% 0.3,
       de_conservation = sp$de_conservation %||% 0.8,
       species_only_first = check_count(sp$only_first %||% 0, "only_first", min = 0),
       species_only_second = check_count(sp$only_second %||% 0, "only_second", min = 0),
       species_de_prob = sp$species_de_prob %||% 0.05,
       species_de_fac_loc = sp$species_de_fac_loc %||% 1,
       species_de_fac_scale = sp$species_de_fac_scale %||% 0.4)
}

# The homolog truth of a second species (`res`, with the core's attributes)
# as a matrix: its genes with a homolog x the cell types of both species.
homolog_lfc_matrix <- function(res) {
  homolog <- attr(res, "homolog")
  shared <- attr(res, "shared_groups")
  lfc <- matrix(attr(res, "homolog_lfc"), nrow = length(homolog))
  keep <- homolog > 0
  matrix(lfc[keep, shared], nrow = sum(keep), dimnames = list(res$genes[keep], res$group$levels[shared]))
}

simulation_result <- function(res, params, format, metadata = list()) {
  counts <- csr_to_dgc(res$counts, res$genes, res$cells)
  as_factor <- function(f) if (is.null(f)) NULL else droplevels(factor(f$levels[f$codes], levels = f$levels))
  cell_data <- data.frame(cell_type = as_factor(res$group), batch = as_factor(res$batch),
                          library_size = res$library_size, row.names = res$cells)
  for (k in c("condition", "sample", "age_group")) {
    if (!is.null(res[[k]])) cell_data[[k]] <- as_factor(res[[k]])
  }
  types <- res$group$levels
  n_genes <- length(res$genes)
  per <- function(v, names, prefix, n = n_genes) {
    m <- matrix(v, nrow = n, dimnames = list(NULL, paste0(prefix, names)))
    as.data.frame(m)
  }
  condition_factor <- matrix(res$condition_factor, nrow = n_genes)
  is_de <- per(as.numeric(condition_factor != 1), types, "is_de_")
  is_de[] <- lapply(is_de, as.logical)
  gene_data <- data.frame(base_mean = res$gene_mean, is_de = rowSums(is_de) > 0, true_lfc = res$true_lfc_population,
                          row.names = res$genes)
  gene_data <- cbind(gene_data, is_de, per(res$true_lfc, types, "true_lfc_"),
                     per(res$group_factor, types, "de_factor_"),
                     per(res$batch_factor, res$batch$levels, "batch_factor_"))
  if (!is.null(res$age_group)) gene_data$age_factor <- res$age_factor
  atac <- peak_data <- NULL
  if (!is.null(res$atac)) {
    a <- res$atac
    atac <- csr_to_dgc(a$counts, a$peaks, res$cells)
    linked <- a$linked_gene
    peak_data <- data.frame(linked_gene = ifelse(linked > 0, res$genes[pmax(linked, 1)], NA_character_),
                            row.names = a$peaks)
    peak_data <- cbind(peak_data, per(a$group_factor, types, "atac_factor_", n = length(a$peaks)))
  }
  species2 <- NULL
  if (!is.null(res$species)) {
    homolog <- attr(res$species, "homolog")
    species2 <- simulation_result(res$species, params, format,
                                  metadata = list(homolog_lfc = homolog_lfc_matrix(res$species)))
    first_gene <- ifelse(homolog > 0, res$genes[pmax(homolog, 1)], NA_character_)
    if (format == "list") {
      species2$gene_data$homolog <- first_gene
      species2$params <- NULL
    } else {
      SummarizedExperiment::rowData(species2)$homolog <- first_gene
    }
  }
  if (format == "list") {
    out <- c(list(counts = counts, cell_data = cell_data, gene_data = gene_data, params = params), metadata)
    if (!is.null(atac)) out <- c(out, list(atac = atac, peak_data = peak_data))
    if (!is.null(species2)) out$species2 <- species2
    return(out)
  }
  need("SingleCellExperiment")
  sce <- SingleCellExperiment::SingleCellExperiment(
    assays = list(counts = counts), colData = S4Vectors_DataFrame(cell_data),
    rowData = S4Vectors_DataFrame(gene_data),
    metadata = c(list(simulation = params), metadata, if (!is.null(species2)) list(species2 = species2)))
  if (!is.null(atac)) {
    SingleCellExperiment::altExp(sce, "ATAC") <- SingleCellExperiment::SingleCellExperiment(
      assays = list(counts = atac), rowData = S4Vectors_DataFrame(peak_data))
  }
  sce
}

#' The six benchmark scenarios
#'
#' Deterministic simulation designs mirroring the six scenarios of the
#' scDistill benchmarks, built with [simulate_counts()]. Sizes and designs
#' follow scDistill's published scenario table; the numeric effect sizes are
#' this package's choices (scDistill's generator, scDesign3, is not
#' reproduced), so numbers are comparable between methods run on these data,
#' not with the scDistill paper.
#'
#' | scenario | cells x genes | batches (proportions) | treated per batch | extra |
#' | --- | --- | --- | --- | --- |
#' | `s1` | 5,000 x 2,000 | 2 (balanced) | 50/50% | |
#' | `s2` | 8,000 x 3,000 | 3 (balanced) | 50/50/50% | age group |
#' | `s3` | 10,000 x 3,000 | 4 (40/30/20/10%) | 50% each | age group |
#' | `s4` | 8,000 x 3,000 | 3 (balanced) | 70/50/30% | confounded |
#' | `s5` | 8,000 x 3,000 | 3 (balanced) | 100/50/0% | strongly confounded |
#' | `s6` | 5,000 x 2,000 | 2 (balanced) | 50/50% | zero inflation |
#'
#' All have five cell types, a medium batch effect, two samples per batch and
#' condition, and a strong treatment response shared by every cell type, as
#' in scDistill's scenarios (one `is_de` and `true_lfc` per gene,
#' "biological effect strength: strong"): 10% of genes change, by a factor
#' drawn as LogNormal(1, 0.3) (median 2.7-fold, |log2 FC| mostly 0.6 to
#' 2.3), up or down with equal odds. The truth for treated against control
#' cells is in `rowData` (`is_de`, `true_lfc`; per cell type
#' `true_lfc_<type>`). For weaker or cell-type-specific effects call
#' [simulate_counts()] with `condition_shared = FALSE` and a smaller
#' `condition_lfc`.
#'
#' @param scenario One of `"s1"` to `"s6"`.
#' @param n_cells Number of cells (default: the scenario's own).
#' @param seed Random seed.
#' @param ... Passed to [simulate_counts()] (e.g. `format`, `threads`), and
#'   overriding the scenario's settings (e.g. `condition_lfc`).
#' @return As [simulate_counts()].
#' @examples
#' s5 <- simulation_scenario("s5", n_cells = 1500)
#' table(s5$batch, s5$condition)
#' @export
simulation_scenario <- function(scenario = c("s1", "s2", "s3", "s4", "s5", "s6"), n_cells = NULL, seed = 1, ...) {
  scenario <- choose_arg(scenario, "scenario")
  design <- switch(scenario,
    s1 = list(n_cells = 5000, n_genes = 2000, batch_prob = c(1, 1), treated_fraction = 0.5),
    s2 = list(n_cells = 8000, n_genes = 3000, batch_prob = c(1, 1, 1), treated_fraction = 0.5, age_de_prob = 0.05),
    s3 = list(n_cells = 10000, n_genes = 3000, batch_prob = c(0.4, 0.3, 0.2, 0.1), treated_fraction = 0.5,
              age_de_prob = 0.05),
    s4 = list(n_cells = 8000, n_genes = 3000, batch_prob = c(1, 1, 1), treated_fraction = c(0.7, 0.5, 0.3)),
    s5 = list(n_cells = 8000, n_genes = 3000, batch_prob = c(1, 1, 1), treated_fraction = c(1, 0.5, 0)),
    s6 = list(n_cells = 5000, n_genes = 2000, batch_prob = c(1, 1), treated_fraction = 0.5, zero_inflation = TRUE))
  if (!is.null(n_cells)) design$n_cells <- n_cells
  design <- c(design, list(condition_shared = TRUE, condition_lfc = 1, condition_fac_scale = 0.3, seed = seed))
  do.call(simulate_counts, utils::modifyList(design, list(...)))
}
