test_that("a Rust panic becomes an R error and R carries on", {
  expect_error(scdistill:::rs_panic_for_test(FALSE), "deliberate panic on the R thread")
  expect_error(scdistill:::rs_panic_for_test(TRUE), "internal error in scdistill.*deliberate panic on a worker thread")
  expect_identical(torch_config("cpu", threads = 1)$threads, 1L) # still alive and working
})

test_that("Ctrl-C (SIGINT) stops work running in Rust and returns control to R", {
  skip_on_os("windows")
  rscript <- file.path(R.home("bin"), "Rscript")
  out <- tempfile()
  script <- tempfile(fileext = ".R")
  writeLines(c(
    "pid <- Sys.getpid()",
    "system(sprintf('(sleep 2; kill -INT %d) >/dev/null 2>&1 &', pid))",
    "res <- tryCatch(scdistill:::rs_wait_for_interrupt(60),",
    "  interrupt = function(e) 'interrupt', error = function(e) conditionMessage(e))",
    sprintf("writeLines(as.character(res), '%s')", out)), script)
  system2(rscript, script, stdout = FALSE, stderr = FALSE, timeout = 50)
  expect_true(file.exists(out))
  expect_match(readLines(out), "interrupt")
})
