"""hvd_signsgd: 1-bit and sparse gradient exchange for Horovod + PyTorch.

    import hvd_signsgd
    optimizer = hvd_signsgd.DistributedOptimizer(optimizer,
                                                 named_parameters=model.named_parameters(),
                                                 method="signum")

Layers, each in its own module: kernels (native bit packing and voting) -> codecs (bytes of one
payload) -> methods (state and aggregation rule per method) -> communicator (Horovod
collectives, byte counts) -> optimizer (hooks, buckets, synchronize).
"""
from . import kernels
from .compression import Compression
from .engine import StepError
from .methods import METHODS, Method, NonFiniteGradientError, make_method, ssdm_lr_lambda
from .optimizer import DistributedOptimizer
from .wire import PayloadError

__all__ = ["DistributedOptimizer", "Compression", "METHODS", "Method", "make_method",
           "NonFiniteGradientError", "PayloadError", "StepError", "ssdm_lr_lambda", "kernels"]
__version__ = "0.1.0"
