#!/usr/bin/env bash
# README command 1: set up, then train the default latent diffusion model (autoencoder, then
# class-conditional diffusion) on the embedded Fashion-MNIST data, and write its image grids,
# a final 64-sample grid and summary.json into the workdir (default runs/quickstart).
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-runs/quickstart}"
scripts/setup.sh
.venv/bin/python train.py --config=configs/ldm.py --workdir="$workdir"
.venv/bin/python sample.py --workdir="$workdir" --num_samples=64 --sampler=ddim --steps=50 \
    --guidance=3.0 --seed=0 --out="$workdir/samples.png"
echo "== done: $workdir (summary.json, samples.png, */reconstructions_*.png, */samples_*.png)"
