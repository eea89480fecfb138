#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with PyTorch, this package
# (editable, with every extra the tests use) and the example plugin package.
# Override the PyTorch wheels with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" for a CPU-only build
# without torchvision; timm then cannot be used).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# shellcheck disable=SC2086
$VPY -m pip install --quiet $TORCH_SPEC
$VPY -m pip install --quiet "setuptools>=68" wheel
$VPY -m pip install --quiet -e ".[dev,nni,tp]"
# The example third-party plugin packages (the tests check they register through entry points).
$VPY -m pip install --quiet --no-deps --no-build-isolation ./examples/plugin_rank_selector \
  ./examples/plugin_foreground_partitioner
echo "set-up done: $($VPY -c 'import torch, hsc_plugin; print("torch", torch.__version__, "hsc_plugin", hsc_plugin.__version__)')"
