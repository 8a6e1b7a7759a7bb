#' libtorch, device and threads
#'
#' Reports the libtorch the package runs on and where it was loaded from,
#' whether CUDA is usable, which device `device` resolves to, and the number
#' of threads computations will use. See [install_libtorch()] for how the
#' libtorch folder is chosen.
#'
#' Thread policy (as `data.table` does): the `threads` argument of a function
#' wins; otherwise `getOption("scdistill.threads")`; otherwise every core this
#' process may use. `OMP_THREAD_LIMIT`, when set, caps the result.
#'
#' @param device `"auto"` (CUDA when libtorch sees a GPU, else CPU), `"cpu"`,
#'   `"cuda"` or `"cuda:N"`.
#' @param threads Number of threads, or `NULL` for the policy above.
#' @return A list of class `scdistill_torch_config` with `libtorch_version`,
#'   `libtorch_path` (the folder libtorch was loaded from),
#'   `libtorch_source` (why that folder: `"option"`, `"install_libtorch()"`
#'   or `"build"`), `cuda_available`, `cuda_device_count`, `cudnn_available`, `device`,
#'   `threads` and `blas` (the library libtorch's matrix products run in:
#'   libtorch's own, whatever BLAS R uses).
#' @examples
#' torch_config()
#' torch_config(device = "cpu", threads = 1)
#' @export
torch_config <- function(device = "auto", threads = NULL) {
  check_device(device)
  cfg <- rust(rs_torch_config(device, resolve_threads(threads)))
  cfg$blas <- rs_blas_library()
  cfg$libtorch_path <- native_env$libtorch$dir
  cfg$libtorch_source <- native_env$libtorch$source
  structure(cfg, class = "scdistill_torch_config")
}

#' @method print scdistill_torch_config
#' @export
print.scdistill_torch_config <- function(x, ...) {
  cat("libtorch ", x$libtorch_version, "\n", sep = "")
  cat("  from   ", x$libtorch_path %||% "?", " (", x$libtorch_source %||% "?", ")\n", sep = "")
  cat("CUDA:    ", if (x$cuda_available) sprintf("yes, %d device(s)%s", x$cuda_device_count,
                                               if (x$cudnn_available) ", cuDNN" else "") else "no", "\n", sep = "")
  cat("device:  ", x$device, "\n", sep = "")
  cat("threads: ", x$threads, "\n", sep = "")
  cat("BLAS:    ", basename(x$blas %||% "?"), "\n", sep = "")
  invisible(x)
}

# The thread count to use: argument, option, or all usable cores; capped by
# OMP_THREAD_LIMIT.
resolve_threads <- function(threads = NULL) {
  n <- threads %||% getOption("scdistill.threads") %||% rs_available_threads()
  arg <- if (is.null(threads)) "options(scdistill.threads)" else "threads"
  if (!is.numeric(n) || length(n) != 1 || is.na(n) || n != round(n) || n < 1) {
    stop("`", arg, "` must be a whole number >= 1", call. = FALSE)
  }
  cores <- rs_available_threads()
  if (n > cores) {
    message("`", arg, "` = ", format(n, scientific = FALSE), " is more than the ", cores,
            " core(s) this process may use; using ", cores)
    n <- cores
  }
  n <- as.integer(n)
  limit <- suppressWarnings(as.integer(Sys.getenv("OMP_THREAD_LIMIT", "")))
  if (!is.na(limit) && limit >= 1) n <- min(n, limit)
  n
}

check_device <- function(device) {
  if (!is.character(device) || length(device) != 1 || is.na(device)) {
    stop("`device` must be one string: \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"", call. = FALSE)
  }
  # In a distributed job each process of a node takes its own GPU (LOCAL_RANK).
  g <- if (device %in% c("auto", "cuda")) process_group_env()
  if (!is.null(g)) {
    n <- rs_torch_config("cpu", 1L)$cuda_device_count
    if (n > 0) device <- paste0("cuda:", g$local_rank %% n)
  }
  device
}
