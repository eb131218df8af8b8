#!/usr/bin/env bash
# Create .venv and install happyhorse-train into it (editable, with test tools). Safe to re-run: it
# skips the install when pyproject.toml has not changed since the last one.
#
# GPU machines: install the CUDA build of torch into .venv before running this (see README); this
# script only installs torch when none is importable, and then the CPU build torch==2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ]; then
    exit 0
fi
python -m pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0
# DeepSpeed ships only a source package whose setup.py imports torch: build it against the torch above.
python -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 python -m pip install --quiet --no-build-isolation "deepspeed>=0.17"
python -m pip install --quiet -e ".[dev]"
rm -f .venv/.installed-*
touch "$stamp"
echo "happyhorse-train installed in .venv"
