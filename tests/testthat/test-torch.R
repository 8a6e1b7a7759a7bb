test_that("torch_config reports the pinned libtorch and applies threads", {
  cfg <- torch_config(device = "cpu", threads = 1)
  expect_s3_class(cfg, "scdistill_torch_config")
  # libtorch's matrix products use its own BLAS, not R's (which exports the
  # same Fortran names and would be ten times slower as the reference BLAS).
  expect_match(basename(cfg$blas), "^libtorch_cpu")
  expect_match(cfg$libtorch_version, "^2\\.11\\.0")
  expect_identical(cfg$device, "cpu")
  expect_identical(cfg$threads, 1L)
  expect_output(print(cfg), "libtorch 2.11.0")
  auto <- torch_config("auto", threads = 1)
  expect_identical(auto$device, if (auto$cuda_available) "cuda:0" else "cpu")
})

test_that("the thread policy: argument, then option, then cores; OMP_THREAD_LIMIT caps", {
  withr_local <- function(opt, env) {
    old_opt <- options(scdistill.threads = opt)
    old_env <- Sys.getenv("OMP_THREAD_LIMIT", unset = NA)
    if (is.na(env)) Sys.unsetenv("OMP_THREAD_LIMIT") else Sys.setenv(OMP_THREAD_LIMIT = env)
    function() {
      options(old_opt)
      if (is.na(old_env)) Sys.unsetenv("OMP_THREAD_LIMIT") else Sys.setenv(OMP_THREAD_LIMIT = old_env)
    }
  }
  restore <- withr_local(opt = 1, env = NA)
  on.exit(restore())
  expect_identical(torch_config("cpu")$threads, 1L)
  expect_identical(torch_config("cpu", threads = 2)$threads, 2L)
  restore(); restore <- withr_local(opt = NULL, env = "1")
  expect_identical(torch_config("cpu", threads = 2)$threads, 1L)
  restore(); restore <- withr_local(opt = NULL, env = NA)
  expect_identical(torch_config("cpu")$threads, scdistill:::rs_available_threads())
  expect_error(torch_config("cpu", threads = 0), "`threads` must be a whole number >= 1")
})

test_that("unknown or unavailable devices give clear errors", {
  expect_error(torch_config("gpu"), "must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", not \"gpu\"")
  expect_error(torch_config(1), "`device` must be one string")
  skip_if(torch_config("auto")$cuda_available)
  expect_error(torch_config("cuda"), "asks for cuda but libtorch sees 0 CUDA device")
})
