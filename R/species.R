#' Align two species in one latent space (scSpecies)
#'
#' Trains the cross-species model of scSpecies (Schaar et al. 2024) on a
#' well-annotated **context** data set of one species (say mouse) and a
#' **target** data set of another (say human): an scVI-type model of the
#' context (outer encoder, inner encoder, learned library, batch-conditioned
#' count decoder), then a model of the target with its own outer encoder
#' (on all of its genes, homologous or not), library encoder and decoder, but
#' the context's inner encoder, frozen, so that both species land in one
#' latent space. While the target trains, each of the `top_percent` % of
#' target cells whose nearest context cells (cosine distance of log counts on
#' the homologous genes, `k_neigh` of them) agree most on a label is pulled
#' toward the context cell, among those neighbours, whose latent explains the
#' target cell's counts best under the target decoder; the pull's weight
#' rises from `eta[1]` to `eta[2]` with the KL weight (`kl_warmup`).
#'
#' The defaults are scSpecies 0.1.4's (ZINB likelihood, dispersion per gene
#' and batch, layer norm, dropout 0.1, outer encoder 300, inner encoder 200,
#' library encoder 200, decoder 200 and 300 units, 10 latent dimensions,
#' Adam at learning rate 0.001, batches of 128, KL weight 0.1 → 1 over 10
#' epochs, no early stopping, encoders reading the raw counts), except that
#' the number of epochs and of warm-up epochs follow the size of the data:
#' scSpecies trains 40 epochs and warms up over 10 whatever the size. At 40
#' epochs on the benchmark's 2,000 + 2,000 simulated cells (one seed), label
#' transfer reached balanced accuracy 0.90 with the longer warm-up and 0.80
#' with 10 epochs; on 600 + 600 cells 0.89 and 0.96, so at that size the
#' difference is within the spread of seeds.
#'
#' @section Precision:
#' On a CPU with native bf16 arithmetic (AVX512-BF16, as recent AMD
#' EPYC/Ryzen and Intel Xeon processors have), both phases train in mixed
#' precision: the products that read or write every gene run in bf16 with
#' f32 accumulation, everything else in f32 (see the section "Precision" of
#' [scdistill]). Two steps that only rank candidates also run their products
#' in bf16: the data-level neighbour search (whose candidates are then
#' re-ranked in f32) and the scoring of each pulled cell's candidates in the
#' alignment term. Together this makes the context phase about 1.5 times and
#' the target phase about 1.3 times faster; the held-out ELBO of both phases
#' stays within 0.05% of f32 training. `options(scdistill.bf16 = FALSE)` keeps
#' every product in f32. Other CPUs, and GPUs, use f32.
#'
#' @param context,target The two species' raw counts: a `SingleCellExperiment`
#'   (assay `"counts"`), a Seurat object, or a genes × cells matrix.
#' @param homologs The homologous genes: a data.frame of pairs, target gene
#'   then context gene (columns named `target` and `context`, or the first
#'   two columns), many-to-many allowed. A gene in several pairs keeps its
#'   first partner, as scSpecies does; pairs naming genes absent from the data
#'   are dropped (a message says how many matched). The HCOP human–mouse
#'   table is an example: `hcop[, c("human_symbol", "symbol")]` aligns human
#'   (target) to mouse (context).
#' @param context_labels The context's cell types: a column of its cell
#'   metadata or one value per cell, without missing values; at least two types.
#' @param batch_context,batch_target Each species' batches (column name or
#'   one value per cell), or `NULL` for one batch.
#' @param n_latent Latent dimensions.
#' @param likelihood `"zinb"` (default) or `"nb"`.
#' @param dispersion NB dispersion per `"gene-batch"` (default), `"gene"` or `"gene-cell"`.
#' @param alignment Where the target is pulled: `"inter"` (the outer
#'   encoder's output, default) or `"latent"` (z; the target then gets an
#'   inner encoder of its own).
#' @param input What the encoders read: the raw `"counts"` (scSpecies'
#'   choice, the default) or `"log1p"`, log(1 + counts). On 2,000 + 2,000
#'   simulated cells at 40 epochs, raw counts transferred labels with
#'   balanced accuracy 0.90, log counts 0.68.
#' @param k_neigh Data-level neighbours scored per target cell.
#' @param top_percent Percent of target cells pulled.
#' @param eta Start and end weight of the alignment term.
#' @param max_epochs Epochs of each phase: one number for both, two for
#'   context and target, or `NULL` for `round(40 * 20000 / n_cells)` within
#'   40 to 400 per species.
#' @param kl_warmup Epochs over which the KL weight rises from 0.1 to 1 and
#'   the alignment weight from `eta[1]` to `eta[2]` (one number, or context
#'   and target); `NULL`: scSpecies' 10 epochs on 20,000 cells or more, and on
#'   fewer cells the epochs that make the same number of optimiser steps
#'   (about 1,560), at most half of `max_epochs`.
#' @param batch_size,lr Minibatch size and Adam's learning rate.
#' @param seed Seed of the initial weights, minibatches and draws.
#' @param device `"auto"`, `"cpu"`, `"cuda"` or `"cuda:N"`.
#' @param threads CPU threads (default: `getOption("scdistill.threads")` or all cores).
#' @param progress Show a progress bar.
#' @param verbose Report how many homologous genes matched.
#' @return A `scdistill_species` model: [latent()], [add_latent()],
#'   [transfer_labels()], [species_similarity()], [homolog_fold_changes()],
#'   [save_model()] and `plot()` (the training history of both phases) work on it.
#' @seealso `vignette("cross-species", package = "scdistill")`
#' @examples
#' \donttest{
#' sim <- simulate_counts(n_cells = 600, n_genes = 300, n_groups = 3,
#'                        species = list(n_cells = 600, n_genes = 280),
#'                        seed = 2)
#' human <- S4Vectors::metadata(sim)$species2
#' hom <- data.frame(target = rownames(human), context = SummarizedExperiment::rowData(human)$homolog)
#' fit <- align_species(sim, human, hom[!is.na(hom$context), ], context_labels = "cell_type",
#'                      batch_context = "batch", batch_target = "batch", threads = 2)
#' fit
#' human <- transfer_labels(fit, human)
#' table(human$scSpecies_label, human$cell_type)
#' }
#' @export
align_species <- function(context, target, homologs, context_labels = "cell_type", batch_context = NULL,
                          batch_target = NULL, n_latent = 10, likelihood = c("zinb", "nb"),
                          dispersion = c("gene-batch", "gene", "gene-cell"), alignment = c("inter", "latent"),
                          input = c("counts", "log1p"), k_neigh = 25, top_percent = 20, eta = c(10, 25),
                          max_epochs = NULL, kl_warmup = NULL, batch_size = 128, lr = 1e-3, seed = 0, device = "auto", threads = NULL, progress = interactive(),
                          verbose = TRUE) {
  likelihood <- choose_arg(likelihood, "likelihood")
  dispersion <- choose_arg(dispersion, "dispersion")
  alignment <- choose_arg(alignment, "alignment")
  if (!is.numeric(eta) || length(eta) != 2 || anyNA(eta) || any(eta < 0)) {
    stop("`eta` must be two non-negative numbers: the alignment weight at the start and after 10 epochs", call. = FALSE)
  }
  check_positive(top_percent, "top_percent")
  if (top_percent > 100) stop("`top_percent` must be at most 100", call. = FALSE)
  check_positive(lr, "lr")
  cc <- tryCatch(as_counts(context, batch = batch_context),
                 error = function(e) stop("`context`: ", conditionMessage(e), call. = FALSE))
  ct <- tryCatch(as_counts(target, batch = batch_target),
                 error = function(e) stop("`target`: ", conditionMessage(e), call. = FALSE))
  labels <- species_labels(context_labels, cc)
  pairs <- homolog_table(homologs, rownames(cc$counts), rownames(ct$counts), verbose)
  check_homolog_counts(ct, pairs$target)

  epochs <- species_epochs(max_epochs, ncol(cc$counts), ncol(ct$counts))
  config <- list(n_latent = check_count(n_latent, "n_latent"), likelihood = likelihood, dispersion = dispersion,
                 log_input = choose_arg(input, "input") == "log1p",
                 alignment = alignment, k_neigh = check_count(k_neigh, "k_neigh"), top_percent = top_percent,
                 eta_start = eta[1], eta_max = eta[2],
                 bf16_scoring = use_bf16())
  batch_size <- check_count(batch_size, "batch_size", min = 2)
  warm <- species_warmup(kl_warmup, epochs, c(ncol(cc$counts), ncol(ct$counts)), batch_size)
  config$eta_epochs <- warm[2]
  phase <- function(n, s, warm) {
    list(max_epochs = n, batch_size = batch_size, lr = lr, weight_decay = 0,
         adam_eps = 1e-8, kl_warmup = 0, kl_warmup_epochs = warm, kl_start = 0.1, early_stopping = FALSE,
         validation_fraction = 0, seed = s, bf16 = use_bf16())
  }
  seed <- check_seed(seed)
  one <- function(cnt) cnt$batch %||% factor(rep("all", ncol(cnt$counts)))
  bar <- if (check_flag(progress, "progress")) species_bar(epochs[1], epochs[2]) else NULL
  if (!is.null(bar)) on.exit(bar$done(), add = TRUE)
  fit <- rust(rs_fit_species(slots(cc), factor_arg(one(cc), batch_name(batch_context, cc) %||% ""),
                             factor_arg(labels, "cell_type"), slots(ct),
                             factor_arg(one(ct), batch_name(batch_target, ct) %||% ""), pairs, config,
                             phase(epochs[1], seed, warm[1]),
                             phase(epochs[2], seed, warm[2]),
                             check_device(device), resolve_threads(threads), bar$update))
  model <- new_model(fit$ptr)
  model$fingerprint <- list(context = data_fingerprint(cc$counts), target = data_fingerprint(ct$counts))
  model$latent <- list(context = latent_matrix(fit$latent$context, colnames(cc$counts), n_latent),
                       target = latent_matrix(fit$latent$target, colnames(ct$counts), n_latent))
  finish_species(model)
}

