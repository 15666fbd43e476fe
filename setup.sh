#!/usr/bin/env bash
# One command on a fresh machine: make .venv, install edgeml with every extra,
# then run the main job: compile the shipped digits example into digits.edgepkg.
#   bash setup.sh            # set up + compile
#   bash setup.sh --install  # set up only (CI uses this)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# Debian packages the tests use (mosquitto, the aarch64 cross toolchain and emulator): installed when this
# runs as root with apt-get; otherwise the script says what is missing and those tests skip with the reason.
bash scripts/system_packages.sh
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch first, pinned, so no extra pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[all]'
if [ "${1:-}" = "--install" ]; then
  exit 0
fi
.venv/bin/edgeml compile examples/digits/digits.onnx --target x86_64 \
  --calib examples/digits/calib.npz --eval examples/digits/eval.npz --max-accuracy-drop 1.0 \
  --name digits-cnn --version 1.0.0 -o digits.edgepkg
.venv/bin/edgeml inspect digits.edgepkg
.venv/bin/edgeml run digits.edgepkg --input examples/digits/sample.npz
