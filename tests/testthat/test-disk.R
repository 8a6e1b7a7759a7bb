# Counts on disk: h5_counts(), simulate_counts(file =), fit_vae() and
# latent() streaming from HDF5 files.

skip_if_not_installed("rhdf5")

sim_file <- function(n_cells = 1500, n_genes = 120, seed = 2, ...) {
  f <- tempfile(fileext = ".h5ad")
  list(file = f, sim = simulate_counts(n_cells = n_cells, n_genes = n_genes, seed = seed, file = f, ...))
}

test_that("simulate_counts(file =) writes the cells simulate_counts() draws, as an .h5ad file", {
  s <- sim_file(n_cells = 400, n_genes = 50, treated_fraction = 0.5)
  mem <- simulate_counts(n_cells = 400, n_genes = 50, seed = 2, treated_fraction = 0.5, format = "list")
  h <- s$sim$counts
  expect_s3_class(h, "scdistill_h5")
  expect_equal(dim(h), c(50, 400))
  expect_equal(h$genes, rownames(mem$counts))
  expect_equal(h$cells, colnames(mem$counts))
  expect_setequal(h$cell_columns, c("cell_type", "batch", "condition", "sample"))
  # X as AnnData stores it: CSR of cells x genes.
  csr <- mem$counts  # genes x cells CSC = cells x genes CSR
  expect_equal(as.numeric(rhdf5::h5read(s$file, "X/indptr")), as.numeric(csr@p))
  expect_equal(as.integer(rhdf5::h5read(s$file, "X/indices")), csr@i)
  expect_equal(as.numeric(rhdf5::h5read(s$file, "X/data")), csr@x)
  expect_equal(scdistill:::h5ad_column(s$file, "batch"), mem$cell_data$batch)
  expect_equal(s$sim$cell_data$cell_type, mem$cell_data$cell_type)
  expect_output(print(h), "50 genes x 400 cells on disk")
  expect_error(simulate_counts(n_cells = 100, file = tempfile(fileext = ".h5ad"), atac = TRUE),
               "with `atac`, `file` must be two file names")
  expect_error(simulate_counts(n_cells = 100, file = tempfile(fileext = ".h5ad"), ambient = TRUE), "cannot be combined")
})

test_that("simulate_counts(atac = TRUE, file =) writes the paired files fit_multimodal() trains on", {
  f <- c(ATAC = tempfile(fileext = ".h5ad"), RNA = tempfile(fileext = ".h5ad"))
  args <- list(n_cells = 300, n_genes = 40, n_groups = 3, atac = TRUE, n_peaks = 120, seed = 5)
  s <- do.call(simulate_counts, c(args, list(file = f)))
  mem <- do.call(simulate_counts, c(args, list(format = "list")))
  expect_s3_class(s$atac, "scdistill_h5")
  expect_equal(dim(s$atac), c(120, 300))
  expect_equal(s$atac$path, f[["ATAC"]])
  expect_equal(s$counts$path, f[["RNA"]])
  expect_equal(as_counts(s$counts)$counts, mem$counts)
  expect_equal(as_counts(s$atac)$counts, mem$atac)
  expect_equal(s$peak_data, mem$peak_data)
  expect_equal(s$cell_data[c("cell_type", "batch")], mem$cell_data[c("cell_type", "batch")])
  expect_equal(scdistill:::h5ad_column(f[["ATAC"]], "cell_type"), mem$cell_data$cell_type)
  m <- fit_multimodal(list(RNA = s$counts, ATAC = s$atac), batch = "batch", max_epochs = 2, seed = 1, threads = 2)
  expect_equal(rownames(latent(m)), colnames(mem$counts))
  expect_error(do.call(simulate_counts, c(args, list(file = f[1]))), "two file names, c\\(RNA = , ATAC = \\)")
  expect_error(do.call(simulate_counts, c(args, list(file = c(RNA = f[[1]], ADT = f[[2]])))), "named RNA and ATAC")
  expect_error(do.call(simulate_counts, c(args, list(file = c(f[[1]], f[[1]])))), "the same file")
})

test_that("fit_vae() trains from a file as from memory, reproducibly, and latent() reads new cells from disk", {
  s <- sim_file()
  # 30 epochs: at 15 the latent spaces are still forming (Leiden NMI about
  # 0.65, moving by 0.03-0.05 with the precision of training), too early to
  # compare cell-type separation; at 30 both reach about 0.85-0.89.
  fit <- function(x) fit_vae(x, batch = "batch", max_epochs = 30, threads = 2, seed = 3)
  disk <- fit(s$file)
  expect_s3_class(disk, "scdistill_vae")
  expect_equal(disk$info$n_cells, 1500)
  z <- latent(disk)
  expect_equal(dim(z), c(1500, 10))
  expect_equal(rownames(z), s$sim$counts$cells)
  # The latent space read again from the file, and from the same counts in memory.
  expect_equal(latent(disk, s$file), z)
  mem <- simulate_counts(n_cells = 1500, n_genes = 120, seed = 2)
  expect_equal(latent(disk, mem), z, tolerance = 1e-5)
  # Validation cells are whole blocks of consecutive cells (16 at this size).
  v <- disk$validation_cells
  expect_true(length(v) >= 150 && all(((v - 1) %/% 16 * 16 + 1) %in% v))
  # Same seed, same model.
  expect_equal(latent(fit(s$file)), z)
  # As good as training in memory: the -ELBO of all cells within 2%.
  in_memory <- fit(mem)
  e_disk <- elbo(disk, mem, seed = 1)
  e_mem <- elbo(in_memory, mem, seed = 1)
  expect_lt(abs(e_disk - e_mem) / e_mem, 0.02)
  # Cell types separate as well in the streamed model's latent space.
  score <- function(z) integration_metrics(z, batch = mem$batch, label = mem$cell_type, threads = 2)$nmi_leiden
  expect_gt(score(z), score(latent(in_memory)) - 0.05)
  # add_latent() on an experiment whose counts are an HDF5-backed DelayedMatrix.
  skip_if_not_installed("HDF5Array")
  h5 <- tempfile(fileext = ".h5")
  counts <- HDF5Array::writeHDF5Array(as.matrix(SingleCellExperiment::counts(mem)), h5, "counts", with.dimnames = TRUE)
  sce <- SingleCellExperiment::SingleCellExperiment(list(counts = counts), colData = SummarizedExperiment::colData(mem))
  expect_equal(SingleCellExperiment::reducedDim(add_latent(sce, disk), "scVI"), z, tolerance = 1e-5,
               ignore_attr = TRUE)
  from_delayed <- fit_vae(sce, batch = "batch", max_epochs = 3, threads = 2)
  expect_equal(from_delayed$info$n_cells, 1500)
  # Genes subset from the experiment: streamed on those genes only.
  genes <- rownames(mem)[c(40, 3, 77, 10:30)]
  sub <- fit_vae(sce[genes, ], batch = "batch", max_epochs = 3, threads = 2)
  expect_equal(sub$info$genes, genes)
  expect_equal(latent(sub, sce[genes, ]), latent(sub, mem[genes, ]), tolerance = 1e-5)
})

