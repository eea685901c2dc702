"""Checkpoint safety (API.md, "Checkpoint safety"): what `lora.save` may replace, its atomic
publish (directory exchange, or two renames with recovery), its staging folders, and
`lora.load` / `lora.load_config` on damaged or hostile metadata.

Each case asserts what a user gets: the error type, a message that names the path and the
field, and nothing changed on disk (a snapshot of every file's bytes, directory and link under
the folder, before and after). Loaded adapters are compared bit for bit with the numpy arrays
they were made from. Kills of real processes are in tests/test_checkpoint_kill.py.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.internal import _atomic, _checkpoint, _checkpoint_meta
from support.trees import leaves_by_path

import flax_lora as lora

META = Path("meta", "metadata")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _arrays(seed: int, extras: bool = False) -> dict[str, np.ndarray]:
    """The reference numpy arrays of adapter set ``seed``, by path."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    out = {"params/dense/kernel/a": f(3, 2), "params/dense/kernel/b": f(2, 4)}
    out |= {"params/proj/kernel/a": f(4, 2), "params/proj/kernel/b": f(2, 5)}
    if extras:
        out |= {"params/head/bias/value": f(5), "params/embed/embedding/delta": f(2, 4)}
    return out


def _adapters(seed: int, extras: bool = False) -> Any:
    x = {k: jnp.asarray(v) for k, v in _arrays(seed, extras).items()}
    lw = lambda p, s, shape: lora.LoraWeights(
        a=x[f"{p}/a"], b=x[f"{p}/b"], scale=s, in_axes=(0,), kernel_shape=shape
    )
    params = {
        "dense": {"kernel": lw("params/dense/kernel", 1.5, (3, 4))},
        "proj": {"kernel": lw("params/proj/kernel", 0.5, (4, 5))},
    }
    if extras:
        params["head"] = {"bias": lora.TrainedCopy(value=x["params/head/bias/value"], role="bias")}
        delta = x["params/embed/embedding/delta"]
        params["embed"] = {"embedding": lora.TokenDelta(delta=delta, indices=(1, 3), num_rows=10)}
    return {"params": params}


def _assert_is(loaded: Any, seed: int) -> None:
    """``loaded`` holds exactly the arrays of adapter set ``seed`` (without extras)."""
    got = {k: np.asarray(v) for k, v in leaves_by_path(loaded).items()}
    want = _arrays(seed)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def _snapshot(root: Path) -> dict[str, Any]:
    """Every entry under ``root`` (itself included), symlinks not followed: a file's bytes, a
    link's target, or a directory / special-file marker."""
    out: dict[str, Any] = {}

    def visit(p: Path, rel: str) -> None:
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = "dir"
            for child in sorted(os.listdir(p)):
                visit(p / child, f"{rel}/{child}")
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = "special"

    visit(root, ".")
    return out


def _checkpoint_dir(tmp_path: Path, seed: int = 0, name: str = "ck", **kw: Any) -> Path:
    path = tmp_path / name
    lora.save(path, _adapters(seed, **kw), lora.LoraConfig(rank=2, alpha=3.0))
    return path


def _edit_meta(path: Path, edit: Any) -> None:
    meta = json.loads((path / META).read_text())
    edit(meta)
    (path / META).write_text(json.dumps(meta))


def _stagings(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".saving-" in n)


# ---------------------------------------------------------------------------------------------
# 1. lora.save replaces only a flax_lora checkpoint it recognises
# ---------------------------------------------------------------------------------------------
def _foreign_folder(tmp: Path) -> tuple[Path, str]:
    (tmp / "t").mkdir()
    (tmp / "t" / "paper.tex").write_text("results")
    (tmp / "t" / "data").mkdir()
    (tmp / "t" / "data" / "x.bin").write_bytes(b"\x00\x01")
    return tmp / "t", "paper.tex"


def _regular_file(tmp: Path) -> tuple[Path, str]:
    (tmp / "t").write_text("notes")
    return tmp / "t", "regular file (5 bytes)"


def _link_to_checkpoint(tmp: Path) -> tuple[Path, str]:
    _checkpoint_dir(tmp, name="real")
    (tmp / "t").symlink_to(tmp / "real")
    return tmp / "t", "symbolic link"


