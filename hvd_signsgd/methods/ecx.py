"""ErrorCompensatedX (Tang, Li, Liu, Yan, NeurIPS 2021; ALGORITHMS.md section 7).

For optimizers whose direction is a moving average of the (compressed) aggregate,

    v_t = (1 - alpha) v_{t-1} + alpha * mean_m q_{m,t},      x_{t+1} = x_t - lr * v_t,

error feedback of the last step alone does not cancel the compression error that the average
keeps for ~1/alpha steps. ECX compensates with the errors of the two previous steps (rank m):

    c_t = (2 - alpha) delta_{t-1} - (1 - alpha) delta_{t-2}
    q_t = C(u_t + c_t);   delta_t = u_t + c_t - q_t;   send q_t

Then the average built from compressed data differs from the uncompressed one by exactly
alpha (delta_{t-1} - delta_t) at every step (the section 7(a) identity): the error does not
accumulate through the average. Conservation form: sum_t q_t + delta_T - (1 - alpha) delta_{T-1}
= sum_t u_t.

Usage: the moving average is the wrapped optimizer's, torch.optim.SGD(lr, momentum=1 - alpha,
dampening=1 - alpha) (which computes v_t = (1 - alpha) v_{t-1} + alpha * grad), with the same
alpha given to the method. torch's first step takes v_1 = grad instead of alpha * grad; the
identity then holds up to a term decaying as (1 - alpha)^t, or exactly if the momentum buffers
are set to zeros before the first step (optimizer.state[p]["momentum_buffer"] = zeros). With
dampening=0 the average is scaled by 1/alpha: the same method with lr / alpha. u_t is the
gradient (momentum SGD). For STORM, compute
u_t = storm_direction(g(x_t; xi_t), g(x_{t-1}; xi_t), alpha) yourself, write it into p.grad and
call optimizer.step() (the wrapper sends whatever p.grad holds; see storm_direction).

Options and defaults:
    alpha=0.1          the moving-average weight (momentum 0.9), as in the paper's setting
    compensation="ecx" "ecx" (two steps), "single" (c_t = delta_{t-1}: plain error feedback,
                       the baseline the paper improves on) or "none" (c_t = 0, no memory)
    compressor="scaled_sign"  per-tensor scaled sign, 1 bit per coordinate + one float32 per
                       tensor, allgather (the compressor of the section 7(b) experiment), with
                       sign(0) = 0: where u_t + c_t is exactly 0 the rank sends q = 0 (a zero
                       mark, wire.FLAG_ZEROS) and the scale is ||x_t||_1 / nnz(x_t)
                       (codecs.ScaledSign), so coordinates that never had a gradient stay put

Encoding (scaled sign with a memory) is one fused kernel, kernels.ecx_sign ("single": ef_sign),
through base.ErrorFeedback: x_t = u_t + (a delta_{t-1} - b delta_{t-2}) with a = float32(2 -
alpha), b = float32(1 - alpha), each operation rounded to float32 in this order; ||x_t||_1
summed in the kernels' fixed order (kernels.tree_abs_sum); NaN/Inf found in the same pass
(the memories then untouched). The new delta goes into a spare buffer and the buffers rotate
(delta2 <- delta1 <- new, no copy); a step that fails on another rank rotates them back.
With the engine's MemoryState the kernel is the one-pass kernels.ecx_sign_deferred
("single": ef_sign_deferred): each buffer keeps the x it was made from and its scales, and
the kernels of the next two steps form delta = x - q as they read it, without storing it
(ErrorFeedback.fused_deferred); reading state["delta1"] or ["delta2"] forms it in place, so
what is read, saved or loaded is delta.
State keys: "delta1", "delta2" (as before; checkpoints load unchanged).

Sparse compressors are refused (ValueError). ALGORITHMS.md reports that with Top-k the
two-step recursion diverged in simulation; we checked it with the project's Top-k codec
(tests/unit/test_sparse_methods.py: test_ecx_with_topk_diverges): on the section 7(b) quadratic
ECX + Top-k 10% blows up where single-step EF + Top-k converges. The reason: for a coordinate
that is not sent, delta follows delta_t = u_t + (2 - alpha) delta_{t-1} - (1 - alpha) delta_{t-2},
whose characteristic roots are 1 and 1 - alpha, so a residual grows ~1/alpha times faster than
under single-step EF; when the coordinate is finally sent, the next step's compensation
-(1 - alpha) delta_{t-1} throws most of it back with the opposite sign, and a selection by
magnitude keeps picking these ringing coordinates. A dense contractive compressor (scaled
sign) touches every coordinate every step, so no residual is left to ring.
"""
from __future__ import annotations

import torch

from .. import wire
from ..codecs import ScaledSign, Sparse, count_zeros
from .base import ErrorFeedback, ErrorFeedbackMethod, as_sum, mean_divisor
from .sparse import topk_indices

_COMPRESSORS = ("scaled_sign",)
_REFUSED = ("topk", "threshold", "randomk")


def storm_direction(g_now: torch.Tensor, g_prev_point: torch.Tensor,
                    alpha: float) -> torch.Tensor:
    """STORM's u_t = g(x_t; xi) + ((1 - alpha) / alpha) (g(x_t; xi) - g(x_{t-1}; xi)), both
    gradients on the SAME mini-batch xi; with the wrapped SGD(momentum=1 - alpha,
    dampening=1 - alpha) the direction is then STORM's v_t = (1 - alpha) v_{t-1} + alpha u_t."""
    return g_now + (1.0 - alpha) / alpha * (g_now - g_prev_point)


