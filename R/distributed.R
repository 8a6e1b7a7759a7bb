#' Data-parallel training on several processes
#'
#' `fit_vae()`, `distill()` and `fit_multimodal()` train on several processes
#' at once with libtorch's own distributed backend (c10d, Gloo between
#' processes): every process holds the same model, computes its share of each
#' minibatch, and the gradients are summed over the processes before every
#' optimiser step. The validation ELBO, early stopping and the returned model
#' are the same on every process. With counts in memory and the same seed
#' and settings, the trained model is the one a single process trains, up to
#' the order of floating-point sums (batch normalisation aside: as in
#' PyTorch's `DistributedDataParallel`, each process normalises with its own
#' cells' statistics; `norm = "layer"`, `distill()`'s and `fit_multimodal()`'s
#' default, or `"none"` gives the single-process model).
#'
#' **On one machine**, give `workers = N` to the fitting function: it starts
#' `N - 1` background R processes (`Rscript`) and takes part itself as the
#' first, splitting `threads` between them. Each process holds the data it is
#' given; for data larger than memory pass on-disk counts (see [h5_counts()]):
#' each epoch deals the file's blocks of cells to the processes, and each
#' streams only its own, with bounded memory (as PyTorch's
#' `DistributedSampler`: the minibatches differ from a single process's, the
#' model is as good).
#'
#' Each optimiser step exchanges the whole gradient (about 3 MB for the
#' default VAE on 2,000 genes), so more processes pay off when a step's
#' computation outweighs that exchange: larger minibatches (`batch_size` is
#' the global minibatch, split between the processes; raise `lr` with it),
#' more genes, more hidden units, or a network faster than the computation.
#'
#' **On a cluster**, launch one `Rscript` per process the way PyTorch jobs are
#' launched (`torchrun`, Slurm's `srun`, `mpirun`-style launchers): each
#' process finds the others through the environment variables `MASTER_ADDR`,
#' `MASTER_PORT`, `WORLD_SIZE` and `RANK` (`LOCAL_RANK` picks the GPU of a
#' multi-GPU node). Under Slurm's `srun` or `mpirun`, only `MASTER_ADDR` and
#' `MASTER_PORT` need setting: the launcher's own numbering
#' (`SLURM_NTASKS`/`SLURM_PROCID`/`SLURM_LOCALID`, Open MPI's
#' `OMPI_COMM_WORLD_*`, MPICH's `PMI_SIZE`/`PMI_RANK`) stands in for the
#' others. Every process runs the same script; each fitting call joins the
#' group, and `dist_rank()` tells the processes apart, e.g. to save the model
#' once:
#'
#' ```
#' # train.R, run under Slurm as
#' #   export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)
#' #   export MASTER_PORT=29500
#' #   srun --ntasks=4 Rscript train.R
#' # (or mpirun -np 4 Rscript train.R; or torchrun-style: WORLD_SIZE and RANK set per process)
#' library(scdistill)
#' model <- fit_vae(h5_counts("atlas.h5ad"), batch = "donor")
#' if (dist_rank() == 0) save_model(model, "atlas_vae.scdistill")
#' ```
#'
#' The processes check at the start that they hold the same data (genes,
#' cells, total count) and settings, and stop with an error naming what
#' differs. A process that dies or stalls stops the others with an error once
#' the connection drops, or at the latest after `options(scdistill.dist_timeout)`
#' seconds (default 300), which also bounds how long the processes wait for
#' each other at the start. `options(scdistill.distributed = FALSE)` ignores
#' the environment variables. Workers started with `workers =` take the
#' calling session's `scdistill.*` options.
#'
#' Under mixed precision (the default on CPUs with native bf16, see the
#' section "Precision" of [scdistill]) each process rounds its share of a
#' gradient's products to bf16 before the gradients are averaged, so a
#' multi-process run matches a single-process one to bf16's precision rather
#' than f32's; with `options(scdistill.bf16 = FALSE)` they agree up to the
#' order of f32 sums. All processes must use the same setting.
#'
#' @name distributed
#' @seealso [dist_rank()], [fit_vae()], `vignette("scdistill")`
NULL

#' This process's rank in a distributed job
#'
#' @return The process's `RANK` (0 for the first process, and outside a
#'   distributed job), an integer.
#' @seealso [distributed]
#' @export
#' @examples
#' dist_rank()
dist_rank <- function() {
  g <- process_group_env()
  if (is.null(g)) 0L else g$rank
}