# The cell types of the context, as a factor; missing values and a single
# type are errors.
species_labels <- function(labels, cnt) {
  if (is.null(labels)) stop("`context_labels` is needed: the context's cell types carry over to the target", call. = FALSE)
  f <- tryCatch(resolve_cell_factor(labels, cnt$cell_data, colnames(cnt$counts), "context_labels"),
                error = function(e) stop(conditionMessage(e), call. = FALSE))
  if (nlevels(f) < 2) {
    stop("the context has a single cell type ('", levels(f), "'): labels cannot be transferred; ",
         "give a context with at least two types", call. = FALSE)
  }
  f
}

# The homolog table as list(target, context) of the pairs whose genes are
# in the data; says how many matched.
homolog_table <- function(homologs, context_genes, target_genes, verbose = TRUE) {
  if (is.matrix(homologs)) homologs <- as.data.frame(homologs, stringsAsFactors = FALSE)
  if (!is.data.frame(homologs) || ncol(homologs) < 2 || nrow(homologs) == 0) {
    stop("`homologs` must be a data.frame of gene pairs: target gene, then context gene (columns `target` and ",
         "`context`, or the first two)", call. = FALSE)
  }
  cols <- if (all(c("target", "context") %in% names(homologs))) c("target", "context") else 1:2
  tg <- as.character(homologs[[cols[1]]])
  cg <- as.character(homologs[[cols[2]]])
  ok <- !is.na(tg) & !is.na(cg) & nzchar(tg) & nzchar(cg)
  tg <- tg[ok]
  cg <- cg[ok]
  in_t <- tg %in% target_genes
  in_c <- cg %in% context_genes
  both <- in_t & in_c
  if (!any(both)) {
    hint <- if (sum(cg %in% target_genes) > sum(in_t)) " (the columns look swapped: give target genes first)" else ""
    stop("no homologous genes in common: of ", fmt_int(length(tg)), " homolog pairs, ", fmt_int(sum(in_t)),
         " name a gene of the target data and ", fmt_int(sum(in_c)), " a gene of the context data, but none both",
         hint, call. = FALSE)
  }
  n_pairs <- length(unique(tg[both][!duplicated(tg[both]) & !duplicated(cg[both])]))
  if (verbose) {
    message("homologs: ", fmt_int(sum(both)), " of ", fmt_int(length(tg)), " pairs name genes of both data sets (",
            fmt_int(length(unique(tg[both]))), " target genes, ", fmt_int(length(unique(cg[both]))),
            " context genes); pairs naming other genes are dropped")
  }
  if (n_pairs < 100) {
    warning("only about ", n_pairs, " one-to-one homologous genes: the data-level neighbour search and the fold ",
            "changes rest on them, and scSpecies asks for at least 250", call. = FALSE)
  }
  list(target = tg[both], context = cg[both])
}

