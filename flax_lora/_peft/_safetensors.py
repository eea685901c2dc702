"""The safetensors format, read as untrusted input: the header parsed and checked by hand, then
only the tensors asked for read, each exactly.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON (an
object: ``"__metadata__"``, a string -> string object, and per tensor ``{"dtype", "shape",
"data_offsets": [begin, end]}`` with offsets into the data after the header), then the data:
the tensors back to back, covering it exactly (as the ``safetensors`` library requires).
`read_header` checks all of that against the file's size, and the dtypes (floating only),
before any tensor is read; `read_tensor` reads one tensor's bytes into a new array (never a
memory map, which a file truncated by another program would turn into a crash); `stand_in`
is an array of a tensor's shape and dtype that costs no memory, for checking shapes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import IO, Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

DTYPES: dict[str, np.dtype] = {
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(jnp.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}
"""The dtypes read: floating only (factors stored as int8 or bool are refused, not cast)."""
METADATA = "__metadata__"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of a file: its dtype, shape and byte range (from the start of the file)."""

    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    def stand_in(self) -> np.ndarray:
        """A read-only array of this shape and dtype that holds no memory (all strides 0)."""
        return np.broadcast_to(np.zeros((), self.dtype), self.shape)


@dataclasses.dataclass(frozen=True)
class Header:
    """A file's checked header: its tensors by name and its ``__metadata__``."""

    file: str
    entries: dict[str, Entry]
    metadata: dict[str, str]


class _Bad(ValueError):
    """A header problem, before the file and tensor are named."""


def read_header(f: IO[bytes], file: str, limit: int) -> Header:
    """The header of the open safetensors file ``f`` (named ``file`` in errors), checked
    against the file's size; a header longer than ``limit`` bytes is refused unread.

    Raises:
      ValueError: the file is not a complete safetensors file of floating tensors: too short,
        a header length beyond ``limit`` or the file, a header that is not a JSON object of
        valid entries, a non-floating dtype, offsets that disagree with the dtype and shape, the
        file's size or each other (naming the file and, where there is one, the tensor).
    """
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise ValueError(
            f"{file!r} is {size} bytes long, too short for a safetensors file (an 8-byte "
            "header length comes first): truncated or not a safetensors file."
        )
    n = int.from_bytes(head, "little")
    if n > limit:
        raise ValueError(
            f"{file!r} declares a safetensors header of {n} bytes, more than the {limit} "
            "allowed here (about 1 KiB per tensor an adapter of these params can hold): a "
            "damaged file, not a safetensors file, or an adapter of a much larger model."
        )
    if 8 + n > size:
        raise ValueError(
            f"{file!r} declares a safetensors header of {n} bytes, but the file has {size}: "
            "a truncated or damaged file, or not a safetensors file."
        )
    raw = f.read(n)
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(
            f"{file!r}: the safetensors header is not valid UTF-8 JSON ({_short(e)})."
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(
            f"{file!r}: the safetensors header must be a JSON object; got {type(obj).__name__}."
        )
    metadata = obj.pop(METADATA, None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{file!r}: {METADATA!r} must be an object of strings; got {metadata!r}.")
    entries = {}
    for name, spec in obj.items():
        try:
            entries[name] = _entry(spec, 8 + n)
        except _Bad as e:
            raise ValueError(f"{file!r}: tensor {name!r}: {e}.") from None
    _check_coverage(file, entries, 8 + n, size)
    return Header(file, entries, metadata)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"the keys {twice} appear twice in one object")
    return dict(pairs)


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:200]}"


def _entry(spec: Any, base: int) -> Entry:
    """One header entry, checked; offsets made absolute (``base``: the data's start)."""
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= set(spec):
        raise _Bad(f"expected {{'dtype', 'shape', 'data_offsets'}}; got {_clip(spec)}")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _Bad(
            f"dtype {_clip(dtype)}; only floating tensors ({', '.join(DTYPES)}) are read (an "
            "integer or bool factor would not be a LoRA factor)"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _Bad(f"shape must be a list of non-negative ints; got {_clip(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise _Bad(f"data_offsets must be [begin, end], non-negative ints; got {_clip(offsets)}")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise _Bad(
            f"data_offsets {offsets} hold {end - begin} bytes, but {dtype} {tuple(shape)} "
            f"needs {nbytes}"
        )
    return Entry(DTYPES[dtype], tuple(shape), base + begin, base + end)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _clip(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_coverage(file: str, entries: Mapping[str, Entry], start: int, size: int) -> None:
    """Raises unless the tensors cover the data ``[start, size)`` exactly, back to back."""
    at = start
    for name, e in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if e.start != at:
            where = "overlaps the tensor before it" if e.start < at else "leaves a gap before it"
            raise ValueError(
                f"{file!r}: tensor {name!r} starts at data offset {e.start - start}, which "
                f"{where} (the previous one ends at {at - start}): a damaged file."
            )
        if e.end > size:
            raise ValueError(
                f"{file!r}: tensor {name!r} ends at byte {e.end}, past the end of the file "
                f"({size} bytes): a truncated file."
            )
        at = e.end
    if at != size:
        raise ValueError(
            f"{file!r}: {size - at} bytes follow the last tensor's data: a damaged file, or "
            "not a safetensors file."
        )


def read_tensor(f: IO[bytes], header: Header, name: str) -> np.ndarray:
    """The tensor ``name`` of the open file ``f`` (its checked ``header``), read into a new
    array.

    Raises:
      ValueError: the file ended before the tensor (changed since its header was read).
    """
    e = header.entries[name]
    out = np.empty(e.shape, e.dtype)
    buffer = memoryview(out.reshape(-1).view(np.uint8))
    f.seek(e.start)
    done = 0
    while done < len(buffer):
        got = f.readinto(buffer[done:])
        if not got:
            raise ValueError(
                f"{header.file!r}: the file ended inside tensor {name!r} (bytes {e.start}.."
                f"{e.end}); it changed while it was read."
            )
        done += got
    return out


def write(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Writes the tensors, each as a C-contiguous array (safetensors' numpy writer stores a
    transposed or sliced array's raw buffer, silently wrong), with ``metadata``, and flushes
    the file to disk."""
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, dict(metadata))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
