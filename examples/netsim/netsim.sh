#!/usr/bin/env bash
# netsim.sh - a simulated multi-host cluster on one Linux box, for benchmarking hvd_signsgd
# against Horovod over a bandwidth-limited TCP network.
#
# Every "host" is a network namespace (plus its own UTS namespace, so it has its own hostname)
# with one veth link to a bridge that lives in a "switch" namespace. Each link is rate limited
# in both directions with tbf. Open MPI starts its daemons through an rsh agent that enters the
# host's namespaces instead of using ssh, so every rank runs "on" its host and talks to the
# others over TCP through the bridge. Nothing is added to the root namespace: the veth ends are
# created directly inside our namespaces, the subnet is private (10.x) and there is no default
# route, so no traffic can leave the namespaces this script made.
#
#   netns ${PREFIX}-sw     bridge sw0 <SUBNET>.254/24      mpirun runs here (it gets no ranks)
#     port1 <== veth ==>   ${PREFIX}-h1  net0 <SUBNET>.1   hostname h1
#     port2 <== veth ==>   ${PREFIX}-h2  net0 <SUBNET>.2   hostname h2 ...
#
# Usage (root):
#   netsim.sh up N                  create the switch and N hosts (1..32)
#   netsim.sh rate RATE|off         tbf RATE (e.g. 100mbit, 1gbit) on both directions of every link
#   netsim.sh mpirun ARGS...        mpirun in the switch namespace, HSG_NETSIM_SLOTS ranks per
#                                   host (as at `up`, or as set for this call), TCP only
#   netsim.sh exec HOST CMD...      run CMD on host hK (its network + UTS namespace)
#   netsim.sh torchrun ARGS...      one torchrun per host (node rank K-1 on hK, master h1,
#                                   GLOO_SOCKET_IFNAME=net0); ARGS: the script and its arguments
#   netsim.sh counters              "host tx_bytes rx_bytes" of each host's net0
#   netsim.sh status                namespaces, addresses, qdisc counters, processes
#   netsim.sh down                  stop what still runs in our namespaces, delete them
#   netsim.sh with N CMD...         up N, run CMD, and always tear down (also on failure or ^C);
#                                   CMD can call this script (rate/mpirun/counters) meanwhile
#
# Environment: HSG_NETSIM_PREFIX (namespace prefix, default hsgnet; use another one to run two
# clusters side by side), HSG_NETSIM_SUBNET (first three octets of a 10.x /24, default
# 10.213.7), HSG_NETSIM_STATE (state dir, default /tmp/<prefix>), HSG_NETSIM_TBF_LATENCY
# (tbf queue length in time, default 50ms), HSG_NETSIM_SLOTS (ranks per host, read by `up`
# and by each `mpirun`, default 1; ranks of one host talk over its loopback, which the
# counters leave out), HSG_NETSIM_TORCHRUN (the torchrun command, default torchrun),
# HSG_NETSIM_PORT (torchrun's master port, default 29500), HSG_NETSIM_COLL (ring: pin Open MPI's allreduce /
# allgather(v) to the ring algorithms, the default; tuned: Open MPI's own choice).
#
# Pitfalls this handles (found on the project's Debian 12 VMs, Open MPI 4.1.4):
# - no netem on this kernel, so only the rate can be emulated, not latency;
# - mpirun must run inside the switch namespace, or the daemons cannot route back to it;
# - Open MPI binds all ranks to core 0 when it sees few ranks per "node": --bind-to none;
# - more ranks than cores: busy-polling ranks starve each other, so mpi_yield_when_idle;
# - hostnames: each host gets its own UTS namespace and /etc/netns/<ns>/hosts (bind-mounted
#   over /etc/hosts by `ip netns exec`), so gethostbyname(gethostname()) works in the ranks;
# - tbf queue of 50 ms: shorter queues drop packets at 100 Mbit/s and add retransmit noise.
set -euo pipefail

