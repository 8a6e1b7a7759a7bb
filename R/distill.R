#' Teachers for distill()
#'
#' A teacher gives [distill()] the batch-free embedding Z* its student
#' learns. `harmony_teacher()` computes it: seurat_v3 highly variable genes
#' (batch-aware), PCA of their log-normalized counts (log2 per 10^4 + 1, see
#' [run_pca()]), then
#' [run_harmony()]. `given_teacher()` uses an embedding you already have
#' (fastMNN, Seurat RPCA/CCA, scVI, ...), so that you can distil from the
#' method you trust; the student's encoder then reads the `n_hvg` highly
#' variable genes.
#'
#' @param theta Harmony's diversity penalty (one per batch variable).
#' @param protect Biological covariates Harmony must not regress out (column
#'   names of the cell metadata), see [run_harmony()]. The model records
#'   them (`model$info$teacher_protects`, and in its teacher's description
#'   for `print(model)`; both kept by [save_model()]), and
#'   `differential_expression(method = "samples")` looks there for the
#'   groups it compares (see there, on confounded designs).
#' @param n_pcs Principal components handed to Harmony; also the latent
#'   dimension of the student unless `distill(n_latent =)` says otherwise.
#'   30, as Seurat's integration and neighbour steps use (scanpy and
#'   scDistill 0.3.1 keep 50): the last PCs hold mostly noise, which Harmony
#'   then corrects and the student learns. Against 50, the student's scIB
#'   total rose on CellBench (0.859 to 0.878; scib-metrics 0.844 to 0.877)
#'   and on a simulation with 12 types and batch-confounded ones (0.761 to
#'   0.769; 0.757 to 0.770), and was even on one with 14 types, several rare
#'   (0.791 and 0.787; 0.773 and 0.783), over two seeds (`bench/RESULTS.md`):
#'   label silhouette and isolated labels rose everywhere, while on the
#'   simulations less of the batch was removed (PCR comparison 0.08-0.13
#'   lower). With many more types than these, more PCs may be needed.
#' @param n_hvg Highly variable genes: the PCA's genes and the encoder's input.
#' @param method,scale_factor The PCA's values, as [run_pca()]'s: log2 of
#'   counts per `scale_factor` + 1 (`"log"`, default), the same per 10^6
#'   (`"log2cpm"`, the default of earlier versions), or analytic Pearson
#'   residuals (`"pearson_residuals"`). The encoder reads log2 CPM either
#'   way (see [distill()]'s `input_scale_factor`). (Formerly `pca_method`,
#'   with `"standard"` for `"log2cpm"`; both are still accepted, with a
#'   warning.)
#' @param sketch Harmony is fitted on a sample of this many cells when the
#'   data have more, and the other cells are corrected by the fit (see
#'   [run_harmony()]'s `sketch`): the teacher's memory then stops growing
#'   with Harmony's clusters × cells matrices (2.3 GB at 10^6 cells). `NULL`:
#'   always fit on all cells.
#' @param ... Further arguments of [run_harmony()]'s algorithm: `sigma`,
#'   `lambda`, `n_clusters`, `max_iter`, `max_iter_cluster`,
#'   `epsilon_cluster`, `epsilon_harmony`, `block_size`, `alpha`, `tau`,
#'   `protect_theta`, and `seed` (by default [distill()]'s). `reduction` and
#'   `name` do not apply: the teacher computes its own PCA and keeps Z* in
#'   the model.
#' @return A `scdistill_teacher`.
#' @examples
#' harmony_teacher(theta = 2, protect = "condition")
#' @export
harmony_teacher <- function(theta = 2, protect = NULL, n_pcs = 30, n_hvg = 2000,
                            method = c("log", "pearson_residuals", "log2cpm"), scale_factor = 1e4,
                            sketch = 2e5, ...) {
  args <- list(...)
  if (!is.null(args$pca_method)) {
    warning("harmony_teacher(pca_method =) is now `method`, as in run_pca()", call. = FALSE)
    method <- if (identical(args$pca_method, "standard")) "log2cpm" else args$pca_method
    args$pca_method <- NULL
  }
  known <- c("sigma", "lambda", "n_clusters", "max_iter", "max_iter_cluster", "epsilon_cluster", "epsilon_harmony",
             "block_size", "alpha", "tau", "protect_theta", "seed")
  bad <- setdiff(names(args) %||% rep("", length(args)), known)
  if (length(bad) || (length(args) && is.null(names(args)))) {
    bad <- bad[nzchar(bad)]
    stop("harmony_teacher() takes run_harmony()'s algorithm settings (", paste(known, collapse = ", "), "); not ",
         if (length(bad)) paste0("`", bad, "`", collapse = ", ") else "unnamed arguments",
         if (any(c("reduction", "name") %in% bad)) " (the teacher computes its own PCA and keeps Z* in the model)",
         call. = FALSE)
  }
  if (!is.null(args$seed)) args$seed <- check_seed(args$seed)
  if (!is.null(sketch)) args$sketch <- check_count(sketch, "sketch", min = 2)
  method <- choose_arg(method, "method")
  scale_factor <- if (method == "log2cpm") 1e6 else check_positive(scale_factor, "scale_factor")
  structure(list(kind = "harmony", theta = theta, protect = protect, n_pcs = check_count(n_pcs, "n_pcs", min = 2),
                 n_hvg = check_count(n_hvg, "n_hvg"), method = if (method == "log2cpm") "log" else method,
                 scale_factor = scale_factor, args = args),
            class = "scdistill_teacher")
}

