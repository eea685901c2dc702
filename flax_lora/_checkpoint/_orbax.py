"""`lora.save` / `lora.load`: orbax checkpoints that hold adapters only.

How a save never loses data (a locked staging folder beside the target, an atomic publish, the
recovery of what a killed save left aside) is `flax_lora._checkpoint._atomic`; how a load reads
the metadata as untrusted input is `flax_lora._checkpoint._meta`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from flax_lora._adapters._tables import adapter_table, split_plain
from flax_lora._checkpoint import _atomic
from flax_lora._checkpoint._meta import (
    FORMAT,
    VERSION,
    adapter,
    adapter_fields,
    array_keys,
    check_all_read,
    extra,
    extra_fields,
    read_meta,
    recognise,
    stored_config,
    where,
)
from flax_lora._config import LoraConfig
from flax_lora._paths import flatten, nest
from flax_lora._typing import PyTree

READ_TRIES = 4
"""Reads of `load` when a concurrent save replaces the checkpoint during one."""
STRAGGLERS_S = 10.0
"""In a multi-process run, how long a failed save waits for orbax's threads in all."""


def save(
    directory: str | os.PathLike[str],
    adapters: PyTree,
    config: LoraConfig | None = None,
    *,
    overwrite: bool = True,
) -> Path:
    """Writes an orbax checkpoint of the adapters (arrays and metadata only) to ``directory``.

    Nothing is lost: ``directory`` may be a new path, an empty directory, or an earlier
    flax_lora checkpoint, which is replaced (``overwrite=False`` refuses any existing path).
    Anything else there (a file, a symlink, a directory holding anything but a flax_lora
    checkpoint) is a ``ValueError`` and is left untouched. The checkpoint is written beside
    ``directory`` and moved into place in one atomic step, so a save that fails, or a process
    killed at any moment, leaves the complete earlier checkpoint or the complete new one; the
    next save removes what a killed save left beside it. Guide: `docs/guides/checkpoints.md`.

    Sharp edge: in a multi-process run (`jax.distributed`) every process must call it with the
    same ``directory`` on a shared file system, as with orbax: each writes its shards, the
    primary process moves the checkpoint into place, and none returns before it is there.

    Examples:
      >>> params, config = {"kernel": jnp.ones((3, 4))}, lora.LoraConfig(rank=2)
      >>> adapters = lora.init(jax.random.key(0), params, config)
      >>> path = lora.save(tempfile.mkdtemp() + "/adapters", adapters, config)
      >>> lora.load(path)["kernel"].a.shape
      (3, 2)

    Args:
      directory: where the checkpoint goes.
      adapters: adapters from `lora.init` (or any function returning adapters), with their
        trained copies and token deltas, if any.
      config: the `LoraConfig` they were made with, stored as metadata.
      overwrite: replace an earlier flax_lora checkpoint at ``directory`` (the default); with
        ``False`` any existing ``directory`` is refused, as orbax's ``force=False``.

    Returns:
      The checkpoint's absolute path.

    Raises:
      ValueError: the adapter tree is empty; ``directory`` holds something other than a
        flax_lora checkpoint (or exists, with ``overwrite=False``).
      TypeError: ``adapters`` holds leaves other than adapter entries (`LoraWeights`,
        `TrainedCopy`, `TokenDelta`); ``config`` is not a `LoraConfig`; ``overwrite`` is not
        a bool.
      OSError: in a multi-process run, the primary process failed to stage or publish it.
    """
    directory = Path(directory).absolute()
    if config is not None and not isinstance(config, LoraConfig):
        raise TypeError(
            f"lora.save: config must be a LoraConfig or None; got {type(config).__name__}. "
            "Pass lora.LoraConfig(**fields)."
        )
    if not isinstance(overwrite, bool):
        raise TypeError(f"lora.save: overwrite must be True or False; got {overwrite!r}.")
    table = adapter_table(adapters)
    extras = split_plain(adapters, "save")[1]
    if not table and not extras:
        raise ValueError("lora.save: the adapter tree is empty.")
    arrays = nest(
        [
            *(
                (p, {"a": w.a, "b": w.b} if w.m is None else {"a": w.a, "b": w.b, "m": w.m})
                for p, w in table.items()
            ),
            *((p, node.arrays()) for p, node in extras.items()),
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
    # In a multi-process run all processes write into the staging folder; only the primary
    # process (as in orbax) makes, locks, publishes and removes it.
    primary = jax.process_index() == 0
    path, staging = _make_staging(directory, overwrite, primary)
    # directories made synchronously, so that no orbax thread recreates one after a failure
    sync_dirs = ocp.CompositeOptions(
        async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False)
    )
    running = set(threading.enumerate())
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler(composite_options=sync_dirs)) as ckptr:
            ckptr.save(
                path / _atomic.CHECKPOINT,
                args=ocp.args.Composite(
                    arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
                ),
            )
    except BaseException:
        _join_orbax_threads(running, primary)
        if staging is not None:
            _atomic.release(staging)
        raise

    def finish() -> None:
        assert staging is not None  # the primary's
        try:
            _replace(staging, directory, overwrite)
        finally:
            _atomic.release(staging)

    _on_primary(finish, primary, f"move the checkpoint into place at {str(directory)!r}")
    return directory


