"""Baselines through the same wrapper: float32 and float16 allreduce."""
from __future__ import annotations

import torch

from ..codecs import Dense
from .base import Method, as_mean


class NoCompression(Method):
    """`none`: float32 allreduce, exactly Horovod's default path."""
    name, collective, bits_per_coordinate = "none", "allreduce", 32.0

    def __init__(self, dtype=torch.float32):
        self.codec = Dense(dtype)

    def encode(self, g, state, ctx):
        if g is ctx.out:      # the wrapper's bucket: Horovod reduces it in place, no copy
            return g
        return self.codec.encode(g)

    def encode_joined(self, g, ctx):
        return g.zero_() if g is ctx.out else torch.zeros_like(g)

    def aggregate(self, reduced, state, ctx):
        return as_mean(self.codec.decode(reduced), ctx)


class FP16(NoCompression):
    """`fp16`: float16 allreduce (as hvd.Compression.fp16); 16 bits per coordinate."""
    name, bits_per_coordinate = "fp16", 16.0

    def __init__(self):
        super().__init__(torch.float16)

    def encode(self, g, state, ctx):
        # Average before the sum, as hvd.Compression.fp16 users expect no fp16 overflow.
        return (g / ctx.size if ctx.average else g).to(torch.float16)

    def encode_joined(self, g, ctx):
        return torch.zeros(g.numel(), dtype=torch.float16)

    def aggregate(self, reduced, state, ctx):
        return reduced.to(torch.float32)
