#!/usr/bin/env bash
# One-shot, idempotent set-up: MPI, a .venv in the repo with PyTorch, Horovod (built with the
# C++17 fix and cached), mpi4py and hvd_signsgd (editable, native extension compiled), then a
# self-check. Called by `make setup` (and so by `make demo` / `make test`). It prints one
# `== setup:` line per step; a tool's output (pip, apt, compilers) is shown only when its step
# fails, in full, and the script then exits non-zero (native/steps.sh).
#
# Env: PYTHON            interpreter to create the venv from (default python3)
#      TORCH_SPEC         pip requirement for PyTorch (default torch==2.13.0)
#      HVD_SIGNSGD_CACHE  where the Horovod wheel is cached (default ~/.cache/hvd_signsgd)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# say (our steps) and run_step (a tool's output shown only if it fails)
# shellcheck source=steps.sh
source "$ROOT/native/steps.sh"

as_root() { [ "$(id -u)" = 0 ]; }
apt_install() {
    # Debian/Ubuntu as root only; a fresh machine's package lists are empty until update.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# --- 1. system tools: MPI and a C/C++ toolchain -------------------------------------------
need=()
command -v mpicc >/dev/null || need+=(openmpi-bin libopenmpi-dev)
command -v g++ >/dev/null || need+=(g++)
command -v cmake >/dev/null || need+=(cmake)
command -v patch >/dev/null || need+=(patch)
command -v make >/dev/null || need+=(make)
if [ ${#need[@]} -gt 0 ]; then
    if as_root && command -v apt-get >/dev/null; then
        say "installing ${need[*]} from the OS packages"
        run_step "apt-get install ${need[*]}" apt_install "${need[@]}"
    else
        cat >&2 <<EOF
setup: missing ${need[*]}.
On an HPC login node, load the site's modules first, for example
    module load gcc cmake openmpi        # names vary: see 'module avail'
so that mpicc, g++ and cmake are on PATH, then run this again.
On a Debian/Ubuntu machine you administer: sudo apt-get install openmpi-bin libopenmpi-dev g++ cmake patch make
EOF
        exit 1
    fi
fi

# --- 2. the virtual environment ---------------------------------------------------------------
if [ ! -x "$PY" ]; then
    say "creating $VENV"
    run_step "create the virtual environment" "${PYTHON:-python3}" -m venv "$VENV"
fi
run_step "upgrade pip, setuptools, wheel" \
    "$PY" -m pip install --upgrade pip setuptools wheel
if ! "$PY" -c "import torch" 2>/dev/null; then
    say "installing $TORCH_SPEC"
    run_step "pip install $TORCH_SPEC" "$PY" -m pip install "$TORCH_SPEC"
fi
say "installing Python dependencies"
# Horovod's build needs cloudpickle/psutil/pyyaml/packaging importable (no build isolation).
run_step "pip install the Python dependencies" \
    "$PY" -m pip install numpy mpi4py pytest hypothesis ruff scikit-learn tqdm matplotlib \
    cloudpickle psutil pyyaml packaging

# --- 3. Horovod 0.28.1 with the C++17 fix, cached -----------------------------------------
bash "$ROOT/native/horovod/build_horovod.sh" "$PY"

# --- 4. hvd_signsgd itself, editable, with the native kernels ------------------------------
say "installing hvd_signsgd (editable, native extension)"
run_step "pip install -e (hvd_signsgd and its native extension)" \
    "$PY" -m pip install --no-build-isolation --no-deps -e "$ROOT"

# --- 5. check ourselves ------------------------------------------------------------------------
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
rc=0
check=$("$VENV/bin/horovodrun" --check-build 2>&1) || rc=$?
for fw in PyTorch MPI Gloo; do
    if [ $rc != 0 ] || ! grep -q "\[X\] $fw" <<<"$check"; then
        printf '== setup: FAILED: horovodrun --check-build (exit %d) does not show %s enabled:\n%s\n' \
            "$rc" "$fw" "$check" >&2
        exit 1
    fi
done
run_step "load the native kernels" "$PY" -c \
    'import hvd_signsgd.kernels as k; assert k.backend() == "native", k.backend()'
hvd_version=$("$PY" -c 'import horovod; print(horovod.__version__)')
say "self-check passed: Horovod $hvd_version with PyTorch, MPI and Gloo; native kernels load"
say "done: activate with 'source .venv/bin/activate'"
