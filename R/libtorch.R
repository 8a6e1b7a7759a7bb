# Getting libtorch: where the package looks for it, how it is downloaded and
# verified, and how the core is loaded against it at run time.
#
# Everything above the "run time" section uses base R, utils and tools only:
# `configure` sources this file (through tools/fetch_libtorch.R) before the
# package exists, to download libtorch for the build.

libtorch_version <- "2.11.0"

# --- sources and checks ---------------------------------------------------------

# The platform name the sources table uses, e.g. "linux-x86_64".
libtorch_platform <- function() {
  os <- tolower(Sys.info()[["sysname"]])
  os <- if (os == "darwin") "macos" else os
  machine <- Sys.info()[["machine"]]
  machine <- switch(machine, amd64 = "x86_64", arm64 = "aarch64", machine)
  paste0(os, "-", machine)
}

# The recorded download parts for `type` on this platform: a data frame with
# `part`, `url` and `sha256` (inst/libtorch/sources.csv). The official PyTorch
# wheels on PyPI carry libtorch and their SHA-256 is published by PyPI, so
# each part is verified against a checksum recorded in the package.
libtorch_parts <- function(type, sources = libtorch_sources_file(), platform = libtorch_platform()) {
  tab <- utils::read.csv(sources, comment.char = "#", stringsAsFactors = FALSE, strip.white = TRUE)
  rows <- tab[tab$type == type & tab$platform == platform, c("part", "url", "sha256"), drop = FALSE]
  if (nrow(rows) == 0) {
    have <- unique(paste0(tab$type, " on ", tab$platform))
    stop("no libtorch ", libtorch_version, " download is recorded for type \"", type, "\" on ", platform,
         " (recorded: ", paste(have, collapse = ", "), "). Give an archive yourself: `url` and `sha256` ",
         "(or SCDISTILL_LIBTORCH_URL and SCDISTILL_LIBTORCH_SHA256), e.g. PyTorch's libtorch zip for your ",
         "platform.", call. = FALSE)
  }
  rows
}

libtorch_sources_file <- function() {
  installed <- system.file("libtorch", "sources.csv", package = "scdistill")
  if (nzchar(installed)) installed else file.path("inst", "libtorch", "sources.csv")
}

# The version recorded in a libtorch folder (libtorch zips: build-version;
# torch wheels: version.py), or NA.
libtorch_dir_version <- function(dir) {
  bv <- file.path(dir, "build-version")
  if (file.exists(bv)) return(trimws(readLines(bv, n = 1, warn = FALSE)))
  vp <- file.path(dir, "version.py")
  if (file.exists(vp)) {
    line <- grep("^__version__", readLines(vp, warn = FALSE), value = TRUE)
    if (length(line)) return(sub("^__version__ *= *['\"]([^'\"]+)['\"].*", "\\1", line[1]))
  }
  NA_character_
}

# NULL when `dir` holds a usable libtorch of the right version; otherwise why not.
libtorch_dir_problem <- function(dir, need_cuda = FALSE) {
  if (!dir.exists(dir)) return(paste0(dir, " does not exist"))
  for (f in c("libc10.so", "libtorch_cpu.so")) {
    if (!file.exists(file.path(dir, "lib", f))) return(paste0(dir, " has no lib/", f))
  }
  v <- libtorch_dir_version(dir)
  if (is.na(v) || sub("\\+.*", "", v) != libtorch_version) {
    return(paste0(dir, " holds libtorch ", if (is.na(v)) "of unknown version" else v,
                  ", not ", libtorch_version))
  }
  if (need_cuda && !file.exists(file.path(dir, "lib", "libtorch_cuda.so"))) {
    return(paste0(dir, " is a CPU-only libtorch (no lib/libtorch_cuda.so), and CUDA libtorch is needed"))
  }
  NULL
}