# The group described by torchrun-style environment variables, or NULL when
# WORLD_SIZE is unset (or options(scdistill.distributed = FALSE)).
process_group_env <- function() {
  if (isFALSE(getOption("scdistill.distributed"))) return(NULL)
  world <- Sys.getenv("WORLD_SIZE")
  rank_var <- "RANK"
  local_var <- "LOCAL_RANK"
  if (!nzchar(world) && nzchar(Sys.getenv("MASTER_ADDR"))) {
    # Launchers that number their processes themselves (Slurm's srun,
    # Open MPI's and MPICH's mpirun): their variables stand in for
    # WORLD_SIZE / RANK / LOCAL_RANK once MASTER_ADDR says where to meet.
    for (l in list(c("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
                   c("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
                   c("PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID"))) {
      if (nzchar(Sys.getenv(l[1])) && nzchar(Sys.getenv(l[2]))) {
        world <- Sys.getenv(l[1])
        rank_var <- l[2]
        local_var <- l[3]
        break
      }
    }
  }
  if (!nzchar(world)) return(NULL)
  whole <- function(name, value, lo, hi = Inf) {
    v <- suppressWarnings(as.numeric(value))
    if (!nzchar(value)) {
      stop("WORLD_SIZE is set (", world, ") but ", name, " is not: set MASTER_ADDR, MASTER_PORT, ",
           "WORLD_SIZE and RANK for every process (see ?distributed)", call. = FALSE)
    }
    if (is.na(v) || v != round(v) || v < lo || v > hi) {
      stop("the environment variable ", name, " is '", value, "', not a whole number in [", lo, ", ", hi, "]",
           call. = FALSE)
    }
    as.integer(v)
  }
  world <- whole("WORLD_SIZE", world, 1)
  rank <- whole(rank_var, Sys.getenv(rank_var), 0, world - 1)
  port <- whole("MASTER_PORT", Sys.getenv("MASTER_PORT"), 1, 65535)
  addr <- Sys.getenv("MASTER_ADDR")
  if (!nzchar(addr)) whole("MASTER_ADDR", addr, 0)
  local <- Sys.getenv(local_var)
  list(addr = addr, port = port, rank = rank, world = world,
       local_rank = if (nzchar(local)) whole(local_var, local, 0) else rank)
}

dist_timeout <- function() {
  t <- getOption("scdistill.dist_timeout", 300)
  if (!is.numeric(t) || length(t) != 1 || is.na(t) || t <= 0) {
    stop("`options(scdistill.dist_timeout)` must be a positive number of seconds", call. = FALSE)
  }
  t
}

# What the ranks must agree on about their counts: a dgCMatrix, a list of
# them (modalities) or on-disk counts.
rank_fingerprint <- function(counts) {
  one <- function(m) {
    if (inherits(m, "scdistill_h5")) return(c(as.numeric(dim(m)), NA))
    c(nrow(m), ncol(m), if (inherits(m, "dgCMatrix")) sum(m@x) else sum(m))
  }
  if (is.list(counts) && !inherits(counts, "scdistill_h5")) {
    v <- unlist(lapply(counts, one))
    names(v) <- paste0(rep(c("the number of features", "the number of cells", "the total count"), length(counts)),
                       rep(paste0(" of ", names(counts) %||% seq_along(counts)), each = 3))
  } else {
    v <- one(counts)
    names(v) <- c("the number of genes", "the number of cells", "the total count")
  }
  v[!is.na(v)]
}

# Before a training call into the core: joins the process group the
# environment describes, once per process (as torch.distributed's
# init_process_group(); later fits reuse it), and checks that every rank holds
# the same `counts` and `settings` (the model's and training's, covariates).
# FALSE outside a distributed job.
join_group <- function(counts, settings) {
  g <- process_group_env()
  if (is.null(g)) return(FALSE)
  if (!rs_dist_joined()) rust(rs_dist_join(g$addr, g$port, g$rank, g$world, dist_timeout()))
  v <- c(rank_fingerprint(counts), "the model and training settings" = settings_hash(settings))
  rust(rs_dist_agree(names(v), unname(as.double(v))))
  TRUE
}

# A number that differs when `x` (a list of settings) does: its serialised
# bytes weighted by position, modulo 2^40 (exact in a double).
settings_hash <- function(x) {
  b <- as.numeric(serialize(x, NULL, xdr = TRUE, version = 2))
  sum((b * (seq_along(b) %% 65521 + 1)) %% 2^40) %% 2^40
}

# Rank 0's numeric matrix on every rank of the joined group (outside one:
# `m` itself): distill()'s teacher embedding, computed on every rank, made
# identical.
rank0_values <- function(m) {
  if (!rs_dist_joined()) return(m)
  v <- rust(rs_dist_broadcast(as.double(m)))
  array(v, dim = dim(m), dimnames = dimnames(m))
}

# The evaluated arguments of a call (`mc` from match.call() in `env`, the
# caller's frame).
called_with <- function(mc, env) {
  lapply(as.list(mc)[-1], eval, envir = env)
}

# fit(x, ..., workers = N): starts N - 1 background R processes running the
# same call and runs it here as rank 0, all joined through a local
# rendezvous. Returns rank 0's result.
run_workers <- function(fun, args, workers, threads) {
  workers <- check_count(workers, "workers")
  if (!is.null(process_group_env())) {
    stop("`workers` cannot be used inside a distributed job (WORLD_SIZE is set): ",
         "there, launch one process per rank (see ?distributed)", call. = FALSE)
  }
  if (!requireNamespace("processx", quietly = TRUE)) {
    stop("`workers` > 1 needs the 'processx' package (Debian: r-cran-processx)", call. = FALSE)
  }
  total <- resolve_threads(threads)
  per <- max(1L, as.integer(total %/% workers))
  args$workers <- NULL
  args$threads <- per
  dir <- tempfile("scdistill-workers-")
  dir.create(dir)
  on.exit(unlink(dir, recursive = TRUE), add = TRUE)
  call_file <- file.path(dir, "call.rds")
  # The workers are fresh sessions: they take this session's package options
  # (bf16, timeouts, ...), or the ranks would train differently.
  opts <- options()
  saveRDS(list(fun = fun, args = utils::modifyList(args, list(progress = FALSE)),
               options = opts[startsWith(names(opts), "scdistill.")]), call_file, compress = FALSE)
  group <- c(MASTER_ADDR = "127.0.0.1", MASTER_PORT = as.character(rs_free_port()),
             WORLD_SIZE = as.character(workers))
  rscript <- file.path(R.home("bin"), "Rscript")
  logs <- file.path(dir, paste0("rank", seq_len(workers - 1), ".log"))
  procs <- lapply(seq_len(workers - 1), function(r) {
    processx::process$new(
      rscript, c("-e", "scdistill:::worker_main()"),
      env = c("current", group, RANK = as.character(r), LOCAL_RANK = as.character(r),
              SCDISTILL_WORKER_CALL = call_file, SCDISTILL_WORKER_READY = file.path(dir, paste0("ready", r)),
              R_LIBS = paste(.libPaths(), collapse = .Platform$path.sep)),
      stdout = logs[r], stderr = "2>&1", cleanup = TRUE, cleanup_tree = TRUE)
  })
  on.exit(for (p in procs) if (p$is_alive()) p$kill_tree(), add = TRUE)
  failed <- function(what) {
    told <- vapply(seq_along(procs), function(r) {
      if (procs[[r]]$is_alive()) return("")
      out <- if (file.exists(logs[r])) readLines(logs[r], warn = FALSE) else character()
      err <- grep("^Error", out, value = TRUE)
      paste0("\n  worker ", r, " (exit status ", procs[[r]]$get_exit_status(), "): ",
             paste(utils::tail(if (length(err)) err else out, 3), collapse = "\n  "))
    }, character(1))
    stop(what, paste(told, collapse = ""), call. = FALSE)
  }
  # Wait until every worker has loaded the package and read the call (a
  # worker that cannot start fails here, not at the rendezvous's timeout).
  deadline <- Sys.time() + dist_timeout()
  repeat {
    ready <- file.exists(file.path(dir, paste0("ready", seq_along(procs))))
    if (all(ready)) break
    if (any(!vapply(procs, function(p) p$is_alive(), logical(1)))) failed("a worker process failed to start:")
    if (Sys.time() > deadline) failed("the worker processes did not start in time")
    Sys.sleep(0.05)
  }
  old <- Sys.getenv(c(names(group), "RANK", "LOCAL_RANK"), unset = NA)
  on.exit(restore_env(old), add = TRUE)
  # This session leaves the group once the workers are done (they exit).
  on.exit(rs_dist_leave(), add = TRUE)
  do.call(Sys.setenv, as.list(c(group, RANK = "0", LOCAL_RANK = "0")))
  out <- tryCatch(call_function(fun, args), error = function(e) {
    # Give the workers a moment to end with their own message.
    for (p in procs) p$wait(2000)
    failed(paste0(conditionMessage(e), "\n(rank 0 of ", workers, ")"))
  })
  for (p in procs) p$wait(dist_timeout() * 1000)
  status <- vapply(procs, function(p) p$get_exit_status() %||% NA_integer_, integer(1))
  if (any(is.na(status) | status != 0)) failed("a worker process did not finish cleanly:")
  out
}

restore_env <- function(old) {
  for (nm in names(old)) {
    if (is.na(old[[nm]])) Sys.unsetenv(nm) else do.call(Sys.setenv, stats::setNames(list(old[[nm]]), nm))
  }
}

# Calls the package's function `fun` with `args` (named and unnamed) without
# deparsing large arguments into the call.
call_function <- function(fun, args) {
  nms <- names(args) %||% rep("", length(args))
  env <- new.env(parent = asNamespace("scdistill"))
  syms <- lapply(seq_along(args), function(i) {
    s <- paste0(".arg", i)
    assign(s, args[[i]], envir = env)
    as.name(s)
  })
  names(syms) <- nms
  eval(as.call(c(list(as.name(fun)), syms)), env)
}

# The entry point of a worker process started by run_workers().
worker_main <- function() {
  spec <- readRDS(Sys.getenv("SCDISTILL_WORKER_CALL"))
  options(spec$options)
  file.create(Sys.getenv("SCDISTILL_WORKER_READY"))
  ok <- tryCatch({
    call_function(spec$fun, spec$args)
    TRUE
  }, error = function(e) {
    cat("Error: ", conditionMessage(e), "\n", sep = "")
    FALSE
  })
  quit(save = "no", status = if (ok) 0 else 1)
}