def _make_staging(
    directory: Path, overwrite: bool, primary: bool
) -> tuple[Path, _atomic.Staging | None]:
    """The staging folder of this save, and its lock on the primary process, which first
    recovers an earlier checkpoint a killed save left aside, refuses a target it must not
    replace, and removes the staging folders of dead saves. Every process of a multi-process
    run gets the same folder (its token is broadcast from the primary)."""
    staging, error = None, None
    if primary:
        try:
            _atomic.recover(directory)
            _atomic.inspect(directory, recognise, overwrite)
            _atomic.clean(directory)
            staging = _atomic.create(directory)
        except Exception as e:
            error = e
    token = 0 if staging is None else staging.token
    if jax.process_count() > 1:
        # a collective: no process goes on before the primary has made the directory
        token = int(multihost_utils.broadcast_one_to_all(np.uint32(token), is_source=primary))
    if error is not None:
        raise error
    if token == 0:
        _atomic.inspect(directory, recognise, overwrite)  # the primary's refusal, seen here
        raise OSError(
            f"lora.save: the primary process could not create a staging directory beside "
            f"{str(directory)!r}; see its error."
        )
    return _atomic.staging_path(directory, token), staging


def _replace(staging: _atomic.Staging, target: Path, overwrite: bool) -> None:
    """Moves the finished checkpoint of ``staging`` to ``target`` (`_atomic.publish`)."""
    _atomic.publish(staging.path, target, overwrite, recognise)


def _join_orbax_threads(running: set[threading.Thread], primary: bool) -> None:
    """On the primary process, which removes the staging folder: waits for the threads orbax
    started during a failed save and left running (its commit threads go on writing after the
    error reaches us), so that none writes into the folder once it is removed. In a
    multi-process run their work may wait on other processes that have moved on: at most
    `STRAGGLERS_S` in all there; a folder a straggler writes afterwards goes with the next save.
    (Threads of another orbax save running meanwhile in this process are waited for too.)"""
    if not primary:
        return
    deadline = None if jax.process_count() == 1 else time.monotonic() + STRAGGLERS_S
    for t in threading.enumerate():
        if t not in running and type(t).__module__.startswith("orbax."):
            # orbax's own join would re-raise the thread's error
            threading.Thread.join(t, None if deadline is None else deadline - time.monotonic())


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


