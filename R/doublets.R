# Doublet detection from simulated doublets (SOLO / Scrublet) in a model's latent space.

#' Find doublets
#'
#' Scores each cell for being a doublet (two cells in one droplet or well).
#' Artificial doublets are made by summing the counts of random pairs of
#' cells of the same batch (`ratio` per cell); a VAE ([fit_vae()], or the
#' `model` given) places observed cells and artificial doublets in its
#' latent space. Two scores come from there:
#' * `"classifier"` (SOLO, Bernstein et al. 2020, as in scvi-tools): a
#'   classifier of artificial doublets against observed cells on the latent
#'   coordinates and log library size; the score is its doublet probability.
#' * `"neighbors"` (Scrublet, Wolock et al. 2019): the share of
#'   artificial doublets among a cell's `k` nearest neighbours, within its
#'   batch, relative to their share overall (1: as many as by chance).
#'
#' `method = "both"` (the default) averages the two scores' ranks (as
#' fractions in 0 to 1). On CellBench's three plates (demuxlet's calls as
#' truth, `bench/pipeline.R`, seeds 1 to 3) its AUPRC was 0.603, 0.606 and
#' 0.571 against Scrublet's 0.582, 0.592 and 0.559 (neighbours alone 0.578,
#' 0.600, 0.534; classifier alone 0.543, 0.531, 0.539; scvi-tools' SOLO
#' 0.36 in an earlier run); its AUROC was a little below Scrublet's (0.61
#' against 0.62 on average).
#'
#' The VAE's encoder reads raw counts, so a cell's depth moves it in the
#' latent space. Real doublets hold from less than one cell's molecules
#' (CellBench's plates) to nearly two (droplets): the neighbour score reads
#' artificial doublets of both kinds, half of them thinned to one cell's
#' depth (each count a Binomial(count, 1/2) draw); the classifier reads the
#' summed ones with their library size, as SOLO does.
#'
#' @param x A `SingleCellExperiment`, `Seurat` object or counts matrix
#'   (genes x cells) of raw counts; all droplets of a batch together.
#' @param batch Batch (lane, sample, plate): doublets form within one, and
#'   the VAE corrects for it. A column of the cell metadata or one value per
#'   cell.
#' @param model A fitted VAE of these cells ([fit_vae()]); `NULL`: one is
#'   fitted on their `n_hvg` most variable genes.
#' @param n_hvg Genes the VAE fitted here sees (on CellBench, all 12,653
#'   genes gave AUROC 0.52 against demuxlet's calls, 2,000 gave 0.60).
#' @param method `"both"`, `"neighbors"` or `"classifier"`.
#' @param ratio Artificial doublets per observed cell (SOLO's 2).
#' @param k Neighbours of the `"neighbors"` score, as counted among observed
#'   cells; `NULL`: Scrublet's rule, round(0.5 * sqrt(cells of the batch)).
#'   On the graph that also holds the artificial doublets it becomes
#'   k * (1 + ratio), as Scrublet's `k_adj`.
#' @param threshold Cells whose score is above it are called doublets. For
#'   `"classifier"` the score is a probability (SOLO calls above 0.5); for
#'   the others, `NULL` calls the `expected_rate` highest-scoring cells of
#'   each batch.
#' @param expected_rate Expected doublet rate, for the default calls of the
#'   rank-based scores (10x: about 0.8% per 1,000 cells loaded).
#' @param max_epochs,seed,threads,progress Training settings of the VAE (when
#'   fitted here) and of the classifier; `max_epochs` applies to the VAE.
#' @param ... Passed to [fit_vae()].
#' @return For a `SingleCellExperiment` or `Seurat` object, `x` with cell
#'   metadata columns `doublet_score` and `doublet_call` (`TRUE` for a
#'   doublet); otherwise a data.frame of both, one row per cell.
#' @examples
#' sim <- simulate_counts(n_cells = 600, n_genes = 300, n_groups = 4, seed = 1)
#' sim <- find_doublets(sim, batch = "batch", max_epochs = 30, threads = 2)
#' summary(sim$doublet_score)
#' table(sim$doublet_call)
#' @export
find_doublets <- function(x, batch = NULL, model = NULL, method = c("both", "neighbors", "classifier"), ratio = 2,
                          n_hvg = 2000, k = NULL, threshold = NULL, expected_rate = 0.08, max_epochs = NULL, seed = 0,
                          threads = NULL, progress = interactive(), ...) {
  method <- choose_arg(method, "method")
  check_positive(ratio, "ratio")
  check_fraction(expected_rate, "expected_rate")
  cnt <- as_counts(x, batch = batch)
  n <- ncol(cnt$counts)
  if (n < 10) stop("`x` has ", n, " cells: doublet detection needs at least 10", call. = FALSE)
  b <- cnt$batch %||% factor(rep("all", n))
  if (!is.null(model)) {
    check_model(model)
  } else {
    # As Scrublet and scvi-tools' tutorials do: the model sees the most variable genes only.
    n_hvg <- check_count(n_hvg, "n_hvg")
    if (n_hvg < nrow(cnt$counts)) {
      hvg <- highly_variable_genes(cnt$counts, n_hvg = n_hvg, batch = cnt$batch, threads = threads)
      sub <- cnt$counts[hvg$highly_variable, , drop = FALSE]
      # Every cell is scored: a cell without counts there keeps all genes in.
      if (all(Matrix::colSums(sub) > 0)) {
        cnt <- new_counts(sub, cnt$batch, cnt$cell_data, checked = TRUE)
        x <- cnt$counts
        batch <- cnt$batch
      }
    }
    model <- fit_vae(x, batch = batch, max_epochs = max_epochs, seed = seed, threads = threads, progress = progress,
                     ...)
  }
  sim <- rust(rs_simulate_doublets(slots(cnt), as.integer(b), nlevels(b), ratio, check_seed(seed)))
  dbl <- csr_to_dgc(sim$counts, rownames(cnt$counts), paste0("simulated_doublet_", seq_along(sim$batch)))
  dbl_batch <- factor(levels(b)[sim$batch], levels = levels(b))
  z_obs <- cached_latent(model, cnt$counts) %||% latent(model, x, batch = batch, threads = threads)
  scores <- list()
  z_sim <- NULL
  if (method %in% c("classifier", "both")) {
    # SOLO's classifier reads the summed doublets and their library size.
    z_sim <- latent(model, dbl, batch = if (is.null(cnt$batch)) NULL else dbl_batch, threads = threads)
    lib <- log(c(colSums(cnt$counts), colSums(dbl)))
    scores$classifier <- doublet_classifier(rbind(z_obs, z_sim), lib, n, seed, threads, progress)
  }
  if (method %in% c("neighbors", "both")) {
    # Half the doublets the neighbour score reads are thinned to one cell's
    # depth: the encoder sees raw counts, so depth moves cells in the latent
    # space, and real doublets hold from less than one cell's molecules
    # (CellBench's plates) to nearly two (droplets). Scrublet normalises
    # depth away instead.
    half <- seq(1, ncol(dbl), by = 2)
    thinned <- csr_to_dgc(rust(rs_thin_counts(slots(list(counts = dbl[, half, drop = FALSE])), 0.5,
                                              check_seed(seed))), rownames(dbl), colnames(dbl)[half])
    mixed_batch <- dbl_batch[c(half, seq_len(ncol(dbl))[-half])]
    dbl_latent <- function(m, bt) latent(model, m, batch = if (is.null(cnt$batch)) NULL else bt, threads = threads)
    # The unthinned half is encoded once: the classifier's z_sim has it.
    z_mixed <- rbind(dbl_latent(thinned, dbl_batch[half]),
                     if (is.null(z_sim)) dbl_latent(dbl[, -half, drop = FALSE], dbl_batch[-half])
                     else z_sim[-half, , drop = FALSE])
    scores$neighbors <- numeric(n)
    for (lv in levels(b)) {
      obs <- which(b == lv)
      z <- rbind(z_obs[obs, , drop = FALSE], z_mixed[mixed_batch == lv, , drop = FALSE])
      # k for the observed cells; on the graph with the doublets, k (1 + r)
      # (Scrublet's k_adj), r the doublets per observed cell.
      kk <- if (is.null(k)) max(round(0.5 * sqrt(length(obs))), 3) else check_count(k, "k")
      kk <- round(kk * (nrow(z) / length(obs)))
      scores$neighbors[obs] <- rust(rs_neighbor_doublet_fraction(unclass_matrix(z), ncol(z), length(obs),
                                                                 min(kk, nrow(z) - 1), check_seed(seed),
                                                                 resolve_threads(threads)))
    }
  }
  score <- if (method == "both") {
    (rank(scores$classifier) + rank(scores$neighbors)) / (2 * n)
  } else scores[[1]]
  call <- if (!is.null(threshold)) {
    score > check_positive(threshold, "threshold", zero_ok = TRUE)
  } else if (method == "classifier") {
    score > 0.5
  } else {
    top_per_batch(score, b, expected_rate)
  }
  out <- data.frame(doublet_score = score, doublet_call = call, row.names = colnames(cnt$counts))
  if (inherits(x, "SummarizedExperiment") || inherits(x, "Seurat")) return(add_cell_columns(x, out))
  names(out) <- c("score", "call")
  out
}

