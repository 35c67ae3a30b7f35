"""hvd_signsgd: 1-bit and sparse gradient exchange for Horovod + PyTorch and PyTorch DDP.

    import hvd_signsgd
    optimizer = hvd_signsgd.DistributedOptimizer(optimizer,
                                                 named_parameters=model.named_parameters(),
                                                 method="signum")          # Horovod
    model.register_comm_hook(hvd_signsgd.ddp.State(method="signum"),
                             hvd_signsgd.ddp.hook)                         # DDP

Layers, each in its own module: kernels (native bit packing and voting) -> codecs (bytes of one
payload) -> methods (state and aggregation rule per method) -> communicator (Horovod or
torch.distributed collectives, byte counts) -> exchange (allgather or sharded) -> engine (the
buckets' step protocol) -> front ends: optimizer (Horovod) and ddp (DDP communication hook).
"""
import importlib

from . import kernels
from .compression import Compression
from .engine import StepError
from .exchange import ExchangeError
from .methods import METHODS, Method, NonFiniteGradientError, make_method, ssdm_lr_lambda
from .wire import PayloadError, SenderFailedError

__all__ = ["DistributedOptimizer", "Compression", "METHODS", "Method", "make_method",
           "NonFiniteGradientError", "PayloadError", "SenderFailedError", "StepError",
           "ExchangeError", "ssdm_lr_lambda", "kernels", "ddp"]
__version__ = "0.1.0"


def __getattr__(name):
    # The front ends load on first use, so that DDP users need no Horovod and Horovod users
    # no torch.distributed set-up.
    if name == "DistributedOptimizer":
        return importlib.import_module(".optimizer", __name__).DistributedOptimizer
    if name == "ddp":
        return importlib.import_module(".ddp", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