# The teacher's PCA values in words, for progress and the model's description.
pca_values <- function(teacher) {
  if (teacher$method != "log") return(teacher$method)
  log_values(teacher$scale_factor %||% 1e6)
}

# log2(count / library x `scale_factor` + 1) in words.
log_values <- function(scale_factor) {
  switch(format(scale_factor, scientific = FALSE), `10000` = "log2 CP10k", `1000000` = "log2 CPM",
         paste("log2 per", format(scale_factor, big.mark = ",", scientific = FALSE)))
}

#' @rdname harmony_teacher
#' @param embedding The name of a `reducedDim` (SingleCellExperiment) or
#'   reduction (Seurat) of the data passed to [distill()], or a cells ×
#'   dimensions matrix whose row names are the cells.
#' @export
given_teacher <- function(embedding, n_hvg = 2000) {
  if (!(is.character(embedding) && length(embedding) == 1) && !(is.matrix(embedding) && is.numeric(embedding))) {
    stop("`embedding` must be the name of a reduction or a numeric cells x dimensions matrix", call. = FALSE)
  }
  structure(list(kind = "given", embedding = embedding, n_hvg = check_count(n_hvg, "n_hvg")),
            class = "scdistill_teacher")
}

#' @method print scdistill_teacher
#' @export
print.scdistill_teacher <- function(x, ...) {
  if (x$kind == "harmony") {
    cat(sprintf("Harmony teacher: %d PCs (%s) of %d highly variable genes, theta %s%s%s\n", x$n_pcs, pca_values(x), x$n_hvg,
                paste(x$theta, collapse = "/"),
                if (length(x$protect)) paste0(", protecting ", paste(x$protect, collapse = ", ")) else "",
                if (!is.null(x$args$sketch)) {
                  sprintf(", Harmony on a sketch of %s cells for larger data", format(x$args$sketch, big.mark = ","))
                } else ""))
  } else {
    cat("Given embedding teacher:", if (is.character(x$embedding)) x$embedding else
      sprintf("%d x %d matrix", nrow(x$embedding), ncol(x$embedding)), "\n")
  }
  invisible(x)
}

