"""The safetensors side of a PEFT adapter directory: writing both files, reading the tensors.

`write_adapter` replaces ``adapter_model.safetensors`` and ``adapter_config.json`` through
temporary files, so a reader never sees half a file; `read_tensors` groups the LoRA tensors by
module (the JSON side is read by `flax_lora._peft._adapter_config.read_config`).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from flax_lora._paths import describe
from flax_lora._peft._layout import PAIRS, SUFFIXES
from flax_lora._peft._names import CONFIG_NAME, MAGNITUDE, PREFIX, WEIGHTS_NAME


def write_adapter(directory: Path, tensors: dict[str, np.ndarray], config: dict[str, Any]) -> Path:
    """Writes the tensors (full names) and the config into ``directory`` (created); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp_w = directory / f".{WEIGHTS_NAME}.{tag}"
    tmp_c = directory / f".{CONFIG_NAME}.{tag}"
    try:
        save_file(tensors, str(tmp_w), metadata={"format": "pt"})
        tmp_c.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_w, directory / WEIGHTS_NAME)
        os.replace(tmp_c, directory / CONFIG_NAME)
    finally:
        for tmp in (tmp_w, tmp_c):
            tmp.unlink(missing_ok=True)
    return directory


def read_tensors(
    directory: Path,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """``{module name: {tensor name after the module name: tensor}}`` of the LoRA tensors, and
    the other tensors by name (prefix removed: modules_to_save, biases, trainable tokens).

    Raises:
      ValueError: no safetensors file; a module's factors are incomplete; no LoRA tensors.
    """
    file = directory / WEIGHTS_NAME
    if not file.is_file():
        other = [p.name for p in directory.glob("adapter_model.*")]
        raise ValueError(
            f"load_peft: {str(directory)!r} has no {WEIGHTS_NAME}"
            + (f" (found {other}; only safetensors are read)." if other else ".")
        )
    modules: dict[str, dict[str, np.ndarray]] = {}
    others: dict[str, np.ndarray] = {}
    for key, value in load_file(str(file)).items():
        name = key.removeprefix(PREFIX)
        suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            others[name] = value
        else:
            modules.setdefault(name.removesuffix(suffix), {})[suffix] = value
    incomplete = [n for n, t in modules.items() if set(t) - {MAGNITUDE} not in PAIRS]
    if incomplete:
        raise ValueError(
            f"load_peft: {str(file)!r} lacks a lora_A/lora_B partner for modules "
            f"{describe(incomplete)}."
        )
    if not modules:
        raise ValueError(f"load_peft: {str(file)!r} holds no LoRA tensors.")
    return modules, others