def _dangling_link(tmp: Path) -> tuple[Path, str]:
    (tmp / "t").symlink_to(tmp / "nowhere")
    return tmp / "t", "symbolic link"


def _checkpoint_and_more(tmp: Path) -> tuple[Path, str]:
    path = _checkpoint_dir(tmp, name="t")
    (path / "notes.txt").write_text("mine")
    return path, "notes.txt"


def _damaged_checkpoint(tmp: Path) -> tuple[Path, str]:
    path = _checkpoint_dir(tmp, name="t")
    (path / META).write_bytes(b"\x00{garbage")
    return path, "not valid JSON"


def _other_orbax_checkpoint(tmp: Path) -> tuple[Path, str]:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(
            tmp / "t",
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave({"w": np.ones(3)}), meta=ocp.args.JsonSave({"x": 1})
            ),
        )
    return tmp / "t", "not a flax_lora checkpoint"


def _fifo_metadata(tmp: Path) -> tuple[Path, str]:
    path = _checkpoint_dir(tmp, name="t")
    (path / META).unlink()
    os.mkfifo(path / META)
    return path, "not a regular file"


def _huge_metadata(tmp: Path) -> tuple[Path, str]:
    path = _checkpoint_dir(tmp, name="t")
    with open(path / META, "r+b") as fh:  # sparse: no disk used, never read
        fh.truncate(_checkpoint_meta.MAX_META_BYTES + 1)
    return path, "byte bound"


@pytest.mark.parametrize(
    "make",
    [
        _foreign_folder,
        _regular_file,
        _link_to_checkpoint,
        _dangling_link,
        _checkpoint_and_more,
        _damaged_checkpoint,
        _other_orbax_checkpoint,
        _fifo_metadata,
        _huge_metadata,
    ],
)
@pytest.mark.parametrize("overwrite", [True, False])
def test_save_refuses_what_it_does_not_recognise(tmp_path, make, overwrite) -> None:
    target, what = make(tmp_path)
    before = _snapshot(tmp_path)
    signal.alarm(60)  # a FIFO read would block: fail instead of hanging
    try:
        with pytest.raises(ValueError) as e:
            lora.save(target, _adapters(1), overwrite=overwrite)
    finally:
        signal.alarm(0)
    assert str(target) in str(e.value) and what in str(e.value)
    assert _snapshot(tmp_path) == before  # nothing touched, no staging folder made


def test_save_in_a_project_folder_refuses_dot(tmp_path, monkeypatch) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('hi')")
    (project / "README.md").write_text("# project")
    before = _snapshot(tmp_path)
    monkeypatch.chdir(project)
    with pytest.raises(ValueError) as e:
        lora.save(".", _adapters(0))
    assert repr(str(project)) in str(e.value) and "README.md" in str(e.value)
    assert _snapshot(tmp_path) == before


