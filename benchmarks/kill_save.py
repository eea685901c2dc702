"""Kill `lora.save` at random moments and check that nothing is lost.

Each trial starts a process that saves adapters of a few MiB (12 kernels 512x512, rank 64,
float32: 3 MiB) over an existing checkpoint and SIGKILLs it:

- at a rename of the publish: the process wraps ``flax_lora._checkpoint._atomic.rename`` (every
  rename of a save goes through it) to kill itself right before or after the n-th one, i.e.
  before, between and after the renames;
- at a uniformly random time while it saves (several saves back to back): killed by its parent;

each with the directory exchange (``renameat2(RENAME_EXCHANGE)``) and with the two-rename
fallback (the wrapper makes the exchange fail with EINVAL, as on a system without it). After the
kill, this process checks that the path loads the complete old or the complete new checkpoint
(every array compared exactly with the numpy arrays it was made from; on every other trial it
first tries ``lora.save(..., overwrite=False)``, which must find a checkpoint there, restored if
the kill left it aside), then saves once more and checks that no staging folder is left.
A "concurrent" trial has two processes save the same path at once (no kill): both must succeed.

The trial processes are forked by one server process that has imported jax, orbax and
flax_lora but started no backend and no thread (importing jax is the slow part); each forked
process starts its own CPU backend.

Run:  python benchmarks/kill_save.py [--trials 120] [--seed 0] [--dir /tmp/kill_save]
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)

import jax
import jax.numpy as jnp
import numpy as np
from support.internal import _atomic  # tests/support/internal.py: the one way to private names

import flax_lora as lora

ROOT = Path(__file__).resolve().parents[1]
KERNELS, WIDTH, RANK = 12, 512, 64
KILLS = {  # publish -> the renames a kill is injected at: (n-th rename, before / after it)
    "exchange": [(1, "before"), (1, "after")],
    "fallback": [(1, "before"), (1, "after"), (2, "after"), (3, "after")],
}
TRIAL_TIMEOUT_S = 120.0


def arrays(version: int) -> dict[str, np.ndarray]:
    """The reference arrays of adapter set ``version``, by path."""
    rng = np.random.default_rng(version)
    out = {}
    for i in range(KERNELS):
        out[f"params/l{i}/kernel/a"] = rng.standard_normal((WIDTH, RANK), np.float32)
        out[f"params/l{i}/kernel/b"] = rng.standard_normal((RANK, WIDTH), np.float32)
    return out


def adapters(version: int) -> Any:
    x = arrays(version)
    return {
        "params": {
            f"l{i}": {
                "kernel": lora.LoraWeights(
                    a=jnp.asarray(x[f"params/l{i}/kernel/a"]),
                    b=jnp.asarray(x[f"params/l{i}/kernel/b"]),
                    scale=0.25,
                    in_axes=(0,),
                    kernel_shape=(WIDTH, WIDTH),
                )
            }
            for i in range(KERNELS)
        }
    }


# ---------------------------------------------------------------------------------------------
# the server and its forked trial processes
# ---------------------------------------------------------------------------------------------
def _child(spec: dict[str, Any], out: Any) -> None:
    """One trial process: saves ``spec["versions"]`` to ``spec["path"]``, reporting to ``out``;
    with ``spec["kill"] = [n, when]`` kills itself at the n-th rename."""
    say = lambda *words: out.write(" ".join(map(str, words)) + "\n")
    original, count = _atomic.rename, [0]
    kill = tuple(spec["kill"]) if spec.get("kill") else None

    def rename(src: Path, dst: Path, mode: str = "replace") -> None:
        if mode == "exchange" and spec["publish"] == "fallback":
            raise OSError(errno.EINVAL, "no exchange in this trial", str(src))
        count[0] += 1
        say("rename", count[0], mode)
        if kill == (count[0], "before"):
            os.kill(os.getpid(), signal.SIGKILL)
        original(src, dst, mode)
        if kill == (count[0], "after"):
            os.kill(os.getpid(), signal.SIGKILL)

    _atomic.rename = rename
    jax.devices()
    say("ready")
    for v in spec["versions"]:
        tree = adapters(v)  # built before its save begins: the kill clock starts at "begin"
        say("begin", v)
        lora.save(spec["path"], tree)
        say("done", v)


def _fork(spec: dict[str, Any]) -> tuple[int, int]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the trial process
        os.close(r)
        os.dup2(2, 1)  # stdout is the server's answer channel
        code = 0
        with os.fdopen(w, "w", buffering=1) as out:
            try:
                _child(spec, out)
            except BaseException:
                out.write("error " + json.dumps(traceback.format_exc()) + "\n")
                code = 1
        os._exit(code)
    os.close(w)
    return pid, r


def _trial(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs one trial process per spec at once; kills each at its ``after_s`` (seconds after
    its first save began, if given); returns what each reported and how it ended."""
    procs = [(spec, *_fork(spec)) for spec in specs]
    reports = []
    for spec, pid, fd in procs:
        events: list[list[Any]] = []
        buf, kill_at, killed = b"", None, False
        deadline = time.monotonic() + TRIAL_TIMEOUT_S
        while True:
            now = time.monotonic()
            wait = min(deadline, kill_at or deadline) - now
            ready = select.select([fd], [], [], max(0.0, wait))[0]
            if not ready:
                os.kill(pid, signal.SIGKILL)
                killed = True
                kill_at = None
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                words = line.decode().split(" ", 1)
                events.append([time.monotonic(), *words])
                if words[0] == "begin" and kill_at is None and not killed and "after_s" in spec:
                    kill_at = time.monotonic() + spec["after_s"]
        os.close(fd)
        status = os.waitpid(pid, 0)[1]
        reports.append(
            {
                "events": events,
                "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                "killed_by_parent": killed,
            }
        )
    return reports


