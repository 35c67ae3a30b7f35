"""Helpers imported by the torchrun snippets of tests/multirank/test_ddp.py (DDP front end)."""
import atexit
import datetime
import io
import os
import sys
import warnings

import torch
import torch.distributed as dist

import hvd_signsgd.ddp
from hvd_signsgd.simulate import Simulation

# Methods whose update does not depend on how tensors are grouped into buckets (per coordinate
# or per tensor, no random stream keyed by bucket offset): their DDP result must equal the
# in-process simulation exactly, whatever DDP's buckets are.
LAYOUT_FREE = ("none", "signsgd", "signum", "ef_signsgd", "topk")
SMALL = 128      # State's default min_compress_numel


def _leave():
    try:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    except RuntimeError:
        pass
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_status[0])     # past the teardown that Gloo's threads can abort (torch 2.13)


_status = [0]


def _excepthook(kind, value, tb):
    _status[0] = 1           # an uncaught error still fails the job
    sys.__excepthook__(kind, value, tb)


def init():
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    # without it, Gloo's threads may outlive the interpreter: "terminate called without an
    # active exception" at exit; the barrier first, so that no rank leaves while another is
    # still in a collective (a bounded one: a rank that died must not hang the others)
    sys.excepthook = _excepthook
    atexit.register(_leave)
    return dist.get_rank(), dist.get_world_size()


class Reversed(torch.nn.Module):
    """Registered a, b, c but used c, b, a: DDP's first buckets (reverse registration order)
    differ from the ones it rebuilds in gradient-ready order after the first iteration."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = torch.nn.Linear(40, 10)
        self.b = torch.nn.Linear(61, 40)
        self.c = torch.nn.Linear(23, 61)   # 1403 weights: alignment gaps

    def forward(self, x):
        return self.a(torch.tanh(self.b(torch.tanh(self.c(x)))))


def batch(step, rank, n=16):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, 23, generator=g), torch.randint(0, 10, (n,), generator=g)


def loss_of(model, step, rank):
    x, y = batch(step, rank)
    return torch.nn.functional.cross_entropy(model(x), y)


def ddp_model(module, **kw):
    # bucket_cap_mb small enough for several buckets (the weights are 4-10 kB)
    kw.setdefault("bucket_cap_mb", 0.02)
    return torch.nn.parallel.DistributedDataParallel(module, **kw)


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def identical_everywhere(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return all(torch.equal(out[0], o) for o in out)


def gather_grads(grads):
    """Every rank's local gradients: [rank][tensor]."""
    n = dist.get_world_size()
    per = [[None] * len(grads) for _ in range(n)]
    for i, g in enumerate(grads):
        out = [torch.empty_like(g) for _ in range(n)]
        dist.all_gather(out, g.contiguous())
        for r in range(n):
            per[r][i] = out[r]
    return per


class Reference:
    """What every rank's p.grad must be after DDP's backward with the hook: the simulation of
    the method over the compressed tensors, the float32 mean over the small ones."""

    def __init__(self, method, params, **options):
        self.large = [i for i, p in enumerate(params) if p.numel() >= SMALL]
        self.small = [i for i, p in enumerate(params) if p.numel() < SMALL]
        self.sim = Simulation(method, dist.get_world_size(),
                              [params[i].numel() for i in self.large], **options)

    def step(self, local_grads):
        per = gather_grads(local_grads)
        update = self.sim.unflatten(self.sim.step([[g[i] for i in self.large] for g in per]))
        out = [None] * len(local_grads)
        for i, u in zip(self.large, update):
            out[i] = u.view_as(local_grads[i]).clone()
        for i in self.small:
            out[i] = sum(g[i] for g in per) / len(per)
        return out


def local_grads(twin, source, steps_and_ranks):
    """The gradients this rank computes before any exchange: twin is a plain copy of the
    model given source's parameters; one backward per (step, rank), accumulated."""
    twin.load_state_dict(source.state_dict())
    twin.zero_grad(set_to_none=True)
    for step, rank in steps_and_ranks:
        loss_of(twin, step, rank).backward()
    return [p.grad.detach().clone() for p in twin.parameters()]


def roundtrip(obj):
    """What torch.save then torch.load of a checkpoint file gives."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def hooked(module, method, optimizer=None, **options):
    model = ddp_model(module)
    state = hvd_signsgd.ddp.State(method=method, optimizer=optimizer, **options)
    model.register_comm_hook(state, hvd_signsgd.ddp.hook)
    return model, state
