"""`lora.save` killed (SIGKILL) at every step of its publish and at random moments, with the
directory exchange and with the two-rename fallback; and two processes saving one path at once.

The processes are those of benchmarks/kill_save.py (which runs 100+ such trials): each saves
3 MiB of adapters over an existing checkpoint and is killed at the n-th rename of the publish
(it wraps ``flax_lora._atomic.rename`` to kill itself right before or after it) or by its parent
at a uniformly random time during its saves. After each kill this process loads the path and
compares every array exactly with the numpy arrays of the old or the new version, then saves
once more and checks that no staging folder is left.
"""

from __future__ import annotations

import random

import pytest

from benchmarks import kill_save


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = kill_save.Server(tmp_path_factory.mktemp("kill_save") / "server.log")
    yield s
    s.close()


def _no_failure(results: list[dict]) -> None:
    failures = [r for r in results if r["state"] == "failure"]
    assert failures == [], failures


def test_kills_at_each_rename_of_the_publish(server, tmp_path) -> None:
    """Each kill point, and what the path must hold after it: the old checkpoint before the
    exchange (or the first rename), the new one after it; between the two renames of the
    fallback the path is missing, and the next reader puts the old one back (the `load` of the
    check, or on odd trials the ``overwrite=False`` save that precedes it)."""
    cases = [  # (publish, (n-th rename, before / after), state, path missing after the kill)
        ("exchange", (1, "before"), "old", False),
        ("exchange", (1, "after"), "new", False),
        ("fallback", (1, "before"), "old", False),
        ("fallback", (1, "after"), "old", True),  # between the renames: restored by lora.save
        ("fallback", (2, "after"), "new", False),
        ("fallback", (3, "after"), "new", False),
        ("fallback", (1, "after"), "old", True),  # the same: restored by lora.load
    ]
    specs = [{"publish": p, "kill": list(k)} for p, k, _, _ in cases]
    results = kill_save.run_trials(server, specs, tmp_path)
    _no_failure(results)
    for (publish, (n, _when), state, missing), r in zip(cases, results, strict=True):
        assert r["signal"] == 9, r
        assert len(r["renames"]) == n, r  # killed at the n-th rename, not before or after
        assert r["renames"][0] == ("1 exchange" if publish == "exchange" else "1 replace"), r
        assert (r["state"], r["missing"]) == (state, missing), r
        assert r["staging_after_kill"] == 1 and r["staging_left"] == 0, r


def test_kills_at_random_times(server, tmp_path) -> None:
    save_s = kill_save.calibrate(server, tmp_path)
    rng = random.Random(1)
    # the kill falls within the first three saves' calibrated time, and the process has forty
    # to make (each built just before it begins): on a loaded machine, where the calibration
    # may have run many times slower than the trial's saves, the process still ends killed
    specs = [
        {"publish": p, "saves": 40, "after_s": rng.uniform(0.0, 3 * save_s)}
        for p in ("exchange", "fallback", "exchange", "fallback")
    ]
    results = kill_save.run_trials(server, specs, tmp_path)
    _no_failure(results)
    assert all(r["signal"] == 9 for r in results), results


@pytest.mark.parametrize("publish", ["exchange", "fallback"])
def test_two_processes_save_one_path_at_once(server, tmp_path, publish) -> None:
    """Each of two processes saves four versions to the same path at the same time: every save
    succeeds, the path holds the last version of one of them, and no staging folder is left."""
    (result,) = kill_save.run_trials(server, [{"publish": publish, "concurrent": True}], tmp_path)
    _no_failure([result])