def serve() -> None:
    """Answers each JSON line on stdin (a list of trial specs) with a JSON line of reports."""
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    if threading.active_count() != 1 or threads != 1:
        print(f"kill_save server: {threads} threads before fork", file=sys.stderr)
    for line in sys.stdin:
        print(json.dumps(_trial(json.loads(line))), flush=True)


class Server:
    """The server process, seen from the process that checks the trials."""

    def __init__(self, log: Path) -> None:
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "OPENBLAS_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
            ),
        }
        self.log = open(log, "w")  # noqa: SIM115 - closed by close()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=ROOT,
            env=env,
            text=True,
        )

    def run(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(specs) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the kill_save server died; see {self.log.name}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------------------------------------
# the checks
# ---------------------------------------------------------------------------------------------
def _stagings(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path.parent) if n.startswith(f".{path.name}.saving-"))


def _which(loaded: Any, candidates: list[int]) -> int | None:
    """The version among ``candidates`` whose every array ``loaded`` holds exactly."""
    flat = {
        f"{p}/{f}": np.asarray(getattr(w, f))
        for p, w in _entries(loaded).items()
        for f in ("a", "b")
    }
    for v in candidates:
        want = arrays(v)
        if set(flat) == set(want) and all(
            flat[k].dtype == x.dtype and np.array_equal(flat[k], x) for k, x in want.items()
        ):
            return v
    return None


def _entries(tree: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: isinstance(x, lora.LoraWeights)
    )
    return {"/".join(str(k.key) for k in kp): w for kp, w in leaves}


def check(path: Path, old: int, report: dict[str, Any], probe: bool, after: int) -> dict:
    """After a killed save of versions following ``old``: which complete checkpoint ``path``
    holds (``"old"`` / ``"new"``, else a failure), then one more save (``after``) and no
    staging folder left. ``probe``: first ``save(..., overwrite=False)``, which must refuse."""
    begun = [int(e[2]) for e in report["events"] if e[1] == "begin"]
    new = begun[-1] if begun else old
    prior = begun[-2] if len(begun) > 1 else old
    out = {
        "missing": not os.path.lexists(path),
        "staging_after_kill": len(_stagings(path)),
        "signal": report["signal"],
        "renames": [e[2] for e in report["events"] if e[1] == "rename"],
        "in_publish": bool(report["events"]) and report["events"][-1][1] == "rename",
    }
    errors = [e[2] for e in report["events"] if e[1] == "error"]
    if errors:
        return {**out, "state": "failure", "why": json.loads(errors[0])}
    if probe:
        try:
            lora.save(path, adapters(after), overwrite=False)
        except ValueError:
            pass
        else:
            return {**out, "state": "failure", "why": "overwrite=False found no checkpoint"}
    try:
        got = _which(lora.load(path), [new, prior] if new != prior else [new])
    except Exception as e:
        return {**out, "state": "failure", "why": f"load: {type(e).__name__}: {e}"}
    if got is None:
        return {**out, "state": "failure", "why": f"neither version {prior} nor {new}"}
    lora.save(path, adapters(after))
    left = _stagings(path)
    if left or _which(lora.load(path), [after]) != after:
        return {**out, "state": "failure", "why": f"after the next save: {left}"}
    state = "new" if got == new and new != old else "old"
    return {**out, "state": state, "staging_left": len(left)}


