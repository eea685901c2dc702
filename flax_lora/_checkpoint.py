"""`lora.save` / `lora.load`: orbax checkpoints that hold adapters only."""

from __future__ import annotations

import os
import secrets
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from flax_lora._adapters import LoraWeights, adapter_table, is_lora
from flax_lora._config import LoraConfig
from flax_lora._extras import arrays_of, from_meta, split
from flax_lora._paths import flatten, nest
from flax_lora._typing import PyTree

FORMAT = "flax_lora.adapters"
VERSION = 1


def save(
    directory: str | os.PathLike[str], adapters: PyTree, config: LoraConfig | None = None
) -> Path:
    """Writes an orbax checkpoint of the adapters (arrays and metadata only) to ``directory``.

    Returns once the checkpoint is on disk. The checkpoint is written beside ``directory`` and
    moved into place only when complete, so a save that fails leaves any earlier checkpoint at
    ``directory`` as it was.

    In a multi-process run (`jax.distributed`), every process must call it with the same
    ``directory`` on a shared file system, as with orbax: each writes its shards, the primary
    process moves the checkpoint into place, and none returns before it is there.

    Example:
      >>> lora.save("/tmp/run/adapters", adapters, config)
      >>> adapters = lora.load("/tmp/run/adapters")

    Args:
      directory: where the checkpoint goes; replaced if it holds an earlier one.
      adapters: adapters from `lora.init` (or any function returning adapters), with their
        trained copies and token deltas (``modules_to_save``, ``bias``,
        ``trainable_token_indices``), if any.
      config: the `LoraConfig` they were made with, stored as metadata.

    Returns:
      The checkpoint's absolute path.

    Raises:
      ValueError: the adapter tree is empty.
      TypeError: ``adapters`` holds leaves other than adapter entries (`LoraWeights`,
        `TrainedCopy`, `TokenDelta`).
    """
    directory = Path(directory).absolute()
    table = adapter_table(adapters)
    extras = split(adapters, is_lora)[1]
    if not table and not extras:
        raise ValueError("lora.save: the adapter tree is empty.")
    arrays = nest(
        [
            *(
                (p, {"a": w.a, "b": w.b} if w.m is None else {"a": w.a, "b": w.b, "m": w.m})
                for p, w in table.items()
            ),
            *((p, arrays_of(node)) for p, node in extras.items()),
        ]
    )
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "adapters": {p: w.meta() for p, w in table.items()},
        "extras": {p: node.meta() for p, node in extras.items()},
        "config": config.to_dict() if config is not None else None,
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    # orbax writes into temporary directories of its own beside its target: keep them all in
    # one private staging directory, removed whatever happens. In a multi-process run all
    # processes share it, and only the primary process (as in orbax) moves or removes files.
    primary = jax.process_index() == 0
    staging = _make_staging(directory, primary)
    # directories made synchronously, so that no orbax thread recreates one after a failure
    sync_dirs = ocp.CompositeOptions(
        async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False)
    )
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler(composite_options=sync_dirs)) as ckptr:
            ckptr.save(
                staging / "checkpoint",
                args=ocp.args.Composite(
                    arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
                ),
            )
    except BaseException:
        if primary:
            _remove(staging, settle_s=0.05)
        raise

    def finish() -> None:
        try:
            _replace(staging / "checkpoint", directory)
        finally:
            _remove(staging, settle_s=0.0)

    _on_primary(finish, primary, f"move the checkpoint into place at {str(directory)!r}")
    return directory


def _make_staging(directory: Path, primary: bool) -> Path:
    """A new staging directory beside ``directory``, made by the primary process; every process
    of a multi-process run gets the same one (its name is broadcast from the primary)."""
    token = secrets.randbits(32) | 1  # never 0: 0 tells the others that the primary failed
    error: OSError | None = None
    if primary:
        try:
            _staging_path(directory, token).mkdir()
        except OSError as e:
            error, token = e, 0
    if jax.process_count() > 1:
        # a collective: no process goes on before the primary has made the directory
        token = int(multihost_utils.broadcast_one_to_all(np.uint32(token), is_source=primary))
    if error is not None:
        raise error
    if token == 0:
        raise OSError(
            f"lora.save: the primary process could not create a staging directory beside "
            f"{str(directory)!r}; see its error."
        )
    return _staging_path(directory, token)


def _staging_path(directory: Path, token: int) -> Path:
    return directory.parent / f".{directory.name}.saving-{token:08x}"


def _on_primary(fn: Callable[[], None], primary: bool, what: str) -> None:
    """Runs ``fn`` on the primary process only. In a multi-process run every process waits for
    it (a collective), so none returns before the files are in place, and all raise if it failed."""
    error: BaseException | None = None
    if primary:
        try:
            fn()
        except BaseException as e:
            if jax.process_count() == 1:
                raise
            error = e
    if jax.process_count() > 1:
        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None), is_source=primary)
        if error is not None:
            raise error
        if not int(ok):
            raise OSError(f"lora.save: the primary process failed to {what}; see its error.")


