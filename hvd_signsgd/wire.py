"""The wire format: one flat uint8 payload per bucket per rank, the only thing that travels.

    offset  size  field
    0       1     format version (1)
    1       1     codec id (CODEC_IDS)
    2       2     flags (FLAG_*)
    4       4     n: elements in the bucket's flat buffer
    8       4     n_scales: float32 scales that follow the header
    12      4     nnz: (index, value) pairs in a sparse body; 0 for dense codecs
    16      4*n_scales   float32 scales, little-endian
    ...     body  codec-specific: packed sign bits (ceil(n/8) bytes, LSB first), float16/float32
                  values, or nnz int32 indices followed by nnz values
    ...     0-3   zero padding to a multiple of 4 bytes

All integers are little-endian. A payload's length follows from its header alone
(`payload_nbytes`), so an allgather of payloads of different lengths, laid end to end, splits
without a side channel. A payload that fails validation raises PayloadError naming the rank and
bucket; it is never used.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

VERSION = 1
HEADER_NBYTES = 16
_HEADER = struct.Struct("<BBHIII")

# Codec ids are part of the format: never renumber, only add.
CODEC_IDS = {
    "sign": 1,            # 1 bit/element
    "scaled_sign": 2,     # 1 bit/element + one float32 scale per tensor
    "stochastic_sign": 3,  # 1 bit/element (+ the sender's norm when norm-weighted)
    "fp16": 4,            # float16 values
    "fp32": 5,            # float32 values
    "sparse32": 6,        # nnz int32 indices + nnz float32 values
    "sparse16": 7,        # nnz int32 indices + nnz float16 values
}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}

FLAG_NONFINITE = 1 << 0   # the sender's gradient had NaN/Inf; body is zero and must not be used
FLAG_DENSE = 1 << 1       # a sparse codec fell back to sending every coordinate (fp32 body)
FLAG_JOINED = 1 << 7      # the sender has joined (optimizer.join()): no body, no vote


class PayloadError(RuntimeError):
    """A received payload is malformed or does not match this rank's bucket."""


@dataclass(frozen=True)
class Header:
    codec: str
    n: int
    n_scales: int = 0
    nnz: int = 0
    flags: int = 0

    def body_nbytes(self) -> int:
        if self.flags & (FLAG_NONFINITE | FLAG_JOINED):
            return 0
        if self.codec in ("sign", "scaled_sign", "stochastic_sign"):
            return (self.n + 7) // 8
        if self.codec == "fp16":
            return 2 * self.n
        if self.codec == "fp32":
            return 4 * self.n
        if self.codec == "sparse32":
            return 4 * self.n if self.flags & FLAG_DENSE else 8 * self.nnz
        if self.codec == "sparse16":
            return 4 * self.n if self.flags & FLAG_DENSE else 6 * self.nnz
        raise PayloadError(f"unknown codec {self.codec!r}")

    def nbytes(self) -> int:
        """Total payload length: header + scales + body, padded to 4 bytes so that every
        payload in a gathered buffer starts 4-byte aligned (scales and values are viewed in
        place)."""
        return HEADER_NBYTES + 4 * self.n_scales + (self.body_nbytes() + 3) // 4 * 4

    def pack(self) -> bytes:
        return _HEADER.pack(VERSION, CODEC_IDS[self.codec], self.flags, self.n, self.n_scales,
                            self.nnz)


def payload_nbytes(codec: str, n: int, n_scales: int = 0, nnz: int = 0, flags: int = 0) -> int:
    """Bytes of one payload; the formula the byte-count tests check."""
    return Header(codec, n, n_scales, nnz, flags).nbytes()


def build(header: Header, scales: torch.Tensor | None = None,
          body: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate header, scales and body into one contiguous uint8 CPU tensor."""
    out = torch.zeros(header.nbytes(), dtype=torch.uint8)
    out[:HEADER_NBYTES] = torch.frombuffer(bytearray(header.pack()), dtype=torch.uint8)
    pos = HEADER_NBYTES
    if header.n_scales:
        s = scales.detach().to(torch.float32).reshape(-1).cpu()
        out[pos:pos + 4 * header.n_scales] = s.view(torch.uint8)
        pos += 4 * header.n_scales
    nb = header.body_nbytes()
    if nb:
        out[pos:pos + nb] = body.reshape(-1).cpu().view(torch.uint8)
    return out


def allocate(header: Header) -> tuple[torch.Tensor, torch.Tensor]:
    """A payload for a kernel to fill in place: (payload, body view). The header is written,
    scales and padding are zero, the body is left uninitialised (the caller writes all of it)."""
    out = torch.empty(header.nbytes(), dtype=torch.uint8)
    out[:HEADER_NBYTES] = torch.frombuffer(bytearray(header.pack()), dtype=torch.uint8)
    b0 = HEADER_NBYTES + 4 * header.n_scales
    b1 = b0 + header.body_nbytes()
    out[HEADER_NBYTES:b0].zero_()
    out[b1:].zero_()
    return out, out[b0:b1]


@dataclass
class Payload:
    """One rank's payload inside a gathered buffer (views, no copies)."""
    rank: int
    header: Header
    scales: torch.Tensor   # float32 (n_scales,)
    body: torch.Tensor     # uint8 (body_nbytes,)


def parse_header(buf: torch.Tensor, pos: int, *, rank: int, bucket: str) -> Header:
    if buf.numel() - pos < HEADER_NBYTES:
        raise PayloadError(f"payload from rank {rank} for bucket {bucket} is truncated "
                           f"({buf.numel() - pos} bytes left, a header needs {HEADER_NBYTES})")
    raw = bytes(buf[pos:pos + HEADER_NBYTES].tolist())
    version, codec_id, flags, n, n_scales, nnz = _HEADER.unpack(raw)
    if version != VERSION or codec_id not in CODEC_NAMES:
        raise PayloadError(f"payload from rank {rank} for bucket {bucket} has an unknown "
                           f"format (version {version}, codec id {codec_id}); are all ranks "
                           f"running the same hvd_signsgd?")
    return Header(CODEC_NAMES[codec_id], n, n_scales, nnz, flags)


def split(gathered: torch.Tensor, n_ranks: int, *, bucket: str, codec: str,
          n: int) -> list[Payload]:
    """Split an allgathered buffer into its n_ranks payloads and check each against this bucket."""
    out, pos = [], 0
    for rank in range(n_ranks):
        h = parse_header(gathered, pos, rank=rank, bucket=bucket)
        if h.codec != codec or h.n != n:
            raise PayloadError(
                f"rank {rank} sent bucket {bucket} as codec {h.codec!r} with {h.n} elements; "
                f"this rank expects {codec!r} with {n}. The ranks disagree about the model or "
                f"the method: every rank must build the same model and optimizer.")
        end = pos + h.nbytes()
        if end > gathered.numel():
            raise PayloadError(f"payload from rank {rank} for bucket {bucket} is truncated")
        s0 = pos + HEADER_NBYTES
        b0 = s0 + 4 * h.n_scales
        body = gathered[b0:b0 + h.body_nbytes()]
        out.append(Payload(rank, h, gathered[s0:b0].view(torch.float32), body))
        pos = end
    if pos != gathered.numel():
        raise PayloadError(f"bucket {bucket}: {gathered.numel() - pos} trailing bytes after "
                           f"{n_ranks} payloads")
    return out