# Target cells without counts on any homologous gene: their data-level
# neighbours are arbitrary. All of them is an error.
check_homolog_counts <- function(ct, genes) {
  rows <- match(unique(genes), rownames(ct$counts))
  per_cell <- Matrix::colSums(ct$counts[rows, , drop = FALSE])
  if (all(per_cell == 0)) {
    stop("no target cell has counts on the homologous genes: check the homolog table's gene names", call. = FALSE)
  }
  if (any(per_cell == 0)) {
    warning(fmt_int(sum(per_cell == 0)), " target cell(s) have no counts on the homologous genes (first: '",
            colnames(ct$counts)[which(per_cell == 0)[1]], "'); they are aligned by their other genes only",
            call. = FALSE)
  }
}

# Epochs over which the KL weight (and the alignment weight) rise: scSpecies'
# 10 epochs where an epoch has at least 156 steps (20,000 cells), else as many
# epochs as it takes to make the same ~1,560 steps, at most half the training.
species_warmup <- function(kl_warmup, epochs, n_cells, batch_size) {
  if (!is.null(kl_warmup)) return(rep_len(vapply(kl_warmup, check_count, 1L, arg = "kl_warmup"), 2))
  steps <- pmax(n_cells %/% batch_size, 1)
  as.integer(pmin(pmax(10, ceiling(1560 / steps)), pmax(1, epochs %/% 2)))
}