class ErrorCompensatedX(ErrorFeedbackMethod):
    """`ecx`: ErrorCompensatedX over scaled sign (module docstring: formula, defaults, why).

    The two-step memory is base.ErrorFeedback with compensation "ecx" (keys delta1 = delta_{t-1},
    delta2 = delta_{t-2}), "single" (delta1) or "none" (no state). With scaled sign and a
    memory, encoding is one fused kernel (kernels.ecx_sign, or ef_sign for "single"; their
    one-pass forms with a MemoryState): NaN/Inf found in the same pass, the new delta written
    out of place and the buffers rotated, no backup copy in the engine. `compress` is the
    unfused reference with the same rounding (ErrorFeedback.compensate, scales summed in the
    kernels' order): bit for bit the same payload and memories (tests set `fused = False` on
    an instance to run it)."""
    name = "ecx"
    bits_per_coordinate = 1.0

    def __init__(self, alpha=0.1, compensation="ecx", compressor="scaled_sign", ratio=0.01,
                 _allow_sparse=False):
        if not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], not {alpha!r}")
        if compensation not in ("ecx", "single", "none"):
            raise ValueError(f"compensation must be 'ecx', 'single' or 'none', not "
                             f"{compensation!r}")
        if compressor in _REFUSED and not (_allow_sparse and compressor == "topk"):
            raise ValueError(
                f"ecx with compressor={compressor!r} is refused: with sparse compressors the "
                f"two-step compensation (2 - alpha) delta_(t-1) - (1 - alpha) delta_(t-2) lets "
                f"the residual of unsent coordinates grow ~1/alpha times faster than error "
                f"feedback and then throws it back with the opposite sign, and training "
                f"diverges (ALGORITHMS.md section 7; reproduced in tests/unit/"
                f"test_sparse_methods.py). Use compressor='scaled_sign', or "
                f"method='{compressor}' (single-step error feedback) with the same momentum.")
        if compressor not in _COMPRESSORS + ("topk",):
            raise ValueError(f"compressor must be one of {_COMPRESSORS}, not {compressor!r}")
        self.alpha, self.compensation = float(alpha), compensation
        self.compressor, self.ratio = compressor, float(ratio)
        keys = {"ecx": ("delta1", "delta2"), "single": ("delta1",), "none": ()}[compensation]
        self.memory = ErrorFeedback(compensation, self.alpha, keys=keys)
        self.fused = compressor == "scaled_sign" and compensation != "none"
        self.deferred = self.fused
        if compressor == "scaled_sign":
            self.codec = ScaledSign()
        else:   # only reachable with _allow_sparse, to reproduce the divergence
            self.codec = Sparse()
            self.bits_per_coordinate = 64.0

    def options(self):
        opts = {"alpha": self.alpha, "compensation": self.compensation,
                "compressor": self.compressor}
        return {**opts, "ratio": self.ratio} if self.compressor == "topk" else opts

    def check_optimizer(self, param_groups):
        """ECX compensates for the moving average v = (1 - alpha) v + alpha * update, which is
        torch's SGD with momentum = dampening = 1 - alpha; anything else breaks the identity."""
        want = 1.0 - self.alpha
        for i, g in enumerate(param_groups):
            got = (g.get("momentum", None), g.get("dampening", None), g.get("nesterov", False))
            if got[0] is None or abs(got[0] - want) > 1e-9 or abs(got[1] - want) > 1e-9 \
                    or got[2]:
                return (f"ecx(alpha={self.alpha}) needs the wrapped optimizer to be "
                        f"torch.optim.SGD(momentum={want:g}, dampening={want:g}) without "
                        f"nesterov; param group {i} has momentum={got[0]}, "
                        f"dampening={got[1]}, nesterov={got[2]}")
        return None

    def encode_nonfinite(self, ctx):
        if self.compressor == "scaled_sign":
            return self.codec.encode(None, ctx.layout, None, flags=wire.FLAG_NONFINITE)
        return self.codec.encode_nonfinite(ctx.layout.numel)

    def compress_fused(self, u, memories, out, ctx):
        if self.compensation == "single":
            return self.codec.encode_fused(u, memories[0], out, ctx.layout)
        return self.codec.encode_ecx(u, memories[0], memories[1], out, ctx.layout, self.alpha)

    def compress_deferred(self, u, kept, prev_scales, out, ctx):
        if self.compensation == "single":
            return self.codec.encode_deferred(u, kept[0], prev_scales[0], out, ctx.layout)
        return self.codec.encode_ecx_deferred(u, kept, prev_scales, out, ctx.layout, self.alpha)

    def compress(self, p, ctx):
        """The payload of p; leaves p - q in p (the new delta, or scratch for "none")."""
        layout = ctx.layout
        if self.compressor == "scaled_sign":
            z = count_zeros(p, layout)
            scales = self.codec.tree_scales(p, layout, zeros=z)
            msg = self.codec.encode(p, layout, scales, zeros=z)
            self.codec.subtract_local(p, scales, layout, zeros=z)
            return msg
        # only reachable with _allow_sparse, to reproduce the divergence
        a = p.abs()
        idx = torch.cat([o + topk_indices(a[o:o + s], max(1, round(self.ratio * s)))
                         for o, s in layout.segments()])
        msg = self.codec.encode(idx, p[idx], layout.numel)
        p.index_fill_(0, idx, 0.0)      # x - x: what topk leaves of a taken x
        return msg

    def aggregate(self, gathered, state, ctx):
        payloads = self._payloads(gathered, ctx, self.codec)
        if self.compressor == "scaled_sign":
            return as_sum(self.codec.aggregate(payloads, ctx.layout, out=ctx.out), ctx)
        return self.codec.aggregate(payloads, ctx.layout.numel, ctx.bucket, out=ctx.out,
                                    divisor=mean_divisor(ctx))