def test_save_uses_an_empty_directory(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    lora.save(tmp_path / "empty", _adapters(3))
    _assert_is(lora.load(tmp_path / "empty"), 3)
    assert os.listdir(tmp_path) == ["empty"]


def test_overwrite_false_refuses_any_existing_path(tmp_path) -> None:
    path = tmp_path / "ck"
    assert lora.save(path, _adapters(0), overwrite=False) == path  # a new path: written
    (tmp_path / "empty").mkdir()
    for target, what in ((path, "a flax_lora checkpoint"), (tmp_path / "empty", "empty")):
        before = _snapshot(tmp_path)
        with pytest.raises(ValueError, match="overwrite=False") as e:
            lora.save(target, _adapters(1), overwrite=False)
        assert str(target) in str(e.value) and what in str(e.value)
        assert _snapshot(tmp_path) == before
    _assert_is(lora.load(path), 0)


def test_save_checks_config_and_overwrite_types(tmp_path) -> None:
    with pytest.raises(TypeError, match="config must be a LoraConfig") as e:
        lora.save(tmp_path / "x", _adapters(0), {"rank": 2})
    assert "dict" in str(e.value)
    with pytest.raises(TypeError, match="overwrite"):
        lora.save(tmp_path / "x", _adapters(0), overwrite="yes")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 2. the publish: an exchange, or two renames; what comes out is checked
# ---------------------------------------------------------------------------------------------
def _spy(monkeypatch, calls: list, exchange: bool = True, before_rename: Any = None) -> None:
    """Wraps `_atomic.rename`: records (src name, dst name, mode); without ``exchange`` the
    exchange fails as on a system without it (EINVAL); ``before_rename(mode)`` runs first."""
    rename = _atomic.rename

    def spy(src, dst, mode="replace"):
        if before_rename is not None:
            before_rename(src, dst, mode)
        if mode == "exchange" and not exchange:
            raise OSError(errno.EINVAL, "no exchange here")
        calls.append((Path(src).name, Path(dst).name, mode))
        rename(src, dst, mode)

    monkeypatch.setattr(_atomic, "rename", spy)


@pytest.mark.parametrize("exchange", [True, False])
def test_publish_replaces_a_checkpoint_atomically(tmp_path, monkeypatch, exchange) -> None:
    path = _checkpoint_dir(tmp_path, seed=0)
    calls: list = []
    _spy(monkeypatch, calls, exchange)
    lora.save(path, _adapters(1))
    if exchange:
        assert calls == [("checkpoint", "ck", "exchange")]
    else:  # the earlier checkpoint aside, the new one in, the earlier one discarded
        assert calls == [
            ("ck", "previous", "replace"),
            ("checkpoint", "ck", "noreplace"),
            ("previous", "discarded", "replace"),
        ]
    _assert_is(lora.load(path), 1)
    assert os.listdir(tmp_path) == ["ck"]
    calls.clear()
    lora.save(tmp_path / "fresh", _adapters(2))  # a new path: one rename that never replaces
    assert calls == [("checkpoint", "fresh", "noreplace")]


@pytest.mark.parametrize("exchange", [True, False])
def test_target_swapped_mid_publish_is_put_back(tmp_path, monkeypatch, exchange) -> None:
    """Someone puts a folder of their own at the path between the save's check and its
    publish: the save puts it back, raises, and replaces nothing."""
    path = _checkpoint_dir(tmp_path, seed=0)

    def swap_in_a_foreign_folder(src, dst, mode):
        if Path(src).name in ("checkpoint", "ck") and not (tmp_path / "aside").exists():
            os.rename(path, tmp_path / "aside")
            path.mkdir()
            (path / "thesis.tex").write_text("mine")

    calls: list = []
    _spy(monkeypatch, calls, exchange, swap_in_a_foreign_folder)
    with pytest.raises(ValueError) as e:
        lora.save(path, _adapters(1))
    assert str(path) in str(e.value) and "put back" in str(e.value)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["aside", "ck"]  # no staging folder left
    assert os.listdir(path) == ["thesis.tex"] and (path / "thesis.tex").read_text() == "mine"
    _assert_is(lora.load(tmp_path / "aside"), 0)


@pytest.mark.parametrize("vanish", ["before_listing", "while_read"])
def test_checkpoint_moved_away_while_inspected_is_looked_at_again(tmp_path, vanish) -> None:
    """A concurrent save (two-rename fallback) moves the checkpoint aside while this save reads
    its metadata: the read fails, but the path did not hold anything foreign, so the save looks
    again instead of refusing (seen once in CI as a refusal naming a missing metadata file)."""
    path = _checkpoint_dir(tmp_path, seed=0)
    aside = tmp_path / "aside"
    real = _checkpoint_meta.recognise

    def moved_away_meanwhile(target):
        if not aside.exists():
            os.rename(path, aside)
            if vanish == "before_listing":
                return real(target)  # raises FileNotFoundError: the directory is gone
            return "is not a readable flax_lora checkpoint (its metadata file is missing)"
        return real(target)

    assert _atomic.inspect(path, moved_away_meanwhile) == "missing"
    os.rename(aside, path)
    calls = iter([True])

    def put_back_meanwhile(target):  # a checkpoint moved in during the read: looked at again
        if next(calls, False):
            os.rename(path, aside)
            _checkpoint_dir(tmp_path, seed=1)
            return "is not a readable flax_lora checkpoint (its metadata file is missing)"
        return real(target)

    assert _atomic.inspect(path, put_back_meanwhile) == "checkpoint"
    with pytest.raises(ValueError, match="missing"):  # the same directory: a real refusal
        _atomic.inspect(path, lambda target: "is missing its metadata")


def test_the_lock_is_held_while_the_save_publishes(tmp_path, monkeypatch) -> None:
    path = _checkpoint_dir(tmp_path)
    seen = []

    def try_lock(src, dst, mode):
        staging = Path(src).parent
        fd = os.open(staging, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            seen.append(staging.name)
        finally:
            os.close(fd)

    _spy(monkeypatch, [], before_rename=try_lock)
    lora.save(path, _adapters(1))
    assert len(seen) == 1 and seen[0].startswith(".ck.saving-")


# ---------------------------------------------------------------------------------------------
# 3. a checkpoint left between two renames is restored; dead staging folders are removed
# ---------------------------------------------------------------------------------------------
def _killed_between_renames(tmp_path: Path) -> Path:
    """The disk as a save killed between its two renames leaves it: the earlier checkpoint
    (set 0) in ``previous`` of its staging folder, the new one (set 1) in ``checkpoint``."""
    path = _checkpoint_dir(tmp_path, seed=0)
    new = _checkpoint_dir(tmp_path, seed=1, name="new")
    staging = _atomic.staging_path(path, 0x0BADCAFE)
    staging.mkdir()
    os.rename(path, staging / _atomic.PREVIOUS)
    os.rename(new, staging / _atomic.CHECKPOINT)
    return path


@pytest.mark.parametrize("reader", [lora.load, lora.load_config])
def test_load_restores_a_checkpoint_left_between_renames(tmp_path, reader) -> None:
    path = _killed_between_renames(tmp_path)
    assert not path.exists()
    reader(path)
    _assert_is(lora.load(path), 0)
    assert lora.load_config(path) == lora.LoraConfig(rank=2, alpha=3.0)
    lora.save(path, _adapters(2))  # and the next save removes the dead staging folder
    assert os.listdir(tmp_path) == ["ck"]
    _assert_is(lora.load(path), 2)


def test_save_restores_a_checkpoint_left_between_renames(tmp_path) -> None:
    path = _killed_between_renames(tmp_path)
    with pytest.raises(ValueError, match="overwrite=False"):  # restored first, so it exists
        lora.save(path, _adapters(2), overwrite=False)
    _assert_is(lora.load(path), 0)
    path2 = _killed_between_renames(tmp_path / "again")
    lora.save(path2, _adapters(2))
    assert os.listdir(tmp_path / "again") == ["ck"]
    _assert_is(lora.load(path2), 2)


def test_dead_staging_folders_go_live_ones_and_lookalikes_stay(tmp_path) -> None:
    path = _checkpoint_dir(tmp_path)
    dead = [_atomic.staging_path(path, t) for t in (0x1, 0xDEADBEEF)]
    for d in dead:
        (d / "checkpoint.orbax-checkpoint-tmp" / "arrays").mkdir(parents=True)
        (d / "checkpoint.orbax-checkpoint-tmp" / "arrays" / "x").write_bytes(b"partial")
    live = _atomic.staging_path(path, 0x12345678)
    (live / "checkpoint").mkdir(parents=True)
    lookalikes = [".ck.saving-xyz", ".ck.saving-123456789", ".ck.old-12345678", ".cko.saving-1"]
    lookalikes += [".other.saving-0000abcd", "ck.saving-0000abcd"]
    for name in lookalikes:
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep").write_text(name)
    files = [".ck.saving-aaaaaaaa.txt", ".ck.saving-bbbbbbbb"]  # not folders: kept
    for name in files:
        (tmp_path / name).write_text("a file")
    others = {n: _snapshot(tmp_path / n) for n in [*lookalikes, *files]}
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live save holds its lock
    try:
        lora.save(path, _adapters(1))
        assert all(not d.exists() for d in dead)
        assert live.is_dir() and os.listdir(live) == ["checkpoint"]
        assert {n: _snapshot(tmp_path / n) for n in others} == others
    finally:
        os.close(fd)  # the live save dies: its lock goes with it
    lora.save(path, _adapters(2))
    assert not live.exists()
    assert {n: _snapshot(tmp_path / n) for n in others} == others
    _assert_is(lora.load(path), 2)


def test_failed_save_leaves_no_orbax_thread_and_no_staging(tmp_path, monkeypatch) -> None:
    path = _checkpoint_dir(tmp_path)
    original = ocp.handlers.StandardCheckpointHandler.async_save

    async def fail_after_writing(*args, **kwargs):
        await original(*args, **kwargs)  # its commit threads go on in the background
        raise OSError("disk full")

    monkeypatch.setattr(ocp.handlers.StandardCheckpointHandler, "async_save", fail_after_writing)
    running = set(threading.enumerate())
    with pytest.raises(OSError, match="disk full"):
        lora.save(path, _adapters(1))
    left = [t for t in threading.enumerate() if t not in running and t.is_alive()]
    assert [t.name for t in left if type(t).__module__.startswith("orbax")] == []
    assert os.listdir(tmp_path) == ["ck"]
    monkeypatch.undo()
    _assert_is(lora.load(path), 0)


def test_load_reads_again_when_a_save_replaced_the_checkpoint(tmp_path, monkeypatch) -> None:
    path = _checkpoint_dir(tmp_path, seed=0)
    read = _checkpoint._read
    reads = []

    def read_then_replaced(directory):
        out = read(directory)
        if not reads:
            lora.save(path, _adapters(1))  # a concurrent save, while this read was going on
        reads.append(directory)
        return out

    monkeypatch.setattr(_checkpoint, "_read", read_then_replaced)
    _assert_is(lora.load(path), 1)
    assert len(reads) == 2


# ---------------------------------------------------------------------------------------------
# 4. lora.load / lora.load_config: damaged metadata
# ---------------------------------------------------------------------------------------------
def _damage(kind: str, file: Path) -> None:
    if kind == "missing":
        file.unlink()
    elif kind == "garbage":
        file.write_bytes(b"{'format': 'flax_lora.adapters',")
    elif kind == "not utf-8":
        file.write_bytes(b'{"format": "\xff\xfe"}')
    elif kind == "deep":
        file.write_text("[" * 200_000 + "]" * 200_000)
    elif kind == "a list":
        file.write_text(json.dumps([1, 2]))
    elif kind == "huge":
        with open(file, "r+b") as fh:
            fh.truncate(_checkpoint_meta.MAX_META_BYTES + 1)
    elif kind == "fifo":
        file.unlink()
        os.mkfifo(file)


@pytest.mark.parametrize(
    "kind, says",
    [
        ("missing", "is missing"),
        ("garbage", "not valid JSON"),
        ("not utf-8", "not valid JSON"),
        ("deep", "not valid JSON"),
        ("a list", "JSON list"),
        ("huge", "byte bound"),
        ("fifo", "not a regular file"),
    ],
)
@pytest.mark.parametrize("reader", [lora.load, lora.load_config])
def test_damaged_metadata_file(tmp_path, kind, says, reader) -> None:
    path = _checkpoint_dir(tmp_path)
    _damage(kind, path / META)
    before = _snapshot(tmp_path)
    signal.alarm(60)
    try:
        with pytest.raises(ValueError) as e:
            reader(path)
    finally:
        signal.alarm(0)
    assert str(path) in str(e.value) and says in str(e.value)
    assert _snapshot(tmp_path) == before


def _set(path: str, field: str, value: Any) -> Any:
    def edit(meta: dict) -> None:
        if value is _DELETE:
            del meta["adapters"][path][field]
        else:
            meta["adapters"][path][field] = value

    return edit


_DELETE = object()
D, P = "params/dense/kernel", "params/proj/kernel"
_top = lambda field, value: lambda meta: meta.__setitem__(field, value)
_extra = lambda p, field, value: lambda meta: meta["extras"][p].__setitem__(field, value)
H, E = "params/head/bias", "params/embed/embedding"


@pytest.mark.parametrize(
    "edit, error, names",
    [
        (_top("version", 99), ValueError, ["'version'", "99"]),
        (_top("version", "1"), ValueError, ["'version'"]),
        (_top("version", True), ValueError, ["'version'"]),
        (_top("adapters", [1]), TypeError, ["'adapters'", "list"]),
        (_top("extras", "x"), TypeError, ["'extras'"]),
        (_top("config", [1]), TypeError, ["'config'", "list"]),
        (lambda m: m["adapters"].__setitem__(D, [1]), TypeError, [D]),
        (
            lambda m: m["adapters"].__setitem__("params//x", m["adapters"].pop(D)),
            ValueError,
            ["//"],
        ),
        (lambda m: m["adapters"].__setitem__(f"{D}/a", m["adapters"][P]), ValueError, [D]),
        (lambda m: m.pop("adapters"), ValueError, ["'adapters'"]),
        (_set(D, "scale", _DELETE), ValueError, [D, "'scale'"]),
        (_set(D, "scale", math.nan), ValueError, [D, "'scale'", "finite"]),
        (_set(D, "scale", math.inf), ValueError, [D, "'scale'"]),
        (_set(D, "scale", 1e300), ValueError, [D, "'scale'"]),
        (_set(D, "scale", "1.5"), TypeError, [D, "'scale'"]),
        (_set(D, "scale", None), TypeError, [D, "'scale'"]),
        (_set(D, "in_axes", [5]), ValueError, [D, "'in_axes'"]),
        (_set(D, "in_axes", [0, 0]), ValueError, [D, "'in_axes'"]),
        (_set(D, "in_axes", [0, 1]), ValueError, [D, "'in_axes'", "no input or no output"]),
        (_set(D, "in_axes", []), ValueError, [D, "'in_axes'"]),
        (_set(D, "in_axes", [-1]), ValueError, [D, "'in_axes'"]),
        (_set(D, "in_axes", "0"), TypeError, [D, "'in_axes'"]),
        (_set(D, "in_axes", [0.0]), TypeError, [D, "'in_axes'"]),
        (_set(D, "kernel_shape", [3, -4]), ValueError, [D, "'kernel_shape'"]),
        (_set(D, "kernel_shape", [3, 0]), ValueError, [D, "'kernel_shape'"]),
        (_set(D, "kernel_shape", {"a": 1}), TypeError, [D, "'kernel_shape'"]),
        (_set(D, "kernel_shape", [3, 5]), ValueError, [D, "b (2, 4)"]),  # vs the arrays
        (_set(D, "kind", "lstm"), ValueError, [D, "'kind'", "lstm"]),
        (_set(D, "kind", 1), TypeError, [D, "'kind'"]),
        (_set(D, "dropout", 1.0), ValueError, [D, "'dropout'"]),
        (_set(D, "dropout", -0.1), ValueError, [D, "'dropout'"]),
        (_set(D, "dropout", False), TypeError, [D, "'dropout'"]),
        (_set(D, "layer_axes", 2), ValueError, [D, "'layer_axes'"]),
        (_set(D, "layer_axes", 1), ValueError, [D, "'in_axes'", "layer axis"]),
        (_set(D, "layer_axes", True), TypeError, [D, "'layer_axes'"]),
        (_set(D, "layer_at", 1), ValueError, [D, "'layer_at'"]),  # no layer axis to place
        (_set(D, "layer_at", -1), ValueError, [D, "'layer_at'"]),
        (_set(D, "layer_at", True), TypeError, [D, "'layer_at'"]),
        (_set(D, "layers", [99]), ValueError, [D, "'layers'"]),
        (_set(D, "layers", 1), TypeError, [D, "'layers'"]),
        (_set(D, "expert_axes", [9]), ValueError, [D, "'expert_axes'"]),
        (_set(D, "expert_axes", [0]), ValueError, [D, "'expert_axes'", "overlaps"]),
        (_set(D, "expert_axes", None), TypeError, [D, "'expert_axes'"]),
        (_set(D, "rank", 0), ValueError, [D, "'rank'"]),
        (_set(D, "rank", 7), ValueError, [D, "'rank'", "(3, 2)"]),
        (_set(D, "dora", "no"), TypeError, [D, "'dora'"]),
        (_set(D, "dora", True), ValueError, [D, "DoRA magnitude"]),
        (
            lambda m: m["adapters"].__setitem__("params/x/kernel", m["adapters"][D]),
            ValueError,
            ["params/x/kernel", "lacks the factors"],
        ),
        (lambda m: m["adapters"].pop(P), ValueError, [P, "does not name"]),  # a stray array
        (_extra(H, "type", "blob"), ValueError, [H, "'type'", "blob"]),
        (_extra(H, "role", 3), TypeError, [H, "'role'"]),
        (lambda m: m["extras"][H].pop("role"), ValueError, [H, "'role'"]),
        (_extra(E, "indices", [1, 1]), ValueError, [E, "'indices'"]),
        (_extra(E, "indices", [1, 30]), ValueError, [E, "'indices'", "num_rows"]),
        (_extra(E, "indices", [1, 2, 3]), ValueError, [E, "shape (2, 4)", "3 indices"]),
        (_extra(E, "num_rows", 0), ValueError, [E, "'num_rows'"]),
        (_extra(E, "num_rows", "10"), TypeError, [E, "'num_rows'"]),
    ],
)
def test_bad_metadata_fields(tmp_path, edit, error, names) -> None:
    path = _checkpoint_dir(tmp_path, extras=True)
    _edit_meta(path, edit)
    before = _snapshot(tmp_path)
    with pytest.raises(error) as e:
        lora.load(path)
    assert str(path) in str(e.value)
    for name in names:
        assert name in str(e.value), (name, str(e.value))
    assert _snapshot(tmp_path) == before


def _orbax_checkpoint(path: Path, arrays: dict, meta: dict) -> None:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(
            path,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
        )


def test_factor_arrays_must_be_floating(tmp_path) -> None:
    path = _checkpoint_dir(tmp_path, name="good")
    meta = json.loads((path / META).read_text())
    ints = {"params": {"dense": {"kernel": {"a": np.ones((3, 2), np.int32), "b": np.ones((2, 4))}}}}
    ints["params"]["proj"] = {"kernel": {"a": np.ones((4, 2)), "b": np.ones((2, 5))}}
    _orbax_checkpoint(tmp_path / "bad", ints, meta)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError) as e:
        lora.load(tmp_path / "bad")
    assert str(tmp_path / "bad") in str(e.value) and f"{D}/a" in str(e.value)
    assert "int32" in str(e.value)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "config, error, names",
    [
        ([1, 2], TypeError, ["'config'", "list"]),
        ({"rank": 2, "colour": "red"}, ValueError, ["'config'", "colour"]),
        ({"rank": -1}, ValueError, ["'config'", "rank"]),
        ({"rank": "2"}, TypeError, ["'config'", "rank"]),
        ({"dtype": "int32"}, TypeError, ["'config'", "dtype"]),
        ({"dtype": 5}, TypeError, ["'config'", "dtype"]),
        ({"dtype": "float99"}, TypeError, ["'config'", "float99"]),
        ({"dropout": 2.0}, ValueError, ["'config'", "dropout"]),
        ({"targets": 3}, TypeError, ["'config'", "targets"]),
    ],
)
def test_bad_stored_config(tmp_path, config, error, names) -> None:
    path = _checkpoint_dir(tmp_path)
    _edit_meta(path, _top("config", config))
    before = _snapshot(tmp_path)
    with pytest.raises(error) as e:
        lora.load_config(path)
    assert str(path) in str(e.value)
    for name in names:
        assert name in str(e.value), (name, str(e.value))
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# 5. random JSON values for each metadata field
# ---------------------------------------------------------------------------------------------
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
_small_ints = st.lists(st.integers(-2, 6), max_size=4)
_EDGES = [math.nan, math.inf, -math.inf, 1e300, 1e6, -1e6, 0.999, 1, True, None, "dense", "conv"]
_EDGES += [0, 2, [0], [3, 4], [0, 1, 2], [], [0, 0], "0", 2**70, [-1, None]]


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _int_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)


