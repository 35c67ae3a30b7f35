"""The communicator moves bytes through Horovod's collectives and counts them; it never looks
inside a payload.

- `allgather(payload)`: a flat uint8 tensor per rank, of any length (Horovod's allgather is an
  MPI_Allgatherv / Gloo allgatherv underneath); every rank gets all payloads in rank order.
- `allreduce(tensor)`: a dense float tensor, summed or averaged (the `none`/`fp16`/Random-k path).

Byte counts are exact for what this rank hands to and receives from each collective:
  allgather: sent = len(own payload), received = sum of the other ranks' payload lengths;
  allreduce: sent = received = tensor bytes.
These are the numbers a float32 allreduce of the same gradients is compared against. What the
network carries on top depends on the collective's algorithm (a ring allgather forwards the
other ranks' payloads; a ring allreduce moves 2(n-1)/n of the tensor each way): see
`wire_bytes()` for that model.
"""
from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field

import horovod.torch as hvd
import torch


@dataclass
class Counters:
    bytes_sent: int = 0
    bytes_received: int = 0
    wire_bytes_sent: int = 0          # ring-algorithm model of what leaves this rank's NIC
    dense_fp32_bytes: int = 0         # a float32 allreduce of the same gradients
    seconds_encode: float = 0.0
    seconds_communicate: float = 0.0
    seconds_decode: float = 0.0
    collectives: int = 0
    extra: dict = field(default_factory=dict)

    def add(self, other: Counters) -> None:
        for k in ("bytes_sent", "bytes_received", "wire_bytes_sent", "dense_fp32_bytes",
                  "seconds_encode", "seconds_communicate", "seconds_decode", "collectives"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for k, v in other.extra.items():
            self.extra[k] = self.extra.get(k, 0) + v


class Handle:
    """An in-flight collective. `wait()` returns its result and books its bytes and time."""

    def __init__(self, comm: Communicator, hvd_handle, kind: str, nbytes: int):
        self.comm, self.hvd_handle, self.kind, self.nbytes = comm, hvd_handle, kind, nbytes
        self._result = None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            t0 = time.perf_counter()
            self._result = hvd.synchronize(self.hvd_handle)
            c = self.comm.counters
            c.seconds_communicate += time.perf_counter() - t0
            n = self.comm.size
            if self.kind == "allgather":
                total = self._result.numel()
                c.bytes_received += total - self.nbytes
                # a ring allgather forwards every block but the next rank's own
                c.wire_bytes_sent += total - self.nbytes if n > 1 else 0
            else:
                c.bytes_received += self.nbytes
                c.wire_bytes_sent += 2 * (n - 1) * self.nbytes // n
        return self._result


class Communicator:
    def __init__(self, process_set=hvd.global_process_set):
        self.process_set = process_set
        self.size = process_set.size()
        self.rank = process_set.rank()
        self.counters = Counters()

    def allgather(self, payload: torch.Tensor, name: str, size_exchange: bool = False) -> Handle:
        """size_exchange: the payload length differs between ranks (an allgatherv), so count
        the exchange of sizes it needs: each rank's int64 first dimension, which Horovod's
        negotiation carries (8 bytes sent, 8 from each other rank; also in
        extra["size_exchange_bytes"]). Fixed-length payloads need none."""
        assert payload.dtype == torch.uint8 and payload.dim() == 1
        c = self.counters
        c.bytes_sent += payload.numel()
        c.collectives += 1
        if size_exchange:
            c.bytes_sent += 8
            c.bytes_received += 8 * (self.size - 1)
            c.wire_bytes_sent += 8
            c.extra["size_exchange_bytes"] = c.extra.get("size_exchange_bytes", 0) + 8 * self.size
        h = hvd.allgather_async(payload, name=name, process_set=self.process_set)
        return Handle(self, h, "allgather", payload.numel())

    def allreduce(self, tensor: torch.Tensor, name: str, op=hvd.Sum,
                  prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> Handle:
        nbytes = tensor.numel() * tensor.element_size()
        self.counters.bytes_sent += nbytes
        self.counters.collectives += 1
        h = hvd.allreduce_async_(tensor, name=name, op=op, prescale_factor=prescale_factor,
                                 postscale_factor=postscale_factor, process_set=self.process_set)
        return Handle(self, h, "allreduce", nbytes)

    def allgather_object(self, obj, name: str = "hvd_signsgd.control") -> list:
        """A small control-plane exchange (validation, checkpoints); not counted as gradient
        bytes. Horovod's own allgather_object has no process_set argument in 0.28."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = hvd.allgather(torch.tensor([data.numel()]), name=name + ".sizes",
                              process_set=self.process_set).tolist()
        gathered = hvd.allgather(data, name=name, process_set=self.process_set)
        out, pos = [], 0
        for n in sizes:
            out.append(pickle.loads(gathered[pos:pos + n].numpy().tobytes()))
            pos += n
        return out