# SHA-256 of a file, from R (>= 4.5) or the system's tool.
file_sha256 <- function(path) {
  tools_ns <- asNamespace("tools")
  if (exists("sha256sum", envir = tools_ns, inherits = FALSE)) {
    return(unname(get("sha256sum", envir = tools_ns)(path)))
  }
  tools <- list(c("sha256sum"), c("shasum", "-a", "256"), c("openssl", "dgst", "-sha256", "-r"))
  for (t in tools) {
    if (nzchar(Sys.which(t[1]))) {
      out <- suppressWarnings(system2(t[1], c(t[-1], shQuote(path)), stdout = TRUE, stderr = FALSE))
      if (length(out) && grepl("^[0-9a-fA-F]{64}", out[1])) return(tolower(substr(out[1], 1, 64)))
    }
  }
  stop("cannot compute a SHA-256 checksum: none of sha256sum, shasum or openssl was found", call. = FALSE)
}

# The value of environment variable `name`, or NULL when it is unset or empty.
env_value <- function(name) {
  v <- Sys.getenv(name)
  if (nzchar(v)) v
}

# --- download and unpack --------------------------------------------------------

# Downloads (or copies, for file:// addresses and local paths) `url` to `dest`.
libtorch_download <- function(url, dest, quiet = FALSE) {
  local <- sub("^file://", "", url)
  if (!grepl("^[a-zA-Z][a-zA-Z0-9+.-]*://", local) && file.exists(local)) {
    if (!file.copy(local, dest, overwrite = TRUE)) stop("cannot copy ", local, call. = FALSE)
    return(invisible(dest))
  }
  old <- options(timeout = max(3600, getOption("timeout")))
  on.exit(options(old))
  status <- tryCatch(utils::download.file(url, dest, mode = "wb", quiet = quiet),
                     error = function(e) conditionMessage(e), warning = function(w) conditionMessage(w))
  if (!identical(status, 0L)) {
    stop("downloading ", url, " failed", if (is.character(status)) paste0(": ", status), call. = FALSE)
  }
  invisible(dest)
}

# The members of a zip archive; an error naming the file when it is not a
# complete archive (a truncated download, an HTML error page).
zip_members <- function(zipfile) {
  tab <- tryCatch(utils::unzip(zipfile, list = TRUE), error = function(e) NULL, warning = function(w) NULL)
  if (is.null(tab) || nrow(tab) == 0) {
    stop(basename(zipfile), " is not a complete zip archive (truncated or not a zip file)", call. = FALSE)
  }
  tab$Name
}

# Extracts the members matching `patterns` (unzip's wildcards: `*` within and
# across folders) into `exdir`: with the system's unzip when R has one (large
# archives, thousands of headers), else R's own.
zip_extract <- function(zipfile, patterns, exdir, junkpaths = FALSE, members = zip_members(zipfile)) {
  if (!length(patterns)) return(invisible())
  dir.create(exdir, recursive = TRUE, showWarnings = FALSE)
  tool <- getOption("unzip")
  if (is.character(tool) && nzchar(tool) && tool != "internal" && nzchar(Sys.which(tool))) {
    out <- suppressWarnings(system2(tool, c(if (junkpaths) "-j", "-oq", shQuote(zipfile), shQuote(patterns),
                                            "-d", shQuote(exdir)), stdout = TRUE, stderr = TRUE))
    status <- attr(out, "status") %||% 0L
    if (status != 0) {
      stop("unpacking ", basename(zipfile), " failed (unzip status ", status, ": ",
           paste(utils::tail(out, 2), collapse = " "), ")", call. = FALSE)
    }
  } else {
    wanted <- members[Reduce(`|`, lapply(utils::glob2rx(patterns), grepl, x = members))]
    res <- tryCatch(utils::unzip(zipfile, files = wanted, exdir = exdir, junkpaths = junkpaths, overwrite = TRUE),
                    error = function(e) e, warning = function(w) w)
    if (inherits(res, "condition")) {
      stop("unpacking ", basename(zipfile), " failed (", conditionMessage(res), ")", call. = FALSE)
    }
  }
  invisible()
}

