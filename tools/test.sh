#!/usr/bin/env bash
# Runs every test: the Rust core (cargo test, release profile), the R
# package (R CMD build, then R CMD check --as-cran --no-manual on the tarball, which runs
# the testthat suite, the examples and the vignettes), and the standard R
# install path on that tarball (tools/test_install.sh: libtorch fetched and
# checked, crates vendored, a model run on a libtorch installed elsewhere). Sets the machine up
# first with tools/setup.sh --no-demo (seconds when already done).
# Tests that read ../shared/data skip when it is absent.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export SCDISTILL_HOME="${SCDISTILL_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/scdistill}"
export SCDISTILL_CARGO_TARGET_DIR="${SCDISTILL_CARGO_TARGET_DIR:-$SCDISTILL_HOME/cargo-target}"
export PATH="$PATH:$HOME/.cargo/bin"
[ -d "$ROOT/../shared/data" ] && export SCDISTILL_SHARED_DATA="$(cd "$ROOT/../shared/data" && pwd)"
step() { printf '\n==> %s\n' "$*"; }

bash tools/setup.sh --no-demo || { echo "test: setup failed" >&2; exit 1; }
LIBTORCH=$(sh tools/find_libtorch.sh) || exit 1
export LIBTORCH
WORK=$(mktemp -d "${TMPDIR:-/tmp}/scdistill-test.XXXXXX")

step "R/extendr-wrappers.R matches the glue's entry points"
Rscript tools/wrappers.R --check
wrappers_rc=$?

step "Rust core: cargo test --release"
sh tools/claim_cargo_cache.sh src/rust "$SCDISTILL_CARGO_TARGET_DIR"
(cd src/rust && CARGO_TARGET_DIR="$SCDISTILL_CARGO_TARGET_DIR" cargo test --release --workspace 2>&1) | tee "$WORK/cargo.log"
cargo_rc=${PIPESTATUS[0]}
rust_pass=$(grep -E '^test result' "$WORK/cargo.log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
rust_fail=$(grep -E '^test result' "$WORK/cargo.log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
[ "$cargo_rc" != 0 ] && [ "$rust_fail" = 0 ] && rust_fail=1   # did not build or crashed

step "R package: R CMD build"
(cd "$WORK" && R CMD build "$ROOT" 2>&1 | grep -vE '^\s+Compiling ')
tarball=$(ls "$WORK"/scdistill_*.tar.gz 2>/dev/null | head -n 1)

step "R package: R CMD check --as-cran --no-manual (testthat, examples, vignettes; no network checks)"
check_status="ERROR (R CMD build failed)"
r_pass=0; r_fail=0; r_skip=0; r_warn=0
if [ -n "$tarball" ]; then
  (cd "$WORK" && _R_CHECK_CRAN_INCOMING_REMOTE_=false _R_CHECK_FUTURE_FILE_TIMESTAMPS_=false \
    R CMD check --as-cran --no-manual "$tarball" 2>&1) | tee "$WORK/check.log" | grep -vE '^\s+Compiling '
  check_status=$(grep -E '^Status:' "$WORK/check.log" | tail -n 1 | sed 's/^Status: //')
  [ -n "$check_status" ] || check_status="ERROR (no status)"
  rout=$(ls "$WORK"/scdistill.Rcheck/tests/testthat.Rout* 2>/dev/null | head -n 1)
  if [ -n "$rout" ]; then
    line=$(grep -E '\[ FAIL [0-9]+ \| WARN [0-9]+ \| SKIP [0-9]+ \| PASS [0-9]+ \]' "$rout" | tail -n 1)
    r_fail=$(echo "$line" | sed -E 's/.*FAIL ([0-9]+).*/\1/'); r_skip=$(echo "$line" | sed -E 's/.*SKIP ([0-9]+).*/\1/')
    r_warn=$(echo "$line" | sed -E 's/.*WARN ([0-9]+).*/\1/')
    r_pass=$(echo "$line" | sed -E 's/.*PASS ([0-9]+).*/\1/')
    [ -n "$line" ] || r_fail=1
    case "$rout" in *.fail) echo; echo "--- end of $rout ---"; tail -n 60 "$rout" ;; esac
  fi
fi

step "The standard R install path: install.packages() with libtorch fetched (file://), vendored crates"
install_pass=0; install_fail=1
if [ -n "$tarball" ]; then
  bash tools/test_install.sh "$tarball" 2>&1 | tee "$WORK/install.log"
  line=$(grep -E '^install path: [0-9]+ passed, [0-9]+ failed' "$WORK/install.log" | tail -n 1)
  install_pass=$(echo "$line" | sed -E 's/^install path: ([0-9]+) passed.*/\1/')
  install_fail=$(echo "$line" | sed -E 's/.* ([0-9]+) failed.*/\1/')
  [ -n "$line" ] || { install_pass=0; install_fail=1; }
fi

echo
echo "cargo test (core):  $rust_pass passed, $rust_fail failed"
echo "install path:       $install_pass passed, $install_fail failed"
echo "testthat (R API):   $r_pass passed, $r_fail failed, $r_skip skipped, ${r_warn:-0} warning(s)"
echo "R CMD check:        $check_status   (log: $WORK/check.log)"
failed=$((rust_fail + r_fail + install_fail + (wrappers_rc != 0)))
case "$check_status" in *ERROR*|*WARNING*) failed=$((failed + 1)) ;; esac
echo "scdistill: $((rust_pass + r_pass + install_pass)) passed, $failed failed, $r_skip skipped"
[ "$failed" = 0 ]
