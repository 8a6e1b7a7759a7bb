# Data-parallel training (?distributed): `workers =` on this machine, and
# processes launched the torchrun way (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK).

rscript <- file.path(R.home("bin"), "Rscript")

# Starts `Rscript -e code` as `rank` of `world`, its output in `log`.
start_rank <- function(code, rank, world, port, log) {
  processx::process$new(rscript, c("-e", code),
                        env = c("current", MASTER_ADDR = "127.0.0.1", MASTER_PORT = as.character(port),
                                WORLD_SIZE = as.character(world), RANK = as.character(rank),
                                R_LIBS = paste(.libPaths(), collapse = .Platform$path.sep)),
                        stdout = log, stderr = "2>&1", cleanup_tree = TRUE)
}

test_that("two workers train the single-process model (same seed and minibatches)", {
  skip_if_not_installed("processx")
  # f32: under bf16 each rank rounds its half of a gradient product, and the
  # runs would agree to bf16's precision only. The workers take this option.
  old <- options(scdistill.bf16 = FALSE)
  on.exit(options(old), add = TRUE)
  sim <- simulate_counts(n_cells = 500, n_genes = 150, n_groups = 3, n_batches = 2, seed = 4, threads = 2)
  args <- list(sim, batch = "batch", norm = "layer", max_epochs = 6, batch_size = 64, seed = 3, progress = FALSE)
  one <- do.call(fit_vae, c(args, threads = 1))
  two <- do.call(fit_vae, c(args, threads = 2, workers = 2))
  expect_s3_class(two, "scdistill_vae")
  # Up to the order of floating-point sums: the gradient of each minibatch as two halves.
  expect_lt(max(abs(latent(one, sim) - latent(two, sim))), 1e-4)
  expect_equal(two$history$validation_elbo, one$history$validation_elbo, tolerance = 1e-6)
  expect_equal(two$history$train_loss, one$history$train_loss, tolerance = 1e-6)
  expect_equal(two$info$validation_cells, one$info$validation_cells)
  # The model is whole: it saves and loads like any other.
  f <- tempfile(fileext = ".scdistill")
  save_model(two, f)
  expect_equal(latent(load_model(f), sim), latent(two, sim))
  # This session has left the group.
  expect_false(scdistill:::rs_dist_joined())
  expect_identical(dist_rank(), 0L)
})

test_that("distill() and fit_multimodal() train on two workers", {
  skip_if_not_installed("processx")
  old <- options(scdistill.bf16 = FALSE)
  on.exit(options(old), add = TRUE)
  sim <- simulate_counts(n_cells = 400, n_genes = 150, n_groups = 3, n_batches = 2, seed = 5, threads = 2)
  args <- list(sim, batch = "batch", teacher = given_teacher(matrix(stats::rnorm(800), 400, 2,
                                                                    dimnames = list(colnames(sim), NULL))),
               norm = "layer", max_epochs_encoder = 4, max_epochs_decoder = 4, seed = 2, progress = FALSE)
  one <- do.call(distill, c(args, threads = 1))
  two <- do.call(distill, c(args, threads = 2, workers = 2))
  expect_s3_class(two, "scdistill_distill")
  expect_lt(max(abs(one$latent - two$latent)), 1e-4)
  for (phase in c("history_encoder", "history_decoder")) {
    expect_equal(two$info[[phase]]$validation_elbo, one$info[[phase]]$validation_elbo, tolerance = 1e-5)
  }

  mo <- simulate_counts(n_cells = 300, n_genes = 100, n_groups = 3, atac = TRUE, n_peaks = 200, seed = 6, threads = 2)
  margs <- list(mo, norm = "layer", max_epochs = 3, seed = 1, progress = FALSE)
  m1 <- do.call(fit_multimodal, c(margs, threads = 1))
  m2 <- do.call(fit_multimodal, c(margs, threads = 2, workers = 2))
  expect_equal(m2$history$validation_elbo, m1$history$validation_elbo, tolerance = 1e-5)
})

