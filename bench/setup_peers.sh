#!/usr/bin/env bash
# Creates the Python environment of the reference tools the benchmarks compare
# against: scvi-tools 1.4.2, harmonypy 2.1.0, scDistill 0.3.1, scSpecies
# 0.1.4 (with muon and mudata), scrublet 0.2.3, CellBender 0.4.0, scib-metrics
# and scanpy, from PyPI. It lives in $SCDISTILL_HOME/peers, outside the package,
# and is never a dependency of it. PyTorch is not downloaded again: the venv sees the torch
# 2.11.0 of tools/setup_torch.sh through a .pth file. On Python 3.11 pip resolves
# scSpecies' muon to 0.1.9 and mudata to 0.3.10 (mudata 0.4 needs Python >= 3.12).
# scrublet 0.2.3 adds scikit-image (0.26.0) and leaves numpy, scipy and
# scikit-learn where scvi-tools has them. cellbender 0.4.0 (remove-background,
# bench/ambient_peer.py) runs on the pyro-ppl 1.9.2 scvi-tools brings and the
# shared torch 2.11.0 (it pins neither); it adds tables (3.11.1, with blosc2,
# numexpr, ndindex), lxml, lxml_html_clean, dill and pydantic, and downgrades
# nothing. Its HTML report needs `jupyter` on the PATH; without it the run
# logs "Unable to create report." and carries on.
# Benchmark-only R dependencies are installed here too where missing:
# DropletUtils (removeAmbience(), pipeline.R's ambient stage) from Debian's
# r-bioc-dropletutils (1.18.1, with scuttle and beachmat), as
# root with apt-get; otherwise the script says how to get it and goes on.
# Idempotent. Prints the venv's python on its last line.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SCDISTILL_HOME="${SCDISTILL_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/scdistill}"
PEERS="$SCDISTILL_HOME/peers"
PY="${PYTHON:-python3}"

bash "$ROOT/tools/setup_torch.sh" >&2
TORCH_SITE=$("$SCDISTILL_HOME/torch-2.11.0/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -x "$PEERS/bin/python" ]; then
  "$PY" -m venv "$PEERS"
fi
PEERS_SITE=$("$PEERS/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$TORCH_SITE" > "$PEERS_SITE/scdistill-torch.pth"
"$PEERS/bin/python" -m pip install --quiet --disable-pip-version-check \
  "scvi-tools==1.4.2" "harmonypy==2.1.0" "scdistill==0.3.1" "scib-metrics" "scanpy" "igraph" "leidenalg" \
  "scspecies==0.1.4" "muon" "mudata" "scrublet==0.2.3" "cellbender==0.4.0" >&2
"$PEERS/bin/python" - >&2 <<'PYEOF'
import importlib.metadata as m
for p in ["torch", "scvi-tools", "harmonypy", "scdistill", "scspecies", "muon", "mudata", "anndata",
          "numpy", "scib-metrics", "scanpy", "jax", "scrublet", "scikit-image", "cellbender",
          "pyro-ppl", "tables"]:
    print(f"{p:14s} {m.version(p)}")
PYEOF

# DropletUtils for the ambient stage of bench/pipeline.R (a benchmark-only R package).
if command -v Rscript >/dev/null 2>&1 &&
   ! Rscript -e 'quit(status = !requireNamespace("DropletUtils", quietly = TRUE))' >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y r-bioc-dropletutils >&2 ||
      echo "apt-get install r-bioc-dropletutils failed: the ambient stage skips DropletUtils" >&2
  else
    echo "DropletUtils missing: apt-get install r-bioc-dropletutils (as root) or" \
      "BiocManager::install(\"DropletUtils\"); the ambient stage skips it until then" >&2
  fi
fi
echo "$PEERS/bin/python"
