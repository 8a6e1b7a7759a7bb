#!/usr/bin/env bash
# Installs PyTorch 2.11.0 from PyPI into a venv kept in a stable place,
# $SCDISTILL_HOME/torch-2.11.0 (default ~/.local/share/scdistill). The package
# links to its libtorch by absolute path (rpath): leave that folder in place.
# Quick when already done.
set -euo pipefail
WANT=2.11.0
SCDISTILL_HOME="${SCDISTILL_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/scdistill}"
VENV="$SCDISTILL_HOME/torch-$WANT"
PY="${PYTHON:-python3}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<PYEOF 2>/dev/null
import importlib.metadata as m, sys
sys.exit(0 if m.version("torch").split("+")[0] == "$WANT" else 1)
PYEOF
then
  echo "setup_torch: PyTorch $WANT already in $VENV"
  exit 0
fi
echo "setup_torch: installing PyTorch $WANT (about 4.5 GB with its CUDA libraries) into $VENV"
mkdir -p "$SCDISTILL_HOME"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$WANT"
echo "setup_torch: done"