PREFIX=${HSG_NETSIM_PREFIX:-hsgnet}
SUBNET=${HSG_NETSIM_SUBNET:-10.213.7}
STATE=${HSG_NETSIM_STATE:-/tmp/$PREFIX}
TBF_LATENCY=${HSG_NETSIM_TBF_LATENCY:-50ms}
COLL=${HSG_NETSIM_COLL:-ring}
SLOTS=${HSG_NETSIM_SLOTS:-1}
SWITCH=$PREFIX-sw
IFACE=net0
SELF=$(readlink -f "${BASH_SOURCE[0]}")

die() { echo "netsim: $*" >&2; exit 1; }

[[ $PREFIX =~ ^[a-z][a-z0-9]{1,11}$ ]] || die "HSG_NETSIM_PREFIX must be 2-12 lowercase letters/digits"
[[ $SUBNET =~ ^10\.([0-9]{1,3})\.([0-9]{1,3})$ ]] || die "HSG_NETSIM_SUBNET must look like 10.A.B"
[[ $SLOTS =~ ^[1-9][0-9]?$ ]] || die "HSG_NETSIM_SLOTS must be 1..99"

hosts() { [[ -f $STATE/hosts ]] && cat "$STATE/hosts"; true; }
ns_exists() { ip netns list | awk '{print $1}' | grep -qx -- "$1"; }
# only namespaces with exactly our names: never anything else on the box
our_namespaces() { ip netns list | awk '{print $1}' | grep -E "^$PREFIX-(sw|h[0-9]+)\$" || true; }

# tbf needs a bucket that holds at least one GSO packet (64 KiB) and about 1 ms of traffic
burst_bytes() {
  awk -v r="$1" 'BEGIN {
    s = tolower(r)
    if (!match(s, /^[0-9]+(\.[0-9]+)?/)) { print "bad rate: " r > "/dev/stderr"; exit 1 }
    v = substr(s, 1, RLENGTH); u = substr(s, RLENGTH + 1)
    if (u !~ /^(|k|m|g)(bit|bps)$/) { print "bad rate unit: " r > "/dev/stderr"; exit 1 }
    m = 1; if (u ~ /^k/) m = 1e3; if (u ~ /^m/) m = 1e6; if (u ~ /^g/) m = 1e9
    bytes_per_s = v * m; if (u ~ /bit$/) bytes_per_s /= 8
    b = int(bytes_per_s / 1000); if (b < 131072) b = 131072; print b }'
}

in_ns() {  # in_ns NS CMD...: run a command in one of our namespaces (no hostname change)
  local ns=$1; shift
  ip netns exec "$ns" "$@"
}

cmd_up() {
  local n=${1:?number of hosts} i ns
  [[ $n =~ ^[0-9]+$ ]] && ((n >= 1 && n <= 32)) || die "N must be 1..32"
  ns_exists "$SWITCH" && die "$SWITCH exists already (another run? 'netsim.sh down' removes it)"
  mkdir -p "$STATE"
  : > "$STATE/hosts"
  : > "$STATE/hostfile"
  ip netns add "$SWITCH"
  # IPv6 off: no link-local addresses, router solicitations or DAD traffic in the counters
  in_ns "$SWITCH" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  ip -n "$SWITCH" link set lo up
  ip -n "$SWITCH" link add sw0 type bridge
  ip -n "$SWITCH" addr add "$SUBNET.254/24" dev sw0
  ip -n "$SWITCH" link set sw0 up
  for ((i = 1; i <= n; i++)); do
    ns=$PREFIX-h$i
    ip netns add "$ns"
    in_ns "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    ip -n "$ns" link set lo up
    # both ends are created inside our namespaces: the root namespace never sees them
    ip link add "port$i" netns "$SWITCH" type veth peer name "$IFACE" netns "$ns"
    ip -n "$SWITCH" link set "port$i" master sw0 up
    ip -n "$ns" addr add "$SUBNET.$i/24" dev "$IFACE"
    ip -n "$ns" link set "$IFACE" up
    echo "h$i" >> "$STATE/hosts"
    echo "h$i slots=$SLOTS" >> "$STATE/hostfile"
  done
  {
    echo "127.0.0.1 localhost"
    echo "$SUBNET.254 sw"
    for ((i = 1; i <= n; i++)); do echo "$SUBNET.$i h$i"; done
  } > "$STATE/etc_hosts"
  for ns in "$SWITCH" $(sed "s/^/$PREFIX-/" "$STATE/hosts"); do
    mkdir -p "/etc/netns/$ns"
    cp "$STATE/etc_hosts" "/etc/netns/$ns/hosts"
  done
  # plm_rsh_agent takes one executable path: a two-line wrapper that calls back into us
  printf '#!/bin/sh\nexec %q agent "$@"\n' "$SELF" > "$STATE/agent"
  chmod +x "$STATE/agent"
  echo "netsim: up $n hosts ($(paste -sd' ' "$STATE/hosts")), $SLOTS slot(s) each, $SUBNET.0/24, switch $SWITCH"
}

