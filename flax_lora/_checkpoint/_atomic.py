"""The filesystem steps of `lora.save` that never lose a checkpoint: atomic renames, staging
folders locked by the save that owns them, and the recovery of a checkpoint a killed save left
aside. No JAX here: paths and system calls only.

A save writes into a private staging folder beside its target, ``.<name>.saving-<8 hex>``, and
publishes the finished checkpoint ``<staging>/checkpoint`` in one atomic step (`publish`): a
rename onto a missing target or an empty directory; onto an earlier checkpoint, an exchange of
the two directories (Linux ``renameat2(RENAME_EXCHANGE)``, macOS ``renamex_np(RENAME_SWAP)``),
after which the staging folder holds the earlier checkpoint and is removed. Where the exchange
is unavailable it takes two renames, the earlier checkpoint going to ``<staging>/previous``
first: a save killed between them leaves the target missing, and `recover` (run by the next
save and by `lora.load`) moves ``previous`` back.

A save holds an exclusive ``flock`` on its staging folder from creating it to removing it. The
kernel drops the lock when the process dies, so a staging folder whose lock another process can
take belongs to a dead save: `clean` removes those (and only names of the staging pattern).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

try:
    import fcntl
except ImportError:  # Windows: no locks, so no staging folder is ever taken for dead
    fcntl = None  # type: ignore[assignment]

Mode = Literal["replace", "noreplace", "exchange"]
State = Literal["missing", "empty", "checkpoint"]
Recognise = Callable[[Path], str | None]
"""``recognise(path)``: ``None`` if ``path`` holds a checkpoint a save may replace, else what is
there (for the error)."""

CHECKPOINT = "checkpoint"
"""The finished checkpoint inside a staging folder (orbax writes it there)."""
PREVIOUS = "previous"
"""Inside a staging folder: the earlier checkpoint, between the two renames of the fallback."""
DISCARDED = "discarded"
"""Inside a staging folder being removed: what was ``previous``, so that no partly removed
checkpoint is ever named ``previous`` (and restored)."""
TRIES = 8
"""Attempts of a step that a concurrent save can disturb (a new staging name, a publish)."""
UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP})
"""Errors of a rename mode this system or file system does not offer."""
RACED = frozenset({errno.EEXIST, errno.ENOTEMPTY, errno.ENOENT, errno.ENOTDIR})
"""Errors of a rename whose target changed since it was inspected (a concurrent save)."""

_FLAGS = {  # the flags of each rename mode, per platform
    "linux": {"noreplace": 1, "exchange": 2},  # RENAME_NOREPLACE, RENAME_EXCHANGE
    "darwin": {"noreplace": 4, "exchange": 2},  # RENAME_EXCL, RENAME_SWAP
}
_PLATFORM = "linux" if sys.platform.startswith("linux") else sys.platform


def _rename_syscall() -> Callable[[bytes, bytes, int], int] | None:
    """The C rename that takes flags: glibc >= 2.28 ``renameat2``, macOS ``renamex_np``."""
    if _PLATFORM not in _FLAGS:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2" if _PLATFORM == "linux" else "renamex_np", None)
    if fn is None:
        return None
    if _PLATFORM == "linux":
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        at_fdcwd = -100
        return lambda src, dst, flags: fn(at_fdcwd, src, at_fdcwd, dst, flags)
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
    return fn


_SYSCALL = _rename_syscall()


def rename(src: Path, dst: Path, mode: Mode = "replace") -> None:
    """Renames ``src`` to ``dst`` in one atomic step.

    ``"replace"``: `os.rename` (replaces a file, or an empty directory when ``src`` is one);
    ``"noreplace"``: fails with ``EEXIST`` when ``dst`` exists; ``"exchange"``: swaps two
    existing paths. Every rename of a save goes through here (the kill tests wrap it).

    Raises:
      OSError: the rename failed; its errno is in `UNSUPPORTED` where this system or file
        system does not offer ``mode``.
    """
    if mode == "replace":
        os.rename(src, dst)
        return
    flags = _FLAGS.get(_PLATFORM, {}).get(mode)
    if _SYSCALL is None or flags is None:
        raise OSError(errno.ENOSYS, f"no atomic rename mode {mode!r} here", str(src))
    if _SYSCALL(os.fsencode(src), os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src), None, str(dst))


def move(src: Path, dst: Path) -> None:
    """Renames ``src`` to a missing ``dst``. Without ``"noreplace"``, a plain rename, which can
    replace at most an empty directory (a directory onto a non-empty one or a file fails)."""
    try:
        rename(src, dst, "noreplace")
    except OSError as e:
        if e.errno not in UNSUPPORTED:
            raise
        rename(src, dst)


# ---------------------------------------------------------------------------------------------
# staging folders and their locks
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Staging:
    """The staging folder of a live save: its path, its name's token, and the open descriptor
    that holds its lock (``None`` where the file system has no locks) until `release`."""

    path: Path
    token: int
    fd: int | None


def staging_path(target: Path, token: int) -> Path:
    """The staging folder of ``target`` with ``token`` (32 bits, 8 hex digits)."""
    return target.parent / f".{target.name}.saving-{token:08x}"


def _stagings(target: Path) -> list[Path]:
    """The staging folders of ``target`` on disk: names of the pattern only."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.saving-[0-9a-f]{{8}}")
    try:
        names = os.listdir(target.parent)
    except FileNotFoundError:
        return []
    return [target.parent / n for n in sorted(names) if pattern.fullmatch(n)]


