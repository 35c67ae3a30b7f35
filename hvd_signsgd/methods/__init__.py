"""Methods: named recipes over a codec, a per-rank memory and an aggregation rule.

base.py      the Method interface, StepContext, NaN/Inf policy
baselines.py none, fp16
sign.py      signsgd, signum, stochastic_sign, ssdm, ef_signsgd
sparse.py    topk, threshold, randomk (error feedback; sparse allgatherv / Random-k allreduce)
ecx.py       ecx (ErrorCompensatedX: two-step error compensation for momentum / STORM)
perturb.py   noise + periodic error reset for the EF sparsifiers (escaping saddle points)
"""
from __future__ import annotations

from .base import MemoryState, Method, NonFiniteGradientError, StepContext, mix_seed
from .baselines import FP16, NoCompression
from .ecx import ErrorCompensatedX, storm_direction
from .sign import SSDM, EFSignSGD, SignSGD, Signum, StochasticSignMethod, ssdm_lr_lambda
from .sparse import HardThreshold, RandomK, TopK, threshold_for, topk_indices

METHODS = {
    "none": NoCompression,
    "fp16": FP16,
    "signsgd": SignSGD,
    "signum": Signum,
    "stochastic_sign": StochasticSignMethod,
    "ssdm": SSDM,
    "ef_signsgd": EFSignSGD,
    "topk": TopK,
    "threshold": HardThreshold,
    "randomk": RandomK,
    "ecx": ErrorCompensatedX,
}


def make_method(name, **options) -> Method:
    """Build a method by name; unknown names and options raise ValueError listing what exists."""
    if isinstance(name, Method):
        if options:
            raise ValueError("options can only be given with a method name, not an instance")
        return name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    try:
        return METHODS[name](**options)
    except TypeError as e:
        raise ValueError(f"bad options for method {name!r}: {e}") from None



__all__ = ["METHODS", "MemoryState", "Method", "StepContext", "NonFiniteGradientError",
           "make_method", "mix_seed", "ssdm_lr_lambda", "NoCompression", "FP16", "SignSGD",
           "Signum",
           "StochasticSignMethod", "SSDM", "EFSignSGD", "TopK", "HardThreshold", "RandomK",
           "ErrorCompensatedX", "threshold_for", "topk_indices", "storm_direction"]