def plan(n: int, rng: random.Random, window_s: float) -> list[dict[str, Any]]:
    """``n`` trials: the injected kills of both publishes, then kills at random times, in turn;
    one concurrent trial per publish."""
    injected = [{"publish": p, "kill": list(k)} for p, ks in KILLS.items() for k in ks]
    randoms = [{"publish": p, "saves": 3} for p in KILLS]
    out = [{"publish": p, "concurrent": True} for p in KILLS]
    i = 0
    while len(out) < n:
        pool = injected if i % 2 == 0 else randoms
        spec = dict(pool[(i // 2) % len(pool)])
        if "saves" in spec:
            spec["after_s"] = rng.uniform(0.0, window_s * spec["saves"])
        out.append(spec)
        i += 1
    return out


def run_trials(
    server: Server, specs: list[dict[str, Any]], folder: Path, start: int = 1
) -> list[dict]:
    """Runs and checks ``specs`` in ``folder``; returns one result per trial."""
    path = folder / "ck"
    version = start
    lora.save(path, adapters(version))
    results = []
    for i, spec in enumerate(specs):
        if spec.get("concurrent"):
            a = [version + 1 + k for k in range(4)]
            b = [version + 11 + k for k in range(4)]
            reports = server.run(
                [{"path": str(path), "publish": spec["publish"], "versions": vs} for vs in (a, b)]
            )
            ok = all(r["exit"] == 0 for r in reports) and not _stagings(path)
            got = _which(lora.load(path), [a[-1], b[-1]])
            why = None if ok and got is not None else [r["events"][-1] for r in reports]
            results.append({**spec, "state": "new" if why is None else "failure", "why": why})
            version += 20
            lora.save(path, adapters(version))
            continue
        n = spec.get("saves", 1)
        versions = [version + 1 + k for k in range(n)]
        (report,) = server.run([{**spec, "path": str(path), "versions": versions}])
        after = version + n + 1
        result = check(path, version, report, probe=i % 2 == 1, after=after)
        results.append({**spec, **result})
        version = after
    return results


def calibrate(server: Server, folder: Path) -> float:
    """Seconds one save takes in a trial process (the median of three)."""
    path = folder / "calibrate"
    (report,) = server.run(
        [{"path": str(path), "publish": "exchange", "versions": [901, 902, 903]}]
    )
    times = {(e[1], e[2]): e[0] for e in report["events"] if e[1] in ("begin", "done")}
    spans = sorted(times[("done", str(v))] - times[("begin", str(v))] for v in (901, 902, 903))
    shutil.rmtree(path, ignore_errors=True)
    return spans[1]


def summary(results: list[dict]) -> dict[str, int]:
    return {
        "trials": len(results),
        "old loaded": sum(r["state"] == "old" for r in results),
        "new loaded": sum(r["state"] == "new" for r in results),
        "killed after a publish rename began": sum(bool(r.get("in_publish")) for r in results),
        "path missing after the kill (restored)": sum(bool(r.get("missing")) for r in results),
        "staging right after the kill": sum(bool(r.get("staging_after_kill")) for r in results),
        "staging left after the next save": sum(bool(r.get("staging_left")) for r in results),
        "failures": sum(r["state"] == "failure" for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    folder = Path(args.dir or tempfile.mkdtemp(prefix="kill_save-"))
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    server = Server(folder / "server.log")
    try:
        save_s = calibrate(server, folder)
        specs = plan(args.trials, random.Random(args.seed), save_s)
        results = run_trials(server, specs, folder)
    finally:
        server.close()
    wall = time.perf_counter() - t0
    print(f"one save of {KERNELS * 2 * WIDTH * RANK * 4 / 2**20:.0f} MiB: {save_s:.2f} s")
    kind = lambda r: "concurrent" if "concurrent" in r else "timed" if "after_s" in r else "rename"
    for k in ("rename", "timed", "concurrent"):
        for publish in KILLS:
            sub = [r for r in results if r["publish"] == publish and kind(r) == k]
            print(
                f"{k} {'saves' if k == 'concurrent' else 'kills'}, {publish}:",
                json.dumps(summary(sub)),
            )
    print("all:", json.dumps(summary(results)))
    for r in results:
        if r["state"] == "failure":
            print("FAILURE", json.dumps(r)[:2000])
    print(f"wall time {wall:.1f} s")
    sys.exit(1 if any(r["state"] == "failure" for r in results) else 0)


if __name__ == "__main__":
    main()