# SOLO's classifier: the label model's MLP on (z, log library), artificial
# doublets against observed cells; the observed cells' doublet probability.
doublet_classifier <- function(z, lib, n_observed, seed, threads, progress) {
  zl <- cbind(z, lib)
  y <- rep(c(1L, 2L), c(n_observed, nrow(z) - n_observed))
  tc <- train_settings(nrow(zl), 400, 128, 1e-3, 0, 0, TRUE, 30, 0, 0.1, seed)
  bar <- if (check_flag(progress, "progress")) training_bar(tc$max_epochs) else NULL
  if (!is.null(bar)) on.exit(bar$done(), add = TRUE)
  config <- list(n_hidden = 128L, n_layers = 1L, dropout = 0.1, classification_ratio = 50)
  fit <- rust(rs_fit_labels(unclass_matrix(zl), ncol(zl), y, c("singlet", "doublet"), config, tc,
                            resolve_threads(threads), bar$update))
  p <- rust(rs_predict_labels(fit$bytes, unclass_matrix(zl[seq_len(n_observed), , drop = FALSE]), ncol(zl),
                              resolve_threads(threads)))
  p$probabilities[, 2]
}

# TRUE for the `rate` highest scores of each batch.
top_per_batch <- function(score, batch, rate) {
  call <- logical(length(score))
  for (lv in levels(batch)) {
    i <- which(batch == lv)
    m <- round(rate * length(i))
    if (m > 0) call[i[order(score[i], decreasing = TRUE)[seq_len(m)]]] <- TRUE
  }
  call
}
