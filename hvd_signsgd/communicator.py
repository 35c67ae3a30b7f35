"""The communicator moves bytes and counts them; it never looks inside a payload.

One small interface, `Communicator`, and one implementation per library that moves bytes:
`HorovodCommunicator` (Horovod's collectives: MPI or Gloo underneath) and
`TorchDistCommunicator` (torch.distributed: Gloo or NCCL, for the DDP hook). Nothing else in the
package imports a communication library. What an implementation provides:

- `allgather(payload, name)`: a flat uint8 tensor per rank, of any length (an allgatherv);
  every rank gets all payloads laid end to end in rank order.
- `allreduce(tensor, name, prescale, postscale)`: a dense float tensor, summed in place.
- `alltoall(payload, splits, name)`: a flat uint8 tensor cut into `size` consecutive pieces
  (splits[j] bytes go to rank j); every rank gets the pieces addressed to it laid end to end
  in rank order. The splits must agree: what rank m sends to rank j is what j expects from m.
- `control(record, name)`: a blocking int64 sum of a small record (the engine's per-step
  control exchange); counted as control bytes, not gradient bytes.
- `allgather_object(obj, name)`: a small control-plane exchange of picklable objects.

With one rank every collective returns its input at once (no library call), so a one-process
run executes the method exactly as n processes do.

Byte counts are exact for what this rank hands to and receives from each collective:
  allgather: sent = len(own payload), received = sum of the other ranks' payload lengths;
  allreduce: sent = received = tensor bytes;
  alltoall: sent = the pieces for the other ranks, received = the pieces from them (the piece a
  rank addresses to itself never leaves it).
They are the same whichever library moves the bytes (the torch.distributed one pads payloads
to the longest, see TorchDistCommunicator; the padding is not counted). These are the numbers a
float32 allreduce of the same gradients is compared against. What the network carries on top
depends on the collective's algorithm (a ring allgather forwards the other ranks' payloads; a
ring allreduce moves 2(n-1)/n of the tensor each way): see `wire_bytes_sent` for that model.
"""
from __future__ import annotations

