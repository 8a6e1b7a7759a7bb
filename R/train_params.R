#' Training settings shared by every model
#'
#' One object for the settings every model's training has in common, to be
#' passed as `train =` to [fit_vae()], [distill()] and [fit_multimodal()]
#' (and the models to come), so that a script sets them once. Settings left
#' `NULL` keep the model's own default (e.g. 45 epochs of patience for a VAE,
#' 10 for each phase of a distillation). The same settings are still accepted
#' as plain arguments of each function; giving one both ways is an error.
#'
#' @param max_epochs Epochs at most (for [distill()]: of each phase).
#' @param batch_size Cells per minibatch.
#' @param lr,weight_decay Adam's learning rate and weight decay.
#' @param kl_warmup Fraction of the planned steps over which the KL weight
#'   rises from 0 to 1 (VAEs only).
#' @param early_stopping,patience,min_delta Early stopping on the validation
#'   loss: stop when it has not improved by more than `min_delta` for
#'   `patience` epochs, keeping the best weights.
#' @param validation_fraction Fraction of the cells held out for validation.
#' @param seed Seed of the weights, minibatches and held-out cells: the
#'   same seed gives the same model on the CPU.
#' @param device `"auto"` (CUDA when available), `"cpu"`, `"cuda"` or `"cuda:N"`.
#' @param threads CPU threads (default: `getOption("scdistill.threads")`,
#'   else every core).
#' @param progress Show a progress bar.
#' @return A `scdistill_train_params` object: the settings given.
#' @examples
#' tp <- train_params(max_epochs = 30, lr = 5e-4, seed = 7, threads = 2)
#' tp
#' sce <- example_cellbench()
#' model <- fit_vae(sce[1:300, ], batch = "batch", train = tp)
#' model$info$train$lr
#' @export
train_params <- function(max_epochs = NULL, batch_size = NULL, lr = NULL, weight_decay = NULL, kl_warmup = NULL,
                         early_stopping = NULL, patience = NULL, min_delta = NULL, validation_fraction = NULL,
                         seed = NULL, device = NULL, threads = NULL, progress = NULL) {
  given <- Filter(Negate(is.null), as.list(environment()))
  structure(given[order(match(names(given), names(formals())))], class = "scdistill_train_params")
}

#' @method print scdistill_train_params
#' @export
print.scdistill_train_params <- function(x, ...) {
  if (!length(x)) {
    cat("Training settings: every model's defaults\n")
    return(invisible(x))
  }
  cat("Training settings (others: the model's defaults):\n")
  for (nm in names(x)) cat(sprintf("  %-20s %s\n", nm, format(x[[nm]])))
  invisible(x)
}

# Applies `train` (a train_params()) to the calling fit function's
# arguments in `env`; `explicit` are the arguments the caller gave, which
# must not also be in `train`; `map` renames a setting to the function's
# argument(s) (distill(): max_epochs -> both phases); settings the function
# does not have are an error naming them.
apply_train_params <- function(train, env, explicit, fun, map = list()) {
  if (is.null(train)) return(invisible(NULL))
  if (!inherits(train, "scdistill_train_params")) {
    stop("`train` must come from train_params(), not ", class(train)[1], call. = FALSE)
  }
  for (nm in names(train)) {
    targets <- map[[nm]] %||% nm
    if (!all(targets %in% ls(env))) {
      stop("train_params(", nm, " =) does not apply to ", fun, "()", call. = FALSE)
    }
    if (any(targets %in% explicit)) {
      stop("`", targets[targets %in% explicit][1], "` is given both as an argument and in `train`; give it once",
           call. = FALSE)
    }
    for (t in targets) assign(t, train[[nm]], envir = env)
  }
  invisible(NULL)
}