test_that("bad files and bad cell columns are errors that name them", {
  s <- sim_file(n_cells = 200, n_genes = 30)
  expect_error(h5_counts(file.path(tempdir(), "none.h5ad")), "does not exist")
  txt <- tempfile(fileext = ".h5ad")
  writeLines("not hdf5", txt)
  expect_error(h5_counts(txt), "not an HDF5 file")
  expect_error(fit_vae(s$file, batch = "donor", max_epochs = 2), "\"donor\" is not a cell column.*cell_type, batch")
  expect_error(fit_vae(s$file, batch = rep("a", 3), max_epochs = 2), "has 3 values but the file has 200 cells")
  expect_error(h5_counts(s$file, layer = "counts"), "has no 'layers/counts'")
  bad <- tempfile(fileext = ".h5ad")
  file.copy(s$file, bad)
  # In another R process: rhdf5::h5write() can leave HDF5's library lock
  # held by the calling thread (seen under testthat's condition handlers),
  # which would block this process's own reads on other threads.
  edit <- sprintf('x <- rhdf5::h5read("%s", "X/data"); x[7] <- 2.5; rhdf5::h5write(x, "%s", "X/data")', bad, bad)
  expect_equal(system2(file.path(R.home("bin"), "Rscript"), c("-e", shQuote(edit))), 0)
  expect_error(fit_vae(bad, max_epochs = 2), "non-integer value")
  model <- fit_vae(s$file, max_epochs = 2, threads = 2)
  other <- sim_file(n_cells = 50, n_genes = 20, seed = 5)
  expect_error(latent(model, other$file), "missing from the new data")
})

test_that("the passes over a file before and after training show their own progress bars", {
  s <- sim_file(n_cells = 40000, n_genes = 40, seed = 6)
  old <- options(cli.progress_show_after = 0, cli.dynamic = FALSE, cli.progress_handlers_only = "logger")
  on.exit(options(old), add = TRUE)
  # cli's logger prints one line per event of each bar.
  log <- capture.output(model <- fit_vae(s$file, max_epochs = 1, threads = 2, progress = TRUE))
  # Reading the counts, then encoding the cells: each bar counts cells to
  # all 40,000 and ends, the second after the first; the epoch bar is
  # created before both and ends before the second.
  bars <- sub("^\\S+ (cli-[0-9]+-[0-9]+) .*", "\\1", log)
  passes <- bars[grepl("0/40000 created", log)]
  expect_length(passes, 2)
  ends <- vapply(passes, function(p) which(grepl(paste(p, "40000/40000 terminated"), log, fixed = TRUE))[1], 1L)
  expect_false(anyNA(ends))
  expect_lt(ends[1], which(grepl("0/40000 created", log))[2])
  epochs <- setdiff(unique(bars), passes)
  expect_length(epochs, 1)
  expect_lt(which(grepl(paste(epochs, "1/1 terminated"), log, fixed = TRUE))[1], ends[2])
  expect_match(log[length(log)], paste(passes[2], "40000/40000 terminated"), fixed = TRUE)
  # latent() of the file shows the encoding pass too.
  log <- capture.output(z <- latent(model, s$file))
  expect_true(any(grepl("0/40000 created", log)) && any(grepl("40000/40000 terminated", log)))
  expect_equal(z, latent(model), tolerance = 1e-6)
})

test_that("write_h5ad() writes counts that stream back to the same latent space", {
  sce <- simulate_counts(n_cells = 600, n_genes = 80, seed = 4)
  f <- write_h5ad(sce, tempfile(fileext = ".h5ad"))
  h <- h5_counts(f)
  expect_equal(h$genes, rownames(sce))
  expect_equal(h$cells, colnames(sce))
  expect_setequal(h$cell_columns, c("cell_type", "batch"))
  expect_equal(scdistill:::h5ad_column(f, "cell_type"), sce$cell_type)
  model <- fit_vae(sce, batch = "batch", max_epochs = 3, threads = 2)
  expect_equal(latent(model, f), latent(model, sce), tolerance = 1e-6)
  expect_error(write_h5ad(sce, tempfile(fileext = ".h5ad"), columns = "donor"), "'donor' is not a cell metadata")
  expect_error(write_h5ad(sce, file.path(tempdir(), "no", "such", "x.h5ad")), "does not exist")
})