species_epochs <- function(max_epochs, n_context, n_target) {
  rule <- function(n) as.integer(min(max(round(40 * 20000 / n), 40), 400))
  if (is.null(max_epochs)) return(c(rule(n_context), rule(n_target)))
  if (!length(max_epochs) %in% 1:2) stop("`max_epochs` must be one or two numbers (context, target)", call. = FALSE)
  e <- vapply(max_epochs, check_count, 1L, arg = "max_epochs")
  rep_len(e, 2)
}

# The batch's column name (to find it in new cells' metadata), or NULL.
batch_name <- function(batch, cnt) {
  if (is.character(batch) && length(batch) == 1 && ncol(cnt$counts) != 1) batch
}

species_bar <- function(e1, e2) two_phase_bar("Species", "context", e1, e2, validation = FALSE)

# The fields of a cross-species model new_model() cannot know: the history
# of both phases and where each species' batch is found.
species_fields <- function(model) {
  i <- model$info
  hist <- function(rec, phase) {
    h <- as.data.frame(rec$history %||% list())
    if (nrow(h)) h$phase <- phase
    h
  }
  model$history <- rbind(hist(i$context_training, "context"), hist(i$target_training, "target"))
  nz <- function(s) if (nzchar(s %||% "")) s
  model$batch <- list(context = nz(i$context_batch_name), target = nz(i$target_batch_name))
  model
}

# Checks after training: divergence and interrupts of either phase.
finish_species <- function(model) {
  i <- model$info
  for (ph in c("context", "target")) {
    rec <- i[[paste0(ph, "_training")]]
    if (length(unlist(rec$diverged_at))) {
      stop(errorCondition(paste0("the ", ph, " model's training loss became infinite or NaN at epoch ",
                                 unlist(rec$diverged_at), "; try a smaller `lr`"),
                          class = "scdistill_diverged", model = model, call = NULL))
    }
    if (isTRUE(rec$interrupted)) {
      msg <- paste0("training was interrupted in the ", ph, " phase")
      if (identical(on_interrupt(), "stop")) {
        stop(errorCondition(msg, class = c("scdistill_interrupted", "interrupt"), model = model, call = NULL))
      }
      warning(msg, call. = FALSE)
    }
  }
  model
}

# Which species the cells of `cnt` are: the one whose genes they all have.
which_species <- function(model, cnt, species) {
  species <- match.arg(species, c("auto", "context", "target"))
  if (species != "auto") return(species)
  genes <- rownames(cnt$counts)
  has <- c(context = all(model$info$context_genes %in% genes), target = all(model$info$target_genes %in% genes))
  if (sum(has) == 1) return(names(has)[has])
  share <- c(context = mean(model$info$context_genes %in% genes), target = mean(model$info$target_genes %in% genes))
  stop("cannot tell which species the cells are: they have ", round(100 * share[["context"]]), "% of the context's ",
       "genes and ", round(100 * share[["target"]]), "% of the target's; give `species = \"context\"` or ",
       "`\"target\"`", call. = FALSE)
}

#' @export
model_cells.scdistill_species <- function(model, x, batch = NULL, species = "auto", ...) {
  if (is.null(x)) stop("pass `x`, the counts of the cells", call. = FALSE)
  cnt <- as_counts(x)
  sp <- which_species(model, cnt, species)
  levels <- unlist(model$info[[paste0(sp, "_batch_levels")]])
  col <- model$batch[[sp]]
  if (is.null(batch) && !is.null(col) && col %in% colnames(cnt$cell_data)) batch <- col
  b <- if (!is.null(batch)) as.character(resolve_cell_factor(batch, cnt$cell_data, colnames(cnt$counts), "batch"))
  if (is.null(b) && identical(levels, "all")) b <- rep("all", ncol(cnt$counts))
  list(counts = list(slots(cnt)), batch = b, cells = colnames(cnt$counts), species = sp, cnt = cnt)
}