# Unpacks one downloaded part into `root` (the libtorch folder being built):
# a libtorch zip (libtorch/ at its top), a torch wheel (torch/lib,
# torch/include, torch/version.py) or a wheel of CUDA libraries (every lib/*.so*).
libtorch_unpack <- function(zipfile, root, type) {
  members <- zip_members(zipfile)
  stage <- tempfile("unpack-", tmpdir = dirname(root))
  on.exit(unlink(stage, recursive = TRUE), add = TRUE)
  if (any(startsWith(members, "libtorch/lib/"))) {
    zip_extract(zipfile, "libtorch/*", stage, members = members)
    src <- file.path(stage, "libtorch")
    for (f in list.files(src, all.files = TRUE, no.. = TRUE)) move_path(file.path(src, f), file.path(root, f))
  } else if (any(startsWith(members, "torch/lib/"))) {
    libs <- members[grepl("^torch/lib/[^/]+\\.so[.0-9]*$", members)]
    # CPU: libtorch_cpu and what it needs; CUDA: every library but Python's.
    keep <- if (type == "cpu") "^lib(c10|torch_cpu|gomp[^/]*)\\.so" else "^lib(?!torch_python|shm)"
    libs <- libs[grepl(keep, basename(libs), perl = TRUE)]
    zip_extract(zipfile, c(libs, "torch/include/*", "torch/version.py"), stage, members = members)
    src <- file.path(stage, "torch")
    move_path(file.path(src, "lib"), file.path(root, "lib"))
    move_path(file.path(src, "include"), file.path(root, "include"))
    v <- libtorch_dir_version(src)
    if (!is.na(v)) writeLines(v, file.path(root, "build-version"))
  } else {
    libs <- members[grepl("(^|/)lib/[^/]+\\.so[.0-9]*$", members)]
    if (!length(libs)) stop(basename(zipfile), " holds neither libtorch nor shared libraries", call. = FALSE)
    zip_extract(zipfile, libs, stage, junkpaths = TRUE, members = members)
    for (f in list.files(stage)) move_path(file.path(stage, f), file.path(root, "lib", f))
  }
  invisible(root)
}

# Moves a file or folder, merging a folder into an existing one.
move_path <- function(from, to) {
  if (!file.exists(from)) return(invisible())
  if (dir.exists(from) && dir.exists(to)) {
    for (f in list.files(from, all.files = TRUE, no.. = TRUE)) move_path(file.path(from, f), file.path(to, f))
    return(invisible())
  }
  dir.create(dirname(to), recursive = TRUE, showWarnings = FALSE)
  if (!file.rename(from, to)) {
    ok <- if (dir.exists(from)) file.copy(from, dirname(to), recursive = TRUE) else file.copy(from, to)
    if (!ok) stop("cannot move ", from, " to ", to, call. = FALSE)
  }
  invisible()
}

# Downloads, verifies and unpacks libtorch into `file.path(path,
# "libtorch-<version>-<type>")`, which is returned. A complete copy already
# there is reused. Nothing is left behind on failure: parts are unpacked into
# a staging folder beside the target, renamed into place only once complete.
fetch_libtorch <- function(path, type = c("cpu", "cuda"), url = NULL, sha256 = NULL, quiet = FALSE,
                           sources = libtorch_sources_file()) {
  type <- match.arg(type)
  target <- file.path(path, paste0("libtorch-", libtorch_version, "-", type))
  if (is.null(libtorch_dir_problem(target, need_cuda = type == "cuda"))) return(normalizePath(target))
  if (!is.null(url)) {
    if (is.null(sha256) || !nzchar(sha256)) {
      stop("a libtorch archive given by its address needs its SHA-256 checksum: pass `sha256` ",
           "(or set SCDISTILL_LIBTORCH_SHA256)", call. = FALSE)
    }
    parts <- data.frame(part = "archive", url = url, sha256 = sha256, stringsAsFactors = FALSE)
  } else {
    parts <- libtorch_parts(type, sources)
  }
  dir.create(path, recursive = TRUE, showWarnings = FALSE)
  stage <- tempfile(paste0(".libtorch-", type, "-"), tmpdir = path)
  on.exit(unlink(stage, recursive = TRUE), add = TRUE)
  root <- file.path(stage, "libtorch")
  dir.create(root, recursive = TRUE)
  for (i in seq_len(nrow(parts))) {
    file <- file.path(stage, basename(sub("[?#].*$", "", parts$url[i])))
    if (!quiet) message("libtorch: fetching ", parts$url[i])
    libtorch_download(parts$url[i], file, quiet = quiet)
    got <- file_sha256(file)
    if (!identical(tolower(got), tolower(parts$sha256[i]))) {
      stop("SHA-256 mismatch for ", basename(file), ": expected ", parts$sha256[i], ", got ", got,
           ". The download is incomplete or not the recorded file; nothing was installed.", call. = FALSE)
    }
    libtorch_unpack(file, root, type)
    unlink(file)
  }
  problem <- libtorch_dir_problem(root, need_cuda = type == "cuda")
  if (!is.null(problem)) {
    stop("the downloaded archive is not a usable libtorch: ", sub(root, "it", problem, fixed = TRUE),
         "; nothing was installed", call. = FALSE)
  }
  unlink(target, recursive = TRUE)
  if (!file.rename(root, target)) stop("cannot move libtorch into ", target, call. = FALSE)
  normalizePath(target)
}

