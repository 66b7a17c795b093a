#!/usr/bin/env bash
# Creates/updates .venv for bev3d. Usage: tools/setup_env.sh [--dev]
# Installs torch==2.13.0 only when no torch is importable (pyproject asks for torch>=2.4), and the
# Debian libraries Open3D's headless renderer needs when running as root (else prints the apt line).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
EXTRA=""
[ "${1:-}" = "--dev" ] && EXTRA="[dev]"

if [ ! -x "$PY" ]; then
    echo "[setup] creating $VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[setup] no torch in $VENV: installing torch==2.13.0"
    "$PY" -m pip install -q torch==2.13.0
fi

# Reinstall only when pyproject.toml changed or a new extra is asked for.
STAMP="$VENV/.bev3d-installed${EXTRA}"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    echo "[setup] installing bev3d${EXTRA} (editable) and its dependencies"
    "$PY" -m pip install -q -e ".${EXTRA}"
    touch "$STAMP"
fi

PKGS="libusb-1.0-0 libgl1 libegl1 libgomp1 libvulkan1 mesa-vulkan-drivers"
MISSING=""
for p in $PKGS; do
    dpkg -s "$p" >/dev/null 2>&1 || MISSING="$MISSING $p"
done
if [ -n "$MISSING" ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "[setup] installing system libraries for headless Open3D:$MISSING"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq $MISSING >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $MISSING; }
    else
        echo "[setup] Open3D's headless renderer needs system libraries; run:"
        echo "    sudo apt-get install -y$MISSING"
        echo "[setup] until then the Open3D tests are skipped with this reason."
    fi
fi
