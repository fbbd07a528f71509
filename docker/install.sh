#!/usr/bin/env bash
# The dependency install of both images (docker/Dockerfile), in the folder above this one,
# which holds pyproject.toml and scripts/setup.sh but not yet the source: cogpipe's
# packages as empty stand-ins (docker/standins.py), installed editable by scripts/setup.sh
# into /opt/venv, then removed, so the source copied in later takes their place. Wheels
# mounted at /wheels are preferred by pip.
#
#   TORCH_SPEC="torch==2.13.0" EXTRAS=dev,gpu docker/install.sh   # both as in setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

python3 docker/standins.py
PIP_FIND_LINKS=/wheels VENV=/opt/venv scripts/setup.sh
python3 docker/standins.py --remove