# Where downloaded libtorch goes by default, and where install_libtorch()
# records its choice.
libtorch_cache_dir <- function() env_value("SCDISTILL_LIBTORCH_CACHE") %||% tools::R_user_dir("scdistill", "cache")

libtorch_record_file <- function() file.path(tools::R_user_dir("scdistill", "config"), "libtorch")

libtorch_recorded <- function() {
  f <- libtorch_record_file()
  if (file.exists(f)) trimws(readLines(f, n = 1, warn = FALSE)) else NA_character_
}

# --- installing it, for users ---------------------------------------------------

#' Download libtorch for scdistill
#'
#' Downloads libtorch 2.11.0 (the C++ library the package's models run
#' on) once, checks every file against the SHA-256 checksum recorded in the
#' package, unpacks it and records where it is. Models then load it from
#' there; a binary of the package built on another machine needs this once.
#' `configure` calls the same code when it finds no libtorch to build against.
#'
#' By default the files come from PyTorch's official wheels on PyPI
#' (`torch` 2.11.0, with the CUDA runtime libraries its CPU
#' library links to): PyPI publishes their checksums, which the package
#' records. `type = "cuda"` adds libtorch's CUDA libraries and the NVIDIA
#' libraries they need (CUDA 13.0; about 3 GB). Only 64-bit Linux is recorded;
#' elsewhere give `url` and `sha256`.
#'
#' Where libtorch is looked for when a model first runs, in order: the
#' option `scdistill.libtorch` or the environment variable
#' `SCDISTILL_LIBTORCH` (a libtorch folder), the folder recorded by
#' `install_libtorch()`, the libtorch the package was built against.
#'
#' @param type `"cpu"` or `"cuda"`.
#' @param url `NULL` for the recorded official files, or the address of one
#'   libtorch archive (`https://`, `file://` or a local path): PyTorch's
#'   libtorch zip (`libtorch/` at its top) or a `torch` wheel. Default:
#'   `Sys.getenv("SCDISTILL_LIBTORCH_URL")`.
#' @param sha256 The SHA-256 checksum of the archive at `url` (required with
#'   `url`). Default: `Sys.getenv("SCDISTILL_LIBTORCH_SHA256")`.
#' @param path Folder to install into. Default: the variable
#'   `SCDISTILL_LIBTORCH_CACHE`, else `tools::R_user_dir("scdistill", "cache")`.
#' @param quiet Suppress progress messages.
#' @return The libtorch folder, invisibly.
#' @seealso [torch_config()] for where libtorch was loaded from.
#' @examples
#' \dontrun{
#' install_libtorch()                 # CPU
#' install_libtorch(type = "cuda")    # NVIDIA GPUs, CUDA 13.0
#' # an archive of your own, e.g. a mirror or an offline copy
#' install_libtorch(url = "file:///opt/mirror/libtorch-2.11.0.zip", sha256 = "...")
#' }
#' @export
install_libtorch <- function(type = c("cpu", "cuda"), url = NULL, sha256 = NULL, path = NULL,
                             quiet = FALSE) {
  type <- match.arg(type)
  url <- url %||% env_value("SCDISTILL_LIBTORCH_URL")
  sha256 <- sha256 %||% env_value("SCDISTILL_LIBTORCH_SHA256")
  if (!is.null(url) && (!is.character(url) || length(url) != 1 || is.na(url))) {
    stop("`url` must be one address", call. = FALSE)
  }
  dir <- fetch_libtorch(path %||% libtorch_cache_dir(), type = type, url = url, sha256 = sha256, quiet = quiet)
  rec <- libtorch_record_file()
  dir.create(dirname(rec), recursive = TRUE, showWarnings = FALSE)
  writeLines(dir, rec)
  if (!quiet) {
    message("libtorch ", libtorch_version, " (", type, ") is in ", dir, "; recorded in ", rec)
    if (!is.null(native_env$dll)) message("Restart R for models to use it (libtorch is already loaded).")
  }
  invisible(dir)
}