def _remove(path: Path, settle_s: float, tries: int = 40) -> None:
    """Removes ``path``; after a failed save, waits ``settle_s`` at a time for straggling
    writers of orbax to finish (they may recreate a directory just removed)."""
    for _ in range(tries):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            time.sleep(settle_s)
            if not path.exists():
                return
        time.sleep(settle_s)


def _replace(new: Path, target: Path) -> None:
    """Moves ``new`` to ``target``; an existing ``target`` is set aside until the move is done."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def load(directory: str | os.PathLike[str]) -> PyTree:
    """Reads adapters written by `save`, exactly (same dtypes, shapes, scales, axes).

    In a single process the factors come back with the shardings they were saved with (on the
    first local device where those devices are missing). In a multi-process run every process
    must call it with the same ``directory``, as with orbax; each gets every factor whole, on its
    own first device (place them on a mesh with ``jax.device_put``).

    Example:
      >>> adapters = lora.load("/tmp/run/adapters")
      >>> y = lora.wrap(model.apply)(params, adapters, x)

    Args:
      directory: a checkpoint directory written by `save`.

    Returns:
      The adapter tree.

    Raises:
      ValueError: ``directory`` does not hold a flax_lora adapter checkpoint.
    """
    directory = Path(directory).absolute()
    meta = _read_meta(directory)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(
            directory, args=ocp.args.Composite(arrays=_restore_arrays(directory))
        )
    arrays = flatten(restored["arrays"])
    entries = []
    for path, m in meta["adapters"].items():
        a, b = arrays.get(f"{path}/a"), arrays.get(f"{path}/b")
        if a is None or b is None:
            raise ValueError(f"Checkpoint {str(directory)!r} lacks the factors of {path!r}.")
        if m.get("dora") and arrays.get(f"{path}/m") is None:
            raise ValueError(f"Checkpoint {str(directory)!r} lacks the DoRA magnitude of {path!r}.")
        entries.append(
            (
                path,
                LoraWeights(
                    a=jax.numpy.asarray(a),
                    b=jax.numpy.asarray(b),
                    scale=float(m["scale"]),
                    in_axes=tuple(m["in_axes"]),
                    kernel_shape=tuple(m["kernel_shape"]),
                    kind=m["kind"],
                    dropout=float(m.get("dropout", 0.0)),
                    layer_axes=int(m.get("layer_axes", 0)),
                    layers=None if m.get("layers") is None else tuple(m["layers"]),
                    expert_axes=tuple(m.get("expert_axes", ())),
                    m=_magnitude(arrays.get(f"{path}/m")),
                ),
            )
        )
    for path, m in (meta.get("extras") or {}).items():
        entries.append((path, from_meta(m, arrays, path)))
    return nest(entries)


def _restore_arrays(directory: Path) -> ocp.args.StandardRestore:
    """How orbax restores the arrays. In a single process: as jax Arrays with the saved
    shardings, or on the first local device where the saved devices are missing (a checkpoint
    written by several processes). In a multi-process run: as numpy arrays, so that each process
    reads the whole of every factor (the saved shardings may span several processes' devices)."""
    if jax.process_count() == 1:
        first = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return ocp.args.StandardRestore(fallback_sharding=first)
    handlers = {"arrays": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers)) as ckptr:
        tree = ckptr.metadata(directory).item_metadata["arrays"].tree
    return ocp.args.StandardRestore(jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree))


def _magnitude(m: Any) -> Any:
    """DoRA's magnitude as read, or ``None`` for a plain LoRA adapter."""
    return None if m is None else jax.numpy.asarray(m)


def load_config(directory: str | os.PathLike[str]) -> LoraConfig | None:
    """The `LoraConfig` stored by `save`, or ``None`` when none was given.

    In a multi-process run every process must call it, as `load`.

    Example:
      >>> lora.save("/tmp/run/adapters", adapters, config)
      >>> lora.load_config("/tmp/run/adapters") == config
      True

    Args:
      directory: a checkpoint directory written by `save`.

    Returns:
      The stored config, or ``None``.

    Raises:
      ValueError: ``directory`` does not hold a flax_lora adapter checkpoint.
    """
    config = _read_meta(Path(directory).absolute()).get("config")
    return LoraConfig.from_dict(config) if config else None


def _read_meta(directory: Path) -> dict[str, Any]:
    """The metadata item of a checkpoint written by `save`; ``ValueError`` if there is none."""
    if not (directory / "meta").is_dir() or not (directory / "arrays").is_dir():
        raise ValueError(
            f"{str(directory)!r} is not a flax_lora adapter checkpoint: expected a directory "
            "written by lora.save, with 'arrays' and 'meta' items"
            + ("" if directory.is_dir() else " (it does not exist)")
            + "."
        )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(directory, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = restored["meta"]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(
            f"{str(directory)!r} is not a flax_lora adapter checkpoint: its 'meta' item has no "
            f"format {FORMAT!r}."
        )
    return meta
