"""A PEFT adapter directory's two files: written so that nothing is lost or mixed, read as
untrusted input.

Writing (`write_adapter`): ``save_peft`` never replaces a folder, and never replaces an
``adapter_model.safetensors`` / ``adapter_config.json`` pair it did not write. What it writes is
marked in the safetensors ``__metadata__`` (`MARK`), with the SHA-256 of the config written with
it (`CONFIG_SHA`) and of the config it replaced (`REPLACED_SHA`; PEFT ignores metadata keys). A
new directory is written complete in a staging folder beside it and renamed into place (the
staging folders of `flax_lora._checkpoint._atomic`, as `lora.save`'s); in an existing folder
(whose other files are left alone) the two files go through temporary files and renames, the
tensors first. A reader (`open_weights`) that finds the tensors of a save beside the config that
save replaced refuses them (an interrupted or running save), and warns on another config (edited
since: used as it is). Concurrent saves into one folder are serialised by an exclusive ``flock``
on the folder where the OS has one.

Reading (`open_weights`): the safetensors header is parsed and checked by
`flax_lora._peft._safetensors` within a size bound given by the caller, the tensors grouped
by module by their names, every factor's rank checked; tensors are read one at a time, on
request, only after the caller has checked their shapes on stand-ins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

import numpy as np

from flax_lora._checkpoint import _atomic
from flax_lora._paths import describe
from flax_lora._peft._names import CONFIG_NAME, MAGNITUDE, PREFIX, WEIGHTS_NAME
from flax_lora._peft._safetensors import Header, read_header, read_tensor, write
from flax_lora._peft._tensor_layouts import PAIRS, SUFFIXES

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent saves into one folder are then unguarded
    fcntl = None

MARK = "flax_lora.save_peft"  # metadata key of every file save_peft writes; value: format "1"
CONFIG_SHA = "flax_lora.config_sha256"  # the SHA-256 of the adapter_config.json written with it
REPLACED_SHA = "flax_lora.replaced_config_sha256"  # ... of the one it replaced ("" if none)
MARK_HEADER_LIMIT = 100_000_000  # reading an existing file's mark (safetensors' own limit)
_TEMP = re.compile(rf"\.({re.escape(WEIGHTS_NAME)}|{re.escape(CONFIG_NAME)})\.[0-9a-f]{{16}}\.tmp")


# -- write ---------------------------------------------------------------------------------------
def write_adapter(
    directory: Path, tensors: Mapping[str, np.ndarray], config: bytes, overwrite: bool
) -> Path:
    """Writes the tensors (full names) and the config's bytes as ``directory``'s pair of
    files; returns ``directory``.

    Raises:
      ValueError: ``directory`` exists and is not a folder; it holds a pair (or one of the two
        files) that save_peft did not write; with ``overwrite=False``, it holds either file.
        Nothing is written then.
    """
    if not os.path.lexists(directory) and _publish_new(directory, tensors, config):
        return directory
    if not directory.is_dir():
        raise ValueError(
            f"save_peft: {str(directory)!r} exists and is not a folder; save_peft writes a "
            "folder and never replaces anything else. Nothing was written."
        )
    with _locked(directory):
        replaced = _replaceable(directory, overwrite)
        tag = uuid.uuid4().hex[:16]
        tmp_w = directory / f".{WEIGHTS_NAME}.{tag}.tmp"
        tmp_c = directory / f".{CONFIG_NAME}.{tag}.tmp"
        try:
            _write_files(tmp_w, tmp_c, tensors, config, replaced)
            # between the two renames a reader sees the new tensors with the old config and
            # refuses them: their metadata names another config
            os.replace(tmp_w, directory / WEIGHTS_NAME)
            os.replace(tmp_c, directory / CONFIG_NAME)
        finally:
            for tmp in (tmp_w, tmp_c):
                tmp.unlink(missing_ok=True)
    return directory


def _publish_new(directory: Path, tensors: Mapping[str, np.ndarray], config: bytes) -> bool:
    """Writes the pair in a staging folder beside ``directory`` (`flax_lora._checkpoint._atomic`:
    locked while this save lives, removed by the next save if this one dies) and renames it
    into place; ``False`` when ``directory`` appeared meanwhile (nothing published)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    _atomic.clean(directory)
    staging = _atomic.create(directory)
    try:
        new = staging.path / _atomic.CHECKPOINT
        new.mkdir()
        _write_files(new / WEIGHTS_NAME, new / CONFIG_NAME, tensors, config, "")
        try:
            # atomic; never onto anything that appeared meanwhile (where the system has no
            # "noreplace" rename: at most onto an empty folder, which held nothing)
            _atomic.move(new, directory)
        except OSError as e:
            if e.errno in _atomic.RACED or os.path.lexists(directory):
                return False
            raise
        return True
    finally:
        _atomic.release(staging)


