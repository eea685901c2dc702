"""`lora.save_peft`: adapters as a HuggingFace PEFT LoRA adapter directory.

The LoRA factors go through `flax_lora._peft._layout` (one PEFT module per kernel, or per layer
of a layered kernel: `flax_lora._peft._layered`), the trained copies and token deltas through
`flax_lora._peft._extras`, the ranks and alphas into `flax_lora._peft._adapter_config`.
"""

from __future__ import annotations

import collections
import os
import warnings
from pathlib import Path

import numpy as np

from flax_lora._adapters import LoraWeights, adapter_table, is_lora
from flax_lora._config import LoraConfig
from flax_lora._extras import split
from flax_lora._paths import describe
from flax_lora._peft._adapter_config import (
    BASE_CHANGING_INITS,
    TASK_TYPES,
    alpha_for,
    config_json,
)
from flax_lora._peft._extras import Extra, save_extras
from flax_lora._peft._files import write_adapter
from flax_lora._peft._layered import Module, layer_modules
from flax_lora._peft._layout import to_peft
from flax_lora._peft._names import LAYER, PREFIX, KeyMap, Namer, namer
from flax_lora._typing import PyTree


def save_peft(
    directory: str | os.PathLike[str],
    adapters: PyTree,
    config: LoraConfig | None = None,
    key_map: KeyMap = None,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    params: PyTree = None,
) -> Path:
    """Writes adapters as a HuggingFace PEFT LoRA adapter (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads onto the
    PyTorch twin of the Flax model.

    Every factor is written as float32; DoRA adapters (all or none of the set) also write their
    magnitudes (``<module>.lora_magnitude_vector``) with ``use_dora: true``. ``target_modules``
    lists the module names; ranks and alphas that differ between modules are written resolved,
    as one ``rank_pattern`` / ``alpha_pattern`` entry per module (longest names first, so PEFT's
    suffix matching picks each module's own entry). Each module's alpha is the config's
    (``config.alpha_for``) when it reproduces the adapter's scale, else derived from the scale
    (``scale * r``, or ``scale * sqrt(r)`` with rsLoRA), so adapters from ``lora.combine`` save
    correctly too.

    Trained copies and token deltas (``LoraConfig(modules_to_save=..., bias=...,
    trainable_token_indices=...)``) are written in PEFT's names: a ``modules_to_save`` module's
    leaves as ``<module>.weight`` / ``.bias`` (a 2-D Dense kernel transposed; kernels of 3 or
    more dimensions are refused, their PyTorch layout being ambiguous) with the module names
    in ``modules_to_save``; trained biases as
    ``<module>.bias`` (``<module>.base_layer.bias`` for a module with LoRA factors) with
    ``bias`` set to ``config.bias`` (without a config: ``"lora_only"`` when every trained bias
    belongs to a module with LoRA factors, else ``"all"``); token deltas as
    ``<embedding>.token_adapter.trainable_tokens_delta``, which in PEFT holds the trained rows
    ``W0[ids] + delta`` (so ``params`` is needed), with ``trainable_token_indices`` ``{module:
    ids}``. A leaf's module name is the key map's name of the leaf's path, or else of its
    module's ``kernel`` / ``embedding``.

    A scan-stacked adapter (`LoraWeights.layer_axes` ``== 1``) is written as one module per
    adapted layer (all ``L``, or its ``layers``), each as the single-layer adapter of that layer's
    kernel: its key-map name must contain ``{layer}`` (``"layers.{layer}.attn.query"``), replaced
    by the layer index; ``target_modules`` / ``rank_pattern`` / ``alpha_pattern`` list the
    per-layer names.

    Note: PEFT matches a listed name also as a suffix (``lin`` targets ``block.lin`` too); an
    extra module PEFT adapts that way starts with PEFT's no-op initialisation (``B = 0``), so the
    loaded model is unchanged, but PEFT may warn about missing keys.

    Example:
      >>> lora.save_peft("/tmp/adapter", adapters, config)
      >>> # PyTorch: PeftModel.from_pretrained(torch_model, "/tmp/adapter")
      >>> # nn.scan-stacked blocks (params/layers/q/kernel (L, d, d)) -> layers.0.q, layers.1.q, ...
      >>> key_map = lambda p: p.removeprefix("params/").replace("layers/", "layers.{layer}.")[:-7]
      >>> lora.save_peft("/tmp/adapter", adapters, config, key_map=key_map)
      >>> # a classifier head (modules_to_save) for BertForSequenceClassification
      >>> lora.save_peft("/tmp/cls", adapters, config, key_map=cls_map, task_type="SEQ_CLS")

    Args:
      directory: the output directory (created; the two files in it are replaced).
      adapters: adapters from `lora.init`, `lora.load`, `lora.load_peft`, ... (kinds ``dense``,
        ``conv`` with Flax's ``(*window, in, out)`` layout, and ``embed`` with a 2-D table).
      config: the `LoraConfig` they were made with (for ``r``, ``lora_alpha``, ``use_rslora``,
        ``lora_dropout``). ``None`` takes the most common rank, alphas from the scales and no
        rsLoRA.
      key_map: kernel path -> PyTorch module name, as a function (returning ``None`` for a path
        without a twin) or a dict; ``None`` drops a leading ``params`` and the leaf name and
        joins with ``"."``. A leading ``base_model.model.`` in a returned name is ignored.
        The name of a scan-stacked kernel must contain ``{layer}`` (so the default key map
        cannot name one), that of a single-layer kernel must not.
      base_model_name_or_path: written to the config (e.g. the Hub id of the base model).
      task_type: PEFT's ``task_type`` (``"SEQ_CLS"``, ``"CAUSAL_LM"``, ``"SEQ_2_SEQ_LM"``,
        ``"TOKEN_CLS"``, ``"QUESTION_ANS"``, ``"FEATURE_EXTRACTION"``), so that
        ``PeftModel.from_pretrained`` builds the matching model class (``"SEQ_CLS"`` adds
        PEFT's ``classifier`` / ``score`` to ``modules_to_save``); ``None``: none.
      params: the base params, needed only for token deltas (PEFT stores the trained rows).

    Returns:
      The directory's absolute path.

    Raises:
      ValueError: the tree is empty; the key map names no module (or one module twice) for
        some paths, which are listed; an unknown ``task_type``; token deltas without
        ``params``; a stacked kernel's name lacks ``{layer}`` (or an
        unstacked one's has it), or a kernel has more than one layer axis (nested scans); an
        adapter has a layout PEFT cannot express.

    Warns:
      UserWarning: ``config.init`` is ``"pissa"``, ``"olora"`` or ``"loftq"`` (the adapters
        belong to the changed base `lora.init` returned, not to the original one PEFT loads).
    """
    table, extras = _parts(adapters)
    _check_options(config, task_type)
    name_of = namer(key_map)
    modules = _modules(table, name_of, default=key_map is None)
    _check_dora(table)
    rslora = bool(config.rslora) if config is not None else False
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path, name, w in modules:
        tensors |= {f"{PREFIX}{name}{key}": t for key, t in to_peft(path, w).items()}
        ranks[name] = w.rank
        alphas[name] = alpha_for(path, w, config, rslora)
    extra_tensors, fields = save_extras(
        extras, name_of, {m.name for m in modules}, table, params, config
    )
    peft_config = config_json(
        ranks,
        alphas,
        config,
        dropout=float(next(iter(table.values())).dropout),
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        use_dora=any(w.m is not None for w in table.values()),
        **fields,
    )
    return write_adapter(Path(directory).absolute(), tensors | extra_tensors, peft_config)