#' @rdname latent
#' @param species For a cross-species model: `"auto"` (from the genes of
#'   `x`), `"context"` or `"target"`.
#' @export
latent.scdistill_species <- function(model, x = NULL, batch = NULL, species = "auto", give_mean = TRUE, seed = 0,
                                     threads = NULL, ...) {
  give_mean <- check_flag(give_mean, "give_mean")
  if (is.null(x)) {
    if (give_mean && !is.null(model$latent)) return(model$latent)
    stop("pass `x`, the counts of one species' cells", call. = FALSE)
  }
  cells <- model_cells(model, x, batch, species = species)
  if (give_mean && is.null(batch)) {
    cached <- species_cached(model, cells)
    if (!is.null(cached)) return(cached)
  }
  z <- rust(rs_model_latent(model_ptr(model), cells[c("counts", "batch")],
                            list(give_mean = give_mean, seed = check_seed(seed), species = cells$species),
                            resolve_threads(threads)))
  latent_matrix(z$joint, cells$cells, ncol(z$joint))
}

species_cached <- function(model, cells) {
  fp <- model$fingerprint[[cells$species]]
  if (!is.null(fp) && identical(fp, data_fingerprint(cells$cnt$counts))) model$latent[[cells$species]]
}

#' @rdname normalized_expression
#' @export
normalized_expression.scdistill_species <- function(model, x, batch = NULL, species = "auto", transform_batch = NULL,
                                                    library_size = 1, log1p = FALSE, threads = NULL, genes = NULL,
                                                    h5_file = NULL, h5_name = "normalized", ...) {
  h5 <- h5_target(h5_file, h5_name)
  cells <- model_cells(model, x, batch, species = species)
  check_positive(library_size, "library_size")
  m <- rust(rs_model_expression(model_ptr(model), cells[c("counts", "batch")],
                                list(transform_batch = as.character(transform_batch), library_size = library_size,
                                     species = cells$species),
                                resolve_threads(threads)))
  features <- unlist(model$info[[paste0(cells$species, "_genes")]])
  # Named in place: `dimnames<-` would copy all of it (the call still holds it).
  m <- shape_in_place(m, dimnames = list(features, cells$cells))
  if (!is.null(genes)) m <- m[feature_index(genes, features), , drop = FALSE]
  if (check_flag(log1p, "log1p")) m <- log1p(m)
  if (is.null(h5)) m else h5_write_matrix(h5, m)
}

#' @rdname add_latent
#' @export
add_latent.scdistill_species <- function(x, model, name = NULL, ...) {
  write_back(x, latent(model, x, ...), name %||% "scSpecies")
}

#' Labels carried across species
#'
#' scSpecies' likelihood-based label transfer: for each target cell, the
#' `n_candidates` nearest context cells in the shared latent space are
#' ranked by how well their latents explain the target cell's counts under
#' the target decoder (the difference of negative log-likelihoods to the
#' cell's own latent; 0 is as good as its own); the label is the majority
#' among the `top_neigh` best, and the share of them with that label is
#' its confidence.
#'
#' @param model A model from [align_species()].
#' @param target Target cells (the training target or new cells of the same species).
#' @param batch Their batches (default: the column the model was trained with).
#' @param top_neigh Context cells that vote.
#' @param n_candidates Latent-space neighbours scored per target cell.
#' @param name Prefix of the columns written.
#' @param threads CPU threads.
#' @return For a `SingleCellExperiment` or Seurat object, the object with
#'   columns `<name>_label`, `<name>_confidence` and `<name>_similarity`
#'   (the median difference of negative log-likelihoods of the voting
#'   cells) in its cell metadata; otherwise a data.frame with `label`,
#'   `confidence` and `similarity`, one row per cell.
#' @examples
#' \donttest{
#' sim <- simulate_counts(n_cells = 600, n_genes = 300, n_groups = 3,
#'                        species = list(n_cells = 600, n_genes = 280),
#'                        seed = 2)
#' human <- S4Vectors::metadata(sim)$species2
#' hom <- data.frame(target = rownames(human), context = SummarizedExperiment::rowData(human)$homolog)
#' fit <- align_species(sim, human, hom[!is.na(hom$context), ],
#'                      batch_context = "batch", batch_target = "batch",
#'                      max_epochs = 100, threads = 2, verbose = FALSE)
#' pred <- transfer_labels(fit, human)
#' label_transfer_accuracy(pred$scSpecies_label, pred$cell_type)
#' }
#' @export
transfer_labels <- function(model, target, batch = NULL, top_neigh = 25, n_candidates = 250, name = "scSpecies",
                            threads = NULL) {
  check_species_model(model)
  cells <- model_cells(model, target, batch, species = "target")
  res <- rust(rs_species_transfer(model_ptr(model), cells[c("counts", "batch")],
                                  check_count(n_candidates, "n_candidates"), check_count(top_neigh, "top_neigh"),
                                  resolve_threads(threads)))
  lv <- unlist(model$info$label_levels)
  out <- data.frame(label = factor(lv[res$label + 1L], levels = lv), confidence = res$confidence,
                    similarity = res$similarity, row.names = cells$cells)
  write_cell_columns(target, out, name)
}