#' Distil a batch-corrected embedding into a neural network (scDistill)
#'
#' The package's main job. A teacher (Harmony on PCA by default) gives a
#' batch-free embedding Z*; a student network then learns it in two phases:
#'
#' 1. an encoder from log2(CPM + 1) of the highly variable genes to Z (loss:
#'    mean squared error to Z* standardized as `standardize` says; architecture
#'    `n_layers` × (Linear → norm → ReLU → Dropout) → Linear);
#' 2. with the encoder frozen, a decoder from Z and a learned batch embedding
#'    (10 dimensions) to a negative binomial model of the counts, μ =
#'    library size × softmax, θ per gene.
#'
#' Each phase stops early when the loss on a held-out validation split
#' (`validation_fraction`, the same cells in both phases) has not improved
#' for `patience` epochs, and keeps the best weights. (scDistill 0.3.1
#' watches the training loss instead.)
#'
#' On CPUs with native bf16 arithmetic, both phases run their widest products
#' in bf16 (mixed precision, about 1.6 times faster at the same held-out
#' losses); `options(scdistill.bf16 = FALSE)` keeps f32. See the section
#' "Precision" of [scdistill].
#'
#' The trained model places new cells without re-running the teacher
#' ([latent()] with `x`), and decodes every cell to a reference batch:
#' batch-corrected expression, [corrected_expression()].
#'
#' @param x Counts: a `SingleCellExperiment`, `Seurat` object, `dgCMatrix`
#'   or matrix (genes × cells), see [as_counts()]; or counts on disk, read
#'   in blocks and streamed, never loaded: the path of an `.h5ad` or 10x
#'   `.h5` file, an [h5_counts()] object, or a `SingleCellExperiment` whose
#'   counts are an HDF5-backed `DelayedMatrix` (see "Counts on disk").
#' @param batch The batch of each cell: a column of the cell metadata (for
#'   a file, of its `obs`) or one value per cell.
#' @param teacher [harmony_teacher()] (default) or [given_teacher()].
#' @section Counts on disk:
#' The Harmony teacher's genes and PCA are computed from the file in four
#' passes of 16,384 cells: the same genes and the same exact PCA (of the
#' log-normalized counts; `method = "pearson_residuals"` needs the counts in
#' memory) as in
#' memory, see [run_pca()]; the first pass also gives the student its
#' library sizes. Harmony then corrects the PCs of every cell (cells ×
#' `n_pcs`, in memory); above 200,000 cells it is fitted on a sketch of
#' that many and corrects the others with the fit (`harmony_teacher(sketch
#' =)`, see [run_harmony()]). With [given_teacher()] a pass reads the
#' library sizes. Both phases of the student then stream minibatches
#' from the file as [fit_vae()] does (whole blocks of cells held out for
#' validation, blocks shuffled in windows); with `norm = "batch"` the
#' encoder's batch norms take their statistics from training cells read in
#' runs (8,192 before each validation, 32,768 after the first phase). One
#' pass then computes every cell's Z for the second phase. What grows with
#' the cells is what `distill()` returns, Z and Z* (cells × `n_latent`
#' doubles each: 800 bytes per cell at 50 dimensions), and a few numbers
#' per cell. The core writes these matrices straight into R and none is
#' copied: Harmony overwrites the teacher's PCs with Z*, and the student
#' holds Z in single precision while its decoder trains, writing it into
#' the returned matrix after that phase. Besides them memory holds a few
#' windows of cells. Pages the training threads freed are handed back to
#' the system after the teacher, after each epoch's pass over the file and
#' after the fit. On 10^6 simulated cells × 2,000 genes in a file, the
#' process peaked at 2.2 GB and held 1.6 GB after the fit; at 5·10^6
#' cells it peaked at 5.8 GB and held 5.3 GB, 4 GB of which are Z and Z*
#' (`bench/out_of_core.R`, `bench/RESULTS.md`).
#'
#' With `h5_file`, none of these matrices is held. The PCA's last pass
#' writes the scores into the file, and Harmony corrects them there: it
#' reads its sketch in one pass and corrects the cells a block of 65,536 at
#' a time, read from the file and written back (without a sketch all PCs
#' are read for the fit). The encoder reads its targets back from there a
#' block of cells at a time (those of the window being trained on); the
#' pass that computes Z writes it there, and the decoder reads it back
#' likewise. What then grows with the cells is a few numbers per cell
#' (names, batches, library sizes, the epoch's order). The model is the
#' same, and so are Z and Z*. On 5·10^6 cells in a file the process
#' peaked at 2.8 GB (5.8 GB without `h5_file`) and held 1.7 GB after the
#' fit.
#'
#' @param n_latent Latent dimensions; `NULL`: the teacher's (for the Harmony
#'   teacher, `n_latent` sets its number of PCs).
#' @param n_hidden Width of the hidden layers: one number for both networks,
#'   or `c(encoder, decoder)`. The encoder's default, 256, is twice
#'   scDistill's: on simulations with 12-14 types, some rare, the student's R²
#'   on held-out cells rose from 0.79 to 0.83 and the gap of its scIB total
#'   to the teacher's from -0.006...-0.020 to -0.004...+0.001 (three seeds);
#'   the decoder keeps 128, its last layer being the costly one.
#' @param n_layers Depth of the encoder and of the decoder.
#' @param dropout Dropout rate in both.
#' @param norm Normalization in the encoder's hidden layers: `"layer"`
#'   (default), `"batch"` or `"none"`. Layer norm treats each cell on its
#'   own, so a cell's Z does not depend on the other cells of its minibatch:
#'   several processes train the model one process trains (see
#'   [distributed]), and from disk no runs of cells are read for batch
#'   statistics. Mean scIB totals over four seeds, layer against batch
#'   norms: 0.872 against 0.857 on CellBench, 0.681 against 0.668 and 0.703
#'   against 0.706 on simulations with 12 types (confounded) and 14 (several
#'   rare); scDistill 0.3.1 scored 0.866, 0.681 and 0.700. Under
#'   scib-metrics the two norms were within 0.005 (`bench/RESULTS.md`).
#' @param standardize How Z* is scaled for the encoder to learn it.
#'   `"global"` (default): each dimension centred, all divided by one number
#'   (Z*'s overall root mean square); the student's Z is reported in the
#'   teacher's units, so it keeps the teacher's geometry: its distances, its
#'   clusters, the weight of its leading dimensions. `"cell"`: each cell's
#'   row standardized to mean 0 and standard deviation 1, as scDistill 0.3.1
#'   does (the encoder then ends in a LayerNorm). That map drops each cell's
#'   distance from the centre, so cell types that differ mainly by it (as
#'   Harmony's first components often separate them) merge in the student;
#'   models saved before this setting existed learned it this way.
#' @param decoder_genes `"all"` genes (default) or only the `"hvg"` the
#'   encoder reads.
#' @param input_scale_factor The encoder reads log2(count / library size ×
#'   `input_scale_factor` + 1) of its genes, library sizes over all genes:
#'   log2 CPM by default (10^6), as scDistill 0.3.1 reads; `1e4` reads the
#'   values of the teacher's PCA ([harmony_teacher()]'s default). On
#'   CellBench and two simulations with 12-14 types, three seeds each, the
#'   two gave the same label silhouette, isolated labels, iLISI, kBET and
#'   PCR comparison to within 0.005, under both scorers
#'   (`bench/RESULTS.md`). A saved model keeps its own.
#' @param max_epochs_encoder,max_epochs_decoder Epochs of each phase at most.
#' @param batch_size,lr,weight_decay Adam's minibatch size, learning rate and
#'   weight decay. The minibatch is 128 cells (scDistill uses 512): on small
#'   data sets 512 leaves a step or two per epoch, and on the 571-cell
#'   CellBench example the student then learned the teacher poorly
#'   (validation MSE 0.90 after 100 epochs, against 0.31 with 128; measured
#'   with the per-cell target, `standardize = "cell"`). For a larger
#'   minibatch, raise `lr` with [scaled_lr()].
#' @param early_stopping,patience,validation_fraction Early stopping on the
#'   held-out cells.
#' @param seed Seed: the same seed gives the same model on CPU.
#' @param device `"auto"`, `"cpu"`, `"cuda"` or `"cuda:N"`.
#' @param threads CPU threads.
#' @param progress Show progress bars.
#' @param train Training settings from [train_params()], instead of (not as
#'   well as) the arguments of the same names; its `max_epochs` sets both
#'   phases, and `kl_warmup` and `min_delta` do not apply.
#' @param workers Train on this many processes on this machine, `threads`
#'   split between them (data-parallel, see [distributed]; every process
#'   computes the teacher, and all train on the first's).
#' @param h5_file `NULL` (default: Z and Z* in memory), or an HDF5 file to
#'   write them into, as datasets `latent` and `teacher_latent` (cells ×
#'   dimensions, with the cells' names; `HDF5Array::HDF5Array(h5_file,
#'   "latent")` opens them again). The model then holds them as
#'   HDF5-backed matrices. With counts on disk, the Harmony teacher makes
#'   Z* in the file (its PCA's scores written there and corrected there; a
#'   given embedding is written there), and the student reads it back a
#'   block of cells at a time, so that neither the PCs, Z* nor Z is held in
#'   memory (see "Counts on disk"). A new file, or an HDF5 file without those datasets: nothing is
#'   overwritten. Needs the Bioconductor package HDF5Array.
#' @param ... Passed to [as_counts()] (e.g. `assay.type`).
#' @return A `scdistill_distill` model (also a `scdistill_model`), with
#'   `$latent` (the student's embedding of the training cells) and
#'   `$teacher_latent` (Z* as the teacher gave it): matrices, or with
#'   `h5_file` HDF5-backed `DelayedMatrix` objects.
#' @references Based on the scDistill approach (PyPI `scdistill` 0.3.1).
#' @examples
#' sce <- example_cellbench()
#' model <- distill(sce, batch = "batch", n_latent = 10, max_epochs_encoder = 30,
#'                  max_epochs_decoder = 30, threads = 2)
#' model
#' sce <- add_latent(sce, model)
#' integration_metrics(sce, batch = "batch", label = "cell_line",
#'                     reduction = "scDistill")[, c("ilisi", "clisi")]
#' corrected <- corrected_expression(model, sce, reference_batch = "p1")
#' dim(corrected)
#' @export
distill <- function(x, batch, teacher = harmony_teacher(), n_latent = NULL, n_hidden = c(256, 128), n_layers = 2,
                    dropout = 0.1, norm = c("layer", "batch", "none"), standardize = c("global", "cell"),
                    decoder_genes = c("all", "hvg"), input_scale_factor = 1e6,
                    max_epochs_encoder = 100, max_epochs_decoder = 100, batch_size = 128, lr = 1e-3,
                    weight_decay = 0, early_stopping = TRUE, patience = 10, validation_fraction = 0.1, seed = 1,
                    device = "auto", threads = NULL, progress = interactive(), train = NULL, workers = 1,
                    h5_file = NULL, ...) {
  h5 <- results_h5_target(h5_file, c("latent", "teacher_latent"))
  if (check_count(workers, "workers") > 1) {
    if (!is.null(h5)) stop("`h5_file` is for one process (`workers = 1`)", call. = FALSE)
    return(run_workers("distill", called_with(match.call(), parent.frame()), workers, threads))
  }
  apply_train_params(train, environment(), names(match.call())[-1], "distill",
                     map = list(max_epochs = c("max_epochs_encoder", "max_epochs_decoder")))
  if (missing(batch) || is.null(batch)) stop("`batch` is required: the batch of each cell", call. = FALSE)
  if (!inherits(teacher, "scdistill_teacher")) {
    stop("`teacher` must be harmony_teacher() or given_teacher()", call. = FALSE)
  }
  norm <- choose_arg(norm, "norm")
  standardize <- choose_arg(standardize, "standardize")
  decoder_genes <- choose_arg(decoder_genes, "decoder_genes")
  check_fraction(dropout, "dropout")
  check_fraction(validation_fraction, "validation_fraction")
  check_positive(lr, "lr")
  check_positive(weight_decay, "weight_decay", zero_ok = TRUE)
  seed <- check_seed(seed)
  progress <- check_flag(progress, "progress")
  phase <- function(epochs, arg) {
    list(max_epochs = check_count(epochs, arg), batch_size = check_count(batch_size, "batch_size", min = 2), lr = lr,
         weight_decay = weight_decay, adam_eps = 1e-8, kl_warmup = 0,
         early_stopping = check_flag(early_stopping, "early_stopping"), patience = check_count(patience, "patience"),
         min_delta = 0, validation_fraction = validation_fraction, seed = seed, bf16 = use_bf16())
  }
  t1 <- phase(max_epochs_encoder, "max_epochs_encoder")
  t2 <- phase(max_epochs_decoder, "max_epochs_decoder")
  if (!is.numeric(n_hidden) || !length(n_hidden) %in% 1:2) {
    stop("`n_hidden` must be one width or c(encoder, decoder)", call. = FALSE)
  }
  n_hidden <- vapply(rep_len(n_hidden, 2), check_count, 1L, "n_hidden")
  config <- list(n_hidden = n_hidden[1], n_hidden_decoder = n_hidden[2], n_layers = check_count(n_layers, "n_layers"),
                 dropout = dropout, norm = norm, target = standardize,
                 input_scale_factor = check_positive(input_scale_factor, "input_scale_factor"))
  if (!is.null(n_latent)) n_latent <- check_count(n_latent, "n_latent", min = 2)

  d <- as_disk(x, ...)
  if (is.null(d)) {
    cnt <- as_counts(x, batch = batch, ...)
    counts <- slots(cnt)
  } else {
    check_disk_genes(d)
    cnt <- disk_cells_table(d)
    d <- cnt$disk
    cnt$batch <- disk_batch(d, batch)
    counts <- c(disk_spec(d), list(genes = d$genes))
  }
  cells <- cell_names(cnt)
  genes <- cnt$genes %||% rownames(cnt$counts)
  distributed <- join_group(if (is.null(d)) cnt$counts else d, list(config, t1, t2, as.integer(cnt$batch)))
  if (!is.null(h5)) {
    made <- !file.exists(h5$path)
    done <- FALSE
    on.exit(if (!done) h5_forget(h5$path, c("latent", "teacher_latent"), made), add = TRUE)
  }
  # Counts on disk with `h5_file`: Harmony's Z* is made in the file (PCA
  # scores written there, corrected there), and `t$file` names it.
  t <- teacher_embedding(teacher, x, cnt, n_latent, seed, threads, progress, h5 = if (!is.null(d)) h5)
  # The teacher's PCs and their copies (cells x n_pcs each) are garbage now;
  # training allocates little in R, so R would keep them for the whole fit.
  # Pages freed by the teacher's passes go back to the system.
  if (!is.null(d)) {
    invisible(gc(verbose = FALSE))
    rs_release_memory()
  }
  # Every rank computed the teacher; all train on rank 0's.
  z <- if (distributed) rank0_values(t$z) else t$z
  z_names <- if (is.null(t$file)) colnames(z) else t$dim_names
  z_dim <- if (is.null(t$file)) ncol(z) else length(z_names)
  if (!is.null(n_latent) && z_dim != n_latent) {
    stop("the teacher embedding has ", z_dim, " dimensions but `n_latent` = ", n_latent,
         "; leave `n_latent = NULL` to use the teacher's", call. = FALSE)
  }
  input <- match(t$hvg, genes)
  output <- if (decoder_genes == "all") seq_along(genes) else input

  bar <- if (progress) distill_bar(t1$max_epochs, t2$max_epochs) else NULL
  if (!is.null(bar)) on.exit(bar$done(), add = TRUE)
  # Z* is read in place (400 MB at 10^6 cells and 50 dimensions), or from
  # its file a block at a time.
  teacher_z <- t$file
  if (is.null(teacher_z)) {
    if (!is.double(z)) storage.mode(z) <- "double"
    teacher_z <- z
    if (!is.null(h5)) {
      rust(rs_h5_cells_write(h5$path, "teacher_latent", z, ncol(z)))
      if (!is.null(d)) {
        teacher_z <- list(path = h5$path, name = "teacher_latent")
        t$z <- NULL
        rm(z)
        invisible(gc(verbose = FALSE))
        rs_release_memory()
      }
    }
  }
  fit <- rust(rs_fit_distill(counts, as.integer(cnt$batch), levels(cnt$batch), input, output, teacher_z,
                             z_dim, t$name, t$protects, t$library, config, t1, t2, check_device(device),
                             resolve_threads(threads),
                             if (!is.null(h5)) list(path = h5$path, name = "latent"),
                             bar$update))
  model <- new_model(fit$ptr, cnt$counts)
  if (!is.null(d)) model$fingerprint <- disk_fingerprint(d)
  # The batch's metadata column, where normalized_expression() finds each cell's own batch.
  model$covariates$batch <- if (is.character(batch) && length(batch) == 1 && length(cells) != 1) batch
  latent <- fit$latent
  if (is.null(h5)) {
    model$teacher_latent <- teacher_z
  } else {
    rm(teacher_z)
    model$teacher_latent <- h5_cells(h5$path, "teacher_latent", cells, z_names)
    latent <- h5_cells(h5$path, "latent", cells, paste0("latent_", seq_len(z_dim)))
    done <- TRUE
  }
  model$teacher_batch <- cnt$batch
  model$teacher <- teacher
  finish_fit(model, latent, cells)
}

