"""A GGUF's header walked with every count bounded by the bytes the file holds, before the
``gguf`` library reads it.

``gguf.GGUFReader`` trusts the counts a header claims: a 69-byte file whose array says it has
2^40 elements made ``agiasi info`` (and ``export --imatrix``) grow without bound. Every count
here — key/value pairs, tensors, array elements, string lengths, dimensions — is checked
against what is left of the file before anything is allocated or looped over, so a crafted
header costs at most one pass over its own bytes. Layout (GGUF v2/v3, little-endian): magic,
version u32, tensor count u64, key/value count u64, the pairs (key string, type u32, value),
then the tensor infos (name, n_dims u32, dims u64 each, type u32, offset u64).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from agiasi.errors import AgiasiError

# GGUF value types → their fixed size in bytes (8: string, 9: array have none).
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 2  # arrays of arrays exist in no real file; deeper is a crafted one


class _Walker:
    def __init__(self, buf, path: Path, what: str):
        self.buf, self.pos, self.path, self.what = buf, 0, path, what

    def fail(self, why: str) -> AgiasiError:
        return AgiasiError(f"{self.what} {self.path} is not a readable GGUF file: {why}")

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if n > self.left():
            raise self.fail(f"it ends inside its header (at byte {self.pos})")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def count(self, n: int, each: int, of: str) -> int:
        """A claimed count, refused when ``n`` items of at least ``each`` bytes cannot fit."""
        if n * each > self.left():
            raise self.fail(
                f"its header claims {n:,} {of}, more than its remaining {self.left():,} bytes "
                "can hold (a damaged or crafted file)"
            )
        return n

    def string(self, of: str) -> None:
        n = self.count(self.take("<Q"), 1, f"bytes of {of}")
        self.pos += n

    def value(self, vtype: int, depth: int = 0) -> None:
        if vtype in _FIXED:
            self.count(1, _FIXED[vtype], "value bytes")
            self.pos += _FIXED[vtype]
        elif vtype == _STRING:
            self.string("a string value")
        elif vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self.fail("its header nests arrays deeper than any real file")
            etype = self.take("<I")
            n = self.take("<Q")
            if etype in _FIXED:
                self.pos += self.count(n, _FIXED[etype], "array elements") * _FIXED[etype]
                return
            if etype not in (_STRING, _ARRAY):
                raise self.fail(f"an array has element type {etype}, which GGUF does not define")
            self.count(n, 8 if etype == _STRING else 12, "array elements")
            for _ in range(n):
                self.value(etype, depth + 1)
        else:
            raise self.fail(f"a value has type {vtype}, which GGUF does not define")


def check_gguf_header(path: str | Path, what: str = "GGUF") -> None:
    """Refuse, in one line, a GGUF whose header claims more than the file holds."""
    path = Path(path)
    with open(path, "rb") as fh:
        if path.stat().st_size < 24:
            raise AgiasiError(f"{what} {path} is not a readable GGUF file: it is too short")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            w = _Walker(buf, path, what)
            if bytes(buf[:4]) != b"GGUF":
                raise w.fail("no GGUF magic at its start")
            w.pos = 4
            version = w.take("<I")
            if version not in (2, 3):
                raise w.fail(f"GGUF version {version} (agiasi reads versions 2 and 3)")
            n_tensors = w.take("<Q")
            n_kv = w.take("<Q")
            w.count(n_kv, 8 + 4 + 1, "key/value pairs")
            w.count(n_tensors, 8 + 4 + 4 + 8, "tensors")
            for _ in range(n_kv):
                w.string("a key")
                w.value(w.take("<I"))
            for _ in range(n_tensors):
                w.string("a tensor name")
                n_dims = w.take("<I")
                if n_dims > MAX_DIMS:
                    raise w.fail(f"a tensor claims {n_dims} dimensions (GGUF has at most 4)")
                w.pos += w.count(n_dims, 8, "dimensions") * 8
                w.take("<I")
                w.take("<Q")
