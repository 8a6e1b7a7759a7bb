#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for scdistill and runs the demo:
#   1. Debian packages: R, the Bioconductor/CRAN packages the package and its
#      tests use (CRAN itself is not needed), pandoc, python3-venv;
#   2. PyTorch 2.11.0 from PyPI into a venv, for its libtorch (tools/setup_torch.sh);
#   3. R CMD INSTALL of this package (Rust crates come from crates.io);
#   4. the demo on the example shipped in the package (tools/demo.R).
# Idempotent: steps already done take seconds.
#
#   bash tools/setup.sh            # all of it
#   bash tools/setup.sh --no-demo  # steps 1-3 (tools/test.sh uses this)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DEMO=1
[ "${1:-}" = "--no-demo" ] && DEMO=0

export SCDISTILL_HOME="${SCDISTILL_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/scdistill}"
# One Rust build cache for every install, check and test run on this machine.
export SCDISTILL_CARGO_TARGET_DIR="${SCDISTILL_CARGO_TARGET_DIR:-$SCDISTILL_HOME/cargo-target}"
step() { printf '\n==> %s\n' "$*"; }
t0=$(date +%s)

step "Debian packages"
PKGS=(r-base-dev r-cran-matrix r-cran-cli r-cran-testthat r-cran-roxygen2 r-cran-knitr
      r-cran-rmarkdown r-bioc-singlecellexperiment r-bioc-summarizedexperiment
      r-cran-seurat r-cran-seuratobject r-bioc-delayedarray r-bioc-hdf5array
      r-bioc-deseq2 r-bioc-edger r-cran-uwot r-cran-ggplot2 r-cran-irlba r-cran-processx
      r-bioc-multiassayexperiment r-bioc-rhdf5 libhdf5-dev pkg-config
      pandoc python3 python3-venv build-essential ca-certificates zip unzip xz-utils
      devscripts qpdf)  # checkbashisms and qpdf, for R CMD check --as-cran
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "setup: root (or sudo) is needed to install: ${missing[*]}" >&2; exit 1; }
    SUDO=sudo
  fi
  echo "installing ${#missing[@]} package(s): ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "all ${#PKGS[@]} present"
fi

step "Rust toolchain"
export PATH="$PATH:$HOME/.cargo/bin"
if ! command -v cargo >/dev/null; then
  echo "setup: cargo was not found. Install Rust >= 1.84 with rustup (Debian 12's rustc is too old)." >&2
  exit 1
fi
rust_minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
if [ "$rust_minor" -lt 84 ]; then
  echo "setup: $(rustc --version) is too old; scdistill needs Rust >= 1.84 (rustup update)." >&2
  exit 1
fi
rustc --version

step "PyTorch 2.11.0 (libtorch)"
bash tools/setup_torch.sh

step "R package"
LIB_ARGS=()
if [ "$(id -u)" != 0 ]; then
  userlib=$(Rscript -e 'cat(Sys.getenv("R_LIBS_USER"))')
  mkdir -p "$userlib"
  LIB_ARGS=(-l "$userlib")
fi
R CMD INSTALL "${LIB_ARGS[@]}" --no-multiarch . 2>&1 | grep -vE '^\s+Compiling ' || { echo "setup: R CMD INSTALL failed" >&2; exit 1; }
echo "setup done in $(( $(date +%s) - t0 )) s"

if [ "$DEMO" = 1 ]; then
  step "Demo: the shipped CellBench example"
  Rscript tools/demo.R
fi
