# Getting libtorch: download, checksum, unpacking, and where models load it
# from. Small fake archives stand in for the real ones (the whole path with a
# real libtorch is tools/test_install.sh, run by tools/test.sh).

skip_if(!nzchar(Sys.which("zip")), "no zip program to make test archives")

# A zip of `files` (named: path inside the archive = content) in a temp folder.
make_zip <- function(files, name = "archive.zip") {
  src <- tempfile("zipsrc-")
  for (p in names(files)) {
    dir.create(dirname(file.path(src, p)), recursive = TRUE, showWarnings = FALSE)
    writeLines(files[[p]], file.path(src, p))
  }
  out <- file.path(tempfile("zip-"), name)
  dir.create(dirname(out))
  old <- setwd(src)
  on.exit(setwd(old))
  utils::zip(out, names(files), flags = "-q")
  out
}

libtorch_zip <- function(version = "2.11.0+cpu", name = "libtorch.zip", cuda = FALSE) {
  files <- list("libtorch/lib/libc10.so" = "c10", "libtorch/lib/libtorch_cpu.so" = "cpu",
                "libtorch/lib/libgomp-abc.so.1" = "gomp", "libtorch/include/torch/a.h" = "h",
                "libtorch/build-version" = version)
  if (cuda) files[["libtorch/lib/libtorch_cuda.so"]] <- "cuda"
  make_zip(files, name)
}

sha <- function(f) scdistill:::file_sha256(f)
leftovers <- function(path) list.files(path, all.files = TRUE, no.. = TRUE)

test_that("a libtorch zip is verified, unpacked into place and reused", {
  zip <- libtorch_zip()
  path <- tempfile("lt-")
  dir <- scdistill:::fetch_libtorch(path, "cpu", url = zip, sha256 = sha(zip), quiet = TRUE)
  expect_equal(basename(dir), "libtorch-2.11.0-cpu")
  expect_null(scdistill:::libtorch_dir_problem(dir))
  expect_setequal(list.files(file.path(dir, "lib")), c("libc10.so", "libtorch_cpu.so", "libgomp-abc.so.1"))
  expect_true(file.exists(file.path(dir, "include", "torch", "a.h")))
  expect_equal(leftovers(path), "libtorch-2.11.0-cpu")  # no staging folder left
  # Complete already: reused without reading the archive again.
  expect_equal(scdistill:::fetch_libtorch(path, "cpu", url = "file:///nonexistent.zip", sha256 = "x",
                                          quiet = TRUE), dir)
  # ...but a CUDA libtorch is not satisfied by a CPU one.
  expect_error(scdistill:::fetch_libtorch(path, "cuda", url = zip, sha256 = sha(zip), quiet = TRUE),
               "it is a CPU-only libtorch \\(no lib/libtorch_cuda.so\\).*nothing was installed")
})

test_that("a wrong checksum or a truncated archive installs nothing, with a clear error", {
  zip <- libtorch_zip()
  path <- tempfile("lt-")
  expect_error(scdistill:::fetch_libtorch(path, "cpu", url = paste0("file://", zip), sha256 = strrep("0", 64),
                                          quiet = TRUE),
               "SHA-256 mismatch for libtorch.zip: expected 0+, got [0-9a-f]{64}.*nothing was installed")
  expect_length(leftovers(path), 0)
  cut <- file.path(dirname(zip), "cut.zip")
  writeBin(readBin(zip, "raw", file.size(zip))[seq_len(file.size(zip) %/% 2)], cut)
  expect_error(scdistill:::fetch_libtorch(path, "cpu", url = cut, sha256 = sha(cut), quiet = TRUE),
               "cut.zip is not a complete zip archive")
  expect_length(leftovers(path), 0)
  expect_error(scdistill:::fetch_libtorch(path, "cpu", url = zip, quiet = TRUE), "needs its SHA-256")
  expect_error(scdistill:::fetch_libtorch(path, "cpu", url = "file:///no/such/file.zip", sha256 = "0", quiet = TRUE),
               "downloading file:///no/such/file.zip failed")
  expect_length(leftovers(path), 0)
})

test_that("an archive of another libtorch version is refused", {
  zip <- libtorch_zip("2.10.0+cpu")
  path <- tempfile("lt-")
  expect_error(scdistill:::fetch_libtorch(path, "cpu", url = zip, sha256 = sha(zip), quiet = TRUE),
               "holds libtorch 2.10.0\\+cpu, not 2.11.0; nothing was installed")
  expect_length(leftovers(path), 0)
})

