#!/usr/bin/env bash
# run_bench.sh - the whole communication benchmark in one command (root): for each host count,
# set up the simulated cluster (netsim.sh), run examples/bench_comm.py once per link rate,
# tear the cluster down (also on failure or ^C), then write the Markdown table and the plots.
#
#   examples/netsim/run_bench.sh                       everything (2 and 4 hosts, 4 rates)
#   QUICK=1 examples/netsim/run_bench.sh               4 hosts, ResNet-50, off + 1gbit only
#   HOSTS=4 RATES=1gbit MODELS=resnet50 examples/netsim/run_bench.sh
#
# Settings (environment): HOSTS ("2 4"), RATES ("off 10gbit 1gbit 100mbit"; "off" = no
# limit), MODELS (resnet50,bert_base), CONTENDERS (bench_comm.py's default list), E2E_RATES
# (rates that also run the end-to-end MLP steps, "1gbit"; empty: none), BENCH_ARGS (more bench_comm.py
# arguments), OUT (results dir, examples/netsim/results), PYTHON (.venv/bin/python),
# TIMEOUT_S (per mpirun, 3600), HSG_NETSIM_PREFIX / HSG_NETSIM_SUBNET (see netsim.sh).
# Output: $OUT/RESULTS.md, $OUT/*.png, $OUT/raw/h<N>-<rate>.json, $OUT/run.log.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")
NETSIM=$HERE/netsim.sh

# the settings given by the caller, for the reproduce line in RESULTS.md
GIVEN=$(for v in QUICK HOSTS RATES MODELS CONTENDERS E2E_RATES BENCH_ARGS; do
          if [[ -n ${!v:-} ]]; then printf "%s='%s' " "$v" "${!v}"; fi; done)
if [[ ${QUICK:-0} == 1 ]]; then
  : "${HOSTS:=4}" "${RATES:=off 1gbit}" "${MODELS:=resnet50}" "${E2E_RATES=1gbit}"
fi
export HOSTS=${HOSTS:-2 4}
export RATES=${RATES:-off 10gbit 1gbit 100mbit}
export MODELS=${MODELS:-resnet50,bert_base}
export CONTENDERS=${CONTENDERS:-}
export E2E_RATES=${E2E_RATES-1gbit}   # empty: no end-to-end runs
export BENCH_ARGS=${BENCH_ARGS:-}
export OUT=${OUT:-$HERE/results}
export PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
export TIMEOUT_S=${TIMEOUT_S:-3600}
# one BLAS/OpenMP thread per rank: the ranks of all "hosts" share this machine's cores
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# runs inside `netsim.sh with N`, which exports HSG_NETSIM (its own path) and tears down after
inner() {
  local n=$1 rate args
  for rate in $RATES; do
    "$HSG_NETSIM" rate "$rate"
    args=()
    if [[ " $E2E_RATES " == *" $rate "* ]]; then args+=(--e2e); fi
    if [[ -n $CONTENDERS ]]; then args+=(--contenders "$CONTENDERS"); fi
    echo "=== $n hosts, rate $rate ($(date +%T), load $(cut -d' ' -f1-3 /proc/loadavg))"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
    timeout --kill-after=30 "$TIMEOUT_S" "$HSG_NETSIM" mpirun -n "$n" \
      "$PYTHON" "$ROOT/examples/bench_comm.py" --rate "$rate" --models "$MODELS" \
      "${args[@]}" $BENCH_ARGS --out "$OUT/raw/h$n-$rate.json"
  done
}

if [[ ${1:-} == _inner ]]; then
  inner "$2"
  exit 0
fi

[[ $(id -u) == 0 ]] || { echo "run_bench.sh: needs root (network namespaces)" >&2; exit 1; }
"$PYTHON" -c 'import horovod.torch, matplotlib' || { echo "run_bench.sh: $PYTHON lacks horovod/matplotlib" >&2; exit 1; }
mkdir -p "$OUT"
rm -rf "$OUT/raw"
mkdir -p "$OUT/raw"
{
  echo "run_bench.sh on $(hostname) $(date '+%F %T'): HOSTS='$HOSTS' RATES='$RATES' MODELS=$MODELS"
  start=$SECONDS
  for n in $HOSTS; do
    "$NETSIM" with "$n" "$SELF" _inner "$n"
  done
  "$PYTHON" "$HERE/report.py" --raw "$OUT/raw" --out "$OUT" \
    --command "${GIVEN}examples/netsim/run_bench.sh"
  echo "run_bench.sh: done in $((SECONDS - start)) s; $OUT/RESULTS.md"
} 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