check_species_model <- function(model) {
  if (!inherits(model, "scdistill_species")) {
    stop("`model` must be a cross-species model from align_species()", call. = FALSE)
  }
}

# Per-cell columns into the object's cell metadata (SCE, Seurat), or the data.frame.
write_cell_columns <- function(x, df, name) {
  cols <- stats::setNames(df, paste0(name, "_", names(df)))
  if (is(x, "SummarizedExperiment")) {
    for (nm in names(cols)) SummarizedExperiment::colData(x)[[nm]] <- cols[[nm]]
    return(x)
  }
  if (inherits(x, "Seurat")) {
    for (nm in names(cols)) x[[nm]] <- cols[[nm]]
    return(x)
  }
  df
}

#' Accuracy of transferred labels
#'
#' The confusion matrix of true against predicted labels, each row in
#' percent of its true type, and the balanced accuracy (the mean recall of
#' the true types) over the cells whose true type is also a predicted
#' (context) type, as scSpecies reports it.
#'
#' @param predicted Predicted labels (e.g. `transfer_labels()`'s).
#' @param truth True labels of the same cells.
#' @param context_types The types the predictions could take (default: the
#'   levels of `predicted` if a factor, else its values).
#' @return A list of class `scdistill_label_accuracy`: `confusion` (matrix,
#'   percent), `balanced_accuracy`, `recall` per shared type, `n_cells` scored.
#' @examples
#' label_transfer_accuracy(c("a", "a", "b", "b"), c("a", "b", "b", "b"))
#' @export
label_transfer_accuracy <- function(predicted, truth, context_types = NULL) {
  if (length(predicted) != length(truth)) {
    stop("`predicted` has ", length(predicted), " labels but `truth` has ", length(truth), call. = FALSE)
  }
  if (anyNA(predicted) || anyNA(truth)) stop("`predicted` and `truth` must not have missing values", call. = FALSE)
  types <- context_types %||% (if (is.factor(predicted)) levels(predicted) else sort(unique(as.character(predicted))))
  p <- as.character(predicted)
  t <- as.character(truth)
  tab <- table(truth = factor(t, levels = sort(unique(t))), predicted = factor(p, levels = types))
  conf <- 100 * sweep(unclass(tab), 1, pmax(rowSums(tab), 1), "/")
  shared <- intersect(sort(unique(t)), types)
  if (!length(shared)) stop("no true type is among the predicted types: nothing to score", call. = FALSE)
  recall <- vapply(shared, function(s) mean(p[t == s] == s), 1)
  structure(list(confusion = conf, balanced_accuracy = mean(recall), recall = recall,
                 n_cells = sum(t %in% shared)),
            class = "scdistill_label_accuracy")
}

#' @method print scdistill_label_accuracy
#' @export
print.scdistill_label_accuracy <- function(x, ...) {
  cat(sprintf("Balanced accuracy %.3f over %s cells of %d shared types\n", x$balanced_accuracy, fmt_int(x$n_cells),
              length(x$recall)))
  cat("Confusion (percent of each true type):\n")
  print(round(x$confusion, 1))
  invisible(x)
}

