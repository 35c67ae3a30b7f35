"""Check that Horovod works across the simulated hosts, over MPI (not Gloo).

    examples/netsim/netsim.sh with 4 sh -c \
        'examples/netsim/netsim.sh mpirun -n 4 .venv/bin/python examples/netsim/hvd_check.py'

Each rank must run on its own host (its own hostname and address), Horovod must use MPI for
both the controller and the CPU collectives, and an allreduce, an allgather of unequal lengths
and a broadcast must give the right values. Rank 0 prints one line per rank and "HVD_CHECK OK".
"""
from __future__ import annotations

import os
import socket
import sys

import horovod.torch as hvd
import torch


def main() -> int:
    # Horovod picks MPI when launched by mpirun, but it would fall back to Gloo (its own TCP
    # rendezvous, which needs HOROVOD_GLOO_* settings) if asked to: ask for MPI explicitly.
    os.environ.setdefault("HOROVOD_CONTROLLER", "mpi")
    os.environ.setdefault("HOROVOD_CPU_OPERATIONS", "mpi")
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    problems = []
    if not hvd.mpi_enabled() or hvd.gloo_enabled():
        problems.append(f"mpi_enabled={hvd.mpi_enabled()} gloo_enabled={hvd.gloo_enabled()}")

    total = hvd.allreduce(torch.full((1000,), float(rank + 1)), op=hvd.Sum, name="check.sum")
    if not torch.all(total == size * (size + 1) / 2):
        problems.append(f"allreduce gave {total[0].item()}")
    gathered = hvd.allgather(torch.full((rank + 1,), rank, dtype=torch.int32), name="check.ag")
    expect = torch.cat([torch.full((r + 1,), r, dtype=torch.int32) for r in range(size)])
    if not torch.equal(gathered, expect):
        problems.append(f"allgather gave {gathered.tolist()}")
    value = hvd.broadcast(torch.tensor([rank * 10 + 7]), root_rank=size - 1, name="check.bc")
    if value.item() != (size - 1) * 10 + 7:
        problems.append(f"broadcast gave {value.item()}")

    host = socket.gethostname()
    addr = socket.gethostbyname(host)
    iface = os.environ.get("HSG_NETSIM_IFACE", "net0")
    tx = f"/sys/class/net/{iface}/statistics/tx_bytes"
    info = hvd.allgather_object((rank, host, addr, os.path.exists(tx), problems))
    if rank == 0:
        bad = False
        for r, h, a, has_if, pr in info:
            print(f"rank {r}: host {h} addr {a} {iface}={'yes' if has_if else 'no'} "
                  f"{'; '.join(pr) or 'ok'}")
            bad |= bool(pr)
        hosts = {h for _, h, _, _, _ in info}
        if len(hosts) != size:
            print(f"ranks share hosts: {sorted(hosts)}")
            bad = True
        print("HVD_CHECK " + ("FAILED" if bad else "OK"), flush=True)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
