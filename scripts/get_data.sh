#!/usr/bin/env bash
# Get Fashion-MNIST: Debian's dataset-fashion-mnist (idx files in /usr/share/datasets/fashion-mnist),
# else torchvision's download (for users who are online), else one clear error.
set -u
DEB_DIR=/usr/share/datasets/fashion-mnist
CACHE_DIR="${HOME}/.cache/slimdeploy/fashion-mnist"
have() { [ -f "$1/t10k-images-idx3-ubyte.gz" ] || [ -f "$1/t10k-images-idx3-ubyte" ]; }

if have "$DEB_DIR" || have "$CACHE_DIR/FashionMNIST/raw"; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  echo "getting Fashion-MNIST from Debian's dataset-fashion-mnist..." >&2
  ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist) \
    >/dev/null 2>&1 || true
  have "$DEB_DIR" && exit 0
fi
echo "Debian package unavailable; trying torchvision's download..." >&2
if .venv/bin/python -c "
import sys, torchvision
torchvision.datasets.FashionMNIST('$CACHE_DIR', train=True, download=True)
torchvision.datasets.FashionMNIST('$CACHE_DIR', train=False, download=True)
" >/dev/null 2>&1 && have "$CACHE_DIR/FashionMNIST/raw"; then
  exit 0
fi
echo "error: cannot get Fashion-MNIST: install Debian's dataset-fashion-mnist (as root) or go online for torchvision's download" >&2
exit 1