test_that("latent() of a file under a distilled model reads it in blocks, as in memory", {
  sce <- run_pca(simulate_counts(n_cells = 700, n_genes = 120, seed = 3), n_pcs = 6, batch = "batch", threads = 2)
  f <- write_h5ad(sce, tempfile(fileext = ".h5ad"))
  m <- distill(sce, batch = "batch", teacher = given_teacher("PCA", n_hvg = 100), max_epochs_encoder = 3,
               max_epochs_decoder = 1, threads = 2, progress = FALSE)
  old <- options(scdistill.disk_block = 250L)  # three blocks
  on.exit(options(old), add = TRUE)
  z <- latent(m, f, threads = 2)
  expect_equal(z, latent(m, sce, threads = 2), tolerance = 1e-6)
  expect_equal(rownames(z), colnames(sce))
})

test_that("elbo() of a file reads it in blocks and agrees with the same cells in memory", {
  s <- sim_file(n_cells = 900, n_genes = 80, seed = 8)
  mem <- as_counts(s$file)
  model <- fit_vae(mem, batch = "batch", max_epochs = 5, threads = 2, progress = FALSE)
  old <- options(scdistill.disk_block = 400L)  # blocks of 400, 400 and 100 cells
  on.exit(options(old), add = TRUE)
  on_disk <- elbo(model, s$file, threads = 2)
  # Each block draws its own z: the same value up to their Monte Carlo error.
  expect_equal(on_disk, elbo(model, mem, threads = 2), tolerance = 2e-3)
  # The weighted mean of the blocks' means, exactly, block k drawing from
  # seed + k - 1 (the same draws in every block would be one draw reused).
  blocks <- list(1:400, 401:800, 801:900)
  parts <- vapply(seq_along(blocks), function(k) {
    elbo(model, as_counts(h5_counts(s$file), cells = blocks[[k]]), seed = k - 1, threads = 2)
  }, 1)
  expect_equal(on_disk, sum(parts * lengths(blocks)) / 900)
  same_seed <- vapply(blocks, function(b) elbo(model, as_counts(h5_counts(s$file), cells = b), threads = 2), 1)
  expect_false(isTRUE(all.equal(on_disk, sum(same_seed * lengths(blocks)) / 900, tolerance = 1e-9)))
  expect_equal(reconstruction_error(model, s$file, threads = 2) < on_disk, TRUE)
})

test_that("normalized_expression() and sample_counts() of a file read it in blocks and agree with memory", {
  s <- sim_file(n_cells = 700, n_genes = 60, seed = 11)
  mem <- as_counts(s$file)
  model <- fit_vae(mem, batch = "batch", max_epochs = 3, threads = 2, progress = FALSE)
  old <- options(scdistill.disk_block = 300L)  # blocks of 300, 300 and 100 cells
  on.exit(options(old), add = TRUE)
  rho <- normalized_expression(model, s$file, threads = 2)
  expect_equal(dim(rho), c(60, 700))
  expect_equal(rho, normalized_expression(model, mem, threads = 2), tolerance = 1e-6)
  # A subset of genes: the same rows, by name or position, from disk or memory.
  some <- rownames(rho)[c(5, 2, 40)]
  expect_equal(normalized_expression(model, s$file, genes = some, threads = 2), rho[some, ])
  expect_equal(normalized_expression(model, mem, genes = c(5, 2, 40), threads = 2), rho[some, ], tolerance = 1e-6)
  expect_error(normalized_expression(model, mem, genes = c(some, "nope", "none")),
               "`genes`: 2 not among the model's 60 genes \\(first: 'nope'\\)")
  expect_error(normalized_expression(model, mem, genes = 61), "positions must be 1 to 60; got 61")
  to <- model$info$batch_levels[2]
  expect_equal(normalized_expression(model, s$file, transform_batch = to, log1p = TRUE, threads = 2),
               normalized_expression(model, mem, transform_batch = to, log1p = TRUE, threads = 2), tolerance = 1e-6)
  # Block k draws from seed + k - 1: the second block is the draw of its cells alone under seed + 1.
  draws <- sample_counts(model, s$file, seed = 4, threads = 2)
  expect_s4_class(draws, "dgCMatrix")
  expect_equal(dimnames(draws), dimnames(rho))
  block2 <- as_counts(h5_counts(s$file), cells = 301:600)
  expect_equal(draws[, 301:600], sample_counts(model, block2, seed = 5, threads = 2))
  expect_false(identical(draws[, 301:600], sample_counts(model, block2, seed = 4, threads = 2)))
  two <- sample_counts(model, s$file, n_samples = 2, seed = 4, threads = 2)
  expect_length(two, 2)
  expect_equal(two[[1]][, 601:700], sample_counts(model, as_counts(h5_counts(s$file), cells = 601:700),
                                                  n_samples = 2, seed = 6, threads = 2)[[1]])
  # Written to .h5ad files as they are drawn (one per draw): the same draws,
  # read back from disk.
  f <- tempfile(fileext = c(".a.h5ad", ".b.h5ad"))
  on.exit(unlink(f), add = TRUE)
  files <- sample_counts(model, s$file, n_samples = 2, seed = 4, h5ad_file = f, threads = 2)
  expect_length(files, 2)
  expect_equal(as_counts(files[[1]])$counts, two[[1]])
  expect_equal(as_counts(files[[2]])$counts, two[[2]])
  g <- tempfile(fileext = ".h5ad")
  on.exit(unlink(g), add = TRUE)
  one <- sample_counts(model, mem, seed = 3, h5ad_file = g, threads = 2)
  expect_equal(as_counts(one)$counts, sample_counts(model, mem, seed = 3, threads = 2))
  # Errors that name the problem; nothing overwritten, nothing half-written left.
  expect_error(sample_counts(model, mem, h5ad_file = g), "exists; remove it or choose another name")
  expect_error(sample_counts(model, mem, n_samples = 2, h5ad_file = tempfile()), "one file per draw: 2")
  expect_error(sample_counts(model, mem, h5ad_file = file.path(tempfile(), "x.h5ad")), "folder .* does not exist")
  h <- tempfile(fileext = ".h5ad")
  expect_error(sample_counts(model, s$file, batch = "nope", h5ad_file = h, threads = 2), "nope")
  expect_false(file.exists(h))
  # A dense result larger than the option allows is refused before any reading.
  small <- options(scdistill.max_dense_gb = 1e-4)
  expect_error(normalized_expression(model, s$file), "dense 60 x 700 matrix \\(0\\.0 GB")
  options(small)
})