# Where a fit writes its results (distill(h5_file =): Z and Z*;
# fit_vae(h5_file =): the latent space): NULL, or list(path), checked before
# anything is computed (a dataset `names` already there is an error).
results_h5_target <- function(h5_file, names) {
  h5 <- h5_target(h5_file, "latent")
  if (is.null(h5)) return(NULL)
  if (!dir.exists(dirname(h5$path))) {
    stop("`h5_file`: the folder '", dirname(h5$path), "' does not exist", call. = FALSE)
  }
  if (file.exists(h5$path)) {
    there <- rust(rs_h5_exists(h5$path, names))
    if (any(there)) {
      stop("`h5_file` '", h5_file, "' already has a dataset '", names[there][1],
           "': give another file (nothing is overwritten)", call. = FALSE)
    }
  }
  list(path = h5$path)
}

# A cells x d dataset written by the core (CellsH5), named and opened as an
# HDF5-backed matrix.
h5_cells <- function(path, name, cells, dims) {
  h5_dimnames(list(cells, dims), path, name)
  HDF5Array::HDF5Array(path, name)
}

# Z* (cells x d, rows in the order of `cnt`), the encoder's genes and a label.
# Counts on disk (`cnt` from disk_cells_table()) are read in blocks. With
# `h5` (counts on disk, distill(h5_file =)) Harmony's Z* is made in its
# dataset `teacher_latent`: the PCA's last pass writes the scores there and
# Harmony corrects them there a block at a time; `z` is then NULL and `file`
# names the dataset, `dim_names` its dimensions.
teacher_embedding <- function(teacher, x, cnt, n_latent, seed, threads, progress, h5 = NULL) {
  cells <- cell_names(cnt)
  counts <- cnt$disk %||% cnt
  if (!progress) {
    old <- options(scdistill.pass_bars = FALSE)  # the passes over a file, too
    on.exit(options(old), add = TRUE)
  }
  if (teacher$kind == "harmony") {
    n_pcs <- n_latent %||% teacher$n_pcs
    values <- pca_values(teacher)
    if (progress) cli::cli_progress_step("Teacher: PCA ({values}) of {teacher$n_hvg} highly variable genes, {n_pcs} PCs")
    lib_sizes <- NULL
    file <- NULL
    if (is.null(cnt$disk)) {
      pcs <- run_pca(counts, n_pcs = n_pcs, n_hvg = teacher$n_hvg, batch = cnt$batch, seed = seed,
                     threads = threads, method = teacher$method, scale_factor = teacher$scale_factor)
      hvg <- rownames(attr(pcs, "rotation"))
    } else {
      # As run_pca() of the file; its first pass has the library sizes the student needs.
      if (!is.null(h5)) file <- list(path = h5$path, name = "teacher_latent")
      p <- disk_pca(cnt$disk, cnt$batch, n_pcs, teacher$n_hvg, TRUE, teacher$method, teacher$scale_factor, threads,
                    file)
      pcs <- if (is.null(file)) p$scores else c(file, list(cells = cells, d = n_pcs))
      hvg <- p$hvg
      lib_sizes <- p$library
      rm(p)
    }
    if (progress) cli::cli_progress_done()
    args <- utils::modifyList(list(theta = teacher$theta, lambda = NULL, sigma = 0.1, n_clusters = NULL,
                                   max_iter = 10, max_iter_cluster = 4, epsilon_cluster = 1e-3,
                                   epsilon_harmony = 1e-2, block_size = 0.05, alpha = 0.2, tau = 0,
                                   protect_theta = 0, seed = seed, sketch = NULL), teacher$args)
    # The PCA's record, dropped from Z* below (a file's scores have none).
    pca_record <- if (is.null(file)) setdiff(names(attributes(pcs)), c("dim", "dimnames", "names"))
    # Harmony overwrites the PCs, which nothing else holds, with Z*: no
    # second cells x n_pcs matrix (2 GB at 5*10^6 cells and 50 PCs).
    z <- do.call(harmony_fit, c(list(emb = pcs, cell_data = cnt$cell_data,
                                     batch = cnt$batch, protect = teacher$protect,
                                     threads = threads, progress = progress, in_place = TRUE), args))
    rm(pcs)
    fitted <- attr(z, "harmony")$fitted_cells
    dim_names <- paste0("harmony_", seq_len(n_pcs))
    if (is.null(file)) {
      # Renamed, and the PCA's and Harmony's records dropped, in place:
      # `attr<-` or `colnames<-` on the result (still referenced from
      # harmony_fit()'s call) would wrap it, and the core would then copy
      # all of Z* to read it.
      dropped <- sapply(c(pca_record, "harmony"), function(a) NULL, simplify = FALSE)
      z <- do.call(shape_in_place, c(list(z, dimnames = list(rownames(z), dim_names)), dropped))
    } else {
      z <- NULL
    }
    sketched <- if (fitted < length(cells)) sprintf(", fitted on a sketch of %s cells", format(fitted, big.mark = ","))
    # The protected covariates (named by their columns) are kept in the
    # model's description, where differential_expression() looks for them.
    protects <- if (is.character(teacher$protect)) teacher$protect else character()
    protecting <- if (length(protects)) {
      paste0(", protecting ", paste(protects, collapse = " + "))
    } else if (length(teacher$protect)) ", protecting given covariates"
    return(list(z = z, file = file, dim_names = dim_names, hvg = hvg, library = lib_sizes, protects = protects,
                name = sprintf("harmony (theta %s) on %d PCs (%s) of %d HVGs%s%s", paste(teacher$theta, collapse = "/"),
                               n_pcs, values, teacher$n_hvg, protecting %||% "", sketched %||% "")))
  }
  emb <- teacher$embedding
  label <- "given embedding"
  if (is.character(emb)) {
    if (!is(x, "SingleCellExperiment") && !is(x, "Seurat")) {
      stop("given_teacher('", emb, "') names a reduction, but `x` is not a SingleCellExperiment or Seurat object; ",
           "pass the matrix itself", call. = FALSE)
    }
    label <- paste0("given embedding '", emb, "'")
    emb <- reduction_input(x, emb)$embedding
  }
  emb <- as.matrix(emb)
  if (nrow(emb) != length(cells)) {
    stop("the teacher embedding has ", nrow(emb), " rows but `x` has ", length(cells), " cells", call. = FALSE)
  }
  if (!is.null(rownames(emb))) {
    if (!setequal(rownames(emb), cells)) stop("the teacher embedding's row names are not the cells of `x`", call. = FALSE)
    emb <- emb[cells, , drop = FALSE]
  }
  if (anyNA(emb)) stop("the teacher embedding has ", sum(is.na(emb)), " missing value(s)", call. = FALSE)
  if (ncol(emb) < 2) stop("the teacher embedding needs at least 2 dimensions", call. = FALSE)
  if (!is.null(n_latent) && n_latent != ncol(emb)) {
    stop("the given embedding has ", ncol(emb), " dimensions but `n_latent` = ", n_latent, call. = FALSE)
  }
  h <- highly_variable_genes(counts, n_hvg = teacher$n_hvg, batch = cnt$batch, threads = threads)
  list(z = emb, hvg = rownames(h)[h$highly_variable], name = label)
}