def _write_files(
    weights: Path,
    config_file: Path,
    tensors: Mapping[str, np.ndarray],
    config: bytes,
    replaced: str,
) -> None:
    """The two files, flushed to disk; the tensors marked as save_peft's, with the hashes."""
    metadata = {
        "format": "pt",
        MARK: "1",
        CONFIG_SHA: hashlib.sha256(config).hexdigest(),
        REPLACED_SHA: replaced,
    }
    write(str(weights), tensors, metadata)
    with open(config_file, "wb") as f:
        f.write(config)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``directory`` (where there is one) and, holding it,
    removes the temporary files of earlier saves that died (no live save holds them then)."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError:  # a file system without locks: go on unguarded, leave the temps
            locked = False
        for entry in os.scandir(directory) if locked else ():
            if _TEMP.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)


def _replaceable(directory: Path, overwrite: bool) -> str:
    """The SHA-256 of the ``adapter_config.json`` a save may replace in ``directory`` (``""``
    when there is none).

    Raises:
      ValueError: with ``overwrite=False``, either file exists; else a pair (or one of the two)
        that save_peft did not write is there.
    """
    weights, config = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    present = [p.name for p in (weights, config) if os.path.lexists(p)]
    if not present:
        return ""
    if not overwrite:
        raise ValueError(
            f"save_peft: {str(directory)!r} already holds {present}, and overwrite=False "
            "refuses to replace them. Nothing was written."
        )
    ours = _marked(weights) and (not os.path.lexists(config) or config.is_file())
    if not ours:
        raise ValueError(
            f"save_peft: {str(directory)!r} holds {present}, which save_peft did not write "
            f"(no {MARK!r} mark in {WEIGHTS_NAME}: PEFT's save_pretrained or another program "
            "wrote them, or they are damaged); save_peft never replaces such files. Nothing "
            "was written: choose another folder, or move them away."
        )
    return _sha256(config) if config.is_file() else ""


def _marked(weights: Path) -> bool:
    """Whether ``weights`` is a safetensors file save_peft wrote (its mark, read cheaply)."""
    try:
        with open(weights, "rb") as f:
            return MARK in read_header(f, str(weights), MARK_HEADER_LIMIT).metadata
    except (OSError, ValueError):
        return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- read ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Weights:
    """An open ``adapter_model.safetensors``, its header checked: the LoRA tensors' names by
    module (``{module: {suffix after the module name: tensor name}}``) and the other tensors'
    names (``{name without PREFIX: tensor name}``)."""

    f: IO[bytes]
    header: Header
    modules: dict[str, dict[str, str]]
    others: dict[str, str]

    @property
    def file(self) -> str:
        return self.header.file

    def shape(self, name: str) -> tuple[int, ...]:
        return self.header.entries[name].shape

    def stand_ins(self, module: str) -> dict[str, np.ndarray]:
        """The module's tensors as stand-ins (their shapes and dtypes; no memory, not read)."""
        return {k: self.header.entries[n].stand_in() for k, n in self.modules[module].items()}

    def read(self, name: str) -> np.ndarray:
        return read_tensor(self.f, self.header, name)

    def tensors(self, module: str) -> dict[str, np.ndarray]:
        """The module's tensors, read."""
        return {k: self.read(n) for k, n in self.modules[module].items()}


