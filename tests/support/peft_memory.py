"""Hostile 1 GiB PEFT adapter files (sparse: nothing is written but a few KiB) and the memory a
``load_peft`` of each costs, measured in a process of its own.

``make_cases(root)`` writes one adapter directory per case under ``root`` (beside a valid small
one, ``good``); ``python -m support.peft_memory <root> <case>...`` (tests/ on ``PYTHONPATH``)
loads ``good`` once (imports, first compilations), then each case, and prints ``RESULT
<json>``: per case the error (``"<type>: <message>"``; ``None`` if it loaded), the seconds,
and the peak resident memory during the call above the resident memory before it (Linux: the
peak is reset through ``/proc/self/clear_refs``; elsewhere the growth of ``ru_maxrss``).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

import flax_lora as lora

GIB = 1 << 30
PREFIX = "base_model.model."
A_NAME, B_NAME = f"{PREFIX}lin.lora_A.weight", f"{PREFIX}lin.lora_B.weight"
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin"]}
PARAMS = {"params": {"lin": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros((3,))}}}


def header_file(path: Path, entries: dict[str, tuple[str, tuple[int, ...]]], size: int) -> None:
    """A safetensors file at ``path`` whose header declares ``entries`` (name -> dtype, shape)
    back to back, every data byte zero, the file made ``size`` bytes long (sparse)."""
    header, at = {}, 0
    for name, (dtype, shape) in entries.items():
        n = int(np.prod(shape)) * {"F32": 4, "F16": 2}[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(size if size else 8 + len(raw) + at)


def make_cases(root: Path) -> list[str]:
    """The case directories under ``root`` (and ``good``); returns the case names."""
    rng = np.random.default_rng(0)
    small = {A_NAME: ("F32", (2, 4)), B_NAME: ("F32", (3, 2))}
    cases: dict[str, tuple[dict[str, Any], Any]] = {
        # random bytes, 1 GiB: the header length is random
        "junk": ({}, rng.bytes(4096)),
        # a header length that fits the file exactly, 1 GiB of "header"
        "junk_header": ({}, (GIB - 8).to_bytes(8, "little") + rng.bytes(4088)),
        # valid headers, 1 GiB of data declared for one tensor
        "huge_factor": ({}, {A_NAME: ("F32", (2, GIB // 8)), B_NAME: ("F32", (3, 2))}),
        "huge_other_module": (
            {},
            small
            | {
                f"{PREFIX}other.lora_A.weight": ("F32", (2, GIB // 8)),
                f"{PREFIX}other.lora_B.weight": ("F32", (3, 2)),
            },
        ),
        # a rank that fits the config and the kernel's features, 1.75 GiB of factors
        "huge_rank": (
            {"r": GIB // 16},
            {A_NAME: ("F32", (GIB // 16, 4)), B_NAME: ("F32", (3, GIB // 16))},
        ),
        "huge_bias": ({"bias": "all"}, small | {f"{PREFIX}lin.bias": ("F32", (GIB // 4,))}),
        "huge_unlisted": ({}, small | {f"{PREFIX}head.weight": ("F32", (GIB // 4,))}),
    }
    good = root / "good"
    good.mkdir(parents=True)
    (good / "adapter_config.json").write_text(json.dumps(CONFIG))
    header_file(good / "adapter_model.safetensors", small, 0)
    for name, (config, content) in cases.items():
        d = root / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps(CONFIG | config))
        file = d / "adapter_model.safetensors"
        if isinstance(content, bytes):
            with open(file, "wb") as f:
                f.write(content)
                f.truncate(GIB)
        else:
            header_file(file, content, 0)
    return list(cases)


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def measure(directory: Path) -> dict[str, Any]:
    """One ``load_peft`` of ``directory``: its error, seconds and extra peak memory (MiB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current
        before, peak_of = _rss_kib("VmRSS"), lambda: _rss_kib("VmHWM")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        lora.load_peft(directory, PARAMS)
        error = None
    except Exception as e:  # reported, judged by the caller
        error = f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    return {"error": error, "seconds": seconds, "extra_mib": (peak_of() - before) / 1024}


def main(root: Path, cases: list[str]) -> None:
    lora.load_peft(root / "good", PARAMS)
    result = {case: measure(root / case) for case in cases}
    result["file_bytes"] = {
        c: os.path.getsize(root / c / "adapter_model.safetensors") for c in cases
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