test_that("normalized_expression(h5_file =) writes the result block by block and returns it on disk", {
  skip_if_not_installed("HDF5Array")
  s <- sim_file(n_cells = 700, n_genes = 60, seed = 11)
  mem <- as_counts(s$file)
  model <- fit_vae(mem, batch = "batch", max_epochs = 2, threads = 2, progress = FALSE)
  old <- options(scdistill.disk_block = 300L, scdistill.max_dense_gb = 1e-4)  # 3 blocks; memory refused
  on.exit(options(old), add = TRUE)
  out <- tempfile(fileext = ".h5")
  to <- model$info$batch_levels[2]
  some <- c(7, 3, 50)
  d <- normalized_expression(model, s$file, transform_batch = to, log1p = TRUE, genes = some, threads = 2,
                             h5_file = out)
  expect_s4_class(d, "DelayedMatrix")
  expect_equal(HDF5Array::path(d), normalizePath(out))
  options(scdistill.max_dense_gb = 16)
  want <- normalized_expression(model, mem, transform_batch = to, log1p = TRUE, genes = some, threads = 2)
  # Stored as 4-byte floats, the model's own precision; names kept in the file.
  expect_equal(as.matrix(d), want, tolerance = 1e-6)
  again <- HDF5Array::HDF5Array(out, "normalized")
  expect_equal(dimnames(again), dimnames(want))
  expect_equal(as.matrix(again), as.matrix(d))
  # One more dataset joins the file; an existing one is never overwritten.
  whole <- normalized_expression(model, mem, threads = 2, h5_file = out, h5_name = "all")
  expect_equal(as.matrix(whole), normalized_expression(model, mem, threads = 2), tolerance = 1e-6)
  expect_error(normalized_expression(model, mem, threads = 2, h5_file = out),
               "already has a dataset 'normalized'.*nothing was overwritten")
  expect_equal(as.matrix(HDF5Array::HDF5Array(out, "normalized")), as.matrix(d))
  expect_error(normalized_expression(model, mem, h5_file = out, h5_name = "a/b"), "`h5_name` must be one dataset name")
  expect_error(normalized_expression(model, mem, h5_file = c("a", "b")), "`h5_file` must be one file path")
  # An unfinished result is taken out of a file the user had; the file stays.
  sink <- scdistill:::h5_sink(list(path = out, name = "part"), 3, 10)
  sink$write(matrix(1, 3, 4), 1)
  sink$abandon()
  expect_false("part" %in% rhdf5::h5ls(out)$name)
  expect_equal(as.matrix(HDF5Array::HDF5Array(out, "normalized")), as.matrix(d))
  # A failed call leaves no file behind it made.
  gone <- tempfile(fileext = ".h5")
  expect_error(normalized_expression(model, s$file, batch = "nope", h5_file = gone), "nope")
  expect_false(file.exists(gone))
})

test_that("DE reads an experiment whose counts are an HDF5-backed DelayedMatrix", {
  skip_if_not_installed("HDF5Array")
  sce <- simulate_counts(n_cells = 800, n_genes = 100, seed = 9)
  model <- fit_vae(sce, batch = "batch", max_epochs = 5, threads = 2, progress = FALSE)
  dir <- tempfile()
  on_disk <- HDF5Array::saveHDF5SummarizedExperiment(sce, dir)
  expect_false(is.null(scdistill:::as_disk(on_disk)))
  de <- function(x) differential_expression(model, x, "cell_type", "Group1", "Group2", n_samples = 1000, threads = 2)
  expect_equal(as.data.frame(de(on_disk)), as.data.frame(de(sce)))
})

test_that("as_counts() reads a file, or some of its cells, into memory", {
  sce <- simulate_counts(n_cells = 300, n_genes = 40, seed = 6)
  f <- write_h5ad(sce, tempfile(fileext = ".h5ad"))
  all <- as_counts(f, batch = "batch")
  expect_equal(all$counts, SingleCellExperiment::counts(sce), ignore_attr = TRUE)
  expect_equal(dimnames(all$counts), dimnames(sce))
  expect_equal(all$batch, sce$batch)
  some <- as_counts(h5_counts(f), cells = c(5, 1, 300))
  expect_equal(as.matrix(some$counts), as.matrix(SingleCellExperiment::counts(sce)[, c(5, 1, 300)]))
  expect_equal(as_counts(h5_counts(f), cells = colnames(sce)[c(5, 1)])$cell_data$cell_type, sce$cell_type[c(5, 1)])
  expect_error(as_counts(h5_counts(f), cells = 301), "not in")
})