@contextlib.contextmanager
def open_weights(directory: Path, limit: int, config_sha: str) -> Iterator[Weights]:
    """The directory's safetensors file, open, checked (header within ``limit`` bytes) and
    grouped; ``config_sha`` is the SHA-256 of the ``adapter_config.json`` read beside it.

    Raises:
      ValueError: no safetensors file; a damaged file or non-floating tensors (see
        `flax_lora._peft._safetensors.read_header`); tensors written by save_peft with another
        config (an interrupted save, or a config edited since); a module's factors are
        incomplete or of too few dimensions; no LoRA tensors.
    """
    file = directory / WEIGHTS_NAME
    if not file.is_file():
        other = [p.name for p in directory.glob("adapter_model.*")]
        raise ValueError(
            f"load_peft: {str(directory)!r} has no {WEIGHTS_NAME}"
            + (f" (found {other}; only safetensors are read)." if other else ".")
        )
    with open(file, "rb") as f:
        try:
            header = read_header(f, str(file), limit)
        except ValueError as e:
            raise ValueError(f"load_peft: {e}") from None
        _check_pair(directory, header, config_sha)
        modules, others = _group(header)
        yield Weights(f, header, modules, others)


def _check_pair(directory: Path, header: Header, config_sha: str) -> None:
    """Raises when the ``adapter_config.json`` beside tensors save_peft wrote is the one that
    save replaced (the save was interrupted between its two renames, or is running); warns when
    it is another one (edited by hand since the save: used as it is)."""
    meta = header.metadata
    if MARK not in meta or meta.get(CONFIG_SHA) == config_sha:
        return
    what = (
        f"load_peft: {str(directory)!r}: {WEIGHTS_NAME} was written by save_peft with another "
        f"{CONFIG_NAME} than the one beside it (SHA-256 {config_sha[:12]}..., written with "
        f"{str(meta.get(CONFIG_SHA))[:12]}...)"
    )
    if meta.get(REPLACED_SHA) == config_sha:
        raise ValueError(
            f"{what}; its config is the one that save replaced: a save_peft into this folder was "
            "interrupted, or is running. Save again, or wait for it to finish."
        )
    warnings.warn(
        f"{what}: the config was changed after the save; it is used as it is now.",
        stacklevel=4,
    )


def _group(header: Header) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """The tensor names by LoRA module, and the others', checked: each module has a complete
    factor pair of 2 or more dimensions each (a magnitude of 1 or more).

    Raises:
      ValueError: an incomplete module, a factor of too few dimensions, no LoRA tensors.
    """
    modules: dict[str, dict[str, str]] = {}
    others: dict[str, str] = {}
    for key, entry in header.entries.items():
        name = key.removeprefix(PREFIX)
        suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            others[name] = key
            continue
        module = name.removesuffix(suffix)
        modules.setdefault(module, {})[suffix] = key
        least = 1 if suffix == MAGNITUDE else 2
        if len(entry.shape) < least:
            raise ValueError(
                f"load_peft: {header.file!r}: tensor {key!r} of module {module!r} has shape "
                f"{entry.shape}; a LoRA {'magnitude' if least == 1 else 'factor'} has at "
                f"least {least} dimension{'s' * (least > 1)}."
            )
    incomplete = [n for n, t in modules.items() if set(t) - {MAGNITUDE} not in PAIRS]
    if incomplete:
        raise ValueError(
            f"load_peft: {header.file!r} lacks a lora_A/lora_B partner for modules "
            f"{describe(incomplete)}."
        )
    if not modules:
        raise ValueError(f"load_peft: {header.file!r} holds no LoRA tensors.")
    return modules, others