def load(directory: str | os.PathLike[str]) -> PyTree:
    """Reads adapters written by `save`, exactly (same dtypes, shapes, scales, axes).

    The checkpoint is untrusted input: its metadata is read with a size bound and every field
    checked (types, ranges, agreement with the arrays) before use. A checkpoint that a save
    killed between its last two renames left aside is moved back into place first; a read
    that a concurrent save overtook is repeated. In a single process the factors come back with
    the shardings they were saved with (on the first local device where those devices are
    missing). Guide: `docs/guides/checkpoints.md`.

    Sharp edge: in a multi-process run every process must call it with the same ``directory``,
    as with orbax; each gets every factor whole, on its own first device (place them on a mesh
    with ``jax.device_put``).

    Examples:
      >>> params, config = {"kernel": jnp.ones((3, 4))}, lora.LoraConfig(rank=2)
      >>> adapters = lora.init(jax.random.key(0), params, config)
      >>> path = lora.save(tempfile.mkdtemp() + "/adapters", adapters, config)
      >>> restored = lora.load(path)
      >>> restored["kernel"].scale, bool((restored["kernel"].a == adapters["kernel"].a).all())
      (4.0, True)

    Args:
      directory: a checkpoint directory written by `save`.

    Returns:
      The adapter tree.

    Raises:
      ValueError: ``directory`` does not hold a flax_lora adapter checkpoint, or it is
        damaged: a field out of range, arrays that disagree with the metadata, another
        format version (naming the directory, the adapter path and the field).
      TypeError: a metadata field has the wrong JSON type (naming the same).
    """
    directory = Path(directory).absolute()
    tries = READ_TRIES if jax.process_count() == 1 else 1  # no retry where reads are collective
    for attempt in range(tries):
        _atomic.recover(directory)
        before = _identity(directory)
        try:
            adapters = _read(directory)
        except (ValueError, TypeError, OSError):
            if attempt + 1 == tries or _identity(directory) == before:
                raise
            continue
        if tries == 1 or _identity(directory) == before:
            return adapters
    raise OSError(
        f"lora.load: {str(directory)!r} was replaced by concurrent saves during each of "
        f"{tries} reads."
    )


def _identity(directory: Path) -> tuple[int, int] | None:
    """The directory's (device, inode): a save replaces the directory, never its files."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _read(directory: Path) -> PyTree:
    """One read of the checkpoint: all its metadata checked, then the arrays against it."""
    meta = read_meta(directory)
    fields = {p: adapter_fields(directory, p, e) for p, e in meta["adapters"].items()}
    extra_f = {p: extra_fields(directory, p, e) for p, e in meta["extras"].items()}
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            restored = ckptr.restore(
                directory, args=ocp.args.Composite(arrays=_restore_arrays(directory))
            )
    except OSError as e:
        if not isinstance(e, FileNotFoundError):
            raise  # the file system's trouble, not the checkpoint's
        raise ValueError(f"{where(directory)}: its 'arrays' item is incomplete ({e}).") from e
    except Exception as e:
        raise ValueError(
            f"{where(directory)}: orbax could not read its 'arrays' item ({type(e).__name__}: "
            f"{str(e)[:300]}); it is damaged or incomplete."
        ) from e
    arrays = flatten(restored["arrays"])
    read = {k for p, f in fields.items() for k in array_keys(p, f)}
    read |= {k for p, f in extra_f.items() for k in array_keys(p, f)}
    check_all_read(directory, arrays, read)
    return nest(
        [
            *((p, adapter(directory, p, f, arrays)) for p, f in fields.items()),
            *((p, extra(directory, p, f, arrays)) for p, f in extra_f.items()),
        ]
    )


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


def load_config(directory: str | os.PathLike[str]) -> LoraConfig | None:
    """The `LoraConfig` stored by `save`, or ``None`` when none was given.

    The metadata is checked as `load` checks it. Guide: `docs/guides/checkpoints.md`.

    Sharp edge: in a multi-process run every process must call it, as `load`.

    Examples:
      >>> params, config = {"kernel": jnp.ones((3, 4))}, lora.LoraConfig(rank=2)
      >>> adapters = lora.init(jax.random.key(0), params, config)
      >>> path = lora.save(tempfile.mkdtemp() + "/adapters", adapters, config)
      >>> lora.load_config(path) == config
      True

    Args:
      directory: a checkpoint directory written by `save`.

    Returns:
      The stored config, or ``None``.

    Raises:
      ValueError: ``directory`` does not hold a flax_lora adapter checkpoint, its metadata is
        damaged, or the stored config has a bad field (naming the directory and the field).
      TypeError: the stored config, or one of its fields, has the wrong type.
    """
    directory = Path(directory).absolute()
    _atomic.recover(directory)
    return stored_config(directory, read_meta(directory))
