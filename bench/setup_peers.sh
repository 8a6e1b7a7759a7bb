#!/usr/bin/env bash
# Creates the Python environment of the reference tools the benchmarks compare
# against: scvi-tools 1.4.2, harmonypy 2.1.0, scDistill 0.3.1, scSpecies
# 0.1.4 (with muon and mudata), scrublet 0.2.3, scib-metrics and scanpy, from
# PyPI. It lives in $SCDISTILL_HOME/peers, outside the package, and is never a
# dependency of it. PyTorch is not downloaded again: the venv sees the torch
# 2.11.0 of tools/setup_torch.sh through a .pth file. On Python 3.11 pip resolves
# scSpecies' muon to 0.1.9 and mudata to 0.3.10 (mudata 0.4 needs Python >= 3.12).
# scrublet 0.2.3 adds scikit-image (0.26.0) and leaves numpy, scipy and
# scikit-learn where scvi-tools has them.
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
  "scspecies==0.1.4" "muon" "mudata" "scrublet==0.2.3" >&2
"$PEERS/bin/python" - >&2 <<'PYEOF'
import importlib.metadata as m
for p in ["torch", "scvi-tools", "harmonypy", "scdistill", "scspecies", "muon", "mudata", "anndata",
          "numpy", "scib-metrics", "scanpy", "jax", "scrublet", "scikit-image"]:
    print(f"{p:14s} {m.version(p)}")
PYEOF
echo "$PEERS/bin/python"