test_that("differential_expression() of counts on disk gives the table of the same cells in memory", {
  s <- sim_file(n_cells = 1600, n_genes = 100, seed = 4, treated_fraction = 0.5)
  mem <- as_counts(s$file)
  model <- fit_vae(mem, batch = "batch", max_epochs = 15, threads = 2, seed = 1, progress = FALSE)
  de <- function(x, ...) {
    suppressMessages(suppressWarnings(differential_expression(model, x, "condition", "treated", "control", threads = 2, ...)))
  }
  # The groups, samples and batches come from the file's obs columns; the
  # cells are read a chunk at a time.
  for (args in list(list(method = "change", n_samples = 2000), list(method = "mc_dropout", n_samples = 5),
                    list(method = "samples", sample_key = "sample"))) {
    on_disk <- do.call(de, c(list(s$file), args))
    in_memory <- do.call(de, c(list(mem), args))
    expect_equal(as.data.frame(on_disk), as.data.frame(in_memory), info = args$method)
    expect_equal(attr(on_disk, "params")$n_cells1, sum(mem$cell_data$condition == "treated"))
  }
  expect_gt(sum(on_disk$is_de), 0)
  # A progress bar counts the cells through the model: 2 x 2,000 draws.
  old <- options(cli.progress_show_after = 0, cli.dynamic = FALSE, cli.progress_handlers_only = "logger")
  log <- capture.output(de(s$file, method = "change", n_samples = 2000))
  options(old)
  expect_true(any(grepl("0/4000 created", log)) && any(grepl("4000/4000 terminated", log)))
  # Pseudobulk sums blocks of cells read in turn (here of 300 cells).
  old <- options(scdistill.disk_block = 300L)
  on.exit(options(old), add = TRUE)
  for (on in c("counts", "corrected")) {
    on_disk <- de(h5_counts(s$file), method = "pseudobulk", sample_key = "sample", on = on)
    in_memory <- de(mem, method = "pseudobulk", sample_key = "sample", on = on)
    expect_equal(attr(on_disk, "pseudobulk"), attr(in_memory, "pseudobulk"), info = on)
    expect_equal(as.data.frame(on_disk), as.data.frame(in_memory), info = on)
  }
  expect_error(de(s$file, method = "samples", sample_key = "donor"), "'donor' is not a column")
})

test_that("highly_variable_genes() and run_pca() of a file read it in blocks and agree with memory", {
  s <- sim_file(n_cells = 1200, n_genes = 150, seed = 11)
  mem <- as_counts(s$file)
  expect_equal(highly_variable_genes(s$file, n_hvg = 80, batch = "batch", threads = 2),
               highly_variable_genes(mem, n_hvg = 80, batch = "batch", threads = 2))
  # Without a batch, and the batch as one value per cell.
  expect_equal(highly_variable_genes(s$file, n_hvg = 80, threads = 2)$highly_variable,
               highly_variable_genes(mem, n_hvg = 80, threads = 2)$highly_variable)
  p_disk <- run_pca(s$file, n_pcs = 8, n_hvg = 80, batch = mem$batch, threads = 2)
  p_mem <- run_pca(mem, n_pcs = 8, n_hvg = 80, batch = mem$batch, threads = 2)
  expect_equal(p_disk, p_mem, tolerance = 1e-8)
  expect_equal(rownames(p_disk), s$sim$counts$cells)
  # Per 10^6 too (the file's passes take the scale factor).
  expect_equal(run_pca(s$file, n_pcs = 8, n_hvg = 80, batch = mem$batch, method = "log2cpm", threads = 2),
               run_pca(mem, n_pcs = 8, n_hvg = 80, batch = mem$batch, method = "log2cpm", threads = 2), tolerance = 1e-8)
  expect_error(run_pca(s$file, n_pcs = 8, method = "pearson_residuals"), "needs the counts in memory")
  expect_error(highly_variable_genes(s$file, batch = "donor"), "not a cell column")
})

test_that("distill() trains from a file: the teacher computed in blocks, the student as good as in memory", {
  s <- sim_file(n_cells = 2000, n_genes = 150, seed = 12)
  mem <- as_counts(s$file)
  fit <- function(x) distill(x, batch = "batch", teacher = harmony_teacher(n_hvg = 100), n_latent = 8,
                             max_epochs_encoder = 15, max_epochs_decoder = 10, threads = 2, progress = FALSE)
  disk <- fit(s$file)
  expect_s3_class(disk, "scdistill_distill")
  # The same teacher: Harmony on the same PCs of the same genes.
  in_memory <- fit(mem)
  expect_equal(teacher_latent(disk), teacher_latent(in_memory), tolerance = 1e-6)
  expect_equal(disk$info$input_genes, in_memory$info$input_genes)
  # The student: validation cells are whole blocks; its Z read again from
  # the file equals the one from training; the same seed, the same model.
  v <- disk$validation_cells
  expect_true(length(v) >= 200 && all(((v - 1) %/% 16 * 16 + 1) %in% v))
  expect_equal(latent(disk, s$file, threads = 2), latent(disk), tolerance = 1e-5)
  expect_equal(latent(fit(s$file)), latent(disk))
  # As close to the teacher, and as good at separating cell types, as the student trained in memory.
  r2 <- function(m) summary(m)$r2[["all"]]
  expect_gt(r2(disk), r2(in_memory) - 0.05)
  metrics <- summary(disk, label = "cell_type", x = s$file, threads = 2)$metrics
  expect_gt(metrics["student", "nmi_leiden"], summary(in_memory, label = mem$cell_data$cell_type, threads = 2)$metrics["student", "nmi_leiden"] - 0.05)
  expect_equal(dim(corrected_expression(disk, as_counts(h5_counts(s$file), cells = 1:50), "Batch1")), c(150L, 50L))
  # The library sizes come from the teacher's first pass; a given teacher's
  # student scans the file for them. (With batch norms, whose statistics
  # come from runs of training cells read from the file.)
  given <- distill(s$file, batch = "batch", teacher = given_teacher(teacher_latent(disk), n_hvg = 100),
                   norm = "batch", max_epochs_encoder = 15, max_epochs_decoder = 10, threads = 2, progress = FALSE)
  expect_equal(latent(given, s$file, threads = 2), latent(given), tolerance = 1e-5)
  expect_setequal(given$info$input_genes, disk$info$input_genes)
  expect_gt(r2(given), r2(disk) - 0.05)
  # A cell without counts (its stored values set to 0, in another R process
  # as above) is named, after the teacher's passes and without a scan.
  empty <- tempfile(fileext = ".h5ad")
  file.copy(s$file, empty)
  edit <- sprintf(paste0('p <- rhdf5::h5read("%s", "X/indptr"); x <- rhdf5::h5read("%s", "X/data"); ',
                         'x[(p[17] + 1):p[18]] <- 0; rhdf5::h5write(x, "%s", "X/data")'), empty, empty, empty)
  expect_equal(system2(file.path(R.home("bin"), "Rscript"), c("-e", shQuote(edit))), 0)
  expect_error(distill(empty, batch = "batch", n_latent = 8, max_epochs_encoder = 2, max_epochs_decoder = 2,
                       threads = 2, progress = FALSE), "1 cell\\(s\\) have zero total counts \\(first: cell 17\\)")
  expect_error(distill(s$file, batch = "donor", n_latent = 8), "not a cell column")
  expect_error(distill(s$file, batch = "batch", teacher = harmony_teacher(method = "pearson_residuals"),
                       n_latent = 8, threads = 2, progress = FALSE), "needs the counts in memory")
})

