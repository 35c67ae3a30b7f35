#!/usr/bin/env bash
# run_time_to_accuracy.sh - the time-to-accuracy benchmark in one command (root): set up the
# simulated cluster (netsim.sh), limit every link, run examples/time_to_accuracy.py under
# mpirun (one rank per host), tear the cluster down (also on failure or ^C).
#
#   examples/netsim/run_time_to_accuracy.sh                  4 hosts, 1 Gbit/s, every contender
#   HOSTS=2 TTA_ARGS='--hidden 128 --steps 6' examples/netsim/run_time_to_accuracy.sh
#
# Settings (environment): HOSTS (4), RATE (1gbit; "off" = no limit), CONTENDERS (default: the
# script's: hvd_fp32, hvd_fp16 and every method in hvd_signsgd.METHODS), TTA_ARGS (more
# time_to_accuracy.py arguments), OUT (results dir, examples/netsim/results/time_to_accuracy),
# PYTHON (.venv/bin/python), TIMEOUT_S (for the mpirun, 2400), HSG_NETSIM_PREFIX /
# HSG_NETSIM_SUBNET (see netsim.sh).
# Output: $OUT/time_to_accuracy.{md,json,png}, $OUT/run.log.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")
NETSIM=$HERE/netsim.sh

export HOSTS=${HOSTS:-4}
export RATE=${RATE:-1gbit}
export CONTENDERS=${CONTENDERS:-}
export TTA_ARGS=${TTA_ARGS:-}
export OUT=${OUT:-$HERE/results/time_to_accuracy}
export PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
export TIMEOUT_S=${TIMEOUT_S:-2400}
# one BLAS/OpenMP thread per rank: the ranks of all "hosts" share this machine's cores
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# runs inside `netsim.sh with N`, which exports HSG_NETSIM (its own path) and tears down after
inner() {
  local args=()
  "$HSG_NETSIM" rate "$RATE"
  if [[ -n $CONTENDERS ]]; then args+=(--contenders "$CONTENDERS"); fi
  echo "=== $HOSTS hosts, rate $RATE ($(date +%T), load $(cut -d' ' -f1-3 /proc/loadavg))"
  # shellcheck disable=SC2086  # TTA_ARGS is a list of words on purpose
  timeout --kill-after=30 "$TIMEOUT_S" "$HSG_NETSIM" mpirun -n "$HOSTS" \
    "$PYTHON" "$ROOT/examples/time_to_accuracy.py" --rate "$RATE" "${args[@]}" $TTA_ARGS \
    --out-dir "$OUT"
  echo "=== done ($(date +%T), load $(cut -d' ' -f1-3 /proc/loadavg))"
}

if [[ ${1:-} == _inner ]]; then
  inner
  exit 0
fi

[[ $(id -u) == 0 ]] || { echo "run_time_to_accuracy.sh: needs root (network namespaces)" >&2; exit 1; }
"$PYTHON" -c 'import horovod.torch, matplotlib, sklearn' ||
  { echo "run_time_to_accuracy.sh: $PYTHON lacks horovod/matplotlib/sklearn" >&2; exit 1; }
mkdir -p "$OUT"
{
  echo "run_time_to_accuracy.sh on $(hostname) $(date '+%F %T'): HOSTS=$HOSTS RATE=$RATE"
  start=$SECONDS
  "$NETSIM" with "$HOSTS" "$SELF" _inner
  echo "run_time_to_accuracy.sh: done in $((SECONDS - start)) s; $OUT/time_to_accuracy.md"
} 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
