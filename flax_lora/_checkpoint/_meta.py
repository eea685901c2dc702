"""The metadata of a `lora.save` checkpoint, read as untrusted input.

A checkpoint is an orbax checkpoint with two items: ``arrays`` (the factors, by adapter path)
and ``meta`` (JSON, orbax's ``meta/metadata``). The JSON is read with a size bound, and each
field is checked before any array is read: its JSON type (``TypeError``), then its range and its
agreement with the other fields (``ValueError``), each error naming the checkpoint directory,
the adapter path and the field. The restored arrays are then checked against it (`adapter`,
`extra`, `check_all_read`). The field checks are one table per entry type (`ADAPTER_FIELDS`,
`EXTRA_FIELDS`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import reprlib
import stat
import typing
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._adapters._delta import check_fits
from flax_lora._adapters._extras import Extra, from_meta
from flax_lora._adapters._weights import LoraWeights
from flax_lora._checkpoint._schema import AdapterFields, ExtraFields, Meta
from flax_lora._config import LoraConfig
from flax_lora._field_checks import finite_float, one_of
from flax_lora._paths import describe, nest
from flax_lora._typing import KINDS, Leaf

FORMAT = "flax_lora.adapters"
VERSION = 1
META_FILE = Path("meta", "metadata")
"""Where orbax's JSON handler keeps the ``meta`` item, inside the checkpoint directory."""
MAX_META_BYTES = 64 << 20
"""The largest metadata file read (about 250 bytes per adapter are written)."""
MAX_SCALE = 1e6
"""The largest ``|scale|`` accepted (``alpha / r``)."""
MAX_AXES = 64
ITEMS = frozenset({"arrays", "meta"})
ORBAX_FILES = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt"})
"""The entries orbax writes beside the items of a checkpoint."""

Check = Callable[[object, str], object]
"""A field's check: ``(the JSON value, where)`` -> the value as used."""
_REQUIRED = object()


def _show(value: object) -> str:
    """A short repr of a metadata value (which may be a huge or deep JSON value)."""
    r = reprlib.Repr()
    r.maxstring, r.maxlist, r.maxdict, r.maxlevel, r.maxother = 60, 8, 8, 3, 60
    return r.repr(value)


def where(directory: Path) -> str:
    return f"Checkpoint {str(directory)!r}"


