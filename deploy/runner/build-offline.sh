#!/bin/sh
# Build the runner image without a registry: debootstrap a minimal Debian with Python from
# this machine's apt mirror and `docker import` it (needs root and debootstrap).
#   sudo deploy/runner/build-offline.sh [--tag ferry/runner:py3] [--mirror URL] [--if-missing]
set -eu
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" -m worker.images "$@"
