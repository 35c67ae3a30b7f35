#!/usr/bin/env bash
# run_ddp_bench.sh - DDP's own hooks (fp32, fp16, PowerSGD ranks 1/2/4) against hvd_signsgd's
# DDP hook on the simulated cluster, in one command (root): set up N hosts (netsim.sh), limit
# every link to RATE, run examples/netsim/ddp_bench.py with one torchrun per host, tear down
# (also on failure or ^C), and leave the Markdown table and the raw JSON in OUT.
#
#   examples/netsim/run_ddp_bench.sh                   4 hosts, 1gbit, ResNet-50 shapes + e2e + digits
#   HOSTS=2 SHAPES=tiny BENCH_ARGS="--steps 2" examples/netsim/run_ddp_bench.sh
#
# Settings (environment): HOSTS (4), RATE (1gbit; off = no limit), SHAPES (resnet50 | tiny),
# BENCH_ARGS (more ddp_bench.py arguments: --steps, --warmup, --configs, --parts, --e2e-width,
# --digits-epochs, --powersgd-start ...), OUT (examples/netsim/results/ddp), PYTHON
# (.venv/bin/python), TIMEOUT_S (3600), HSG_NETSIM_PREFIX / HSG_NETSIM_SUBNET (see netsim.sh).
# Output: $OUT/RESULTS.md, $OUT/raw.json, $OUT/counters.txt (netsim.sh counters before and
# after the whole run), $OUT/run.log.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")
NETSIM=$HERE/netsim.sh

export HOSTS=${HOSTS:-4}
export RATE=${RATE:-1gbit}
export SHAPES=${SHAPES:-resnet50}
export BENCH_ARGS=${BENCH_ARGS:-}
export OUT=${OUT:-$HERE/results/ddp}
export PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
export TIMEOUT_S=${TIMEOUT_S:-3600}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# runs inside `netsim.sh with N`, which exports HSG_NETSIM and tears down afterwards
inner() {
  "$HSG_NETSIM" rate "$RATE"
  echo "=== $HOSTS hosts, rate $RATE ($(date +%T), load $(cut -d' ' -f1-3 /proc/loadavg))"
  { echo "before"; "$HSG_NETSIM" counters; } > "$OUT/counters.txt"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HSG_NETSIM_TORCHRUN="$PYTHON -m torch.distributed.run" \
    timeout --kill-after=30 "$TIMEOUT_S" "$HSG_NETSIM" torchrun \
    "$HERE/ddp_bench.py" --rate "$RATE" --shapes "$SHAPES" $BENCH_ARGS --out "$OUT/raw.json"
  { echo "after"; "$HSG_NETSIM" counters; } >> "$OUT/counters.txt"
  cp "$OUT/raw.md" "$OUT/RESULTS.md"
  rm -f "$OUT/raw.md"
  {
    echo
    echo "Whole run, \`netsim.sh counters\` (host tx_bytes rx_bytes, before and after; includes"
    echo "rendezvous, model broadcasts and warm-up steps):"
    echo
    echo '```'
    cat "$OUT/counters.txt"
    echo '```'
    echo
    echo "Reproduce: \`HOSTS=$HOSTS RATE=$RATE SHAPES=$SHAPES BENCH_ARGS='$BENCH_ARGS' examples/netsim/run_ddp_bench.sh\`"
  } >> "$OUT/RESULTS.md"
}

if [[ ${1:-} == _inner ]]; then
  inner
  exit 0
fi

[[ $(id -u) == 0 ]] || { echo "run_ddp_bench.sh: needs root (network namespaces)" >&2; exit 1; }
mkdir -p "$OUT"
rm -f "$OUT/raw.json" "$OUT/RESULTS.md"
{
  echo "run_ddp_bench.sh on $(hostname) $(date '+%F %T'): HOSTS=$HOSTS RATE=$RATE SHAPES=$SHAPES BENCH_ARGS='$BENCH_ARGS'"
  start=$SECONDS
  "$NETSIM" with "$HOSTS" "$SELF" _inner
  echo "run_ddp_bench.sh: done in $((SECONDS - start)) s; $OUT/RESULTS.md"
} 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
