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
#' @param batch_size Cells per minibatch; for a larger one, raise `lr` with
#'   [scaled_lr()].
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

#' Learning rate for a larger minibatch
#'
#' Every model trains by default on minibatches of 128 cells with Adam's
#' learning rate 1e-3. A larger minibatch takes fewer, less noisy steps per
#' epoch and keeps a GPU busier; the learning rate should then grow with it.
#' `scaled_lr()` gives that rate, to pass as `lr` together with
#' `batch_size`: by default the linear rule (Goyal et al. 2017: learning
#' rate × k for a minibatch k times larger), or the square-root rule
#' proposed for Adam (Malladi et al. 2022: × √k).
#'
#' Measured with [fit_vae()] on 20,000 simulated cells × 2,000 genes, 60
#' epochs each (`bench/large_batch.R`): with the linear rule the held-out
#' ELBO stayed within 0.02% of the default's at minibatches of 512 to 4,096
#' cells; the square-root rule lost 0.2% to 2.9%, taking too small steps
#' for the fewer of them. At 8,192 cells (two steps per epoch there) the
#' linear rule lost 1.4%: keep a few dozen steps per epoch. On a CPU a
#' larger minibatch is barely faster; it pays on a GPU.
#'
#' @param batch_size The minibatch the model will train on (cells).
#' @param rule `"linear"` (default) or `"sqrt"`.
#' @param base_lr,base_batch_size The learning rate known to work at a
#'   minibatch size: by default the models' own, 1e-3 at 128 cells.
#' @return The learning rate, a number.
#' @examples
#' scaled_lr(1024)                 # 1e-3 * 8
#' scaled_lr(1024, rule = "sqrt")  # 1e-3 * sqrt(8)
#' sim <- simulate_counts(n_cells = 2000, n_genes = 200, seed = 1)
#' model <- fit_vae(sim, batch = "batch", batch_size = 512, lr = scaled_lr(512),
#'                  max_epochs = 10, threads = 2)
#' model$info$train$lr
#' @export
scaled_lr <- function(batch_size, rule = c("linear", "sqrt"), base_lr = 1e-3, base_batch_size = 128) {
  batch_size <- check_count(batch_size, "batch_size", min = 2)
  base_batch_size <- check_count(base_batch_size, "base_batch_size", min = 2)
  check_positive(base_lr, "base_lr")
  rule <- choose_arg(rule, "rule")
  k <- batch_size / base_batch_size
  base_lr * if (rule == "sqrt") sqrt(k) else k
}