# field -> (whether the JSON type is right, whether the value is valid, the loaded attribute)
_ORACLE = {
    "scale": (_number, lambda v: math.isfinite(v) and abs(v) <= 1e6, lambda w: w.scale),
    "dropout": (_number, lambda v: 0 <= v < 1, lambda w: w.dropout),
    "kind": (
        lambda v: isinstance(v, str),
        lambda v: v in ("dense", "conv", "embed"),
        lambda w: w.kind,
    ),
    "in_axes": (_int_list, lambda v: v == [0], lambda w: list(w.in_axes)),
    "kernel_shape": (_int_list, lambda v: v == [3, 4], lambda w: list(w.kernel_shape)),
    "layer_axes": (
        lambda v: isinstance(v, int) and not isinstance(v, bool),
        lambda v: v == 0,
        lambda w: w.layer_axes,
    ),
    "expert_axes": (_int_list, lambda v: v == [], lambda w: list(w.expert_axes)),
    "layer_at": (
        lambda v: isinstance(v, int) and not isinstance(v, bool),
        lambda v: v == 0,
        lambda w: w.layer_at,
    ),
    "layers": (
        lambda v: v is None or _int_list(v),
        lambda v: v is None or (len(set(v)) == len(v) and all(0 <= i < 3 for i in v)),
        lambda w: w.layers if w.layers is None else list(w.layers),
    ),
    "rank": (
        lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
        lambda v: v in (None, 2),
        None,
    ),
    "dora": (lambda v: isinstance(v, bool), lambda v: v is False, None),
}


