# Small helpers shared by the R layer.

`%||%` <- function(a, b) if (is.null(a)) b else a

utils_head <- function(x, n) if (length(x) > n) c(x[seq_len(n)], "...") else x

# New cells `z` must lie in the space a fit was made on: `n_in` dimensions
# named `dims` (when both have names). `what` names the fit in the message.
check_same_space <- function(z, n_in, dims, what) {
  if (ncol(z) != n_in) {
    stop("the new cells have ", ncol(z), " dimensions where ", what, " was fitted on ", n_in,
         ": give them in the same space (the same reduction)", call. = FALSE)
  }
  if (!is.null(colnames(z)) && !is.null(dims) && !identical(colnames(z), dims)) {
    stop("the new cells' dimensions (", paste(utils_head(colnames(z), 3), collapse = ", "),
         ") are not those ", what, " was fitted on (", paste(utils_head(dims, 3), collapse = ", "), ")",
         call. = FALSE)
  }
  invisible(z)
}

fmt_int <- function(n) format(n, big.mark = ",", scientific = FALSE, trim = TRUE)

# Stops with a helpful message when a suggested package is missing.
need <- function(pkg) {
  if (!requireNamespace(pkg, quietly = TRUE)) {
    stop("this needs the Bioconductor/CRAN package '", pkg, "'; install it ",
         "(on Debian: apt-get install r-bioc-", tolower(pkg), " or r-cran-", tolower(pkg), ")",
         call. = FALSE)
  }
}

# Evaluates a call into Rust and re-raises its error as coming from the
# exported function that made the call.
rust <- function(expr) {
  call <- sys.call(-1)
  tryCatch(expr, error = function(e) {
    stop(simpleError(conditionMessage(e), call = call))
  })
}

# `x`, a double vector or matrix the glue has just returned and nothing else
# holds, given `dim` (NULL: its own), `dimnames` and the attributes in `...`
# in place: matrix(x, dimnames =), `dimnames<-` or `attr<-` would copy it
# (400 MB at 10^6 cells and 50 dimensions). Never for a value the user has.
shape_in_place <- function(x, dim = NULL, dimnames, ...) {
  attrs <- c(list(dimnames = dimnames), list(...))
  if (!is.double(x)) {
    m <- matrix(x, nrow = dim[1] %||% nrow(x), ncol = dim[2] %||% ncol(x))
    attributes(m) <- c(list(dim = dim(m)), attrs)
    return(m)
  }
  rust(rs_shape_in_place(x, if (!is.null(dim)) as.integer(dim), attrs))
}

# The counts as the Rust routines take them: a dgCMatrix's slots and dimnames.
slots <- function(cnt) {
  m <- cnt$counts
  list(p = m@p, i = m@i, x = m@x, genes = rownames(m), cells = colnames(m))
}

# A cells-as-rows CSR from Rust, list(p, i, x), as a features x cells dgCMatrix.
csr_to_dgc <- function(csr, features, cells) {
  new("dgCMatrix", i = csr$i, p = csr$p, x = csr$x, Dim = c(length(features), length(cells)),
      Dimnames = list(features, cells))
}

# Batch codes (1-based) and levels for Rust, NULLs when there is no batch.
batch_args <- function(batch) {
  if (is.null(batch)) return(list(codes = NULL, levels = NULL))
  list(codes = as.integer(batch), levels = levels(batch))
}

# A factor as the glue's categorical covariate: list(name, codes (1-based), levels).
factor_arg <- function(f, name) list(name = name, codes = as.integer(f), levels = levels(f))

check_count <- function(x, arg, min = 1) {
  if (!is.numeric(x) || length(x) != 1 || is.na(x) || x != round(x) || x < min) {
    stop("`", arg, "` must be a whole number >= ", min, call. = FALSE)
  }
  as.integer(x)
}

check_flag <- function(x, arg) {
  if (!is.logical(x) || length(x) != 1 || is.na(x)) stop("`", arg, "` must be TRUE or FALSE", call. = FALSE)
  x
}

check_fraction <- function(x, arg, upper_open = TRUE) {
  ok <- is.numeric(x) && length(x) == 1 && !is.na(x) && x >= 0 && (if (upper_open) x < 1 else x <= 1)
  if (!ok) stop("`", arg, "` must be a number in [0, 1", if (upper_open) ")" else "]", call. = FALSE)
  x
}

check_positive <- function(x, arg, zero_ok = FALSE) {
  ok <- is.numeric(x) && length(x) == 1 && is.finite(x) && (x > 0 || (zero_ok && x == 0))
  if (!ok) stop("`", arg, "` must be a ", if (zero_ok) "non-negative" else "positive", " number", call. = FALSE)
  x
}

# A seed: a whole number from 0 to 2^53 (doubles hold every whole number
# up to there), kept as a double so that no integer overflow warns.
check_seed <- function(x, arg = "seed") {
  if (!is.numeric(x) || length(x) != 1 || is.na(x) || x != round(x) || x < 0 || x > 2^53) {
    stop("`", arg, "` must be a whole number from 0 to 2^53", call. = FALSE)
  }
  as.double(x)
}

# match.arg() whose error names the argument: `arg` against the choices in
# the calling function's default for `name`.
choose_arg <- function(arg, name) {
  choices <- eval(formals(sys.function(sys.parent()))[[name]])
  if (identical(arg, choices)) return(arg[[1]])
  if (is.character(arg) && length(arg) == 1 && !is.na(arg)) {
    hit <- pmatch(arg, choices)
    if (!is.na(hit)) return(choices[[hit]])
  }
  stop("`", name, "` must be one of ", paste0("\"", choices, "\"", collapse = ", "), ", not ",
       paste(deparse(arg), collapse = " "), call. = FALSE)
}