test_that("on-disk counts train on two workers, each reading its own blocks: fit_vae(), distill(), fit_multimodal()", {
  skip_if_not_installed("processx")
  f <- tempfile(fileext = ".h5ad")
  on.exit(unlink(f), add = TRUE)
  simulate_counts(n_cells = 3000, n_genes = 100, n_groups = 4, n_batches = 2, seed = 7, file = f, threads = 2)
  args <- list(f, batch = "batch", norm = "layer", max_epochs = 8, seed = 1, early_stopping = FALSE, progress = FALSE)
  one <- do.call(fit_vae, c(args, threads = 1))
  two <- do.call(fit_vae, c(args, threads = 2, workers = 2))
  # The same held-out blocks; minibatches are drawn differently (each rank
  # streams its own windows), so the models agree in quality, not weights.
  expect_equal(two$info$validation_cells, one$info$validation_cells)
  v1 <- utils::tail(one$history$validation_elbo, 1)
  v2 <- utils::tail(two$history$validation_elbo, 1)
  expect_lt(abs(v2 / v1 - 1), 0.01)
  expect_lt(v2, two$history$validation_elbo[1])

  # distill(): every rank computes the teacher from the file (rank 0's is
  # used), then streams its own blocks in both phases.
  dargs <- list(f, batch = "batch", norm = "layer", max_epochs_encoder = 6, max_epochs_decoder = 6, seed = 1,
                early_stopping = FALSE, progress = FALSE)
  d1 <- do.call(distill, c(dargs, threads = 1))
  d2 <- do.call(distill, c(dargs, threads = 2, workers = 2))
  expect_equal(d2$validation_cells, d1$validation_cells)
  expect_equal(teacher_latent(d2), teacher_latent(d1))
  nll <- function(m) utils::tail(unlist(m$info$history_decoder$validation_elbo), 1)
  expect_lt(abs(nll(d2) / nll(d1) - 1), 0.01)

  # fit_multimodal() on two files streamed in step, on each rank.
  mo <- simulate_counts(n_cells = 1500, n_genes = 100, n_groups = 3, n_batches = 2, atac = TRUE, n_peaks = 300,
                        seed = 8, threads = 2)
  files <- c(RNA = tempfile(fileext = ".h5ad"), ATAC = tempfile(fileext = ".h5ad"))
  on.exit(unlink(files), add = TRUE)
  write_h5ad(mo, files[["RNA"]], columns = "batch")
  write_h5ad(SingleCellExperiment::altExp(mo, "ATAC"), files[["ATAC"]])
  margs <- list(as.list(files), batch = "batch", norm = "layer", max_epochs = 8, seed = 1, early_stopping = FALSE,
                progress = FALSE)
  m1 <- do.call(fit_multimodal, c(margs, threads = 1))
  m2 <- do.call(fit_multimodal, c(margs, threads = 2, workers = 2))
  expect_equal(m2$validation_cells, m1$validation_cells)
  e1 <- utils::tail(m1$history$validation_elbo, 1)
  e2 <- utils::tail(m2$history$validation_elbo, 1)
  expect_lt(abs(e2 / e1 - 1), 0.01)
  expect_lt(e2, m2$history$validation_elbo[1])
})

