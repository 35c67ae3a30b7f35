#!/usr/bin/env bash
# Build Horovod 0.28.1 for the PyTorch in $PY's environment, once, and cache the wheel.
#
# Horovod 0.28.1 (its last release) asks for C++14 while PyTorch >= 2.1 needs C++17;
# cxx17.patch beside this script is the same change upstream made on master (PR #3998).
# The wheel is tied to the exact torch build, Python and patch, so all three are in the
# cache key. A cached wheel turns a second set-up into a few seconds of `pip install`.
#
# Usage: build_horovod.sh PYTHON        (PYTHON: the venv's interpreter)
# Env:   HVD_SIGNSGD_CACHE   cache root (default ~/.cache/hvd_signsgd)
#        MAKEFLAGS            parallel build jobs (default -j<nproc>)
set -euo pipefail

PY=${1:?usage: build_horovod.sh PYTHON}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VERSION=0.28.1
PATCH="$HERE/cxx17.patch"
CACHE=${HVD_SIGNSGD_CACHE:-$HOME/.cache/hvd_signsgd}
# say and run_step: pip's and the compiler's output only when their step fails
# shellcheck source=../steps.sh
source "$HERE/../steps.sh"

torch_tag=$("$PY" -c 'import torch, sys; print(f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}")')
patch_tag=$(sha256sum "$PATCH" | cut -c1-12)
WHEEL_DIR="$CACHE/wheels/horovod-$VERSION-$torch_tag-$patch_tag"

installed=$("$PY" -c 'import importlib.metadata as m; print(m.version("horovod"))' 2>/dev/null || true)
if [ "$installed" = "$VERSION" ] && "$PY" -c 'import horovod.torch' 2>/dev/null; then
    say "horovod $VERSION already installed"
    exit 0
fi

if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
    say "building Horovod $VERSION from its sdist, no cached wheel in $WHEEL_DIR" \
        "(about 8 min on 2 cores; the compiler's output is shown only if it fails)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    run_step "download the Horovod $VERSION sdist" \
        "$PY" -m pip download --no-deps --no-binary :all: "horovod==$VERSION" -d "$work"
    run_step "unpack the sdist" tar xzf "$work/horovod-$VERSION.tar.gz" -C "$work"
    run_step "apply $PATCH" patch -d "$work/horovod-$VERSION" -p1 --forward -i "$PATCH"
    mkdir -p "$WHEEL_DIR.tmp"
    run_step "build the Horovod wheel" env \
        HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
        HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
        MAKEFLAGS="${MAKEFLAGS:--j$(nproc)}" \
        "$PY" -m pip wheel --no-build-isolation --no-deps -w "$WHEEL_DIR.tmp" \
        "$work/horovod-$VERSION"
    rm -rf "$WHEEL_DIR" && mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"
fi

run_step "pip install the Horovod wheel" \
    "$PY" -m pip install --no-deps --force-reinstall "$WHEEL_DIR"/horovod-*.whl
say "installed $(basename "$(ls "$WHEEL_DIR"/horovod-*.whl)") (cached in $WHEEL_DIR)"