#' Cell-type similarity across species
#'
#' scSpecies' cell-type similarity: for each target type T and context type
#' C, the likelihood-based similarity (see [transfer_labels()]) of up to
#' `max_target` cells of T each to up to `max_context` random cells of C;
#' the table holds minus the mode of those values (the middle of the fullest
#' bin of a Freedman–Diaconis histogram), so that values near 0 mean "as
#' similar as a cell to itself" and more negative values mean less similar.
#'
#' @inheritParams transfer_labels
#' @param labels The target cells' types (a column of their metadata or one
#'   value per cell); default: the labels transferred by [transfer_labels()].
#' @param max_target,max_context Cells sampled per target type and, for
#'   each of them, per context type.
#' @param seed Seed of the sampling.
#' @return A matrix (target types × context types) of class
#'   `scdistill_species_similarity`; `plot()` draws it as a heatmap.
#' @examples
#' \donttest{
#' sim <- simulate_counts(n_cells = 600, n_genes = 300, n_groups = 3,
#'                        species = list(n_cells = 600, n_genes = 280),
#'                        seed = 2)
#' human <- S4Vectors::metadata(sim)$species2
#' hom <- data.frame(target = rownames(human), context = SummarizedExperiment::rowData(human)$homolog)
#' fit <- align_species(sim, human, hom[!is.na(hom$context), ],
#'                      batch_context = "batch", batch_target = "batch",
#'                      max_epochs = 100, threads = 2, verbose = FALSE)
#' s <- species_similarity(fit, human, labels = "cell_type", max_target = 50, max_context = 20)
#' plot(s)
#' }
#' @export
species_similarity <- function(model, target, labels = NULL, batch = NULL, max_target = 200, max_context = 50,
                               seed = 0, threads = NULL) {
  check_species_model(model)
  cells <- model_cells(model, target, batch, species = "target")
  f <- target_types(model, cells, labels, batch, threads)
  v <- rust(rs_species_similarity(model_ptr(model), cells[c("counts", "batch")],
                                  factor_arg(f, "labels"),
                                  check_count(max_target, "max_target"), check_count(max_context, "max_context"),
                                  check_seed(seed), resolve_threads(threads)))
  lv <- unlist(model$info$label_levels)
  m <- matrix(v, nrow = nlevels(f), byrow = TRUE, dimnames = list(target = levels(f), context = lv))
  structure(m, class = c("scdistill_species_similarity", "matrix"))
}

# The target cells' types: given, or transferred.
target_types <- function(model, cells, labels, batch, threads) {
  if (is.null(labels)) {
    return(droplevels(transfer_labels(model, cells$cnt, batch = cells$batch, threads = threads)$label))
  }
  resolve_cell_factor(labels, cells$cnt$cell_data, cells$cells, "labels")
}

#' @method print scdistill_species_similarity
#' @export
print.scdistill_species_similarity <- function(x, ...) {
  cat("Cell-type similarity (rows: target types, columns: context types; 0 = most similar)\n")
  print(round(unclass(x), 2))
  invisible(x)
}

#' @method plot scdistill_species_similarity
#' @export
plot.scdistill_species_similarity <- function(x, ...) {
  m <- unclass(x)
  old <- graphics::par(mar = c(7, 7, 3, 2))
  on.exit(graphics::par(old))
  cols <- grDevices::hcl.colors(50, "YlOrRd", rev = TRUE)
  graphics::image(seq_len(ncol(m)), seq_len(nrow(m)), t(m), col = cols, axes = FALSE, xlab = "", ylab = "",
                  main = "Cell-type similarity across species", ...)
  graphics::axis(1, at = seq_len(ncol(m)), labels = colnames(m), las = 2, cex.axis = 0.8)
  graphics::axis(2, at = seq_len(nrow(m)), labels = rownames(m), las = 1, cex.axis = 0.8)
  graphics::mtext("context type", side = 1, line = 5.5)
  graphics::mtext("target type", side = 2, line = 5.5)
  best <- apply(m, 1, function(r) if (all(is.na(r))) NA else which.max(r))
  graphics::points(best, seq_len(nrow(m)), pch = 19, cex = 0.8)
  invisible(x)
}