def _open_dir(path: Path) -> int | None:
    """A descriptor of the directory ``path`` (no symlink followed), or ``None`` if gone."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink: not a staging folder of ours
            return None
        raise


def _lock(fd: int, blocking: bool) -> bool | None:
    """Takes the exclusive lock of ``fd``: ``True``; held by another (not ``blocking``):
    ``False``; no locks on this system or file system: ``None``."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, *UNSUPPORTED):
            return None
        raise
    return True


def _same(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the directory open as ``fd``."""
    here = os.fstat(fd)
    return _identity(path) == (here.st_dev, here.st_ino)


def create(target: Path) -> Staging:
    """Makes and locks a new staging folder of ``target``. A cleaner that took the lock of the
    new folder first (and removed it) is waited for; then a new name is tried."""
    for _ in range(TRIES):
        token = secrets.randbits(32) | 1  # never 0: 0 tells other processes the primary failed
        path = staging_path(target, token)
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        fd = _open_dir(path)
        if fd is None:
            continue
        _lock(fd, blocking=True)
        if _same(fd, path):
            return Staging(path, token, fd)
        os.close(fd)
    raise OSError(
        errno.EEXIST, f"no new staging folder beside {target.name!r} after {TRIES} tries", str(path)
    )


def release(staging: Staging) -> None:
    """Removes a save's own staging folder, then drops its lock."""
    try:
        _remove(staging.path)
    finally:
        if staging.fd is not None:
            os.close(staging.fd)


def _remove(path: Path) -> None:
    """Removes a locked staging folder; never raises (a leftover goes with the next `clean`)."""
    if os.path.isdir(path / PREVIOUS):
        with contextlib.suppress(OSError):  # else removed under its own name: superseded
            rename(path / PREVIOUS, path / DISCARDED)
    shutil.rmtree(path, ignore_errors=True)


def clean(target: Path) -> None:
    """Removes the staging folders of dead saves of ``target`` (those whose lock this process
    can take), after restoring an earlier checkpoint one holds when ``target`` is missing."""
    for path in _stagings(target):
        fd = _open_dir(path)
        if fd is None:
            continue
        try:
            if _lock(fd, blocking=False) and _same(fd, path):
                _restore(path, target)
                _remove(path)
        finally:
            os.close(fd)


def recover(target: Path) -> bool:
    """When ``target`` is missing, moves back the earlier checkpoint a save killed between its
    two renames left in its staging folder; whether it did. A live save in that step holds the
    lock for two renames: it is waited for."""
    if os.path.lexists(target):
        return False
    for path in _stagings(target):
        if not os.path.isdir(path / PREVIOUS):
            continue
        fd = _open_dir(path)
        if fd is None:
            continue
        try:
            _lock(fd, blocking=True)  # no locks: a live save finds the target taken and retries
            if _same(fd, path) and _restore(path, target):
                return True
        finally:
            os.close(fd)
    return False


def _restore(staging: Path, target: Path) -> bool:
    """Moves ``<staging>/previous`` to a missing ``target``; whether it did."""
    if os.path.lexists(target) or not os.path.isdir(staging / PREVIOUS):
        return False
    try:
        move(staging / PREVIOUS, target)
    except OSError as e:
        if e.errno in RACED:
            return False
        raise
    return True


# ---------------------------------------------------------------------------------------------
# the target and the publish
# ---------------------------------------------------------------------------------------------
def inspect(target: Path, recognise: Recognise, overwrite: bool = True) -> State:
    """What is at ``target``: ``"missing"``, ``"empty"`` (an empty directory) or
    ``"checkpoint"`` (one ``recognise`` accepts).

    Raises:
      ValueError: anything else is there (a file, a symlink, a directory of anything else), or
        anything at all with ``overwrite=False``; naming the path and what is there.
    """
    for _ in range(TRIES):
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            return "missing"
        if stat.S_ISLNK(st.st_mode):
            _refuse(target, f"is a symbolic link (to {os.readlink(target)!r})")
        if stat.S_ISREG(st.st_mode):
            _refuse(target, f"is a regular file ({st.st_size} bytes)")
        if not stat.S_ISDIR(st.st_mode):
            _refuse(target, "is a special file (a device, FIFO or socket)")
        try:  # a concurrent save may move the directory away meanwhile: then look again
            state: State = "checkpoint" if os.listdir(target) else "empty"
            reason = recognise(target) if state == "checkpoint" else None
        except (FileNotFoundError, NotADirectoryError):
            continue
        if reason is None:
            break
        if _identity(target) == (st.st_dev, st.st_ino):  # still the directory that was read
            _refuse(target, reason)
        # a concurrent save moved a checkpoint in or out while it was read: look again
    else:
        raise OSError(
            errno.EBUSY, f"lora.save: {str(target)!r} kept changing while inspected", str(target)
        )
    if not overwrite:
        what = "a flax_lora checkpoint" if state == "checkpoint" else "an empty directory"
        raise ValueError(
            f"lora.save(..., overwrite=False): {str(target)!r} exists (it is {what}); nothing "
            "was written. Pass overwrite=True to replace an earlier checkpoint."
        )
    return state


def _identity(path: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of what ``path`` names now; ``None`` if nothing."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _refuse(target: Path, what: str) -> None:
    raise ValueError(
        f"lora.save: {str(target)!r} {what}. lora.save writes only to a new path, an empty "
        "directory or an earlier flax_lora checkpoint, and leaves anything else untouched: "
        "choose another path, or move that away yourself."
    )


def publish(staging: Path, target: Path, overwrite: bool, recognise: Recognise) -> None:
    """Moves the finished ``<staging>/checkpoint`` to ``target`` atomically (see the module
    docstring); inspects ``target`` again and retries when a concurrent save changed it.

    Raises:
      ValueError: ``target`` holds something else (`inspect`); nothing is moved.
      OSError: a rename failed, or ``target`` kept changing for `TRIES` attempts.
    """
    new = staging / CHECKPOINT
    for _ in range(TRIES):
        state = inspect(target, recognise, overwrite)
        try:
            _PUBLISH[state](new, target, recognise)
            return
        except OSError as e:
            if e.errno not in RACED:
                raise
    raise OSError(
        errno.EBUSY,
        f"lora.save: {str(target)!r} kept changing (concurrent saves?) for {TRIES} attempts to "
        "move the new checkpoint into place; it was not published",
        str(target),
    )


def _onto_empty(new: Path, target: Path, recognise: Recognise) -> None:
    rename(new, target)  # replaces only an empty directory; ENOTEMPTY if one came meanwhile


def _onto_missing(new: Path, target: Path, recognise: Recognise) -> None:
    move(new, target)


def _onto_checkpoint(new: Path, target: Path, recognise: Recognise) -> None:
    """Exchanges ``new`` and the checkpoint at ``target``; checks that what came out is still a
    checkpoint (else swaps back). Falls back to two renames where there is no exchange."""
    try:
        rename(new, target, "exchange")
    except OSError as e:
        if e.errno not in UNSUPPORTED:
            raise
        _two_renames(new, target, recognise)
        return
    reason = recognise(new)  # ``new`` now holds what was at ``target``
    if reason is not None:
        rename(new, target, "exchange")
        _refuse(target, f"changed while the checkpoint was published: it {reason}; it was put back")


def _two_renames(new: Path, target: Path, recognise: Recognise) -> None:
    """The fallback: ``target`` to ``<staging>/previous``, then ``new`` to ``target``. Killed in
    between, `recover` moves ``previous`` back."""
    previous = new.parent / PREVIOUS
    if os.path.lexists(previous):  # left by an earlier attempt that a concurrent save overtook
        shutil.rmtree(previous)
    rename(target, previous)
    reason = recognise(previous)
    if reason is not None:
        move(previous, target)
        _refuse(target, f"changed while the checkpoint was published: it {reason}; it was put back")
    try:
        move(new, target)
    except OSError:
        try:
            move(previous, target)
        except OSError as e:  # a concurrent save published there meanwhile: its checkpoint stays
            if e.errno not in RACED:
                raise
        raise


_PUBLISH: dict[State, Callable[[Path, Path, Recognise], None]] = {
    "missing": _onto_missing,
    "empty": _onto_empty,
    "checkpoint": _onto_checkpoint,
}
