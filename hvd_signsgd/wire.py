"""The wire format: one flat uint8 payload per bucket per rank, the only thing that travels.

    offset  size  field
    0       1     format version (1)
    1       1     codec id (CODEC_IDS)
    2       2     flags (FLAG_*)
    4       4     n: elements in the bucket's flat buffer
    8       4     n_scales: float32 scales that follow the header
    12      4     nnz: (index, value) pairs in a sparse body; for the sign codecs with
                  FLAG_ZEROS the number z of marked zeros; else 0
    16      4*n_scales   float32 scales, little-endian
    ...     body  codec-specific: packed sign bits (ceil(n/8) bytes, LSB first), float16/float32
                  values, or nnz int32 indices followed by nnz values
    ...     0-3   zero padding to a multiple of 4 bytes

Zero marks (FLAG_ZEROS; codecs sign, scaled_sign, stochastic_sign). One bit cannot carry 0, so
a sender whose vector has exact zeros (+0 or -0) marks them: a marked coordinate does not vote
(sign(0) = 0). Without the flag the body is the B = ceil(n/8) sign bytes, as always, so a vector
without zeros pays nothing. With it, nnz = z (1 <= z <= n) marked positions and, B4 being B
rounded up to a multiple of 4:

    z == n       body empty: every coordinate is 0 (no sign bits at all)
    4z < B       "list":  B sign bytes, 0-3 zero bytes up to B4, then z int32 positions,
                          strictly ascending, in [0, n)                     body = B4 + 4z
    otherwise    "plane": B sign bytes, 0-3 zero bytes up to B4, then B bytes, bit i set
                          where coordinate i is marked (as the sign bits; padding bits 0)
                                                                            body = B4 + B
The form follows from (n, z), so payload_nbytes needs no more than the header. The sign bit
of a marked coordinate is 0 (the receiver checks it), so an unweighted vote is the usual count
minus the number of marks per coordinate. Marks cost min(4z, B4) + (B4 - B) bytes: 32 bits per
zero while zeros are few, never more than about 1 bit per coordinate.

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
FLAG_ZEROS = 1 << 2       # sign codecs: nnz exact zeros are marked and do not vote (see above)
FLAG_FAILED = 1 << 3      # the sender's encode raised: no body (sent with FLAG_NONFINITE, so
                          # every reader skips the body); every rank raises SenderFailedError

SIGN_CODECS = ("sign", "scaled_sign", "stochastic_sign")


def _round4(n: int) -> int:
    return (n + 3) // 4 * 4


class PayloadError(RuntimeError):
    """A received payload is malformed or does not match this rank's bucket."""


class SenderFailedError(PayloadError):
    """Another rank's method raised while encoding its payload (FLAG_FAILED); that rank raises
    its own error. The step is applied on no rank."""


