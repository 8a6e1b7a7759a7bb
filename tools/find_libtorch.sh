#!/bin/sh
# Prints the folder holding libtorch (with lib/ and include/), or explains how
# to get it and fails. Order: $LIBTORCH, the torch wheel of $LIBTORCH_PYTHON
# (default python3, located without importing it), then the venv made by
# tools/setup_torch.sh. tch 0.24 needs PyTorch 2.11.0 exactly.
WANT="2.11.0"
SCDISTILL_HOME="${SCDISTILL_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/scdistill}"
VENV_PY="$SCDISTILL_HOME/torch-$WANT/bin/python"
rejected=""

version_of() {  # the torch version recorded in a libtorch folder
  if [ -f "$1/version.py" ]; then
    sed -n "s/^__version__ = ['\"]\([^'\"]*\)['\"].*/\1/p" "$1/version.py"
  elif [ -f "$1/build-version" ]; then
    cat "$1/build-version"
  fi
}

try_dir() {  # succeeds (and prints) when $1 is a usable libtorch of the right version
  [ -n "$1" ] && [ -d "$1/lib" ] && [ -d "$1/include" ] || return 1
  v=$(version_of "$1")
  case "$v" in
    "$WANT"|"$WANT"+*) echo "$1"; return 0 ;;
  esac
  if [ -n "$LIBTORCH_BYPASS_VERSION_CHECK" ]; then echo "$1"; return 0; fi
  rejected="$rejected\n  $1 (version ${v:-unknown})"
  return 1
}

wheel_of() {  # the torch folder of a Python's torch wheel, without importing torch
  [ -n "$1" ] && command -v "$1" >/dev/null 2>&1 || return 1
  "$1" -c 'import importlib.util, os
s = importlib.util.find_spec("torch")
print(os.path.dirname(s.origin) if s and s.origin else "")' 2>/dev/null
}

if [ -n "$LIBTORCH" ]; then
  try_dir "$LIBTORCH" && exit 0
  echo "find_libtorch: LIBTORCH=$LIBTORCH is not a libtorch $WANT folder (lib/ and include/)" >&2
  exit 1
fi
try_dir "$(wheel_of "${LIBTORCH_PYTHON:-python3}")" && exit 0
try_dir "$(wheel_of "$VENV_PY")" && exit 0

cat >&2 <<MSG
scdistill needs libtorch $WANT (the C++ library inside the PyTorch $WANT wheel).
None was found.${rejected:+ Found, but of another version:$rejected}
Get it with either of:
  * tools/setup_torch.sh   (makes a venv in $SCDISTILL_HOME/torch-$WANT; needs python3 with venv)
  * pip install torch==$WANT, then LIBTORCH_PYTHON=/path/to/that/python R CMD INSTALL .
  * an unpacked libtorch $WANT: LIBTORCH=/path/to/libtorch R CMD INSTALL .
MSG
exit 1