test_that("the recorded parts (torch wheel + CUDA runtime wheels) assemble one libtorch", {
  wheel <- make_zip(list("torch/lib/libc10.so" = "c10", "torch/lib/libtorch_cpu.so" = "cpu",
                         "torch/lib/libgomp.so.1" = "gomp", "torch/lib/libtorch.so" = "needs cuda",
                         "torch/lib/libtorch_cuda.so" = "cuda", "torch/lib/libtorch_python.so" = "py",
                         "torch/include/ATen/b.h" = "h", "torch/__init__.py" = "",
                         "torch/version.py" = "__version__ = '2.11.0+cu130'"), "torch-2.11.0-x.whl")
  rt <- make_zip(list("nvidia/cu13/lib/libcudart.so.13" = "rt", "nvidia/cu13/include/c.h" = "h"),
                 "nvidia_cuda_runtime-13.whl")
  sources <- tempfile(fileext = ".csv")
  writeLines(c("# test", "type,platform,part,url,sha256",
               sprintf("cpu,%s,torch,file://%s,%s", scdistill:::libtorch_platform(), wheel, sha(wheel)),
               sprintf("cpu,%s,rt,%s,%s", scdistill:::libtorch_platform(), rt, sha(rt)),
               sprintf("cuda,%s,torch,file://%s,%s", scdistill:::libtorch_platform(), wheel, sha(wheel)),
               sprintf("cuda,%s,rt,%s,%s", scdistill:::libtorch_platform(), rt, sha(rt))), sources)
  path <- tempfile("lt-")
  cpu <- scdistill:::fetch_libtorch(path, "cpu", sources = sources, quiet = TRUE)
  # CPU: libtorch_cpu and what it links to; nothing that needs CUDA or Python.
  expect_setequal(list.files(file.path(cpu, "lib")),
                  c("libc10.so", "libtorch_cpu.so", "libgomp.so.1", "libcudart.so.13"))
  expect_equal(readLines(file.path(cpu, "build-version")), "2.11.0+cu130")
  expect_true(file.exists(file.path(cpu, "include", "ATen", "b.h")))
  # R's own unzip, where the system has none, unpacks the same.
  old <- options(unzip = "internal")
  on.exit(options(old))
  cuda <- scdistill:::fetch_libtorch(path, "cuda", sources = sources, quiet = TRUE)
  expect_setequal(list.files(file.path(cuda, "lib")),
                  c("libc10.so", "libtorch_cpu.so", "libgomp.so.1", "libtorch.so", "libtorch_cuda.so",
                    "libcudart.so.13"))
  expect_error(scdistill:::libtorch_parts("cpu", sources, platform = "plan9-mips"),
               "no libtorch 2.11.0 download is recorded for type \"cpu\" on plan9-mips.*`url` and `sha256`")
})

test_that("the package records the official files with their checksums", {
  tab <- utils::read.csv(system.file("libtorch", "sources.csv", package = "scdistill"), comment.char = "#")
  expect_setequal(unique(tab$type), c("cpu", "cuda"))
  expect_true(all(grepl("^[0-9a-f]{64}$", tab$sha256)))
  expect_true(all(startsWith(tab$url, "https://files.pythonhosted.org/")))
  expect_true(any(grepl("/torch-2\\.11\\.0-", tab$url[tab$type == "cpu"])))
})

test_that("install_libtorch() records its folder, and models look there first", {
  # A package linked against CUDA libtorch needs a CUDA one at run time.
  cuda <- scdistill:::libtorch_build_info()$cuda
  zip <- libtorch_zip(cuda = cuda)
  old <- Sys.getenv(c("R_USER_CONFIG_DIR", "SCDISTILL_LIBTORCH"), unset = NA)
  on.exit({
    for (n in names(old)) if (is.na(old[[n]])) Sys.unsetenv(n) else do.call(Sys.setenv, as.list(old[n]))
  })
  Sys.setenv(R_USER_CONFIG_DIR = tempfile("config-"))
  Sys.unsetenv("SCDISTILL_LIBTORCH")
  withr_opt <- options(scdistill.libtorch = NULL)
  on.exit(options(withr_opt), add = TRUE)
  path <- tempfile("lt-")
  dir <- install_libtorch(if (cuda) "cuda" else "cpu", url = zip, sha256 = sha(zip), path = path, quiet = TRUE)
  expect_equal(readLines(scdistill:::libtorch_record_file()), dir)
  loc <- scdistill:::libtorch_location()
  expect_equal(loc$dir, dir)
  expect_equal(loc$source, "install_libtorch()")
  # An explicit folder wins; a bad one is named, with what to run.
  options(scdistill.libtorch = dir)
  expect_equal(scdistill:::libtorch_location()$source, "option")
  options(scdistill.libtorch = tempfile("nowhere-"))
  expect_error(scdistill:::libtorch_location(), "nowhere-.* does not exist. Run scdistill::install_libtorch")
  options(scdistill.libtorch = NULL)
  unlink(dir, recursive = TRUE)
  expect_error(scdistill:::libtorch_location(), "recorded by install_libtorch\\(\\): .* does not exist")
  expect_error(install_libtorch(url = c("a", "b"), sha256 = "0", path = path, quiet = TRUE), "one address")
})