distill_bar <- function(e1, e2) two_phase_bar("Student", "encoder", e1, e2)

# A progress bar over two training phases of e1 and e2 epochs (the first
# named `first`), with the training loss and, where there is one, the
# validation loss.
two_phase_bar <- function(title, first, e1, e2, validation = TRUE) {
  state <- new.env()
  state$phase <- first
  state$loss <- NA_real_
  state$val <- NA_real_
  state$epoch <- 0
  id <- cli::cli_progress_bar(
    total = e1 + e2, clear = FALSE, .envir = state,
    format = paste(title, "{cli::pb_bar} {phase} epoch {epoch} | loss {format(loss, digits = 5)}",
                   if (validation) "| validation {format(val, digits = 5)}", "| {cli::pb_elapsed}"))
  list(update = function(phase, epoch, loss, val) {
         if (phase %in% names(pass_labels)) return(pass_progress(state, phase, epoch, loss))
         state$phase <- phase
         state$epoch <- epoch
         state$loss <- loss
         state$val <- val
         cli::cli_progress_update(id = id, set = if (phase == first) epoch else e1 + epoch, .envir = state)
       },
       done = function() {
         if (!is.null(state$pass)) cli::cli_progress_done(id = state$pass$id, .envir = state$pass)
         cli::cli_progress_done(id = id, .envir = state)
       })
}