test_that("fit_vae(h5_file =) writes the latent space to a file as it is encoded: the model of memory", {
  skip_if_not_installed("HDF5Array")
  s <- sim_file(n_cells = 1200, n_genes = 80, seed = 13)
  fit <- function(x, ...) fit_vae(x, batch = "batch", n_latent = 6, max_epochs = 3, threads = 2, progress = FALSE, ...)
  h5 <- tempfile(fileext = ".h5")
  on_file <- fit(s$file, h5_file = h5)
  in_memory <- fit(s$file)
  expect_s4_class(latent(on_file), "DelayedMatrix")
  # The same model, and the same values (single precision, as the encoder
  # gives them) and names, opened again from the file.
  expect_identical(on_file$history$validation_elbo, in_memory$history$validation_elbo)
  expect_identical(as.matrix(latent(on_file)), latent(in_memory))
  expect_identical(as.matrix(HDF5Array::HDF5Array(h5, "latent")), latent(in_memory))
  # Counts in memory too; what reuses the training cells' latent space reads it from the file.
  mem <- as_counts(s$file)
  m_file <- fit(mem, h5_file = tempfile(fileext = ".h5"))
  z_mem <- latent(fit(mem))
  expect_identical(as.matrix(latent(m_file)), z_mem)
  expect_identical(scdistill:::cached_latent(m_file, mem$counts), z_mem)
  # Nothing is overwritten, and that is known before any work.
  expect_error(fit(s$file, h5_file = h5), "already has a dataset 'latent'")
  expect_error(fit(s$file, h5_file = tempfile(fileext = ".h5"), workers = 2), "one process")
  expect_error(fit(mem, regularized = TRUE, h5_file = tempfile(fileext = ".h5")), "does not apply to `regularized")
  expect_error(fit(mem, h5_file = file.path(tempfile(), "z.h5")), "does not exist")
  # A fit that fails (a cell without counts, found by the core after the
  # dataset was made) leaves no file of its own, and takes out of the
  # user's file what it wrote there.
  empty <- tempfile(fileext = ".h5ad")
  file.copy(s$file, empty)
  edit <- sprintf(paste0('p <- rhdf5::h5read("%s", "X/indptr"); x <- rhdf5::h5read("%s", "X/data"); ',
                         'x[(p[17] + 1):p[18]] <- 0; rhdf5::h5write(x, "%s", "X/data")'), empty, empty, empty)
  expect_equal(system2(file.path(R.home("bin"), "Rscript"), c("-e", shQuote(edit))), 0)
  gone <- tempfile(fileext = ".h5")
  expect_error(fit(empty, h5_file = gone), "zero total counts \\(first: cell 17\\)")
  expect_false(file.exists(gone))
  theirs <- tempfile(fileext = ".h5")
  HDF5Array::writeHDF5Array(matrix(1:6, 2), theirs, "mine")
  before <- rhdf5::h5ls(theirs)
  expect_error(fit(empty, h5_file = theirs), "zero total counts")
  expect_identical(rhdf5::h5ls(theirs), before)
})

