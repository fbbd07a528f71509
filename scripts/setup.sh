#!/usr/bin/env bash
# Create the virtual environment and install cogpipe with its pins (used by `make`, CI and
# the Docker images). A second run is a no-op while pyproject.toml is unchanged.
#
#   scripts/setup.sh                     # .venv with Python 3.11/3.12, CPU torch 2.13.0
#   TORCH_SPEC="torch==2.13.0" EXTRAS=dev,gpu VENV=/opt/venv scripts/setup.sh   # the GPU image
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev}  # the GPU image adds `gpu` (bitsandbytes)
PY=${PYTHON:-$(command -v python3.11 || command -v python3.12 || command -v python3)}
stamp="$VENV/.cogpipe-setup"
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC $EXTRAS"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: creating $VENV with $($PY --version) and installing cogpipe (a few minutes once)"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first: on hosts whose pip finds a local CPU build, this keeps the CUDA wheels out.
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options (--index-url ...)
"$VENV/bin/python" -m pip install -q $TORCH_SPEC
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
echo "$want" > "$stamp"
echo "setup: done ($VENV)"