_FIXTURE = [HealthCheck.function_scoped_fixture]  # each example rewrites the metadata it reads


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    return _checkpoint_dir(tmp_path_factory.mktemp("base"))


@pytest.mark.parametrize("field", sorted(_ORACLE))
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_values_of_a_field(base_checkpoint, tmp_path, field, data) -> None:
    type_ok, valid, attr = _ORACLE[field]
    value = data.draw(st.one_of(_json, _small_ints, st.sampled_from(_EDGES)))
    path = tmp_path / "ck"
    if not path.exists():
        shutil.copytree(base_checkpoint, path)
    original = (path / META).read_bytes()
    try:
        _edit_meta(path, _set(D, field, value))
        before = _snapshot(path)
        try:
            loaded = lora.load(path)
        except (TypeError, ValueError) as e:
            assert str(path) in str(e) and D in str(e), str(e)
            assert not (type_ok(value) and valid(value)), (value, str(e))
            if not type_ok(value):
                assert isinstance(e, TypeError) and f"'{field}'" in str(e), str(e)
        else:
            assert type_ok(value) and valid(value), value
            w = loaded["params"]["dense"]["kernel"]
            if attr is not None:
                assert attr(w) == value
            _assert_is(loaded, 0)
        assert _snapshot(path) == before
    finally:
        (path / META).write_bytes(original)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(version=st.one_of(_json, st.sampled_from([1, 1.0, 2, 0])))