@dataclass(frozen=True)
class Header:
    codec: str
    n: int
    n_scales: int = 0
    nnz: int = 0
    flags: int = 0

    def zero_form(self) -> str | None:
        """None (no marks), "all" (every coordinate 0), "list" or "plane" (module doc)."""
        if (self.flags & (FLAG_NONFINITE | FLAG_JOINED) or not self.flags & FLAG_ZEROS
                or self.codec not in SIGN_CODECS):
            return None
        if self.nnz == self.n:
            return "all"
        return "list" if 4 * self.nnz < (self.n + 7) // 8 else "plane"

    def signs_nbytes(self) -> int:
        """Bytes of packed sign bits at the start of a sign codec's body (0 for "all")."""
        return 0 if self.zero_form() == "all" else (self.n + 7) // 8

    def zeros_nbytes(self) -> int:
        """Bytes of the zero marks after the padded sign bytes."""
        form = self.zero_form()
        return 4 * self.nnz if form == "list" else (self.n + 7) // 8 if form == "plane" else 0

    def body_nbytes(self) -> int:
        if self.flags & (FLAG_NONFINITE | FLAG_JOINED):
            return 0
        if self.codec in SIGN_CODECS:
            if self.zero_form() in ("list", "plane"):
                return _round4((self.n + 7) // 8) + self.zeros_nbytes()
            return self.signs_nbytes()
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
    """Bytes of one payload; the formula the byte-count tests check. For a sign codec with
    z marked zeros pass nnz=z, flags=FLAG_ZEROS (z = 0 means no marks: the plain length)."""
    if codec in SIGN_CODECS and flags & FLAG_ZEROS and nnz == 0:
        flags &= ~FLAG_ZEROS
    return Header(codec, n, n_scales, nnz, flags).nbytes()


def build(header: Header, scales: torch.Tensor | None = None,
          body: torch.Tensor | None = None, zeros: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate header, scales and body into one contiguous uint8 CPU tensor. For a sign
    codec with zero marks, body is the packed sign bits (None for "all") and zeros the marks:
    int32 positions ("list") or a uint8 bitplane ("plane")."""
    form = header.zero_form()
    if form in ("list", "plane"):
        signs = body.reshape(-1).cpu().view(torch.uint8)
        body = torch.zeros(header.body_nbytes(), dtype=torch.uint8)
        body[:signs.numel()] = signs
        body[_round4(signs.numel()):] = zeros.reshape(-1).cpu().contiguous().view(torch.uint8)
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
    body: torch.Tensor     # uint8 (body_nbytes,); sign codecs: the packed sign bits only
    zeros: torch.Tensor | None = None   # sign codecs: int32 positions ("list"), uint8 plane
                                        # ("plane"), else None (header.zero_form())


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
    h = Header(CODEC_NAMES[codec_id], n, n_scales, nnz, flags)
    if flags & FLAG_ZEROS and not flags & FLAG_NONFINITE and (
            h.codec not in SIGN_CODECS or not 1 <= nnz <= n):
        raise PayloadError(f"payload from rank {rank} for bucket {bucket} marks {nnz} zeros "
                           f"of {n} elements as codec {h.codec!r}")
    return h


def _check_zeros(h: Header, signs: torch.Tensor, zeros: torch.Tensor, *, rank: int,
                 bucket: str) -> None:
    """Marks inside [0, n), unique, and on sign bits that are 0 (cheap: O(z) or O(n/8))."""
    def bad(what):
        return PayloadError(f"payload from rank {rank} for bucket {bucket}: zero marks {what}")
    if h.zero_form() == "list":
        idx = zeros.long()
        if int(idx[0]) < 0 or int(idx[-1]) >= h.n or (idx.numel() > 1
                                                      and not bool((idx[1:] > idx[:-1]).all())):
            raise bad(f"are not strictly ascending positions in [0, {h.n})")
        if bool(((signs[idx >> 3] >> (idx & 7).to(torch.uint8)) & 1).any()):
            raise bad("fall on sign bits that are set")
        return
    if h.n % 8 and int(zeros[-1]) >> (h.n % 8):
        raise bad("set padding bits")
    if bool((signs & zeros).any()):
        raise bad("fall on sign bits that are set")


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
        body, zeros = gathered[b0:b0 + h.body_nbytes()], None
        form = h.zero_form()
        if form is not None:
            nb, z0 = h.signs_nbytes(), b0 + _round4(h.signs_nbytes())
            body, zeros = gathered[b0:b0 + nb], gathered[z0:z0 + h.zeros_nbytes()]
            if form == "list":
                zeros = zeros.view(torch.int32)
            if form != "all":
                _check_zeros(h, body, zeros, rank=rank, bucket=bucket)
        out.append(Payload(rank, h, gathered[s0:b0].view(torch.float32), body, zeros))
        pos = end
    if pos != gathered.numel():
        raise PayloadError(f"bucket {bucket}: {gathered.numel() - pos} trailing bytes after "
                           f"{n_ranks} payloads")
    return out


WORD = 4        # the sharded exchange cuts packed bits in whole words of WORD bytes


def shard_bounds(nbytes: int, n: int, word: int = WORD) -> list[tuple[int, int]]:
    """[(first byte, end byte)] of the n shards of nbytes packed bytes: contiguous, in rank
    order, covering [0, nbytes); in whole words of `word` bytes, the counts of words differing
    by at most one (with w words, the first w % n shards have one more; the last word may be
    partial). A shard may be empty when there are fewer words than ranks."""
    if n < 1 or word < 1 or nbytes < 0:
        raise ValueError(f"bad shard arguments nbytes={nbytes}, n={n}, word={word}")
    words = -(-nbytes // word)
    q, r = divmod(words, n)
    out = []
    for j in range(n):
        w0 = j * q + min(j, r)
        w1 = w0 + q + (j < r)
        out.append((min(w0 * word, nbytes), min(w1 * word, nbytes)))
    return out


def shard_elements(numel: int, n: int, word: int = WORD) -> list[tuple[int, int]]:
    """[(first element, element count)] of the n shards of a bucket of numel elements."""
    return [(8 * b0, max(0, min(8 * b1, numel) - 8 * b0))
            for b0, b1 in shard_bounds(-(-numel // 8), n, word)]
