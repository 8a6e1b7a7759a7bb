#!/usr/bin/env bash
# The standard R install path, tested offline: a source package installed with
# install.packages(tarball, repos = NULL) into a clean library on a machine
# where no libtorch is found, so configure fetches one (from a file:// URL,
# SHA-256 checked) and the crates come vendored; then, with that libtorch
# gone, install_libtorch() into a fresh place and a model trained on it. Also:
# a wrong checksum and a truncated archive stop with a clear error and leave
# nothing installed.
#   bash tools/test_install.sh SOURCE_TARBALL      (called by tools/test.sh)
# The libtorch archive is made from the wheel tools/setup.sh installed, in
# PyTorch's libtorch-zip layout, with the CPU libraries only.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARBALL=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
export SCDISTILL_HOME="${SCDISTILL_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/scdistill}"
LT=$(sh "$ROOT/tools/find_libtorch.sh") || exit 1
W=$(mktemp -d "${TMPDIR:-/tmp}/scdistill-install.XXXXXX")
pass=0; fail=0
ok() { pass=$((pass + 1)); echo "  ok: $*"; }
bad() { fail=$((fail + 1)); echo "  FAILED: $*"; }

echo "--- a libtorch archive (CPU, libtorch-zip layout) from $LT"
A=$W/archive/libtorch
mkdir -p "$A/lib"
cp "$LT"/lib/libc10.so "$LT"/lib/libtorch_cpu.so "$LT"/lib/libgomp.so.1 "$A/lib/"
cp "$LT"/../nvidia/cu13/lib/libcudart.so.13 "$LT"/../nvidia/cu13/lib/libcupti.so.13 "$A/lib/"
cp -r "$LT/include" "$A/"
echo "2.11.0+cpu" > "$A/build-version"
(cd "$W/archive" && zip -q -1 -r "$W/libtorch.zip" libtorch) || { echo "zip failed"; exit 1; }
rm -rf "$W/archive"
SHA=$(sha256sum "$W/libtorch.zip" | cut -c1-64)
head -c 20000000 "$W/libtorch.zip" > "$W/truncated.zip"
SHA_TRUNC=$(sha256sum "$W/truncated.zip" | cut -c1-64)
echo "    $(du -h "$W/libtorch.zip" | cut -f1), sha256 $SHA"

echo "--- the source package with its crates vendored"
mkdir -p "$W/src" && tar xzf "$TARBALL" -C "$W/src"
sh "$ROOT/tools/vendor.sh" "$W/src/scdistill" || exit 1
PKG=$W/$(basename "$TARBALL")
(cd "$W/src" && tar czf "$PKG" scdistill) && rm -rf "$W/src"

# A machine with no libtorch: no LIBTORCH, no Python torch, no setup venv;
# R's user folders and the package library are fresh; no network for cargo.
mkdir -p "$W/lib" "$W/home"
run_r() {
  env -u LIBTORCH -u SCDISTILL_LIBTORCH LIBTORCH_PYTHON=/nonexistent SCDISTILL_HOME="$W/home" \
    R_LIBS="$W/lib" R_USER_CACHE_DIR="$W/cache" R_USER_CONFIG_DIR="$W/config" \
    SCDISTILL_CARGO_TARGET_DIR="$SCDISTILL_HOME/cargo-target-install" CARGO_NET_OFFLINE=true \
    "$@"
}
install_pkg() {  # install_pkg SHA URL LOG
  run_r SCDISTILL_LIBTORCH_URL="$2" SCDISTILL_LIBTORCH_SHA256="$1" \
    Rscript -e "install.packages('$PKG', repos = NULL, lib = '$W/lib')" > "$3" 2>&1
  [ -d "$W/lib/scdistill" ]
}
leftovers() { find "$W/cache" -mindepth 1 -maxdepth 3 -name '*libtorch*' 2>/dev/null | wc -l; }

echo "--- install.packages() with a wrong checksum"
install_pkg 0000000000000000000000000000000000000000000000000000000000000000 "file://$W/libtorch.zip" "$W/wrong.log" \
  && bad "installed despite a wrong checksum" || ok "refused"
grep -q "SHA-256 mismatch" "$W/wrong.log" && ok "says: $(grep -o 'SHA-256 mismatch[^:]*' "$W/wrong.log" | head -1)" \
  || { bad "no checksum message"; tail -5 "$W/wrong.log"; }
[ "$(leftovers)" = 0 ] && ok "nothing left in the cache" || bad "left: $(find "$W/cache" -name '*libtorch*')"

echo "--- install.packages() with a truncated archive"
install_pkg "$SHA_TRUNC" "file://$W/truncated.zip" "$W/trunc.log" \
  && bad "installed from a truncated archive" || ok "refused"
grep -q "not a complete zip archive" "$W/trunc.log" && ok "says: truncated.zip is not a complete zip archive" \
  || { bad "no truncation message"; tail -5 "$W/trunc.log"; }
[ "$(leftovers)" = 0 ] && ok "nothing left in the cache" || bad "left: $(find "$W/cache" -name '*libtorch*')"

echo "--- install.packages() fetching libtorch from file:// (then the Rust build, offline)"
if install_pkg "$SHA" "file://$W/libtorch.zip" "$W/install.log"; then
  ok "installed"
  grep -E "configure: (no libtorch|crates|libtorch:)" "$W/install.log" | sed 's/^/    /'
else
  bad "install failed"; tail -30 "$W/install.log"
  echo "install path: $pass passed, $fail failed (stopped: nothing to test further)"; exit 1
fi

echo "--- the libtorch it was built against removed; install_libtorch() into a fresh place"
rm -rf "$W/cache"
run_r Rscript -e 'library(scdistill); stopifnot(startsWith(system.file(package = "scdistill"), Sys.getenv("R_LIBS")))
  r <- tryCatch(fit_vae(simulate_counts(200, 100, seed = 1), max_epochs = 1), error = function(e) conditionMessage(e))
  stopifnot(is.character(r)); cat(r, "\n"); stopifnot(grepl("install_libtorch()", r, fixed = TRUE))' > "$W/missing.log" 2>&1 \
  && ok "a model call without libtorch says: $(head -c 160 "$W/missing.log")" || { bad "no clear error"; cat "$W/missing.log"; }
run_r Rscript -e "scdistill::install_libtorch(url = 'file://$W/libtorch.zip', sha256 = '$SHA', path = '$W/fresh')" \
  > "$W/fetch.log" 2>&1 && ok "install_libtorch() into $W/fresh" || { bad "install_libtorch failed"; cat "$W/fetch.log"; }
run_r Rscript -e "library(scdistill); x <- simulate_counts(300, 200, seed = 1)
  m <- fit_vae(x, max_epochs = 3, seed = 1); z <- latent(m, x)
  stopifnot(nrow(z) == 300, all(is.finite(z)))
  cfg <- torch_config(); print(cfg)
  want <- normalizePath('$W/fresh/libtorch-2.11.0-cpu')
  stopifnot(cfg\$libtorch_path == want, cfg\$libtorch_source == 'install_libtorch()',
            startsWith(normalizePath(cfg\$blas), want))" > "$W/fit.log" 2>&1 \
  && ok "fit_vae() on the installed libtorch; torch_config(): $(grep 'from' "$W/fit.log" | head -1 | sed 's/^ *//')" \
  || { bad "fit on the fresh libtorch failed"; tail -20 "$W/fit.log"; }

echo "install path: $pass passed, $fail failed"
[ "$fail" = 0 ] && rm -rf "$W"
[ "$fail" = 0 ]