def _parts(adapters: PyTree) -> tuple[dict[str, LoraWeights], dict[str, Extra]]:
    """The adapters' LoRA entries and their other entries, by path.

    Raises:
      ValueError: no LoRA entries.
    """
    table = adapter_table(adapters)
    extras = split(adapters, is_lora)[1]
    if not table:
        raise ValueError(
            "lora.save_peft: the adapter tree holds no LoRA factors"
            + (" (only trained copies / token deltas)." if extras else " (it is empty).")
        )
    return table, extras


def _check_options(config: LoraConfig | None, task_type: str | None) -> None:
    """Checks ``config`` and ``task_type``; warns for a config whose init changed the base."""
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(
            f"save_peft: task_type must be one of {TASK_TYPES} or None; got {task_type!r}."
        )
    if config is not None and not isinstance(config, LoraConfig):
        raise TypeError(f"save_peft: config must be a LoraConfig; got {type(config).__name__}.")
    if config is not None and config.init.startswith(BASE_CHANGING_INITS):
        warnings.warn(
            f"save_peft: these adapters were made with init={config.init!r}, which also changed "
            "the base weights (lora.init returned new params); PEFT will load them onto the "
            "original base, where they give a different model. Export the changed base too, or "
            "lora.merge them into it and use that merged model.",
            stacklevel=3,  # _check_options <- save_peft <- the caller
        )


def _modules(table: dict[str, LoraWeights], name_of: Namer, default: bool) -> list[Module]:
    """The PEFT modules the adapters make, layer by layer for layered kernels; ``default``:
    the key map is the default one.

    Raises:
      ValueError: kernels without a module name, or several with one module name; layered
        kernels named by the default key map (or a name that does not fit a kernel).
    """
    names = {path: name_of(path) for path in table}
    unmapped = [path for path, name in names.items() if name is None]
    if unmapped:
        raise ValueError(
            f"save_peft: key_map gives no PyTorch module name for the adapters at "
            f"{describe(unmapped)}; every adapted kernel needs one."
        )
    layered = [p for p, w in table.items() if w.layer_axes]
    if default and layered:
        raise ValueError(
            f"save_peft: {describe(layered)} adapt scan-stacked kernels (a leading layer axis), "
            "which PEFT stores as one module per layer; pass a key_map whose names for them "
            f"contain {LAYER!r} (e.g. 'layers.{LAYER}.attn.query'), replaced by each layer index."
        )
    modules = [m for path, w in table.items() for m in layer_modules(path, names[path], w)]
    counts = collections.Counter(m.name for m in modules)
    twice = [n for n, c in counts.items() if c > 1]
    if twice:
        paths = list(dict.fromkeys(m.path for m in modules if m.name in twice))
        raise ValueError(
            f"save_peft: key_map maps several kernels to the same module(s) {twice}: {paths}."
        )
    return modules


def _check_dora(table: dict[str, LoraWeights]) -> None:
    """Raises unless all adapters or none are DoRA adapters (PEFT's ``use_dora`` is global)."""
    dora = [p for p, w in table.items() if w.m is not None]
    if dora and len(dora) != len(table):
        plain = [p for p in table if p not in dora]
        raise ValueError(
            f"save_peft: PEFT's use_dora holds for all modules of an adapter, but only some "
            f"adapters are DoRA adapters (with a magnitude m: {describe(dora)}; without: "
            f"{describe(plain)}). Save them as two adapters."
        )