#' The teacher's embedding of a distilled model
#'
#' Z* as the teacher gave it (before the standardization the student is
#' trained on), for the training cells: compare it with the student's
#' [latent()], in the same units unless `distill(standardize = "cell")`.
#'
#' @param model A model from [distill()].
#' @return A cells × dimensions matrix.
#' @examples
#' sce <- example_cellbench()
#' model <- distill(sce, batch = "batch", n_latent = 10, max_epochs_encoder = 10,
#'                  max_epochs_decoder = 5, threads = 2)
#' dim(teacher_latent(model))
#' @export
teacher_latent <- function(model) {
  check_distill(model)
  if (is.null(model$teacher_latent)) {
    stop("this model carries no teacher embedding (models read with load_model() keep only the student)", call. = FALSE)
  }
  model$teacher_latent
}

#' Batch-corrected expression from a distilled model
#'
#' Encodes every cell of `x` and decodes it as if it had been measured in
#' `reference_batch` (averaged over the batches when several are given):
#' expression with the batch effect removed, for every decoder gene.
#'
#' @param model A model from [distill()].
#' @param x Counts of the cells (usually the training data; new cells work
#'   too, genes matched by name).
#' @param reference_batch One or more batch levels of the training data;
#'   `NULL`: the first level. The same as [normalized_expression()]'s
#'   `transform_batch` (this function calls it, then takes log2 CPM); only
#'   the default differs: `transform_batch = NULL` decodes each cell in its
#'   own batch, which corrects nothing.
#' @param type `"log2cpm"`: log2(ρ · 10^6 + 1), the scale of the encoder's
#'   input; `"scale"`: the proportions ρ (columns sum to 1).
#' @param threads CPU threads.
#' @param ... Passed to [as_counts()].
#' @return A genes × cells matrix.
#' @examples
#' sce <- example_cellbench()
#' model <- distill(sce, batch = "batch", n_latent = 10, max_epochs_encoder = 10,
#'                  max_epochs_decoder = 10, threads = 2)
#' SummarizedExperiment::assay(sce, "corrected") <- corrected_expression(model, sce, "p1")
#' @export
corrected_expression <- function(model, x, reference_batch = NULL, type = c("log2cpm", "scale"), threads = NULL, ...) {
  check_distill(model)
  type <- choose_arg(type, "type")
  reference_batch <- as.character(reference_batch %||% model$info$batch_levels[1])
  out <- normalized_expression(model, x, transform_batch = reference_batch, threads = threads, ...)
  if (type == "log2cpm") out <- log2(out * 1e6 + 1)
  out
}