# --- run time -------------------------------------------------------------------

# What configure recorded of the libtorch the package was built against.
libtorch_build_info <- function() {
  f <- system.file("libtorch", "build.dcf", package = "scdistill")
  if (!nzchar(f)) return(list(dir = NA_character_, cuda = FALSE))
  d <- read.dcf(f)
  list(dir = unname(d[1, "dir"]), cuda = identical(unname(d[1, "cuda"]), "yes"))
}

# The libtorch folder models load, and why it was chosen; a clear error,
# saying what to run, when none is usable.
libtorch_location <- function() {
  build <- libtorch_build_info()
  fix <- paste0("Run scdistill::install_libtorch(", if (build$cuda) "type = \"cuda\"", ") to download libtorch ",
                libtorch_version, " (once), or point the option `scdistill.libtorch` at a libtorch ",
                libtorch_version, " folder.")
  given <- getOption("scdistill.libtorch") %||% env_value("SCDISTILL_LIBTORCH")
  if (!is.null(given)) {
    problem <- libtorch_dir_problem(given, need_cuda = build$cuda)
    if (!is.null(problem)) stop("libtorch from option `scdistill.libtorch`/SCDISTILL_LIBTORCH: ", problem, ". ", fix, call. = FALSE)
    return(list(dir = normalizePath(given), source = "option"))
  }
  recorded <- libtorch_recorded()
  if (!is.na(recorded)) {
    problem <- libtorch_dir_problem(recorded, need_cuda = build$cuda)
    if (!is.null(problem)) stop("libtorch recorded by install_libtorch(): ", problem, ". ", fix, call. = FALSE)
    return(list(dir = normalizePath(recorded), source = "install_libtorch()"))
  }
  if (!is.na(build$dir)) {
    problem <- libtorch_dir_problem(build$dir, need_cuda = build$cuda)
    if (is.null(problem)) return(list(dir = normalizePath(build$dir), source = "build"))
    stop("scdistill cannot find libtorch ", libtorch_version, ": the one it was built against is gone (",
         problem, "). ", fix, call. = FALSE)
  }
  stop("scdistill cannot find libtorch ", libtorch_version, ". ", fix, call. = FALSE)
}

# Loads the package's core (Rust and libtorch) from the chosen libtorch: the
# loader in src/entrypoint.c opens the libraries named in
# SCDISTILL_LIBTORCH_LIB first, so the core's own references to libtorch bind
# to them whatever path the build recorded.
load_core <- function() {
  loc <- libtorch_location()
  lib <- file.path(loc$dir, "lib")
  order <- c("^libgomp", "^libcudart", "^libcupti", "^libc10\\.so$", "^libtorch_cpu\\.so$",
             "^libc10_cuda\\.so$", "^libtorch_cuda\\.so$", "^libtorch\\.so$")
  files <- list.files(lib)
  preload <- unlist(lapply(order, function(p) file.path(lib, grep(p, files, value = TRUE))))
  old <- Sys.getenv("SCDISTILL_LIBTORCH_LIB", unset = NA)
  Sys.setenv(SCDISTILL_LIBTORCH_LIB = paste(preload, collapse = ":"))
  on.exit(if (is.na(old)) Sys.unsetenv("SCDISTILL_LIBTORCH_LIB") else Sys.setenv(SCDISTILL_LIBTORCH_LIB = old))
  dll <- library.dynam("scdistill", "scdistill", lib.loc = dirname(system.file(package = "scdistill")))
  native_env$libtorch <- loc
  dll
}
