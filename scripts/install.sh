#!/usr/bin/env bash
# Installs everything napari-pathflip needs on a fresh Debian machine with Python 3.11:
# the system libraries for headless Qt + Xvfb, a virtual environment in .venv, and the package with pinned versions.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxcb-image0 libxcb-render-util0 \
libxcb-shape0 libxcb-xinerama0 libxcb-randr0 libxkbcommon-x11-0 libegl1 libgl1 libfontconfig1 libdbus-1-3 libglib2.0-0"
missing=$(for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first and pinned: the CPU wheel; letting pip choose pulls CUDA packages.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test]"
echo "napari-pathflip installed in .venv"