check_distill <- function(model) {
  if (!inherits(model, "scdistill_distill")) {
    stop("`model` must be a distilled model (from distill()), not ",
         if (inherits(model, "scdistill_model")) "a VAE" else class(model)[1], call. = FALSE)
  }
}

#' @method print scdistill_distill
#' @export
print.scdistill_distill <- function(x, ...) {
  i <- x$info
  c <- i$config
  width <- unique(c(c$n_hidden, c$n_hidden_decoder %||% c$n_hidden))
  cat(sprintf("scdistill distilled model: %s input genes (%s) -> %d latent dimensions -> %s genes (%d x %s hidden)\n",
              fmt_int(length(i$input_genes)), log_values(c$input_scale_factor %||% 1e6), c$n_latent,
              fmt_int(length(i$genes)), c$n_layers, paste(width, collapse = "/")))
  cat(sprintf("  teacher: %s\n", i$teacher))
  cat(sprintf("  trained on %s cells, %d batches\n", fmt_int(i$n_cells), length(i$batch_levels)))
  print_query_batches(i)
  for (p in c("encoder", "decoder")) {
    h <- i[[paste0("history_", p)]]
    best <- i[[paste0("best_epoch_", p)]]
    if (length(h$epoch)) {
      cat(sprintf("  %s: %d epochs, kept epoch %d, validation %s %.4g; %.1f s\n", p, length(h$epoch), best,
                  if (p == "encoder") "MSE" else "NLL per cell", h$validation_elbo[max(best, 1)], sum(h$seconds)))
    }
  }
  invisible(x)
}

