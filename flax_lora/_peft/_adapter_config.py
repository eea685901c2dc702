"""PEFT's ``adapter_config.json`` both ways: the fields `save_peft` writes, the checks
`load_peft` makes, and each module's rank and scale from ``r`` / ``lora_alpha`` and the patterns.

PEFT resolves a module's rank and alpha by ``rank_pattern`` / ``alpha_pattern`` (the first key
``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``), else ``r`` / ``lora_alpha``; its scale is
``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``. `save_peft` writes ranks and
alphas that differ between modules resolved, one pattern entry per module.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from flax_lora import _regex
from flax_lora._adapters._weights import LoraWeights
from flax_lora._config import LoraConfig
from flax_lora._peft._config_checks import CHECKS, REQUIRED
from flax_lora._peft._names import CONFIG_NAME

TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
# init_lora_weights values with which PEFT rewrites the base weights when it makes the adapter
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
MAX_CONFIG_BYTES = 16 * 2**20  # an adapter_config.json is a few kilobytes
# adapter_config.json fields that change the adapted model in ways these adapters cannot express.
_UNSUPPORTED = {
    "lora_bias": "a bias on lora_B",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "Activated LoRA",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
}
_DEFAULTS = {  # the fields save_peft writes as PEFT's defaults
    "peft_type": "LORA",
    "auto_mapping": None,
    "revision": None,
    "inference_mode": True,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "init_lora_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "layer_replication": None,
    "loftq_config": {},
    "megatron_config": None,
    "megatron_core": "megatron.core",
}


# -- write ---------------------------------------------------------------------------------------
def alpha_for(path: str, w: LoraWeights, config: LoraConfig | None, rslora: bool) -> float:
    """The alpha giving ``w.scale`` at rank ``w.rank`` by PEFT's formula, exactly if possible:
    the config's (``config.alpha_for``) when it reproduces the scale, else derived from it."""
    denom = math.sqrt(w.rank) if rslora else w.rank
    scale = float(w.scale)
    if config is not None:
        alpha = config.alpha_for(path)
        if alpha / denom == scale:
            return alpha
    alpha = scale * denom
    for candidate in (alpha, math.nextafter(alpha, math.inf), math.nextafter(alpha, -math.inf)):
        if candidate / denom == scale:
            return candidate
    return alpha


def config_json(
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
    config: LoraConfig | None,
    dropout: float,
    parameters: Collection[str] = (),
    **fields: Any,
) -> dict[str, Any]:
    """The ``adapter_config.json`` of modules with these ranks and alphas (by module name):
    ``r`` / ``lora_alpha`` the config's (without one: the most common), the others as one
    ``rank_pattern`` / ``alpha_pattern`` entry per module (longest names first, so PEFT's
    suffix matching picks each module's own entry); ``dropout`` is used without a config;
    ``parameters`` are the names (``"<module>.<param>"``) that go to ``target_parameters``
    instead of ``target_modules``; ``fields`` are written as given."""
    if config is not None:
        r0, alpha0, dropout = int(config.rank), float(config.alpha), float(config.dropout)
    else:
        r0 = collections.Counter(ranks.values()).most_common(1)[0][0]
        alpha0 = collections.Counter(alphas.values()).most_common(1)[0][0]
    order = sorted(ranks, key=lambda n: (-len(n), n))  # longest first: each finds its own entry
    differ = any(r != r0 for r in ranks.values())
    rank_pattern = {n: ranks[n] for n in order} if differ else {}
    differ = any(a != alpha0 for a in alphas.values())
    alpha_pattern = {n: _json_number(alphas[n]) for n in order} if differ else {}
    targeted = {"target_parameters": sorted(parameters)} if parameters else {}
    return (
        _DEFAULTS
        | targeted
        | {
            "r": r0,
            "lora_alpha": _json_number(alpha0),
            "lora_dropout": dropout,
            "target_modules": sorted(n for n in ranks if n not in parameters),
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "use_rslora": bool(config.rslora) if config is not None else False,
            **fields,
        }
    )


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


# -- read ----------------------------------------------------------------------------------------
def read_config(directory: Path) -> tuple[dict[str, Any], str]:
    """The directory's ``adapter_config.json``, checked, with every field `load_peft` uses
    normalised (`flax_lora._peft._config_checks`), and the SHA-256 of its bytes.

    Raises:
      ValueError: no such file; a file over ``MAX_CONFIG_BYTES``, not UTF-8 or not JSON; not
        a LoRA adapter; options these adapters cannot honour (loading part of it would
        silently change the model); no ``r`` or ``lora_alpha``; a field out of range.
      TypeError: the file is not a JSON object, or a field has the wrong JSON type.

    Warns:
      UserWarning: a PEFT init that rewrites the base weights (the adapter fits that base only).
    """
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise ValueError(f"load_peft: {str(directory)!r} has no {CONFIG_NAME}.")
    with open(file, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(
            f"load_peft: {str(file)!r} is larger than {MAX_CONFIG_BYTES} bytes; an adapter "
            "config is a few kilobytes."
        )
    cfg = _parse(file, raw)
    missing = [key for key in REQUIRED if key not in cfg]
    if missing:
        raise ValueError(f"load_peft: {str(file)!r} has no {' or '.join(map(repr, missing))}.")
    checked = {}
    for key, check in CHECKS.items():
        if key in cfg:
            try:
                checked[key] = check(cfg[key])
            except (TypeError, ValueError) as e:
                raise type(e)(f"load_peft: {str(file)!r}: field {key!r}{e}.") from None
    cfg |= checked
    problems = [
        f"{key}={cfg[key]!r} ({what})" for key, what in _UNSUPPORTED.items() if cfg.get(key)
    ]
    if problems:
        raise ValueError(
            f"load_peft: {str(file)!r} uses PEFT options that flax_lora adapters cannot honour: "
            f"{', '.join(problems)}. Only LoRA (optionally rsLoRA, rank/alpha patterns) "
            "DoRA, modules_to_save, trainable_token_indices and bias are supported; loading part "
            "of it would silently change the model."
        )
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        warnings.warn(
            f"load_peft: {str(file)!r} was initialised with init_lora_weights="
            f"{init!r}, which changes the base weights: pass the params of "
            "that changed base, or convert the adapter in PEFT first (save_pretrained with "
            "path_initial_model_for_weight_conversion) to use it on the original base.",
            stacklevel=3,  # read_config <- load_peft <- the caller
        )
    return cfg, hashlib.sha256(raw).hexdigest()


def _parse(file: Path, raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``.

    Raises:
      ValueError: not UTF-8, not JSON (or nested too deeply to parse).
      TypeError: JSON, but not an object.
    """
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        what = "UTF-8" if isinstance(e, UnicodeDecodeError) else "JSON"
        raise ValueError(
            f"load_peft: {str(file)!r} is not valid {what}: {type(e).__name__}: {str(e)[:200]}."
        ) from None
    if not isinstance(cfg, dict):
        raise TypeError(
            f"load_peft: {str(file)!r} must hold a JSON object of PEFT's fields; got "
            f"{type(cfg).__name__}."
        )
    return cfg


def rank_and_scale(cfg: Mapping[str, Any], name: str) -> tuple[int, float]:
    """The rank and scale PEFT gives the module ``name``."""
    r = int(_pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"]))
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"]))
    return r, alpha / (math.sqrt(r) if cfg.get("use_rslora", False) else r)


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in patterns.items():
        if _regex.search(rf"\A(.*\.)?({key})$", name, "adapter_config.json: pattern key"):
            return value
    return default
