#!/usr/bin/env bash
# README command 1: set up, then train the default model on the embedded Fashion-MNIST data
# and write its image grids and summary.json into the workdir (default runs/quickstart).
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-runs/quickstart}"
scripts/setup.sh
.venv/bin/python train.py --config=configs/autoencoder.py --workdir="$workdir"
echo "== done: $workdir (summary.json, autoencoder/reconstructions_*.png, TensorBoard events)"
