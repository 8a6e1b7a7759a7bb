# Called by configure when no libtorch was found: reuses or downloads libtorch
# (R/libtorch.R, with the checksums in inst/libtorch/sources.csv) and prints
# its folder. Type: SCDISTILL_CUDA (e.g. "13.0") asks for the CUDA build.
# Address: SCDISTILL_LIBTORCH_URL with SCDISTILL_LIBTORCH_SHA256 overrides the
# recorded official files. Messages go to stderr; stdout is the folder alone.
`%||%` <- function(a, b) if (is.null(a)) b else a
source(file.path("R", "libtorch.R"))
cuda <- Sys.getenv("SCDISTILL_CUDA")
if (nzchar(cuda) && !cuda %in% c("13.0", "13")) {
  message("configure: SCDISTILL_CUDA=", cuda, ": libtorch ", libtorch_version,
          " is recorded for CUDA 13.0 only (SCDISTILL_CUDA=13.0)")
  quit(status = 1)
}
type <- if (nzchar(cuda)) "cuda" else "cpu"
# A libtorch install_libtorch() recorded earlier is used as it is.
rec <- libtorch_recorded()
if (!is.na(rec) && is.null(libtorch_dir_problem(rec, need_cuda = type == "cuda"))) {
  cat(normalizePath(rec), "\n", sep = "")
  quit(status = 0)
}
dir <- tryCatch(
  fetch_libtorch(libtorch_cache_dir(), type = type, url = env_value("SCDISTILL_LIBTORCH_URL"),
                 sha256 = env_value("SCDISTILL_LIBTORCH_SHA256")),
  error = function(e) {
    message("configure: error: could not get libtorch ", libtorch_version, ": ", conditionMessage(e))
    quit(status = 1)
  })
cat(dir, "\n", sep = "")