def read_json(file: Path, what: str) -> object:
    """The JSON value in ``file``, read with the `MAX_META_BYTES` bound, never blocking on a
    FIFO or device. ``ValueError`` (naming ``what`` and the file) for a missing, special,
    oversized, non-UTF-8 or non-JSON file."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ValueError(f"{what}: its metadata file {str(file)!r} is missing.") from e
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{what}: its metadata {str(file)!r} is not a regular file.")
        if st.st_size > MAX_META_BYTES:
            raise ValueError(
                f"{what}: its metadata file {str(file)!r} has {st.st_size} bytes, over the "
                f"{MAX_META_BYTES}-byte bound on checkpoint metadata."
            )
        data = fh.read(MAX_META_BYTES + 1)
    if len(data) > MAX_META_BYTES:
        raise ValueError(f"{what}: its metadata file {str(file)!r} grew past the size bound.")
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too deep
        raise ValueError(
            f"{what}: its metadata file {str(file)!r} is not valid JSON ({type(e).__name__}: "
            f"{str(e)[:200]}). The checkpoint is damaged."
        ) from e


def recognise(path: Path) -> str | None:
    """``None`` if the directory ``path`` holds a flax_lora checkpoint and nothing else (so that
    `lora.save` may replace it), else what is there, for the error. Reads the metadata only."""
    names = set(os.listdir(path))
    if not all((path / item).is_dir() for item in ITEMS):
        some = describe(sorted(names), limit=5)
        return f"is a directory holding {some}, not a flax_lora checkpoint"
    try:
        meta = read_json(path / META_FILE, "its 'meta' item")
    except (ValueError, OSError) as e:
        return f"is not a readable flax_lora checkpoint ({e})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return f"holds orbax items but is not a flax_lora checkpoint (no format {FORMAT!r})"
    others = sorted(names - ITEMS - ORBAX_FILES)
    if others:
        return (
            f"holds a flax_lora checkpoint and also {describe(others)}, which a save would delete"
        )
    return None


def read_meta(directory: Path) -> Meta:
    """The checkpoint's metadata, its top level checked (format, version, the types of
    ``adapters``, ``extras`` and ``config``, the adapter paths); the entries are checked by
    `adapter_fields` / `extra_fields`.

    Raises:
      ValueError: ``directory`` is not a flax_lora checkpoint, its metadata is damaged, of
        another format version, or names a path twice.
      TypeError: a top-level field has the wrong JSON type.
    """
    here = where(directory)
    if not all((directory / item).is_dir() for item in ITEMS):
        raise ValueError(
            f"{str(directory)!r} is not a flax_lora adapter checkpoint: expected a directory "
            "written by lora.save, with 'arrays' and 'meta' items"
            + ("" if directory.is_dir() else " (it does not exist)")
            + "."
        )
    meta = read_json(directory / META_FILE, here)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        kind = "" if isinstance(meta, dict) else f" (its metadata is a JSON {type(meta).__name__})"
        raise ValueError(
            f"{str(directory)!r} is not a flax_lora adapter checkpoint: its 'meta' item has no "
            f"format {FORMAT!r}{kind}."
        )
    version = meta.get("version")
    if type(version) is not int or version != VERSION:
        raise ValueError(
            f"{here}: field 'version' is {_show(version)}; this flax_lora reads checkpoint "
            f"format version {VERSION} only (written by another flax_lora, or damaged)."
        )
    if meta.get("extras") is None:  # checkpoints written before extras existed
        meta = {**meta, "extras": {}}
    for name in ("adapters", "extras"):
        entries = meta.get(name, _REQUIRED)
        if entries is _REQUIRED:
            raise ValueError(f"{here}: its metadata lacks the field {name!r}.")
        if not isinstance(entries, dict):
            raise TypeError(
                f"{here}: field {name!r} must be a JSON object (adapter path -> fields); got "
                f"{type(entries).__name__}."
            )
        for path, fields in entries.items():
            _check_path(path, f"{here}: field {name!r}")
            if not isinstance(fields, dict):
                raise TypeError(
                    f"{here}: {name} entry {path!r} must be a JSON object; got "
                    f"{type(fields).__name__}."
                )
    try:
        nest((p, None) for p in [*meta["adapters"], *meta["extras"]])
    except ValueError as e:
        raise ValueError(f"{here}: its adapter paths do not form a tree: {e}") from e
    if meta.get("config") is not None and not isinstance(meta["config"], dict):
        raise TypeError(
            f"{here}: field 'config' must be a JSON object (the LoraConfig's fields) or null; "
            f"got {type(meta['config']).__name__}."
        )
    return typing.cast(Meta, meta)  # its fields checked above


def _check_path(path: str, what: str) -> None:
    if not path or path.startswith("/") or path.endswith("/") or "//" in path:
        raise ValueError(f"{what}: {_show(path)} is not an adapter path ('a/b/kernel').")


# ---------------------------------------------------------------------------------------------
# field checks: (value, where) -> the value as used, or TypeError / ValueError naming `where`
# ---------------------------------------------------------------------------------------------
def _int(v: object, at: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{at} must be an integer; got {_show(v)} ({type(v).__name__}).")
    return v


def _count(v: object, at: str) -> int:
    if (n := _int(v, at)) < 0:
        raise ValueError(f"{at} must be >= 0; got {v}.")
    return n


def _positive(v: object, at: str) -> int:
    if (n := _int(v, at)) < 1:
        raise ValueError(f"{at} must be >= 1; got {v}.")
    return n


def _ints(check: Callable[[object, str], int], distinct: bool = True) -> Check:
    """A list of ``check``-ed integers (``distinct``: no repeats), as a tuple."""

    def ints(v: object, at: str) -> tuple[int, ...]:
        if not isinstance(v, list):
            raise TypeError(f"{at} must be a list of integers; got {type(v).__name__}.")
        for i in v:  # every entry's type first: a wrong type is a TypeError wherever it is
            _int(i, at)
        if len(v) > MAX_AXES:
            raise ValueError(f"{at} has {len(v)} entries, more than {MAX_AXES}.")
        out = tuple(check(i, at) for i in v)
        if distinct and len(set(out)) != len(out):
            raise ValueError(f"{at} repeats an entry: {_show(v)}.")
        return out

    return ints


def _real(v: object, at: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"{at} must be a number; got {_show(v)} ({type(v).__name__}).")
    return finite_float(v, at, str(v))


def _scale(v: object, at: str) -> float:
    if abs(out := _real(v, at)) > MAX_SCALE:
        raise ValueError(f"{at} must be at most {MAX_SCALE:g} in size; got {v}.")
    return out


def _dropout(v: object, at: str) -> float:
    if not 0.0 <= (out := _real(v, at)) < 1.0:
        raise ValueError(f"{at} must be in [0, 1); got {v}.")
    return out


def _flag(v: object, at: str) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{at} must be true or false; got {_show(v)} ({type(v).__name__}).")
    return v


def _optional(check: Check) -> Check:
    return lambda v, at: None if v is None else check(v, at)


ADAPTER_FIELDS: dict[str, tuple[object, Check]] = {  # field -> (default, check)
    "scale": (_REQUIRED, _scale),
    "in_axes": (_REQUIRED, _ints(_count)),
    "kernel_shape": (_REQUIRED, _ints(_positive, distinct=False)),
    "kind": (_REQUIRED, one_of(KINDS, _show)),
    "dropout": (0.0, _dropout),
    "layer_axes": (0, _count),
    "layers": (None, _optional(_ints(_count))),
    "expert_axes": ((), _ints(_count)),
    "layer_at": (0, _count),
    "rank": (None, _optional(_positive)),
    "dora": (False, _flag),
}
EXTRA_FIELDS: dict[str, dict[str, tuple[object, Check]]] = {  # type -> its fields
    "copy": {"role": (_REQUIRED, one_of(("module", "bias"), _show))},
    "tokens": {"indices": (_REQUIRED, _ints(_count)), "num_rows": (_REQUIRED, _positive)},
}


def _fields(
    entry: dict[str, object], table: dict[str, tuple[object, Check]], at: str
) -> dict[str, object]:
    out = {}
    for name, (default, check) in table.items():
        if name not in entry and default is _REQUIRED:
            raise ValueError(f"{at} lacks the field {name!r}.")
        out[name] = check(entry[name], f"{at}, field {name!r}") if name in entry else default
    return out


def adapter_fields(directory: Path, path: str, entry: dict[str, object]) -> AdapterFields:
    """The checked static fields of the adapter at ``path`` (`ADAPTER_FIELDS`), its axes in
    range of its kernel and apart from each other."""
    at = f"{where(directory)}: adapter {path!r}"
    f = typing.cast(AdapterFields, _fields(entry, ADAPTER_FIELDS, at))  # checked to its types
    shape, n = f["kernel_shape"], len(f["kernel_shape"])
    if f["layer_axes"] >= n:
        raise ValueError(f"{at}, field 'layer_axes': {f['layer_axes']} for a kernel {shape}.")
    if f["layer_at"] and (not f["layer_axes"] or f["layer_at"] + f["layer_axes"] > n):
        raise ValueError(
            f"{at}, field 'layer_at': {f['layer_at']} for a kernel {shape} with layer_axes "
            f"{f['layer_axes']} (expected 0, or a position that leaves the layer axes in range)."
        )
    for name in ("in_axes", "expert_axes"):
        for i in f[name]:
            if i >= n or i < f["layer_axes"]:
                raise ValueError(
                    f"{at}, field {name!r}: axis {i} is out of range or a layer axis for "
                    f"kernel_shape {shape} with layer_axes {f['layer_axes']}."
                )
    if set(f["in_axes"]) & set(f["expert_axes"]):
        raise ValueError(f"{at}, field 'expert_axes': {f['expert_axes']} overlaps in_axes.")
    if not f["in_axes"] or f["layer_axes"] + len(f["expert_axes"]) + len(f["in_axes"]) >= n:
        raise ValueError(
            f"{at}, field 'in_axes': {f['in_axes']} leaves no input or no output axis of the "
            f"kernel {shape}."
        )
    if f["layers"] is not None and any(i >= shape[0] for i in f["layers"]):
        raise ValueError(f"{at}, field 'layers': {f['layers']} out of range for {shape[0]} layers.")
    return f


def extra_fields(directory: Path, path: str, entry: dict[str, object]) -> ExtraFields:
    """The checked fields of the trained copy or token delta at ``path`` (`EXTRA_FIELDS`)."""
    at = f"{where(directory)}: entry {path!r}"
    kind = one_of(tuple(EXTRA_FIELDS), _show)(entry.get("type"), f"{at}, field 'type'")
    f = typing.cast(ExtraFields, {"type": kind, **_fields(entry, EXTRA_FIELDS[kind], at)})
    if kind == "tokens" and any(i >= f["num_rows"] for i in f["indices"]):
        raise ValueError(f"{at}, field 'indices': rows beyond num_rows {f['num_rows']}.")
    return f


# ---------------------------------------------------------------------------------------------
# the arrays against the metadata
# ---------------------------------------------------------------------------------------------
def _array(directory: Path, arrays: dict[str, Leaf], key: str, what: str) -> jax.Array:
    x = arrays.get(key)
    if x is None or not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise ValueError(f"{where(directory)} lacks the {what} (array {key!r}).")
    if not jnp.issubdtype(np.dtype(x.dtype), jnp.floating):
        raise ValueError(
            f"{where(directory)}: array {key!r} has dtype {np.dtype(x.dtype)}; adapter arrays "
            "are floating."
        )
    return jnp.asarray(x)


def adapter(directory: Path, path: str, f: AdapterFields, arrays: dict[str, Leaf]) -> LoraWeights:
    """The `LoraWeights` at ``path`` from its checked fields ``f`` and the restored arrays,
    whose shapes and dtypes must agree with them."""
    a = _array(directory, arrays, f"{path}/a", f"factors of {path!r}")
    b = _array(directory, arrays, f"{path}/b", f"factors of {path!r}")
    m = _array(directory, arrays, f"{path}/m", f"DoRA magnitude of {path!r}") if f["dora"] else None
    w = LoraWeights(
        a=a,
        b=b,
        m=m,
        scale=f["scale"],
        in_axes=f["in_axes"],
        kernel_shape=f["kernel_shape"],
        kind=f["kind"],
        dropout=f["dropout"],
        layer_axes=f["layer_axes"],
        layers=f["layers"],
        expert_axes=f["expert_axes"],
        layer_at=f["layer_at"],
    )
    try:
        check_fits(path, w, w.stored_shape)
    except ValueError as e:
        raise ValueError(f"{where(directory)}: its arrays disagree with its metadata: {e}") from e
    if f["rank"] is not None and a.shape[-1] != f["rank"]:
        raise ValueError(
            f"{where(directory)}: adapter {path!r}, field 'rank' is {f['rank']} but its factor "
            f"a has shape {tuple(a.shape)}."
        )
    return w


def extra(directory: Path, path: str, f: ExtraFields, arrays: dict[str, Leaf]) -> Extra:
    """The trained copy or token delta at ``path`` from its checked fields and arrays."""
    key = f"{path}/value" if f["type"] == "copy" else f"{path}/delta"
    x = _array(directory, arrays, key, f"array of {path!r}")
    if f["type"] == "tokens" and (x.ndim < 1 or x.shape[0] != len(f["indices"])):
        raise ValueError(
            f"{where(directory)}: token delta {path!r} has shape {tuple(x.shape)} for "
            f"{len(f['indices'])} indices."
        )
    return from_meta(dict(f), {key: x}, path)


def array_keys(path: str, f: AdapterFields | ExtraFields) -> tuple[str, ...]:
    """The arrays that the entry at ``path`` with checked fields ``f`` reads."""
    if "type" in f:
        return (f"{path}/value",) if f["type"] == "copy" else (f"{path}/delta",)
    return tuple(f"{path}/{n}" for n in (("a", "b", "m") if f["dora"] else ("a", "b")))


def check_all_read(directory: Path, arrays: dict[str, Leaf], read: set[str]) -> None:
    """``ValueError`` when the ``arrays`` item holds arrays besides those ``read`` (the ones its
    metadata names)."""
    stray = sorted(set(arrays) - read)
    if stray:
        raise ValueError(
            f"{where(directory)}: its 'arrays' item holds {describe(stray)}, which its metadata "
            "does not name (arrays and metadata of different saves?)."
        )


def stored_config(directory: Path, meta: Meta) -> LoraConfig | None:
    """The `LoraConfig` in the checked metadata ``meta``, or ``None``."""
    config = meta.get("config")
    if not config:
        return None
    at = f"{where(directory)}: field 'config'"
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{at} has unknown fields {describe(unknown)}; LoraConfig has none.")
    if not isinstance(config.get("dtype", "float32"), str):
        raise TypeError(f"{at}, field 'dtype' must be a dtype name; got {_show(config['dtype'])}.")
    try:
        return LoraConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise (TypeError if isinstance(e, TypeError) else ValueError)(f"{at}: {e}") from e