cmd_rate() {
  local rate=${1:?rate, e.g. 1gbit, or off} h i burst
  [[ -s $STATE/hosts ]] || die "cluster not up"
  [[ $rate == off ]] || burst=$(burst_bytes "$rate")
  for h in $(hosts); do
    i=${h#h}
    if [[ $rate == off ]]; then
      tc -n "$PREFIX-$h" qdisc del dev "$IFACE" root 2>/dev/null || true
      tc -n "$SWITCH" qdisc del dev "port$i" root 2>/dev/null || true
    else
      # host egress = upload (net0), switch port egress = download (port<i>)
      tc -n "$PREFIX-$h" qdisc replace dev "$IFACE" root tbf rate "$rate" burst "$burst" \
        latency "$TBF_LATENCY"
      tc -n "$SWITCH" qdisc replace dev "port$i" root tbf rate "$rate" burst "$burst" \
        latency "$TBF_LATENCY"
    fi
  done
  echo "netsim: rate $rate on $(hosts | wc -l) links"
}

cmd_agent() {  # Open MPI calls: agent HOST ORTED-WORDS... (like ssh HOST COMMAND)
  local host=$1; shift
  grep -qx -- "$host" "$STATE/hosts" 2>/dev/null || { echo "netsim agent: unknown host $host" >&2; exit 255; }
  # ssh joins its arguments into one shell command line; so do we
  exec ip netns exec "$PREFIX-$host" unshare --uts -- \
    sh -c 'hostname "$1" && exec sh -c "$2"' netsim-agent "$host" "$*"
}

cmd_exec() {
  local host=${1:?host}; shift
  grep -qx -- "$host" "$STATE/hosts" 2>/dev/null || die "unknown host $host"
  exec ip netns exec "$PREFIX-$host" unshare --uts -- \
    sh -c 'hostname "$1" && shift && exec "$@"' netsim-exec "$host" "$@"
}

cmd_mpirun() {
  ns_exists "$SWITCH" || die "cluster not up"
  local n extra=() hostfile slots=${HSG_NETSIM_SLOTS:-1}
  [[ $slots =~ ^[1-9][0-9]?$ ]] || die "HSG_NETSIM_SLOTS must be 1..99"
  # this call's ranks per host (e.g. 2 for a hierarchical exchange), whatever `up` was given
  hostfile=$STATE/hostfile.$slots
  sed "s/slots=[0-9]*\$/slots=$slots/" "$STATE/hostfile" > "$hostfile"
  n=$(($(hosts | wc -l) * slots))
  # all "hosts" share this box's cores; Open MPI cannot see that oversubscription
  ((n > $(nproc))) && extra+=(--mca mpi_yield_when_idle 1)
  if [[ $COLL == ring ]]; then
    # reproducible, bandwidth-optimal collectives (the default rules switch algorithms by
    # message size and rank count, which made allreduce times vary 1.5x from run to run)
    extra+=(--mca coll_tuned_use_dynamic_rules 1 --mca coll_tuned_allreduce_algorithm 4
            --mca coll_tuned_allgather_algorithm 4 --mca coll_tuned_allgatherv_algorithm 3)
  elif [[ $COLL != tuned ]]; then
    die "HSG_NETSIM_COLL must be ring or tuned"
  fi
  exec ip netns exec "$SWITCH" mpirun --allow-run-as-root "${extra[@]}" \
    --hostfile "$hostfile" \
    --mca plm_rsh_agent "$STATE/agent" --mca plm_rsh_no_tree_spawn 1 \
    --mca pml ob1 --mca btl tcp,self \
    --mca btl_tcp_if_include "$SUBNET.0/24" --mca oob_tcp_if_include "$SUBNET.0/24" \
    --bind-to none "$@"
}

cmd_torchrun() {
  ns_exists "$SWITCH" || die "cluster not up"
  local n k=0 h rc=0 pids=()
  n=$(hosts | wc -l)
  for h in $(hosts); do
    # shellcheck disable=SC2086  # the torchrun command may be several words (python -m ...)
    GLOO_SOCKET_IFNAME=$IFACE "$SELF" exec "$h" ${HSG_NETSIM_TORCHRUN:-torchrun} \
      --nnodes "$n" --node-rank "$k" --nproc-per-node 1 \
      --master-addr "$SUBNET.1" --master-port "${HSG_NETSIM_PORT:-29500}" "$@" &
    pids+=("$!")
    k=$((k + 1))
  done
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  return "$rc"
}

cmd_counters() {
  local h
  for h in $(hosts); do
    ip -n "$PREFIX-$h" -j -s link show dev "$IFACE" | python3 -c '
import json, sys
s = json.load(sys.stdin)[0]["stats64"]
print(sys.argv[1], s["tx"]["bytes"], s["rx"]["bytes"])' "$h"
  done
}

cmd_status() {
  local ns
  for ns in $(our_namespaces); do
    echo "== $ns  pids: $(ip netns pids "$ns" | paste -sd' ')"
    ip -n "$ns" -br addr show | grep -v '^lo' || true
    tc -n "$ns" -s qdisc show | grep -A2 '^qdisc tbf' || true
  done
}

cmd_down() {
  local ns pids p
  for ns in $(our_namespaces); do
    # whatever still runs in OUR namespaces (orted, ranks of a failed job) was started by us
    pids=$(ip netns pids "$ns" | paste -sd' ')
    if [[ -n $pids ]]; then
      echo "netsim: $ns still runs pids $pids: TERM" >&2
      for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
      for _ in $(seq 30); do [[ -z $(ip netns pids "$ns") ]] && break; sleep 0.1; done
      for p in $(ip netns pids "$ns"); do kill -KILL "$p" 2>/dev/null || true; done
    fi
    ip netns del "$ns"          # the veth pairs and the bridge go with their namespaces
    rm -rf "/etc/netns/$ns"
  done
  rmdir /etc/netns 2>/dev/null || true   # only if no one else keeps files there
  rm -rf "$STATE"
  echo "netsim: down ($PREFIX)"
}

cmd_with() {
  local n=${1:?number of hosts}; shift
  (($# > 0)) || die "with N CMD...: no command"
  # set the trap before anything exists, so a failure halfway through `up` is cleaned too
  trap 'rc=$?; trap - EXIT INT TERM; "$SELF" down >&2 || true; exit $rc' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  cmd_up "$n"
  export HSG_NETSIM_PREFIX=$PREFIX HSG_NETSIM_SUBNET=$SUBNET HSG_NETSIM_STATE=$STATE \
    HSG_NETSIM_TBF_LATENCY=$TBF_LATENCY HSG_NETSIM_COLL=$COLL HSG_NETSIM_SLOTS=$SLOTS \
    HSG_NETSIM=$SELF
  "$@"
}

[[ $(id -u) == 0 ]] || die "needs root (network namespaces, tc)"
case "${1:-}" in
  up | rate | agent | exec | mpirun | torchrun | counters | status | down | with)
    sub=$1; shift; "cmd_$sub" "$@" ;;
  *) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$SELF" >&2; exit 2 ;;
esac