import atexit
import os
import pickle
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Counters:
    bytes_sent: int = 0
    bytes_received: int = 0
    wire_bytes_sent: int = 0          # ring-algorithm model of what leaves this rank's NIC
    dense_fp32_bytes: int = 0         # a float32 allreduce of the same gradients
    control_bytes: int = 0            # the per-step control record (sent; received alike)
    seconds_encode: float = 0.0
    seconds_communicate: float = 0.0
    seconds_decode: float = 0.0
    collectives: int = 0
    extra: dict = field(default_factory=dict)

    def add(self, other: Counters) -> None:
        for k in ("bytes_sent", "bytes_received", "wire_bytes_sent", "dense_fp32_bytes",
                  "control_bytes", "seconds_encode", "seconds_communicate", "seconds_decode",
                  "collectives"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for k, v in other.extra.items():
            self.extra[k] = self.extra.get(k, 0) + v


class Handle:
    """An in-flight collective. `wait()` returns its result and books its bytes and time.
    `wait_fn` is the library's wait, or None for a result known at once (one rank)."""

    def __init__(self, comm: Communicator, wait_fn, kind: str, nbytes: int, result=None,
                 own: int = 0):
        self.comm, self.wait_fn, self.kind, self.nbytes = comm, wait_fn, kind, nbytes
        self.own = own           # alltoall: the bytes a rank addresses to itself
        self._result = result
        self._booked = False

    def wait(self) -> torch.Tensor:
        if not self._booked:
            t0 = time.perf_counter()
            if self.wait_fn is not None:
                self._result = self.wait_fn()
            self._booked = True
            with self.comm.counting:
                self._book(time.perf_counter() - t0)
        return self._result

    def _book(self, seconds) -> None:
        add = self.comm._add
        self.comm.counters.seconds_communicate += seconds
        n = self.comm.size
        if self.kind == "allgather":
            total = self._result.numel()
            add("bytes_received", total - self.nbytes)
            # a ring allgather forwards every block but the next rank's own
            add("wire_bytes_sent", total - self.nbytes if n > 1 else 0)
        elif self.kind == "alltoall":
            add("bytes_received", self._result.numel() - self.own)
            add("wire_bytes_sent", self.nbytes)     # direct: each piece leaves once
        elif n > 1:
            add("bytes_received", self.nbytes)
            add("wire_bytes_sent", 2 * (n - 1) * self.nbytes // n)

    def future(self) -> torch.futures.Future:
        """A future completed once the collective is done (its value is not the result: call
        wait() from its callback). Libraries without futures give a completed one, and wait()
        then blocks."""
        fut = getattr(self.wait_fn, "future", None)
        if fut is None:
            fut = torch.futures.Future()
            fut.set_result(None)
        return fut


class Communicator:
    """The interface the engine talks to (module docstring). Subclasses implement the
    `_start_*` methods and `_control` / `_allgather_bytes`; counting is done here."""

    size: int = 1
    rank: int = 0
    included: bool = True
    parent = None           # a sub-communicator (split_local) books into its parent's counters
    scope = None            # "local": its bytes go to extra["local_<field>"], not the fields

    def __init__(self):
        self._counters = Counters()
        # the DDP hook counts from several threads (its own, the library's callbacks, the
        # follow-up worker): each booking is one locked update
        self._counting = threading.RLock()

    @property
    def counters(self) -> Counters:
        return self.parent.counters if self.parent is not None else self._counters

    @counters.setter
    def counters(self, value: Counters) -> None:
        self._counters = value

    @property
    def counting(self) -> threading.RLock:
        """The lock of the counters this communicator books into."""
        return self.parent.counting if self.parent is not None else self._counting

    def _add(self, field_name: str, nbytes: int) -> None:
        """Book bytes: into the field, or for a local sub-communicator into extra (so that
        bytes_sent / bytes_received / wire_bytes_sent stay the bytes that leave a host)."""
        with self.counting:
            c = self.counters
            if self.scope == "local":
                key = f"local_{field_name}"
                c.extra[key] = c.extra.get(key, 0) + nbytes
            else:
                setattr(c, field_name, getattr(c, field_name) + nbytes)

    def follow_up(self, fn) -> torch.futures.Future:
        """Run fn() (which may start and wait for collectives) after the follow-ups submitted
        before it; return a future that completes with fn's result, or its exception. For a
        chain of collectives whose later links depend on earlier results (the sharded
        exchange's phases) behind a future the caller does not wait for. Here fn runs at
        once, on the caller's thread; TorchDistCommunicator runs it off the caller's thread
        once `open_follow_ups()` has run."""
        fut = torch.futures.Future()
        try:
            fut.set_result(fn())
        except Exception as e:  # noqa: BLE001 - handed to whoever waits for the future
            fut.set_exception(e)
        return fut

    def open_follow_ups(self) -> None:
        """Prepare what follow_up() needs; a collective: every rank calls it at the same
        point, after the ranks have agreed that they need it."""

    def allgather(self, payload: torch.Tensor, name: str, size_exchange: bool = False) -> Handle:
        """size_exchange: the payload length differs between ranks (an allgatherv), so count
        the exchange of sizes it needs: each rank's int64 length (8 bytes sent, 8 from each
        other rank; also in extra["size_exchange_bytes"]). Fixed-length payloads need none."""
        assert payload.dtype == torch.uint8 and payload.dim() == 1
        with self.counting:
            c = self.counters
            self._add("bytes_sent", payload.numel())
            c.collectives += 1
            if size_exchange and self.size > 1:
                self._book_size_exchange()
        if self.size == 1:
            return Handle(self, None, "allgather", payload.numel(), result=payload)
        return Handle(self, self._start_allgather(payload, name), "allgather", payload.numel())

    def allreduce(self, tensor: torch.Tensor, name: str, prescale: float = 1.0,
                  postscale: float = 1.0) -> Handle:
        """Sum over ranks, in place where the library allows; the scales multiply before and
        after the sum (Horovod's gradient_predivide_factor)."""
        nbytes = tensor.numel() * tensor.element_size()
        with self.counting:
            self._add("bytes_sent", nbytes)
            self.counters.collectives += 1
        if self.size == 1:
            if prescale * postscale != 1.0:
                tensor.mul_(prescale * postscale)
            return Handle(self, None, "allreduce", nbytes, result=tensor)
        return Handle(self, self._start_allreduce(tensor, name, prescale, postscale),
                      "allreduce", nbytes)

    def alltoall(self, payload: torch.Tensor, splits: list[int], name: str) -> Handle:
        """Send splits[j] consecutive bytes of payload to rank j; the result holds the pieces
        the ranks addressed to this one, in rank order."""
        assert payload.dtype == torch.uint8 and payload.dim() == 1
        assert len(splits) == self.size and sum(splits) == payload.numel()
        own = splits[self.rank] if self.size > 1 else payload.numel()
        sent = payload.numel() - own
        with self.counting:
            self._add("bytes_sent", sent)
            self.counters.collectives += 1
        if self.size == 1:
            return Handle(self, None, "alltoall", 0, result=payload, own=own)
        return Handle(self, self._start_alltoall(payload, list(splits), name), "alltoall",
                      sent, own=own)

    def _book_size_exchange(self) -> None:
        """Each rank's int64 length: 8 bytes sent, 8 from each other rank."""
        with self.counting:
            self._add("bytes_sent", 8)
            self._add("bytes_received", 8 * (self.size - 1))
            self._add("wire_bytes_sent", 8)
            extra = self.counters.extra
            extra["size_exchange_bytes"] = extra.get("size_exchange_bytes", 0) + 8 * self.size

    def exchange_sizes(self, nbytes: int, name: str) -> list[int]:
        """Every rank's payload length, in rank order (blocking): the size exchange of an
        allgatherv done ahead of it, so that every rank can choose the route from the lengths.
        Booked exactly as allgather(size_exchange=True) books it; the allgather that follows
        then passes size_exchange=False."""
        if self.size == 1:
            return [nbytes]
        self._book_size_exchange()
        got = self._allgather_bytes(torch.tensor([nbytes], dtype=torch.int64), name)
        return [int(x) for x in got.tolist()]

    def control(self, record: torch.Tensor, name: str) -> torch.Tensor:
        """Blocking int64 sum of `record` over the ranks."""
        with self.counting:
            self.counters.control_bytes += record.numel() * 8
        if self.size == 1:
            return record
        return self._control(record, name)

    def allgather_object(self, obj, name: str = "hvd_signsgd.control") -> list:
        """A small control-plane exchange (validation, checkpoints); not counted."""
        if self.size == 1:
            return [obj]
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = self._allgather_bytes(torch.tensor([data.numel()]), name + ".sizes").tolist()
        gathered = self._allgather_bytes(data, name)
        out, pos = [], 0
        for n in sizes:
            out.append(pickle.loads(gathered[pos:pos + n].numpy().tobytes()))
            pos += n
        return out

    # --- hosts ------------------------------------------------------------------------------

    def split_local(self, local_size: int | None = None) -> tuple[Communicator, Communicator]:
        """(local, cross): the ranks of this rank's host, and the ranks of the other hosts
        with the same local rank (exchange="hierarchical"). Collective: every rank of this
        communicator calls it. Hosts are the library's (Horovod: cross_rank; torch.distributed:
        the host name), or, with local_size, blocks of local_size consecutive ranks (to fake
        hosts on one machine, or for a launcher whose hosts are such blocks). Host order is the
        order of their smallest rank; local and cross ranks follow the global rank order.
        Every host must have the same number of ranks. Raises the same ValueError on every
        rank when that, or what the library needs for sub-groups, is missing. The two book
        their bytes into this communicator's counters: the cross one into the usual fields,
        the local one into extra["local_bytes_sent"], ["local_bytes_received"],
        ["local_wire_bytes_sent"]."""
        n = self.size
        views = self.allgather_object((self._host_key() if local_size is None else None,
                                       local_size, self._split_info()),
                                      name="hvd_signsgd.hosts")
        if len({v[1] for v in views}) > 1:
            raise ValueError(f"hvd_signsgd: the ranks were given different local sizes "
                             f"({[v[1] for v in views]}; HVD_SIGNSGD_LOCAL_SIZE?)")
        if local_size is not None:
            if local_size < 1 or n % local_size:
                raise ValueError(f"hvd_signsgd: local_size={local_size} does not divide the "
                                 f"{n} ranks into hosts of equal size")
            host_of = [r // local_size for r in range(n)]
        else:
            first = {}
            host_of = [first.setdefault(v[0], len(first)) for v in views]
        members = [[r for r in range(n) if host_of[r] == h] for h in range(max(host_of) + 1)]
        if len({len(m) for m in members}) > 1:
            raise ValueError(f"hvd_signsgd: exchange='hierarchical' needs the same number of "
                             f"ranks on every host; the hosts have {[len(m) for m in members]}")
        width = len(members[0])
        groups = members + [[m[i] for m in members] for i in range(width)]
        subs = self._subgroups(groups, [v[2] for v in views])
        local = subs[host_of[self.rank]]
        cross = subs[len(members) + members[host_of[self.rank]].index(self.rank)]
        local.parent, local.scope = self, "local"
        cross.parent, cross.scope = self, "cross"
        return local, cross

    def _host_key(self):
        """What tells this rank's host apart (gathered from every rank)."""
        return socket.gethostname()

    def _split_info(self):
        """What _subgroups needs to know of every rank (gathered)."""
        return None

    def _subgroups(self, groups, infos):
        """Communicators for `groups` (lists of this communicator's ranks): every rank
        creates every group in the same order; the entry of a group without this rank is
        None. A group of one rank needs no library."""
        return [Communicator() if len(g) == 1 else None for g in groups]

    # --- what an implementation provides ----------------------------------------------------

    def _start_allgather(self, payload, name):
        """Start an allgather; return a function that waits and returns the result (with a
        `future` attribute where the library has futures: see Handle.future)."""
        raise NotImplementedError

    def _start_allreduce(self, tensor, name, prescale, postscale):
        raise NotImplementedError

    def _start_alltoall(self, payload, splits, name):
        raise NotImplementedError

    def _control(self, record, name):
        raise NotImplementedError

    def _allgather_bytes(self, tensor, name):
        """Blocking allgather of a small tensor (any dtype)."""
        raise NotImplementedError


class HorovodCommunicator(Communicator):
    """Horovod's collectives on one process set. On a rank outside the set, size is the set's
    size, rank is -1 and included is False: such a rank constructs everything but never
    exchanges (its synchronize() is a no-op, as in Horovod)."""

    def __init__(self, process_set=None):
        super().__init__()
        import horovod.torch as hvd
        self._hvd = hvd
        self.process_set = process_set if process_set is not None else hvd.global_process_set
        # From the set's rank list, not size()/rank(): those ask Horovod's background thread,
        # which may not have registered the set yet right after hvd.init(process_sets=...)
        # (Horovod 0.28 then raises on some ranks, at random).
        ranks = list(self.process_set.ranks or range(hvd.size()))
        self.included = hvd.rank() in ranks
        self.size = len(ranks)
        self.rank = ranks.index(hvd.rank()) if self.included else -1

    def _host_key(self):
        return self._hvd.cross_rank()

    def _split_info(self):
        return os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS", "0") not in ("", "0")

    def _subgroups(self, groups, infos):
        """Horovod process sets of the groups' global ranks: a set that exists already (given
        to hvd.init(process_sets=...), or made for an earlier optimizer) is reused, the others
        are added, which Horovod allows only with dynamic process sets on every rank."""
        hvd = self._hvd
        glob = list(self.process_set.ranks or range(hvd.size()))
        if len(glob) != hvd.size():
            raise ValueError("hvd_signsgd: exchange='hierarchical' runs on the global "
                             "process set only")
        existing = _horovod_process_sets()
        wanted = [tuple(sorted(glob[r] for r in g)) for g in groups]
        missing = [w for w in wanted if len(w) > 1 and w not in existing
                   and len(w) != len(glob)]
        if missing and not all(infos):
            raise ValueError(
                "hvd_signsgd: exchange='hierarchical' needs Horovod process sets for the "
                "ranks of each host and across hosts: run every rank with "
                "HOROVOD_DYNAMIC_PROCESS_SETS=1 (or call hvd.init(process_sets='dynamic')); "
                f"ranks without it: {[r for r, ok in enumerate(infos) if not ok]}")
        out = []
        for w in wanted:
            if len(w) == len(glob):
                ps = hvd.global_process_set
            elif len(w) == 1:
                out.append(Communicator() if hvd.rank() in w else None)
                continue
            elif w in existing:
                ps = hvd.ProcessSet(list(w))
                ps.process_set_id = existing[w]
            else:
                ps = hvd.add_process_set(list(w))
                existing[w] = ps.process_set_id
            out.append(HorovodCommunicator(ps) if hvd.rank() in w else None)
        _register_exit_barrier(hvd)
        return out

    def _start_allgather(self, payload, name):
        h = self._hvd.allgather_async(payload, name=name, process_set=self.process_set)
        return lambda: self._hvd.synchronize(h)

    def _start_allreduce(self, tensor, name, prescale, postscale):
        h = self._hvd.allreduce_async_(tensor, name=name, op=self._hvd.Sum,
                                       prescale_factor=prescale, postscale_factor=postscale,
                                       process_set=self.process_set)
        return lambda: self._hvd.synchronize(h)

    def _start_alltoall(self, payload, splits, name):
        h = self._hvd.alltoall_async(payload, splits=torch.tensor(splits, dtype=torch.int32),
                                     name=name, process_set=self.process_set)
        return lambda: self._hvd.synchronize(h)[0]    # (output, received splits)

    def _control(self, record, name):
        return self._hvd.allreduce(record, name=name, op=self._hvd.Sum,
                                   process_set=self.process_set)

    def _allgather_bytes(self, tensor, name):
        return self._hvd.allgather(tensor, name=name, process_set=self.process_set)


EXIT_BARRIER_S = 10.0
_exit_barrier_registered = False


def _register_exit_barrier(hvd) -> None:
    """Once per process: _exit_barrier at exit, before Horovod's own shutdown (atexit runs
    the later registration first; hvd.init registered Horovod's)."""
    global _exit_barrier_registered
    if not _exit_barrier_registered:
        _exit_barrier_registered = True
        atexit.register(_exit_barrier, hvd)


def _exit_barrier(hvd, timeout: float = EXIT_BARRIER_S) -> None:
    """Wait, at most timeout seconds, until every rank reaches exit. Horovod's shutdown at
    exit fails every rank's pending collectives, those of process sets included, and a
    hierarchical step ends in each host's own allgather: a host that finished it first would
    otherwise fail the other hosts' last step by exiting. Skipped when this rank exits on an
    uncaught exception (the others must hear of it at once, not after the timeout)."""
    if getattr(sys, "last_exc", None) is not None or getattr(sys, "last_value", None) is not None:
        return
    try:
        h = hvd.allreduce_async(torch.zeros(1), name="hvd_signsgd.exit", op=hvd.Sum)
        deadline = time.monotonic() + timeout
        while not hvd.poll(h):
            if time.monotonic() > deadline:
                return
            time.sleep(0.002)
        hvd.synchronize(h)
    except Exception:  # noqa: BLE001 - Horovod already shut down (another rank failed)
        pass


def _horovod_process_sets() -> dict:
    """{sorted global ranks: id} of the process sets Horovod knows (Horovod has no public
    query for this; empty where the private one is missing)."""
    try:
        from horovod.common import process_sets as ps_mod
        ids = ps_mod._basics._get_process_set_ids_and_ranks()
    except (AttributeError, ImportError):
        return {}
    return {tuple(sorted(r)): i for i, r in ids.items() if i != 0}


class _Pending:
    """A torch.distributed collective in flight: wait() via `future`, then `finish()` turns
    the output buffer into the result."""

    def __init__(self, future, finish):
        self.future, self._finish = future, finish

    def __call__(self):
        self.future.wait()
        return self._finish()


class TorchDistCommunicator(Communicator):
    """torch.distributed's collectives on one process group (None: the default group), for
    the DDP communication hook (ddp.py). Collectives are asynchronous and give futures, so a
    hook can return a future chained on them.

    Payloads first gather their lengths (a small blocking all_gather), then travel padded to
    the longest in one all_gather_into_tensor. Dense tensors: all_reduce; the sharded
    exchange: all_to_all_single. The padding and the lengths travel but are not counted
    (module docstring), so that the byte counts are those of the Horovod front end for the
    same payloads.

    Follow-ups (`follow_up`, for the sharded exchange's second phase, chained behind the
    DDP hook's future): collectives must start in the same order on every rank, which
    callbacks of the library's threads cannot promise. So after `open_follow_ups()` one worker
    thread per communicator runs the follow-ups in the order they were submitted (the hook's
    bucket order, the same on every rank), and the collectives it starts go to a second
    process group of the same ranks, so they never interleave with the ones the hook starts
    meanwhile on the first.

    Device: the engine works on CPU float32 buffers; with the NCCL backend payloads are
    staged to the current CUDA device and the results back (correct but not fast; NOT TESTED:
    this package's test machines have no GPU). Gloo works on CPU tensors directly."""

    def __init__(self, process_group=None):
        super().__init__()
        import torch.distributed as dist
        self._dist = dist
        self.group = process_group if process_group is not None else dist.group.WORLD
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.included = self.rank >= 0
        self.backend = str(dist.get_backend(self.group)).lower()
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if "nccl" in self.backend else torch.device("cpu"))
        self._lane = None            # (second process group, worker thread, its queue)

    def open_follow_ups(self) -> None:
        if self._lane is not None or self.size == 1:
            return
        # only the group's ranks take part (use_local_synchronization), so a State built on
        # a subgroup does not need the other ranks
        group = self._dist.new_group(self._dist.get_process_group_ranks(self.group),
                                     backend=self.backend, use_local_synchronization=True)
        jobs = queue.SimpleQueue()
        worker = threading.Thread(target=_run_follow_ups, args=(jobs,), daemon=True,
                                  name="hvd_signsgd.follow_ups")
        self._lane = (group, worker, jobs)
        worker.start()

    def follow_up(self, fn) -> torch.futures.Future:
        if self._lane is None:
            return super().follow_up(fn)
        fut = torch.futures.Future()
        self._lane[2].put((fn, fut))
        return fut

    def _group(self):
        lane = self._lane
        return lane[0] if lane is not None and threading.current_thread() is lane[1] \
            else self.group

    def _subgroups(self, groups, infos):
        """dist.new_group for every group, on every rank, in the same order (as it asks)."""
        if self.group is not self._dist.group.WORLD:
            raise ValueError("hvd_signsgd: exchange='hierarchical' runs on the default "
                             "process group only")
        out = []
        for g in groups:
            pg = self._dist.new_group(ranks=list(g)) if len(g) > 1 else None
            if self.rank not in g:
                out.append(None)
            else:
                out.append(TorchDistCommunicator(pg) if pg is not None else Communicator())
        return out

    def _dev(self, t):
        return t if t.device == self.device else t.to(self.device)

    def _host(self, t):
        return t if t.device.type == "cpu" else t.cpu()

    def _gather_into(self, x, async_op):
        out = torch.empty(self.size * x.numel(), dtype=x.dtype, device=self.device)
        # all_gather_single is all_gather_into_tensor's newer name (the old one warns)
        gather = getattr(self._dist, "all_gather_single", None) or \
            self._dist.all_gather_into_tensor
        work = gather(out, self._dev(x), group=self._group(), async_op=async_op)
        return out, work

    def _start_allgather(self, payload, name):
        # Lengths first: even a fixed-layout payload is shorter on a NaN/Inf rank (a header)
        # and longer where exact zeros are marked (wire.FLAG_ZEROS).
        n = payload.numel()
        sizes, _ = self._gather_into(torch.tensor([n], dtype=torch.int64), False)
        sizes = self._host(sizes).tolist()
        width = max(sizes)
        slot = torch.zeros(width, dtype=torch.uint8)
        slot[:n] = payload
        out, work = self._gather_into(slot, True)

        def finish():
            rows = self._host(out).view(self.size, width)
            if all(k == width for k in sizes):
                return rows.reshape(-1)
            return torch.cat([rows[r, :k] for r, k in enumerate(sizes)])

        return _Pending(work.get_future(), finish)

    def _start_alltoall(self, payload, splits, name):
        # every piece addressed to one rank has the same length (exchange.py's pieces)
        recv = [splits[self.rank]] * self.size
        out = torch.empty(sum(recv), dtype=torch.uint8, device=self.device)
        work = self._dist.all_to_all_single(out, self._dev(payload), output_split_sizes=recv,
                                            input_split_sizes=list(splits), group=self._group(),
                                            async_op=True)
        return _Pending(work.get_future(), lambda: self._host(out))

    def _start_allreduce(self, tensor, name, prescale, postscale):
        x = self._dev(tensor)
        if prescale != 1.0:
            x.mul_(prescale)
        work = self._dist.all_reduce(x, group=self._group(), async_op=True)

        def finish():
            if postscale != 1.0:
                x.mul_(postscale)
            if x is not tensor:
                tensor.copy_(x)
            return tensor

        return _Pending(work.get_future(), finish)

    def _control(self, record, name):
        x = self._dev(record.clone())
        self._dist.all_reduce(x, group=self._group())
        return self._host(x)

    def _allgather_bytes(self, tensor, name):
        """Blocking; the lengths may differ between ranks (pickled objects)."""
        x = tensor.contiguous().view(-1)
        sizes, _ = self._gather_into(torch.tensor([x.numel()], dtype=torch.int64), False)
        sizes = self._host(sizes).tolist()
        width = max(sizes)
        slot = torch.zeros(width, dtype=x.dtype)
        slot[:x.numel()] = x
        out, _ = self._gather_into(slot, False)
        rows = self._host(out).view(self.size, width)
        return torch.cat([rows[r, :k] for r, k in enumerate(sizes)])


def _run_follow_ups(jobs) -> None:
    """The follow-up worker: fn after fn, in submission order; results into their futures."""
    while True:
        fn, fut = jobs.get()
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - handed to whoever waits for the future
            fut.set_exception(e)
        else:
            fut.set_result(value)
