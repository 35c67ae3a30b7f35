"""Run a method for n virtual ranks in one process: the real codecs, kernels, payload bytes and
aggregation, with the collective replaced by concatenation (what an allgather returns) or a sum
(what an allreduce returns).

For experiments that need thousands of steps on toy problems (ALGORITHMS.md sections 1-9) and
for unit tests of the methods; multi-rank behaviour proper is tested with real MPI jobs.

    sim = Simulation("ef_signsgd", n_ranks=4, sizes=[50])
    update = sim.step([g0, g1, g2, g3])       # the gradient every rank would get
"""
from __future__ import annotations

import torch

from . import kernels
from .codecs import Layout
from .methods import StepContext, make_method


class Simulation:
    def __init__(self, method, n_ranks: int, sizes, seed: int = 0, average: bool = True,
                 **options):
        self.method = make_method(method, **options)
        self.n = n_ranks
        self.layout = Layout.for_sizes(list(sizes))
        self.states = [self.method.init_state(self.layout) for _ in range(n_ranks)]
        self.seed, self.average = seed, average
        self.step_count = 0
        self.bytes_sent = [0] * n_ranks

    def flatten(self, tensors) -> torch.Tensor:
        flat = torch.zeros(self.layout.numel)
        for t, o, s in zip(tensors, self.layout.offsets, self.layout.sizes):
            flat[o:o + s] = t.reshape(-1).float()
        return flat

    def unflatten(self, flat):
        return [flat[o:o + s] for o, s in self.layout.segments()]

    def step(self, grads) -> torch.Tensor:
        """grads: one flat tensor (or list of per-tensor tensors) per rank; returns the flat
        update every rank would write into its gradients."""
        m = self.method
        flats = [g if torch.is_tensor(g) and g.numel() == self.layout.numel and g.dim() == 1
                 else self.flatten(g if isinstance(g, (list, tuple)) else [g]) for g in grads]
        ctxs = [StepContext(step=self.step_count, rank=r, size=self.n, bucket="sim", offset=0,
                            layout=self.layout, seed=self.seed, average=self.average,
                            nonfinite=not kernels.all_finite(f))
                for r, f in enumerate(flats)]
        for f, st, ctx in zip(flats, self.states, ctxs):
            m.prepare(f, st, ctx)
        if m.model_scope:
            for f, st, ctx in zip(flats, self.states, ctxs):
                ctx.model_norm = m.combine_norms([m.norm_part(f, st, ctx)])
        msgs = [m.encode(f, st, ctx) for f, st, ctx in zip(flats, self.states, ctxs)]
        for r, msg in enumerate(msgs):
            self.bytes_sent[r] += msg.numel() * msg.element_size()
        self.last_messages = msgs
        if m.collective == "allgather":
            result = torch.cat(msgs)
        else:
            result = msgs[0].clone()
            for msg in msgs[1:]:
                result += msg
        update = m.aggregate(result, self.states[0], ctxs[0])
        self.step_count += 1
        return update
