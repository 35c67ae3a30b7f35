#!/usr/bin/env bash
# run_scaling.sh - the scaling study (root): for each host count N, set up the simulated cluster
# (netsim.sh) at one link rate, run examples/bench_comm.py with the contenders, tear the cluster
# down (also on failure or ^C); then scaling_report.py fits a cost model per exchange and writes
# the table, the targets and the plot.
#
#   examples/netsim/run_scaling.sh                          2, 4, 8, 16 hosts, 100 Mbit/s, ResNet-50
#   HOSTS="2 4 8" examples/netsim/run_scaling.sh
#
# Settings (environment): HOSTS ("2 4 8 16"), RATE (100mbit), MODEL (resnet50; or tiny, d=N),
# CONTENDERS (one rank per host: "hvd_fp32,hvd_fp16,signsgd:exchange=allgather,
# signsgd:exchange=alltoall"), HIER_CONTENDERS (run with HIER_SLOTS ranks per host:
# "signsgd:exchange=hierarchical"; skipped with a note when DistributedOptimizer rejects the
# exchange, i.e. before the hierarchical exchange exists), HIER_SLOTS (2), BENCH_ARGS
# (bench_comm.py arguments; default: few steps, as a Horovod fp32 step of ResNet-50 on 16 hosts
# at 100 Mbit/s takes ~15 s), OUT (examples/netsim/scaling), PYTHON, TIMEOUT_S (per mpirun,
# 1800), APPEND (1: keep earlier raw results, e.g. more host counts for some contenders),
# HSG_NETSIM_PREFIX / HSG_NETSIM_SUBNET (see netsim.sh).
# Output: $OUT/SCALING.md, $OUT/scaling.png, $OUT/fit.json, $OUT/raw/h<N>[-x<slots>].json
# (and h<N>-x<slots>.skipped: why a contender did not run), $OUT/run.log.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")
NETSIM=$HERE/netsim.sh

GIVEN=$(for v in HOSTS RATE MODEL CONTENDERS HIER_CONTENDERS HIER_SLOTS BENCH_ARGS; do
          if [[ -n ${!v:-} ]]; then printf "%s='%s' " "$v" "${!v}"; fi; done)
export HOSTS=${HOSTS:-2 4 8 16}
export RATE=${RATE:-100mbit}
export MODEL=${MODEL:-resnet50}
export CONTENDERS=${CONTENDERS-hvd_fp32,hvd_fp16,signsgd:exchange=allgather,signsgd:exchange=alltoall}
export HIER_CONTENDERS=${HIER_CONTENDERS-signsgd:exchange=hierarchical}
export HIER_SLOTS=${HIER_SLOTS:-2}
# Horovod baselines: 1 warm-up + 3 timed steps at 8-15 s each; ours: up to 8 timed in 2 rounds
export BENCH_ARGS=${BENCH_ARGS:---steps 8 --min-steps 3 --budget-s 30 --rounds 2 --warmup 1 --profile none}
export OUT=${OUT:-$HERE/scaling}
export PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
export TIMEOUT_S=${TIMEOUT_S:-1800}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

inner() {
  local n=$1 bench ok
  bench=(timeout --kill-after=30 "$TIMEOUT_S" "$HSG_NETSIM" mpirun -n)
  "$HSG_NETSIM" rate "$RATE"
  if [[ -n $CONTENDERS ]]; then
    echo "=== $n hosts x 1 rank, $RATE ($(date +%T), load $(cut -d' ' -f1-3 /proc/loadavg))"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
    "${bench[@]}" "$n" "$PYTHON" "$ROOT/examples/bench_comm.py" --rate "$RATE" \
      --models "$MODEL" --contenders "$CONTENDERS" $BENCH_ARGS --out "$OUT/raw/h$n.json"
  fi
  if [[ -n $HIER_CONTENDERS ]]; then
    ok=$("$PYTHON" "$HERE/scaling_report.py" --accepted "$HIER_CONTENDERS" \
           --skipped-to "$OUT/raw/h$n-x$HIER_SLOTS.skipped")
    if [[ -n $ok ]]; then
      echo "=== $n hosts x $HIER_SLOTS ranks, $RATE ($(date +%T), load $(cut -d' ' -f1-3 /proc/loadavg))"
      # shellcheck disable=SC2086
      # the hierarchical exchange adds Horovod process sets after hvd.init()
      HSG_NETSIM_SLOTS=$HIER_SLOTS "${bench[@]}" "$((n * HIER_SLOTS))" \
        -x HOROVOD_DYNAMIC_PROCESS_SETS=1 "$PYTHON" \
        "$ROOT/examples/bench_comm.py" --rate "$RATE" --models "$MODEL" --contenders "$ok" \
        $BENCH_ARGS --out "$OUT/raw/h$n-x$HIER_SLOTS.json"
    else
      echo "=== $n hosts x $HIER_SLOTS ranks: skipped ($(cat "$OUT/raw/h$n-x$HIER_SLOTS.skipped"))"
    fi
  fi
}

if [[ ${1:-} == _inner ]]; then
  inner "$2"
  exit 0
fi

[[ $(id -u) == 0 ]] || { echo "run_scaling.sh: needs root (network namespaces)" >&2; exit 1; }
"$PYTHON" -c 'import horovod.torch, matplotlib' || { echo "run_scaling.sh: $PYTHON lacks horovod/matplotlib" >&2; exit 1; }
[[ ${APPEND:-0} == 1 ]] || rm -rf "$OUT/raw"
mkdir -p "$OUT/raw"
{
  echo "run_scaling.sh on $(hostname) $(date '+%F %T'): HOSTS='$HOSTS' RATE=$RATE MODEL=$MODEL"
  start=$SECONDS
  for n in $HOSTS; do
    rm -f "$OUT/raw/h$n.json" "$OUT/raw/h$n-x"*
    "$NETSIM" with "$n" "$SELF" _inner "$n"
  done
  "$PYTHON" "$HERE/scaling_report.py" --raw "$OUT/raw" --out "$OUT" \
    --command "${GIVEN}examples/netsim/run_scaling.sh"
  echo "run_scaling.sh: done in $((SECONDS - start)) s; $OUT/SCALING.md"
} 2>&1 | if [[ ${APPEND:-0} == 1 ]]; then tee -a "$OUT/run.log"; else tee "$OUT/run.log"; fi
exit "${PIPESTATUS[0]}"