test_that("a worker that fails, or ranks that disagree, end the job with an error naming why", {
  skip_if_not_installed("processx")
  sim <- simulate_counts(n_cells = 200, n_genes = 80, seed = 1, threads = 2)
  # A worker's own error reaches this session (the argument is checked on every rank).
  expect_error(fit_vae(sim, batch = "nope", workers = 2, progress = FALSE),
               "unknown batch column|no column 'nope'|nope")
  expect_false(scdistill:::rs_dist_joined())

  # Ranks launched by hand with different data: both stop at the start.
  dir <- tempfile("dist-")
  dir.create(dir)
  on.exit(unlink(dir, recursive = TRUE), add = TRUE)
  code <- function(seed, dropout) {
    sprintf(paste0("library(scdistill); options(scdistill.dist_timeout = 60); ",
                   "s <- simulate_counts(n_cells = 200, n_genes = 80, seed = %d, threads = 1); ",
                   "fit_vae(s, batch = 'batch', dropout = %g, max_epochs = 2, threads = 1, progress = FALSE)"),
            seed, dropout)
  }
  # Launches rank 0 and rank 1 with their own code; both must stop with `why`.
  both_stop <- function(code0, code1, tag, why) {
    port <- scdistill:::rs_free_port()
    logs <- file.path(dir, paste0(tag, 0:1, ".log"))
    ps <- list(start_rank(code0, 0, 2, port, logs[1]), start_rank(code1, 1, 2, port, logs[2]))
    for (p in ps) p$wait(120000)
    for (i in 1:2) {
      expect_false(ps[[i]]$is_alive())
      expect_equal(ps[[i]]$get_exit_status(), 1L)
      expect_match(paste(readLines(logs[i]), collapse = "\n"), why)
    }
  }
  both_stop(code(1, 0.1), code(2, 0.1), "r", "distributed training: the ranks disagree on the total count")
  # The same data, another dropout rate on one rank.
  both_stop(code(1, 0.1), code(1, 0.2), "s", "the ranks disagree on the model and training settings")

  # A rank killed during training: the other stops with an error, not a hang.
  port <- scdistill:::rs_free_port()
  long <- paste0("library(scdistill); options(scdistill.dist_timeout = 60); ",
                 "s <- simulate_counts(n_cells = 400, n_genes = 80, seed = 1, threads = 1); ",
                 "cat('training\\n'); ",
                 "fit_vae(s, batch = 'batch', max_epochs = 100000, early_stopping = FALSE, threads = 1, progress = FALSE)")
  logs <- file.path(dir, c("k0.log", "k1.log"))
  ps <- list(start_rank(long, 0, 2, port, logs[1]), start_rank(long, 1, 2, port, logs[2]))
  started <- function(f) file.exists(f) && any(grepl("training", readLines(f, warn = FALSE)))
  deadline <- Sys.time() + 120
  while (!(started(logs[1]) && started(logs[2])) && Sys.time() < deadline) Sys.sleep(0.1)
  Sys.sleep(3)
  expect_true(ps[[1]]$is_alive())
  ps[[2]]$kill()
  ps[[1]]$wait(90000)
  expect_false(ps[[1]]$is_alive())
  expect_equal(ps[[1]]$get_exit_status(), 1L)
  expect_match(paste(readLines(logs[1]), collapse = "\n"), "distributed training: .*failed on rank 0 of 2")
})

test_that("the environment variables are checked and named", {
  old <- Sys.getenv(c("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID",
                      "SLURM_LOCALID"), unset = NA)
  on.exit(scdistill:::restore_env(old), add = TRUE)
  Sys.setenv(WORLD_SIZE = "2", MASTER_ADDR = "127.0.0.1", MASTER_PORT = "29500")
  Sys.unsetenv("RANK")
  sim <- simulate_counts(n_cells = 50, n_genes = 30, seed = 1, threads = 1)
  expect_error(fit_vae(sim, progress = FALSE), "WORLD_SIZE is set \\(2\\) but RANK is not")
  Sys.setenv(RANK = "2")
  expect_error(dist_rank(), "RANK is '2', not a whole number in \\[0, 1\\]")
  Sys.setenv(RANK = "1")
  expect_identical(dist_rank(), 1L)
  expect_error(fit_vae(sim, workers = 2, progress = FALSE), "cannot be used inside a distributed job")
  # Slurm's numbering stands in for WORLD_SIZE / RANK / LOCAL_RANK.
  Sys.unsetenv(c("WORLD_SIZE", "RANK"))
  Sys.setenv(SLURM_NTASKS = "4", SLURM_PROCID = "3", SLURM_LOCALID = "1")
  g <- scdistill:::process_group_env()
  expect_equal(g[c("world", "rank", "local_rank")], list(world = 4L, rank = 3L, local_rank = 1L))
  Sys.setenv(SLURM_PROCID = "x")
  expect_error(dist_rank(), "SLURM_PROCID is 'x'")
  Sys.unsetenv(c("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"))
  expect_null(scdistill:::process_group_env())
  withr_opt <- options(scdistill.distributed = FALSE)
  on.exit(options(withr_opt), add = TRUE)
  expect_identical(dist_rank(), 0L)
  expect_error(fit_vae(sim, workers = 0), "`workers` must be a whole number >= 1")
})