test_that("distill(h5_file =) writes Z and Z* to a file, the student reading Z* back from it: the model of memory", {
  skip_if_not_installed("HDF5Array")
  s <- sim_file(n_cells = 2000, n_genes = 150, seed = 12)
  fit <- function(x, teacher = harmony_teacher(n_hvg = 100), epochs = c(5, 3), ...) {
    distill(x, batch = "batch", teacher = teacher, n_latent = 8, max_epochs_encoder = epochs[1],
            max_epochs_decoder = epochs[2], threads = 2, progress = FALSE, ...)
  }
  h5 <- tempfile(fileext = ".h5")
  on_file <- fit(s$file, h5_file = h5)
  in_memory <- fit(s$file)
  expect_s4_class(latent(on_file), "DelayedMatrix")
  expect_s4_class(teacher_latent(on_file), "DelayedMatrix")
  # The same values and names, Z as the encoder gave it (single precision).
  expect_identical(as.matrix(teacher_latent(on_file)), teacher_latent(in_memory))
  expect_identical(as.matrix(latent(on_file)), latent(in_memory))
  expect_identical(as.matrix(HDF5Array::HDF5Array(h5, "latent")), latent(in_memory))
  expect_identical(on_file$info$history_decoder$validation_elbo, in_memory$info$history_decoder$validation_elbo)
  expect_equal(summary(on_file)$r2, summary(in_memory)$r2)
  # With counts on disk Z* is made in the file (the PCA's scores written
  # there, Harmony correcting them there); fitted on a sketch, the other
  # cells are corrected a block at a time, read from the file and written
  # back: the same Z* as in memory.
  sketch <- harmony_teacher(n_hvg = 100, sketch = 600)
  sk_file <- fit(s$file, sketch, c(1, 1), h5_file = tempfile(fileext = ".h5"))
  sk_mem <- fit(s$file, sketch, c(1, 1))
  expect_match(sk_file$info$teacher, "fitted on a sketch of 1,\\d{3} cells")
  expect_identical(sk_file$info$teacher, sk_mem$info$teacher)
  expect_identical(as.matrix(teacher_latent(sk_file)), teacher_latent(sk_mem))
  # Counts in memory train as before; the results go to the file at the end.
  mem <- as_counts(s$file)
  h5m <- tempfile(fileext = ".h5")
  on_file_mem <- fit(mem, h5_file = h5m)
  z_mem <- latent(fit(mem))
  expect_identical(as.matrix(latent(on_file_mem)), z_mem)
  # What reuses the training cells' latent space reads it from the file.
  expect_identical(scdistill:::cached_latent(on_file_mem, mem$counts), z_mem)
  # Nothing is overwritten, and that is known before any work.
  expect_error(fit(s$file, h5_file = h5), "already has a dataset 'latent'")
  expect_error(fit(s$file, h5_file = file.path(tempfile(), "z.h5")), "does not exist")
  expect_error(fit(s$file, h5_file = tempfile(fileext = ".h5"), workers = 2), "one process")
  expect_error(fit(s$file, h5_file = c("a.h5", "b.h5")), "one file path")
  # A fit that fails leaves no file of its own behind.
  failed <- tempfile(fileext = ".h5")
  z <- matrix(rnorm(6000), 2000, 3)
  z[5, 2] <- Inf
  expect_error(distill(s$file, batch = "batch", teacher = given_teacher(z, n_hvg = 100), threads = 2,
                       progress = FALSE, h5_file = failed), "infinite value \\(cell 5\\)")
  expect_false(file.exists(failed))
  # In a file the user had, a failed fit removes what it wrote there and
  # nothing else, so the same call can be made again.
  theirs <- tempfile(fileext = ".h5")
  HDF5Array::writeHDF5Array(matrix(1:6, 2, dimnames = list(c("a", "b"), NULL)), theirs, "mine", with.dimnames = TRUE)
  before <- rhdf5::h5ls(theirs)
  expect_error(distill(s$file, batch = "batch", teacher = given_teacher(z, n_hvg = 100), threads = 2,
                       progress = FALSE, h5_file = theirs), "infinite value \\(cell 5\\)")
  expect_identical(rhdf5::h5ls(theirs), before)
  z[5, 2] <- 0
  again <- distill(s$file, batch = "batch", teacher = given_teacher(z, n_hvg = 100), max_epochs_encoder = 1,
                   max_epochs_decoder = 1, threads = 2, progress = FALSE, h5_file = theirs)
  expect_identical(dim(latent(again)), c(2000L, 3L))
  expect_identical(as.matrix(HDF5Array::HDF5Array(theirs, "mine")), matrix(1:6, 2, dimnames = list(c("a", "b"), NULL)))
})

test_that("distill() holds two cells x n_pcs matrices, in memory and from a file: the PCs that become Z*, and Z", {
  skip_if_not(capabilities("profmem"), "R was built without memory profiling")
  s <- sim_file(n_cells = 3000, n_genes = 200, seed = 5)
  bytes <- 3000 * 20 * 8 # cells x n_pcs doubles
  big <- function(x) {
    log <- tempfile()
    Rprofmem(log, threshold = bytes - 1)
    on.exit(Rprofmem(NULL))
    distill(x, batch = "batch", teacher = harmony_teacher(n_pcs = 20, n_hvg = 150, sketch = 1000),
            max_epochs_encoder = 1, max_epochs_decoder = 1, threads = 2, progress = FALSE)
    Rprofmem(NULL)
    sizes <- as.numeric(sub(" *:.*", "", grep("^[0-9]+ *:", readLines(log), value = TRUE)))
    sum(sizes >= bytes & sizes < bytes + 1000)
  }
  # The PCA's scores, which Harmony overwrites with Z*, and the student's Z:
  # renaming them, or handing Z* to the core, used to copy them, and Z* was
  # a third matrix.
  expect_identical(big(s$file), 2L)
  expect_identical(big(as_counts(s$file, batch = "batch")), 2L)
})