#' Fold changes of homologous genes between species
#'
#' scSpecies' homologous-gene log2 fold changes, target over context, per
#' cell type present in both: target cells of the type (outliers beyond the
#' χ² 0.9 quantile of their latent Mahalanobis distance left out) are drawn
#' from their posteriors, each draw decoded by both species' decoders
#' (averaged over the batches in which the type has more than three cells),
#' the expression taken as proportions over the homologous genes (times
#' 1 − π under ZINB). The log2 ratio per draw gives the median fold change
#' `lfc` and the share of draws with |LFC| > `delta` (`p`); `lfc_rand` and
#' `p_rand` are the same with the context genes permuted, the null of no
#' gene-to-gene correspondence.
#'
#' @inheritParams species_similarity
#' @param labels The target cells' types (default: transferred ones).
#' @param delta Fold-change threshold (log2).
#' @param n_samples Posterior draws per cell type (spread over its cells,
#'   at least one per cell). scSpecies draws 50,000; at 10,000 two seeds'
#'   fold changes differ by 0.008 (99th percentile of |difference|, 2,000
#'   cells) in a fifth of the time.
#' @return A named list, one data.frame per shared cell type, one row per
#'   homologous pair (row names: target genes): `target_gene`,
#'   `context_gene`, `rho_median_context`, `mu_median_context`,
#'   `rho_median_target`, `mu_median_target`, `lfc`, `p`, `lfc_rand`,
#'   `p_rand`, ordered by `p` then |`lfc`|; attribute `n_cells` gives the
#'   target cells used per type.
#' @examples
#' \donttest{
#' sim <- simulate_counts(n_cells = 600, n_genes = 300, n_groups = 3,
#'                        species = list(n_cells = 600, n_genes = 280),
#'                        seed = 2)
#' human <- S4Vectors::metadata(sim)$species2
#' hom <- data.frame(target = rownames(human), context = SummarizedExperiment::rowData(human)$homolog)
#' fit <- align_species(sim, human, hom[!is.na(hom$context), ],
#'                      batch_context = "batch", batch_target = "batch",
#'                      max_epochs = 100, threads = 2, verbose = FALSE)
#' fc <- homolog_fold_changes(fit, human, labels = "cell_type", n_samples = 2000)
#' head(fc[[1]])
#' }
#' @export
homolog_fold_changes <- function(model, target, labels = NULL, batch = NULL, delta = 1, n_samples = 10000, seed = 0,
                                 threads = NULL) {
  check_species_model(model)
  check_positive(delta, "delta")
  cells <- model_cells(model, target, batch, species = "target")
  f <- target_types(model, cells, labels, batch, threads)
  res <- rust(rs_species_fold_changes(model_ptr(model), cells[c("counts", "batch")],
                                      factor_arg(f, "labels"),
                                      check_count(n_samples, "n_samples"), delta, check_seed(seed),
                                      resolve_threads(threads)))
  if (!length(res)) {
    stop("no cell type is shared by the target labels and the context (target: ",
         paste(utils_head(levels(f), 5), collapse = ", "), "; context: ",
         paste(utils_head(unlist(model$info$label_levels), 5), collapse = ", "), ")", call. = FALSE)
  }
  pairs <- rs_species_pairs(model_ptr(model))
  tg <- unlist(model$info$target_genes)[pairs$target]
  cg <- unlist(model$info$context_genes)[pairs$context]
  out <- lapply(res, function(r) {
    df <- data.frame(target_gene = tg, context_gene = cg, r[setdiff(names(r), c("n_target_cells", "n_used"))],
                     row.names = tg, stringsAsFactors = FALSE)
    df[order(-df$p, -abs(df$lfc)), ]
  })
  attr(out, "n_cells") <- vapply(res, function(r) r$n_used, 1L)
  out
}

#' @method print scdistill_species
#' @export
print.scdistill_species <- function(x, ...) {
  i <- x$info
  cat("Cross-species model (scSpecies)\n")
  cat(sprintf("  context: %s cells x %s genes, %d batch(es), %d cell types\n", fmt_int(i$n_context_cells),
              fmt_int(length(i$context_genes)), length(i$context_batch_levels), length(i$label_levels)))
  cat(sprintf("  target:  %s cells x %s genes, %d batch(es)\n", fmt_int(i$n_target_cells),
              fmt_int(length(i$target_genes)), length(i$target_batch_levels)))
  cat(sprintf("  %s homologous genes; %s target cells pulled toward context matches (%s alignment)\n",
              fmt_int(length(i$homologs)), fmt_int(i$n_aligned), i$config$alignment))
  h <- x$history
  if (nrow(h)) {
    for (ph in c("context", "target")) {
      hp <- h[h$phase == ph, , drop = FALSE]
      if (nrow(hp)) cat(sprintf("  %s: %d epochs in %.1f s, final -ELBO %.1f\n", ph, nrow(hp), sum(hp$seconds),
                                hp$train_elbo[nrow(hp)]))
    }
  }
  invisible(x)
}

#' @method summary scdistill_species
#' @export
summary.scdistill_species <- function(object, ...) print.scdistill_species(object, ...)

#' @method plot scdistill_species
#' @export
plot.scdistill_species <- function(x, ...) {
  h <- x$history
  if (!nrow(h)) stop("the model has no training history", call. = FALSE)
  old <- graphics::par(mfrow = c(1, 2), mar = c(4.5, 4.5, 2.5, 1))
  on.exit(graphics::par(old))
  for (ph in c("context", "target")) {
    hp <- h[h$phase == ph, , drop = FALSE]
    if (!nrow(hp)) next
    graphics::plot(hp$epoch, hp$train_elbo, type = "l", lwd = 2, col = "#1b6ca8", xlab = "epoch",
                   ylab = "-ELBO per cell", main = paste(ph, "model"), ...)
  }
  invisible(x)
}