#' How well a distilled student reproduces its teacher
#'
#' The architecture and training of a [distill()] model, and how close the
#' student's embedding is to its teacher's on the training cells: R² of the
#' student's Z on the teacher's Z* (over all cells and over the held-out
#' validation cells), and, given the cells' types, [integration_metrics()]
#' of both embeddings side by side with their differences. A student whose
#' scores fall clearly below its teacher's has not learned it: more epochs,
#' a wider network (`n_hidden`) or less `dropout` may help. The k-means
#' ARI/NMI move with k-means' random starts (two nearly identical embeddings
#' can differ by 0.1); compare the Leiden and neighbourhood scores first.
#'
#' @param object A model from [distill()].
#' @param label Optional: the cell type of each training cell (a vector in
#'   the training cells' order, or the name of a column of the cell metadata
#'   of `x`); adds the integration metrics, which take seconds to minutes on
#'   large data.
#' @param x The training data, when `label` is a column name.
#' @param threads CPU threads for the metrics.
#' @param ... Unused.
#' @return A `summary.scdistill_distill` (printed): `r2` (all and validation
#'   cells), `metrics` (student, teacher and student − teacher, or `NULL`)
#'   and the model's description.
#' @examples
#' sce <- example_cellbench()
#' model <- distill(sce, batch = "batch", n_latent = 10, max_epochs_encoder = 30,
#'                  max_epochs_decoder = 5, threads = 2)
#' summary(model, label = sce$cell_line)
#' @method summary scdistill_distill
#' @export
summary.scdistill_distill <- function(object, label = NULL, x = NULL, threads = NULL, ...) {
  z_star <- object$teacher_latent
  if (is.null(z_star)) {
    stop("this model carries no teacher embedding (models read with load_model() keep only the student), ",
         "so the student cannot be compared with it", call. = FALSE)
  }
  z <- object$latent
  per_cell <- identical(object$info$config$target, "cell")
  # Sums over blocks of cells, each block read once (Z and Z* may be on
  # disk, see distill(h5_file =)); whole-matrix temporaries were 1.6 GB at
  # 10^6 cells. SS_tot = sum(x^2) - sum(x)^2 / n per dimension.
  r2 <- function(rows) {
    res <- 0
    s1 <- s2 <- numeric(ncol(z))
    for (b in split(rows, ceiling(seq_along(rows) / 65536))) {
      zs <- as.matrix(z_star[b, , drop = FALSE])
      if (per_cell) {
        # Each row standardized as the student's target was.
        zs <- zs - rowMeans(zs)
        zs <- zs / (sqrt(rowMeans(zs^2)) + 1e-5)
      }
      res <- res + sum((as.matrix(z[b, , drop = FALSE]) - zs)^2)
      s1 <- s1 + colSums(zs)
      s2 <- s2 + colSums(zs^2)
    }
    1 - res / sum(s2 - s1^2 / length(rows))
  }
  val <- object$validation_cells
  out <- list(model = object, r2 = c(all = r2(seq_len(nrow(z))), validation = if (length(val) > 1) r2(val) else NA),
              metrics = NULL)
  if (!is.null(label)) {
    if (is.character(label) && length(label) == 1 && nrow(z) != 1) {
      if (is.null(x)) stop("`label` names a column; pass the training data as `x` too", call. = FALSE)
      d <- as_disk(x)
      cnt <- if (is.null(d)) as_counts(x) else disk_cells_table(d)  # only the cell metadata of a file
      label <- as.character(resolve_cell_factor(label, cnt$cell_data, cell_names(cnt), "label"))
    }
    if (length(label) != nrow(z)) {
      stop("`label` has ", length(label), " values for the model's ", nrow(z), " training cells", call. = FALSE)
    }
    if (is.null(object$teacher_batch)) {
      stop("this model does not carry its training cells' batches (fitted by an older version); ",
           "call integration_metrics() on latent(model) and teacher_latent(model)", call. = FALSE)
    }
    m <- integration_metrics(list(student = as.matrix(z), teacher = as.matrix(object$teacher_latent)),
                             batch = object$teacher_batch,
                             label = label, threads = threads)
    m <- as.data.frame(m)
    out$metrics <- rbind(m, `student - teacher` = m["student", ] - m["teacher", ])
  }
  class(out) <- "summary.scdistill_distill"
  out
}

#' @method print summary.scdistill_distill
#' @export
print.summary.scdistill_distill <- function(x, ...) {
  print(x$model)
  cat("\nArchitecture:\n")
  print(unlist(x$model$info$config), quote = FALSE)
  cat(sprintf("\nStudent against teacher: R\u00b2 %.3f on all cells, %.3f on the validation cells\n",
              x$r2[["all"]], x$r2[["validation"]]))
  if (!is.null(x$metrics)) {
    keep <- intersect(c("total", "bio_conservation", "batch_correction", "ari_kmeans", "nmi_kmeans", "ari_leiden",
                        "nmi_leiden", "isolated_labels", "silhouette_label", "clisi", "ilisi", "kbet",
                        "graph_connectivity"), colnames(x$metrics))
    print(round(t(x$metrics[, keep]), 3))
  } else {
    cat("(give `label` for the integration metrics of both)\n")
  }
  invisible(x)
}

#' @method plot scdistill_distill
#' @export
plot.scdistill_distill <- function(x, ...) {
  i <- x$info
  old <- graphics::par(mfrow = c(1, 2), mar = c(4.5, 4.5, 2.5, 1))
  on.exit(graphics::par(old))
  for (p in c("encoder", "decoder")) {
    h <- i[[paste0("history_", p)]]
    if (!length(h$epoch)) next
    ylim <- range(c(h$train_loss, h$validation_elbo), finite = TRUE)
    graphics::plot(h$epoch, h$train_loss, type = "l", col = "#1b6ca8", lwd = 2, ylim = ylim, xlab = "epoch",
                   ylab = if (p == "encoder") "MSE to the teacher" else "NB negative log-likelihood per cell",
                   main = if (p == "encoder") "Phase 1: encoder" else "Phase 2: decoder", ...)
    graphics::lines(h$epoch, h$validation_elbo, col = "#d1495b", lwd = 2)
    graphics::abline(v = i[[paste0("best_epoch_", p)]], lty = 3, col = "grey40")
    graphics::legend("topright", c("training", "validation", "kept epoch"), col = c("#1b6ca8", "#d1495b", "grey40"),
                     lty = c(1, 1, 3), lwd = c(2, 2, 1), bty = "n", cex = 0.85)
  }
  invisible(x)
}