test_that("fit_multimodal() trains from paired files as from memory, and latent() reads them in blocks", {
  suppressMessages(library(SingleCellExperiment))
  mo <- simulate_counts(n_cells = 1500, n_genes = 150, n_groups = 4, n_batches = 2, atac = TRUE, n_peaks = 500,
                        seed = 4)
  atac <- counts(altExp(mo, "ATAC"))
  fr <- tempfile(fileext = ".h5ad")
  fa <- tempfile(fileext = ".h5ad")
  write_h5ad(mo, fr, columns = "batch")
  write_h5ad(atac, fa)
  files <- list(RNA = fr, ATAC = fa)
  disk <- fit_multimodal(files, batch = "batch", max_epochs = 15, seed = 1, threads = 2)
  memory <- fit_multimodal(mo, batch = "batch", max_epochs = 15, seed = 1, threads = 2)
  expect_equal(disk$info$features, memory$info$features)
  expect_equal(disk$info$ambient$levels, levels(factor(mo$batch)))
  # Held out by whole blocks of the files (16 cells at this size), and the
  # batch read from the first file's obs.
  v <- disk$validation_cells - 1L
  expect_true(all((v %/% 16L * 16L) %in% v))
  # Scored alike on the cells in memory, the two train equally well.
  e <- c(disk = elbo(disk, mo), memory = elbo(memory, mo))
  expect_lt(abs(e[["disk"]] - e[["memory"]]), 0.02 * abs(e[["memory"]]))
  # The training latent space is the model's latent space of the files,
  # in blocks of cells or all at once, and of the cells in memory.
  z <- latent(disk)
  expect_equal(dim(z), c(1500, 20))
  expect_equal(rownames(z), colnames(mo))
  expect_identical(latent(disk, files), z)
  copy <- tempfile(fileext = ".h5ad")
  file.copy(fr, copy)
  old <- options(scdistill.disk_block = 600L)
  on.exit(options(old), add = TRUE)
  expect_equal(latent(disk, list(RNA = copy, ATAC = fa)), z, tolerance = 1e-6)
  expect_equal(latent(disk, mo), z, tolerance = 1e-6)
  expect_equal(dim(latent(disk, list(RNA = copy, ATAC = fa), modality = "ATAC")), c(1500, 10))
  # Expression, ELBO and attribution of the files, in blocks of 600, 600 and
  # 300 cells, equal those of the cells in memory.
  atac_disk <- normalized_expression(disk, files, modality = "ATAC", threads = 2)
  expect_equal(atac_disk, normalized_expression(disk, mo, modality = "ATAC", threads = 2), tolerance = 1e-6)
  expect_equal(normalized_expression(disk, files, modality = "ATAC", genes = 10:12, threads = 2), atac_disk[10:12, ])
  rna <- normalized_expression(disk, files, transform_batch = levels(factor(mo$batch))[1], threads = 2)
  expect_equal(dim(rna), c(150, 1500))
  expect_equal(rna, normalized_expression(disk, mo, transform_batch = levels(factor(mo$batch))[1], threads = 2),
               tolerance = 1e-6)
  # Block k draws z from seed + k - 1: equal to the weighted blocks in memory.
  blocks <- list(1:600, 601:1200, 1201:1500)
  parts <- vapply(seq_along(blocks), function(k) elbo(disk, mo[, blocks[[k]]], seed = 2 + k - 1, threads = 2), 1)
  expect_equal(elbo(disk, files, seed = 2, threads = 2), sum(parts * lengths(blocks)) / 1500, tolerance = 1e-6)
  a <- modality_attribution(disk, files, threads = 2)
  expect_equal(unclass(a), unclass(modality_attribution(disk, mo, threads = 2)), tolerance = 1e-6)
  expect_equal(dimnames(a)[[1]], colnames(mo))
  expect_error(differential_expression(disk, files, groupby = "batch", group1 = "1"),
               "not available for multimodal models")
  # Files that do not pair up are refused before training.
  fewer <- tempfile(fileext = ".h5ad")
  write_h5ad(atac[, 1:1000], fewer)
  expect_error(fit_multimodal(list(RNA = fr, ATAC = fewer), max_epochs = 1),
               "same cells in the same order .*RNA has 1,500 cells, ATAC has 1,000, 1,000 of them shared")
  expect_error(fit_multimodal(list(RNA = fr, ATAC = atac), max_epochs = 1), "ATAC not: give every modality as a file")
  expect_error(fit_multimodal(fr, max_epochs = 1), "holds one modality")
})

test_that("fit_multimodal() splits a 10x multiome file by its features' types", {
  skip_if_not_installed("HDF5Array")
  suppressMessages(library(SingleCellExperiment))
  mo <- simulate_counts(n_cells = 600, n_genes = 80, n_groups = 3, atac = TRUE, n_peaks = 200, seed = 6)
  both <- rbind(counts(mo), counts(altExp(mo, "ATAC")))
  h5 <- tempfile(fileext = ".h5")
  rds <- tempfile(fileext = ".rds")
  saveRDS(list(x = both@x, i = both@i, p = both@p, dim = dim(both), cells = colnames(both),
               features = rownames(both)), rds)
  # Cell Ranger ARC's layout (features x cells, column-compressed, with the
  # features' types), written in another R process (see the first test).
  write <- sprintf(paste0('x <- readRDS("%s"); f <- "%s"; w <- function(v, n) rhdf5::h5write(v, f, n); ',
                          'rhdf5::h5createFile(f); rhdf5::h5createGroup(f, "matrix"); ',
                          'rhdf5::h5createGroup(f, "matrix/features"); w(x$x, "matrix/data"); ',
                          'w(x$i, "matrix/indices"); w(x$p, "matrix/indptr"); w(x$dim, "matrix/shape"); ',
                          'w(x$cells, "matrix/barcodes"); w(x$features, "matrix/features/id"); ',
                          'w(rep(c("Gene Expression", "Peaks"), c(80, 200)), "matrix/features/feature_type")'),
                   rds, h5)
  expect_equal(system2(file.path(R.home("bin"), "Rscript"), c("-e", shQuote(write))), 0)
  # Fixed-length names that fill their size keep their last character.
  expect_equal(h5_counts(h5)$cells, colnames(mo))
  m <- fit_multimodal(h5, max_epochs = 3, seed = 2, threads = 2)
  expect_equal(m$info$features[[1]], rownames(mo))
  expect_equal(m$info$features[[2]], rownames(altExp(mo, "ATAC")))
  expect_equal(scdistill:::modality_names(m), c("RNA", "ATAC"))
  expect_equal(dim(latent(m)), c(600, 20))
  expect_error(fit_multimodal(h5, modalities = c("RNA", "ADT"), max_epochs = 1),
               "'ADT' not among the feature types")
})
