#!/usr/bin/env bash
# Sets up a fresh machine for ldm_jax (safe to re-run): the Debian package with the embedded
# Fashion-MNIST data where apt is available, and a virtual environment in .venv with the package
# and the extras given as arguments (e.g. `scripts/setup.sh dev,parity`).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo_cmd="sudo"
  echo "== installing dataset-fashion-mnist (apt)"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
stamp=".venv/.installed-$(echo "$extras" | tr ',' '-')-$(cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  echo "== installing ldm_jax ${spec} into .venv"
  .venv/bin/python -m pip install -q -e "$spec"
  touch "$stamp"
fi