def test_random_versions(base_checkpoint, version) -> None:
    meta = json.loads((base_checkpoint / META).read_text())
    target = base_checkpoint.parent / "v"
    if not target.exists():
        shutil.copytree(base_checkpoint, target)
    (target / META).write_text(json.dumps({**meta, "version": version}))
    if type(version) is int and version == 1:
        _assert_is(lora.load(target), 0)
        return
    for reader in (lora.load, lora.load_config):
        with pytest.raises(ValueError) as e:
            reader(target)
        assert str(target) in str(e.value) and "'version'" in str(e.value)


def test_save_refuses_stacked_extras_by_path(tmp_path) -> None:
    # lora.stack's trained copies and token deltas, without the stacked factors: a checkpoint
    # holds one adapter set (each set is saved before stacking), so save names them.
    stacked = lora.stack([_adapters(0, extras=True), _adapters(1, extras=True)])
    kept = ("head", "embed")
    only_extras = {"params": {k: v for k, v in stacked["params"].items() if k in kept}}
    with pytest.raises(TypeError) as e:
        lora.save(tmp_path / "out", only_extras)
    assert "lora.save" in str(e.value)
    assert "head/bias" in str(e.value) and "embed/embedding" in str(e.value)
    assert not (tmp_path / "out").exists()
