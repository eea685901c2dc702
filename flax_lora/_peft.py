"""`lora.save_peft` / `lora.load_peft`: HuggingFace PEFT adapter files, both ways.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and
``adapter_model.safetensors``. Its tensors are named after the PyTorch modules they adapt:
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (Linear, Conv, GPT-2 Conv1D) and
``base_model.model.<module>.lora_embedding_A`` / ``.lora_embedding_B`` (Embedding). A ``key_map``
turns each Flax kernel path into the name of its PyTorch twin.

Layouts (``a (*I, r)`` and ``b (r, *O)`` are ours, in the Flax kernel's layout):

- Linear / Conv1D <-> Dense, DenseGeneral, Einsum: ``lora_A.weight = a.reshape(n_in, r).T``
  ``(r, in)`` and ``lora_B.weight = b.reshape(r, n_out).T`` ``(out, r)``, the input axes ``I`` and
  output axes ``O`` of a multi-axis kernel each flattened row-major in kernel order (a q/k/v
  kernel ``(d, heads, head_dim)`` is the twin of ``Linear(d, heads * head_dim)``). GPT-2's
  ``Conv1D`` (``fan_in_fan_out=True``) stores its weight ``(in, out)``, but PEFT stores its LoRA
  factors as for a Linear, so it needs nothing special.
- Conv1d/2d/3d <-> Conv: ``lora_A.weight`` is a conv weight ``(r, in, *window)`` and
  ``lora_B.weight`` a 1x1 conv ``(out, r, 1, ...)``; ours are ``a (*window, in, r)`` and
  ``b (r, out)``.
- Embedding <-> Embed: ``lora_embedding_A (r, num)`` = ``a.T`` and ``lora_embedding_B (dim, r)``
  = ``b.T``.
- DoRA (``use_dora``): ``<module>.lora_magnitude_vector`` (no ``.weight``) is our ``m``
  (``LoraWeights.m``, shape ``O``): ``(out,)`` for a Linear / Conv1D (``O`` flattened), ``(dim,)``
  for an Embedding, ``(1, out, 1, ...)`` for a Conv. PEFT's norms run over the same axes as ours
  (see `flax_lora._dora`).

Scan-stacked kernels (``nn.scan`` / ``nnx.scan``, `LoraWeights.layer_axes` ``== 1``): a kernel
``(L, *rest)`` with factors ``a (L, *I, r)``, ``b (L, r, *O)`` is ``L`` PyTorch modules, one per
layer (``model.layers.0.q_proj``, ``model.layers.1.q_proj``, ...). The key map names such a
kernel with the placeholder ``{layer}`` (``"layers.{layer}.attn.query"``); layer ``i``'s module
is that name with ``{layer}`` replaced by ``i`` (plain replacement, not ``str.format``). Each
layer's module holds exactly what an unstacked adapter of the layer's kernel ``rest`` would. A
stacked adapter of some layers only (`LoraWeights.layers`) writes those layers' modules; loading
a file without some layers' modules gives those layers zero factors (and, for DoRA, the
magnitudes ``||W0||`` of their base kernels, so they stay the base) and ``layers=`` the others.
One stacked adapter has one rank, one scale and one DoRA-ness for all its layers.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import os
import re
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._adapters import LoraWeights, adapter_table
from flax_lora._config import LoraConfig
from flax_lora._paths import describe, flatten, nest

PyTree = Any
KeyMap = Callable[[str], str | None] | Mapping[str, str] | None

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
LAYER = "{layer}"  # in a key map's name of a scan-stacked kernel: replaced by each layer index
_FLAX_KERNEL_NAMES = ("kernel", "embedding")
_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "EA",
    ".lora_embedding_B": "EB",
    ".lora_magnitude_vector": "M",
}
# adapter_config.json fields that change the adapted model in ways these adapters cannot express.
_UNSUPPORTED = {
    "lora_bias": "a bias on lora_B",
    "target_parameters": "LoRA on bare nn.Parameters",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "Activated LoRA",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
}


# init_lora_weights values with which PEFT rewrites the base weights when it makes the adapter
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# -- key maps ------------------------------------------------------------------------------------
def default_key_map(path: str) -> str:
    """The default kernel path -> PyTorch module name: drop a leading ``params`` and the leaf.

    ``params/encoder/layers_0/query/kernel`` -> ``encoder.layers_0.query``;
    ``layers/0/linear/kernel`` (an NNX state) -> ``layers.0.linear``.
    """
    parts = path.split("/")
    if len(parts) > 1 and parts[0] == "params":
        parts = parts[1:]
    return ".".join(parts[:-1])


def _key_fn(key_map: KeyMap) -> Callable[[str], str | None]:
    if key_map is None:
        return default_key_map
    if isinstance(key_map, Mapping):
        table = dict(key_map)
        return table.get
    if callable(key_map):
        return key_map
    raise TypeError(
        "key_map must be None, a dict {kernel path: module name} or a function of the kernel "
        f"path; got {type(key_map).__name__}."
    )


def _module_name(fn: Callable[[str], str | None], path: str) -> str | None:
    name = fn(path)
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"key_map({path!r}) must return a module name (str) or None; got {name!r}.")
    return name.removeprefix(PREFIX) or None


# -- save ----------------------------------------------------------------------------------------
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
    adapted layer (all ``L``, or its ``layers``), each as the unstacked adapter of that layer's
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
        cannot name one), that of an unstacked kernel must not.
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
    from flax_lora._adapters import is_lora
    from flax_lora._extras import split
    from flax_lora._peft_extras import TASK_TYPES, save_extras

    directory = Path(directory).absolute()
    table = adapter_table(adapters)
    extras = split(adapters, is_lora)[1]
    if not table:
        raise ValueError(
            "lora.save_peft: the adapter tree holds no LoRA factors"
            + (" (only trained copies / token deltas)." if extras else " (it is empty).")
        )
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(
            f"save_peft: task_type must be one of {TASK_TYPES} or None; got {task_type!r}."
        )
    if config is not None and not isinstance(config, LoraConfig):
        raise TypeError(f"save_peft: config must be a LoraConfig; got {type(config).__name__}.")
    if config is not None and config.init.startswith(_BASE_CHANGING_INITS):
        warnings.warn(
            f"save_peft: these adapters were made with init={config.init!r}, which also changed "
            "the base weights (lora.init returned new params); PEFT will load them onto the "
            "original base, where they give a different model. Export the changed base too, or "
            "lora.merge them into it and use that merged model.",
            stacklevel=2,
        )
    fn = _key_fn(key_map)
    names: dict[str, str] = {}
    unmapped = []
    for path in table:
        name = _module_name(fn, path)
        if name is None:
            unmapped.append(path)
        else:
            names[path] = name
    if unmapped:
        raise ValueError(
            f"save_peft: key_map gives no PyTorch module name for the adapters at "
            f"{describe(unmapped)}; every adapted kernel needs one."
        )
    stacked = [p for p, w in table.items() if w.layer_axes]
    if key_map is None and stacked:
        raise ValueError(
            f"save_peft: {describe(stacked)} adapt scan-stacked kernels (a leading layer axis), "
            "which PEFT stores as one module per layer; pass a key_map whose names for them "
            f"contain {LAYER!r} (e.g. 'layers.{LAYER}.attn.query'), replaced by each layer index."
        )
    modules = [  # (kernel path, module name, adapter of that module's kernel), layer by layer
        item for path, w in table.items() for item in _layer_modules(path, names[path], w)
    ]
    counts = collections.Counter(name for _, name, _ in modules)
    twice = [n for n, c in counts.items() if c > 1]
    if twice:
        paths = list(dict.fromkeys(p for p, n, _ in modules if n in twice))
        raise ValueError(
            f"save_peft: key_map maps several kernels to the same module(s) {twice}: {paths}."
        )

    rslora = bool(config.rslora) if config is not None else False
    dora = [p for p, w in table.items() if w.m is not None]
    if dora and len(dora) != len(table):
        plain = [p for p in table if p not in dora]
        raise ValueError(
            f"save_peft: PEFT's use_dora holds for all modules of an adapter, but only some "
            f"adapters are DoRA adapters (with a magnitude m: {describe(dora)}; without: "
            f"{describe(plain)}). Save them as two adapters."
        )
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path, name, w in modules:
        lora_a, lora_b = _to_peft(path, w)
        if w.kind == "embed":
            tensors[f"{PREFIX}{name}.lora_embedding_A"] = lora_a
            tensors[f"{PREFIX}{name}.lora_embedding_B"] = lora_b
        else:
            tensors[f"{PREFIX}{name}.lora_A.weight"] = lora_a
            tensors[f"{PREFIX}{name}.lora_B.weight"] = lora_b
        if w.m is not None:  # DoRA
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = _magnitude_to_peft(w)
        ranks[name] = w.rank
        alphas[name] = _alpha(path, w, config, rslora)

    extra_tensors, fields = save_extras(
        extras, fn, _module_name, {name for _, name, _ in modules}, params
    )
    tensors.update(extra_tensors)
    bias = "none"
    if fields["biases"]:
        lora_paths = {p.rsplit("/", 1)[0] for p in table}
        only = all(b.rsplit("/", 1)[0] in lora_paths for b in fields["biases"])
        inferred = "lora_only" if only else "all"
        bias = config.bias if config is not None and config.bias != "none" else inferred

    if config is not None:
        r0, alpha0 = int(config.rank), float(config.alpha)
        dropout = float(config.dropout)
    else:
        r0 = collections.Counter(ranks.values()).most_common(1)[0][0]
        alpha0 = collections.Counter(alphas.values()).most_common(1)[0][0]
        dropout = float(next(iter(table.values())).dropout)
    order = sorted(ranks, key=lambda n: (-len(n), n))  # longest first: each finds its own entry
    rank_pattern = {n: ranks[n] for n in order} if any(r != r0 for r in ranks.values()) else {}
    alpha_pattern = (
        {n: _json_number(alphas[n]) for n in order}
        if any(a != alpha0 for a in alphas.values())
        else {}
    )
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r0,
        "lora_alpha": _json_number(alpha0),
        "lora_dropout": dropout,
        "target_modules": sorted(ranks),
        "exclude_modules": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": rslora,
        "fan_in_fan_out": False,
        "bias": bias,
        "lora_bias": False,
        "use_dora": bool(dora),
        "modules_to_save": fields["modules_to_save"],
        "trainable_token_indices": fields["trainable_token_indices"],
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "layer_replication": None,
        "loftq_config": {},
        "megatron_config": None,
        "megatron_core": "megatron.core",
    }
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp_w = directory / f".{WEIGHTS_NAME}.{tag}"
    tmp_c = directory / f".{CONFIG_NAME}.{tag}"
    try:
        save_file(tensors, str(tmp_w), metadata={"format": "pt"})
        tmp_c.write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_w, directory / WEIGHTS_NAME)
        os.replace(tmp_c, directory / CONFIG_NAME)
    finally:
        for tmp in (tmp_w, tmp_c):
            tmp.unlink(missing_ok=True)
    return directory


def _layer_modules(path: str, name: str, w: LoraWeights) -> list[tuple[str, str, LoraWeights]]:
    """``(path, module name, adapter)`` of each PEFT module ``w`` stands for: itself, or for a
    scan-stacked kernel one per adapted layer, as the adapter of that layer's kernel."""
    if not w.layer_axes:
        if LAYER in name:
            raise ValueError(
                f"save_peft: key_map names the unstacked kernel {path!r} {name!r}, with the "
                f"placeholder {LAYER!r}; only kernels stacked by a scan have layers."
            )
        return [(path, name, w)]
    if w.layer_axes > 1:
        raise ValueError(
            f"save_peft: the kernel {path!r} of shape {tuple(w.kernel_shape)} has "
            f"{w.layer_axes} layer axes (nested scans); PEFT modules can be named by one layer "
            "index only, so one layer axis is expected."
        )
    if LAYER not in name:
        raise ValueError(
            f"save_peft: key_map names the scan-stacked kernel {path!r} (shape "
            f"{tuple(w.kernel_shape)}) {name!r}; a stacked kernel's name must contain "
            f"{LAYER!r}, replaced by each layer index (one PEFT module per layer)."
        )
    layers = range(w.kernel_shape[0]) if w.layers is None else w.layers
    return [
        (
            path,
            layer_name(name, i),
            w.unstacked(a=w.a[i], b=w.b[i], m=None if w.m is None else w.m[i]),
        )
        for i in layers
    ]


def layer_name(name: str, i: int) -> str:
    """The PEFT module name of layer ``i`` of a stacked kernel named ``name``."""
    return name.replace(LAYER, str(i))


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _alpha(path: str, w: LoraWeights, config: LoraConfig | None, rslora: bool) -> float:
    """The alpha giving ``w.scale`` at rank ``w.rank`` by PEFT's formula, exactly if possible."""
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


def _magnitude_to_peft(w: LoraWeights) -> np.ndarray:
    """DoRA's ``m`` in PEFT's ``lora_magnitude_vector`` layout, float32."""
    m = np.asarray(jax.device_get(w.m)).astype(np.float32).reshape(-1)
    if w.kind == "conv":  # PEFT: (1, out, 1, ...) for Conv1d/2d/3d
        m = m.reshape((1, m.size) + (1,) * (len(w.kernel_shape) - 2))
    return np.ascontiguousarray(m)


def _to_peft(path: str, w: LoraWeights) -> tuple[np.ndarray, np.ndarray]:
    """Our ``(a, b)`` as PEFT's float32 ``(lora_A, lora_B)``."""
    a = np.asarray(jax.device_get(w.a)).astype(np.float32)
    b = np.asarray(jax.device_get(w.b)).astype(np.float32)
    r = w.rank
    n_in, n_out = math.prod(w.in_shape), math.prod(w.out_shape)
    nd = len(w.kernel_shape)
    if w.kind == "conv":
        if tuple(w.in_axes) != tuple(range(nd - 1)):
            raise ValueError(
                f"save_peft: conv kernel {path!r} of shape {tuple(w.kernel_shape)} has input axes "
                f"{tuple(w.in_axes)}; PEFT's conv layout needs Flax's (*window, in, out)."
            )
        lora_a = np.moveaxis(np.moveaxis(a, -1, 0), -1, 1)  # (*k, in, r) -> (r, in, *k)
        lora_b = b.T.reshape((n_out, r) + (1,) * (nd - 2))
    else:
        if w.kind == "embed" and nd != 2:
            raise ValueError(
                f"save_peft: embedding {path!r} has a {nd}-D table {tuple(w.kernel_shape)}; "
                "PEFT's Embedding LoRA needs a 2-D (num, dim) table."
            )
        lora_a = a.reshape(n_in, r).T
        lora_b = b.reshape(r, n_out).T
    return np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b)


# -- load ----------------------------------------------------------------------------------------
def load_peft(
    directory: str | os.PathLike[str],
    params: PyTree,
    key_map: KeyMap = None,
    *,
    probe: Callable[[PyTree], Any] | None = None,
    dtype: Any = None,
) -> PyTree:
    """Reads a HuggingFace PEFT LoRA adapter (written by PEFT or by `save_peft`) onto ``params``.

    Each tensor's module name is matched with the kernel paths of ``params`` through
    ``key_map``; the scale of each module is PEFT's: ``lora_alpha / r`` (``/ sqrt(r)`` with
    ``use_rslora``), with ``rank_pattern`` / ``alpha_pattern`` resolved as PEFT resolves them.
    A DoRA adapter (``use_dora``) loads with its magnitudes as `LoraWeights.m`.

    ``modules_to_save`` tensors (``<module>.weight`` / ``.bias``) load as `TrainedCopy` entries
    of the leaves the key map names so (a Linear weight transposed to a kernel); trained biases
    (``bias="all"`` / ``"lora_only"``: ``<module>.bias``, ``<module>.base_layer.bias``) as
    `TrainedCopy` entries with ``role="bias"``; trainable tokens
    (``<embedding>.token_adapter.trainable_tokens_delta``, PEFT's trained rows) as a
    `TokenDelta` holding ``rows - W0[ids]`` (so ``params`` must hold the table's values), the
    ids from ``trainable_token_indices``. A tensor the config does not account for is an error,
    never dropped.

    Scan-stacked kernels: a kernel whose key-map name contains ``{layer}`` is taken as stacked
    on its leading axis (``L = kernel.shape[0]``) and gathers the modules of its layers (the name
    with ``{layer}`` replaced by ``0 ... L-1``), each read as for the unstacked layer kernel
    ``kernel.shape[1:]``, into one stacked `LoraWeights` (``layer_axes=1``). Layers without a
    module get zero factors and ``layers=`` the others (a kernel with none is not adapted);
    all its layers must have one rank, one scale and the same DoRA-ness. A DoRA adapter's
    absent layers (PEFT's ``layers_to_transform``) get the magnitudes ``||W0||`` (the base
    kernel's norms per output unit, computed from ``params``), which leave them the base kernel.

    How each kernel's input axes are found:

    - with ``probe`` (as in `lora.init`): from the traced model, for every kernel;
    - else a 2-D kernel's rows are its input (an ``embedding`` from ``lora_embedding_*``
      tensors is an Embed, anything else a Dense);
    - a conv (PEFT wrote a conv weight) has Flax's ``(*window, in, out)`` layout;
    - a dense kernel of 3 or more dimensions: the input axes are the one set of kernel axes
      whose sizes multiply to PEFT's ``in`` features while the rest multiply to its ``out``
      features. When several sets fit (a q kernel ``(384, 12, 32)`` is ``384 -> 384`` either
      way), the load stops and asks for ``probe``: it never guesses.

    Example:
      >>> adapters = lora.load_peft("/tmp/adapter", params)
      >>> y = lora.wrap(model.apply)(params, adapters, x)
      >>> # stacked blocks: {"params/layers/q/kernel": "layers.{layer}.q", ...}
      >>> adapters = lora.load_peft("/tmp/adapter", params, key_map=key_map)

    Args:
      directory: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the Flax params tree the adapter is for (a Linen variables dict, an NNX state).
      key_map: kernel path -> PyTorch module name, as for `save_peft`. A function may return
        ``None`` for kernels without a twin; every key of a dict must be a path in ``params``.
        Names with ``{layer}`` mark scan-stacked kernels (see above).
      probe: an optional function of the params alone, e.g. ``lambda p: model.apply(p, x)``,
        traced abstractly (no FLOPs) to learn each kernel's input axes.
      dtype: the dtype of the factors; ``None`` keeps the file's (float32 as PEFT saves).

    Returns:
      The adapters: nested dicts mirroring the adapted kernels' paths, each a `LoraWeights`,
      and the paths of trained leaves (`TrainedCopy`) and token tables (`TokenDelta`), if any.

    Warns:
      UserWarning: the adapter was made with a PEFT init that rewrites the base weights
        (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) and not converted: it fits only that changed base.

    Raises:
      ValueError: the adapter uses options these adapters cannot honour (``lora_bias``,
        ``target_parameters``, ``layer_replication``, ...); tensors besides the LoRA factors
        that the config does not account for, or that match no leaf or do not fit it, token
        ids out of range (each named); tensors match no kernel, or the key map
        names kernels not in ``params`` (both listed); a tensor does not fit its kernel (the path
        is named); the input axes of a kernel are ambiguous without ``probe``; the layers of a
        stacked kernel differ in rank, scale or DoRA-ness, or the probe's view of a kernel
        (stacked or not) disagrees with ``{layer}`` in its name; a stacked DoRA adapter lacks
        layers but ``params`` holds no values (``jax.ShapeDtypeStruct``) for their norms.
    """
    directory = Path(directory)
    cfg = _read_config(directory)
    rslora = bool(cfg.get("use_rslora", False))
    r0 = int(cfg["r"])
    alpha0 = float(cfg["lora_alpha"])
    rank_pattern = dict(cfg.get("rank_pattern") or {})
    alpha_pattern = dict(cfg.get("alpha_pattern") or {})
    dropout = float(cfg.get("lora_dropout") or 0.0)
    modules, raw_extras = _read_tensors(directory)
    use_dora = bool(cfg.get("use_dora", False))
    wrong = [n for n, t in modules.items() if ("M" in t) != use_dora]
    if wrong:
        raise ValueError(
            f"load_peft: adapter_config.json has use_dora={use_dora}, but modules "
            f"{describe(wrong)} {'lack' if use_dora else 'have'} a lora_magnitude_vector."
        )

    kernels = {p: x for p, x in flatten(params).items() if getattr(x, "ndim", 0) >= 2}
    if isinstance(key_map, Mapping):
        absent = [p for p in key_map if p not in kernels]
        if absent:
            raise ValueError(
                f"load_peft: key_map names paths that are not kernels (2+ dims) of params: "
                f"{describe(absent)}. Kernels in params: {describe(kernels, limit=20)}."
            )
    fn = _key_fn(key_map)
    by_name: dict[str, list[str]] = {}
    layer_of: dict[tuple[str, str], int] = {}  # (module, stacked kernel path) -> layer index
    templates: dict[str, str] = {}  # stacked kernel path -> its name with {layer}
    for path in kernels:
        name = _module_name(fn, path)
        if name is None:
            continue
        if LAYER not in name:
            by_name.setdefault(name, []).append(path)
            continue
        templates[path] = name
        for i in range(kernels[path].shape[0]):
            by_name.setdefault(layer_name(name, i), []).append(path)
            layer_of[layer_name(name, i), path] = i
    unmatched = [n for n in modules if n not in by_name]
    if unmatched:
        raise ValueError(
            f"load_peft: the adapter in {str(directory)!r} has LoRA tensors for modules that "
            f"match no kernel of params: {describe(unmatched)}. The key map names these "
            f"kernels: {describe(sorted(by_name), limit=20)}. Pass key_map= to map kernel "
            "paths to the PyTorch module names."
        )
    for n in modules:  # a module's kernel, not a multi-axis bias beside it (same module name)
        if len(by_name[n]) > 1:
            named = [p for p in by_name[n] if p.rsplit("/", 1)[-1] in _FLAX_KERNEL_NAMES]
            by_name[n] = named if len(named) == 1 else by_name[n]
    twice = {n: by_name[n] for n in modules if len(by_name[n]) > 1}
    if twice:
        raise ValueError(f"load_peft: key_map maps several kernels to one module: {twice}.")

    uses = None
    if probe is not None:
        from flax_lora._probe import kernel_uses

        uses = kernel_uses(probe, params)

    per_kernel: dict[str, dict[int | None, LoraWeights]] = {}
    for name, tensors in modules.items():
        path = by_name[name][0]
        r = int(_pattern_value(rank_pattern, name, r0))
        alpha = float(_pattern_value(alpha_pattern, name, alpha0))
        scale = alpha / (math.sqrt(r) if rslora else r)
        use = uses.get(path) if uses is not None else None
        if uses is not None and use is None:
            raise ValueError(
                f"load_peft: the probe never contracts or gathers the kernel {path!r} "
                f"(module {name!r}), so its input axes are unknown."
            )
        kernel_shape = tuple(int(s) for s in kernels[path].shape)
        layer = layer_of.get((name, path))
        if use is not None and len(use.layer_axes) != (layer is not None):
            seen = f"stacked by {len(use.layer_axes)} scan(s)" if use.layer_axes else "unstacked"
            raise ValueError(
                f"load_peft: the probe sees the kernel {path!r} (module {name!r}) {seen}"
                f", but the key map's name for it {'has' if layer is not None else 'lacks'} the "
                f"placeholder {LAYER!r}; expected one scan-stacked layer axis named by "
                f"{LAYER!r}, or an unstacked kernel without it."
            )
        if layer is not None:  # one layer of a stacked kernel: that layer's kernel and use
            kernel_shape = kernel_shape[1:]
            if use is not None:
                use = dataclasses.replace(
                    use, in_axes=tuple(d - 1 for d in use.in_axes), layer_axes=()
                )
        w = _module_weights(path, name, kernel_shape, tensors, use, r, scale, dropout, dtype)
        per_kernel.setdefault(path, {})[layer] = w
    entries = [
        (
            path,
            _stack(path, templates[path], kernels[path], pieces)
            if path in templates
            else pieces[None],
        )
        for path, pieces in per_kernel.items()
    ]
    from flax_lora._peft_extras import load_extras

    extras = load_extras(
        raw_extras, cfg, params, fn, _module_name, str(directory / WEIGHTS_NAME), dtype
    )
    return nest(entries + list(extras.items()))


def _module_weights(
    path: str,
    name: str,
    kernel_shape: tuple[int, ...],
    tensors: dict[str, np.ndarray],
    use: Any,
    r: int,
    scale: float,
    dropout: float,
    dtype: Any,
) -> LoraWeights:
    """The adapter one PEFT module's tensors make for the (unstacked) kernel of ``kernel_shape``."""
    a, b, kind, in_axes = _from_peft(path, name, kernel_shape, tensors, use)
    if a.shape[-1] != r:
        raise ValueError(
            f"load_peft: module {name!r} (kernel {path!r}) has rank {a.shape[-1]} tensors, "
            f"but adapter_config.json gives it r={r}."
        )
    m = None
    if "M" in tensors:  # DoRA: PEFT's (out,), (dim,) or conv (1, out, 1, ...) -> O
        out_shape = tuple(kernel_shape[i] for i in range(len(kernel_shape)) if i not in in_axes)
        m = tensors["M"]
        if m.size != math.prod(out_shape) or m.ndim not in (1, len(kernel_shape)):
            raise ValueError(
                f"load_peft: module {name!r} -> kernel {path!r}: its lora_magnitude_vector "
                f"has shape {tuple(m.shape)}; expected {math.prod(out_shape)} entries, one "
                f"per output unit {out_shape}."
            )
        m = m.reshape(out_shape)
        m = m.astype(dtype) if dtype is not None else m.astype(a.dtype)
    if dtype is not None:
        a, b = a.astype(dtype), b.astype(dtype)
    return LoraWeights(
        a=jnp.asarray(a),
        b=jnp.asarray(b),
        scale=scale,
        in_axes=in_axes,
        kernel_shape=kernel_shape,
        kind=kind,
        dropout=dropout,
        m=None if m is None else jnp.asarray(m),
    )


def _stack(path: str, template: str, kernel: Any, pieces: dict[Any, LoraWeights]) -> LoraWeights:
    """One scan-stacked adapter (``layer_axes=1``) of ``kernel`` (the stacked base kernel) from
    the adapters of its layers' modules; layers without a module get zero factors, DoRA
    magnitudes ``||W0||`` (which leave them the base kernel), and ``layers`` lists the others
    when there are such."""
    shape = tuple(int(s) for s in kernel.shape)
    present = sorted(pieces)
    how = {i: (w.rank, float(w.scale), w.m is not None) for i, w in pieces.items()}
    if len(set(how.values())) > 1:
        raise ValueError(
            f"load_peft: the layers of the scan-stacked kernel {path!r} (modules {template!r}) "
            "must share one rank, one scale and DoRA-ness (one stacked adapter holds them); the "
            "file gives, by layer: "
            + ", ".join(
                f"{i}: rank {r}, scale {scale}{', DoRA' if dora else ''}"
                for i, (r, scale, dora) in sorted(how.items())
            )
            + "."
        )
    first = pieces[present[0]]
    missing = [i for i in range(shape[0]) if i not in pieces]
    fill = {"a": {}, "b": {}, "m": {}}  # field -> {absent layer: its value}
    for i in missing:
        fill["a"][i], fill["b"][i] = jnp.zeros_like(first.a), jnp.zeros_like(first.b)
    if missing and first.m is not None:  # DoRA: zero factors (V = W0) and m = ||W0||
        norms = _base_norms(path, template, kernel, first.in_axes, missing)
        fill["m"] = {i: jnp.asarray(norms[i], first.m.dtype) for i in missing}

    def stacked(field: str) -> jax.Array:
        return jnp.stack(
            [getattr(pieces[i], field) if i in pieces else fill[field][i] for i in range(shape[0])]
        )

    return first.replace(
        a=stacked("a"),
        b=stacked("b"),
        m=None if first.m is None else stacked("m"),
        in_axes=tuple(d + 1 for d in first.in_axes),
        kernel_shape=tuple(shape),
        layer_axes=1,
        layers=tuple(present) if missing else None,
    )


def _base_norms(
    path: str, template: str, kernel: Any, in_axes: tuple[int, ...], layers: list[int]
) -> dict[int, np.ndarray]:
    """``||W0[i]||`` over each layer's input axes ``in_axes`` (one value per output unit, as
    `flax_lora._dora.weight_norm`), float32 or wider, for the given layers of a stacked kernel."""
    if isinstance(kernel, jax.ShapeDtypeStruct) or not hasattr(kernel, "dtype"):
        raise ValueError(
            f"load_peft: the DoRA adapter of the scan-stacked kernel {path!r} (modules "
            f"{template!r}) lacks layers {layers}, whose magnitudes are the base kernel's norms, "
            f"but params holds no values at {path!r} ({type(kernel).__name__}); pass the real "
            "params."
        )
    acc = jnp.promote_types(kernel.dtype, jnp.float32)
    axes = tuple(sorted(d + 1 for d in in_axes))
    norms = np.asarray(
        jax.device_get(jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(kernel, acc)), axis=axes)))
    )
    return {i: norms[i] for i in layers}


def _read_config(directory: Path) -> dict[str, Any]:
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise ValueError(f"load_peft: {str(directory)!r} has no {CONFIG_NAME}.")
    cfg = json.loads(file.read_text())
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise ValueError(
            f"load_peft: {str(file)!r} is a {cfg.get('peft_type')!r} adapter; only LORA is read."
        )
    problems = [
        f"{key}={cfg[key]!r} ({what})" for key, what in _UNSUPPORTED.items() if cfg.get(key)
    ]
    if (cfg.get("bias") or "none") not in ("none", "all", "lora_only"):
        problems.append(f"bias={cfg['bias']!r} (an unknown bias mode)")
    if problems:
        raise ValueError(
            f"load_peft: {str(file)!r} uses PEFT options that flax_lora adapters cannot honour: "
            f"{', '.join(problems)}. Only LoRA (optionally rsLoRA, rank/alpha patterns) "
            "DoRA, modules_to_save, trainable_token_indices and bias are supported; loading part "
            "of it would silently change the model."
        )
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise ValueError(f"load_peft: {str(file)!r} has no {key!r}.")
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        warnings.warn(
            f"load_peft: {str(file)!r} was initialised with init_lora_weights="
            f"{cfg['init_lora_weights']!r}, which changes the base weights: pass the params of "
            "that changed base, or convert the adapter in PEFT first (save_pretrained with "
            "path_initial_model_for_weight_conversion) to use it on the original base.",
            stacklevel=3,
        )
    return cfg


def _read_tensors(
    directory: Path,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Module name -> {"A"/"B"/"EA"/"EB"/"M": tensor}, and the other tensors by name (prefix
    removed: modules_to_save, biases, trainable tokens, checked by `load_extras`); incomplete
    LoRA entries are errors."""
    file = directory / WEIGHTS_NAME
    if not file.is_file():
        other = [p.name for p in directory.glob("adapter_model.*")]
        raise ValueError(
            f"load_peft: {str(directory)!r} has no {WEIGHTS_NAME}"
            + (f" (found {other}; only safetensors are read)." if other else ".")
        )
    from safetensors.numpy import load_file

    modules: dict[str, dict[str, np.ndarray]] = {}
    others: dict[str, np.ndarray] = {}
    for key, value in load_file(str(file)).items():
        name = key.removeprefix(PREFIX)
        for suffix, role in _SUFFIXES.items():
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[role] = value
                break
        else:
            others[name] = value
    incomplete = [n for n, t in modules.items() if set(t) - {"M"} not in ({"A", "B"}, {"EA", "EB"})]
    if incomplete:
        raise ValueError(
            f"load_peft: {str(file)!r} lacks a lora_A/lora_B partner for modules "
            f"{describe(incomplete)}."
        )
    if not modules:
        raise ValueError(f"load_peft: {str(file)!r} holds no LoRA tensors.")
    return modules, others


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _from_peft(
    path: str,
    name: str,
    shape: tuple[int, ...],
    tensors: dict[str, np.ndarray],
    use: Any,
) -> tuple[np.ndarray, np.ndarray, str, tuple[int, ...]]:
    """PEFT's tensors for one module as our ``(a, b, kind, in_axes)`` for the kernel at path."""
    nd = len(shape)
    where = f"load_peft: module {name!r} -> kernel {path!r} of shape {shape}"

    def misfit(expected: str) -> ValueError:
        got = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(tensors.items()))
        return ValueError(f"{where}: expected {expected}; the file has {got}.")

    if "EA" in tensors:  # Embedding
        lora_a, lora_b = tensors["EA"], tensors["EB"]
        if use is not None and (use.kind != "embed" or tuple(use.in_axes) != (0,)):
            raise ValueError(
                f"{where}: PEFT adapted an Embedding, but the probe sees a {use.kind}."
            )
        r = lora_a.shape[0]
        if nd != 2 or lora_a.shape != (r, shape[0]) or lora_b.shape != (shape[1], r):
            raise misfit("lora_embedding_A (r, num) and lora_embedding_B (dim, r) of a 2-D table")
        return lora_a.T, lora_b.T, "embed", (0,)

    lora_a, lora_b = tensors["A"], tensors["B"]
    r = lora_a.shape[0]
    if lora_a.ndim > 2:  # Conv1d/2d/3d
        in_axes = tuple(range(nd - 1))
        if use is not None and (use.kind != "conv" or tuple(use.in_axes) != in_axes):
            raise ValueError(
                f"{where}: PEFT adapted a conv, but the probe sees a {use.kind} with input axes "
                f"{tuple(use.in_axes)} (Flax's conv layout (*window, in, out) is expected)."
            )
        window = shape[:-2]
        if (
            lora_a.ndim != nd
            or lora_a.shape != (r, shape[-2], *window)
            or lora_b.shape != (shape[-1], r) + (1,) * (nd - 2)
        ):
            raise misfit(
                f"conv factors lora_A (r, {shape[-2]}, {', '.join(map(str, window))}) and "
                f"lora_B ({shape[-1]}, r{', 1' * (nd - 2)})"
            )
        a = np.moveaxis(np.moveaxis(lora_a, 0, -1), 0, -2)  # (r, in, *k) -> (*k, in, r)
        b = lora_b.reshape(shape[-1], r).T
        return a, b, "conv", in_axes

    # Linear / Conv1D
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_b.shape[1] != r:
        raise misfit("lora_A (r, in) and lora_B (out, r)")
    n_in, n_out = lora_a.shape[1], lora_b.shape[0]
    if use is not None:
        if use.kind == "conv":
            raise ValueError(f"{where}: PEFT adapted a Linear, but the probe sees a conv.")
        kind, in_axes = use.kind, tuple(use.in_axes)
    elif nd == 2:
        kind, in_axes = "dense", (0,)
    else:
        kind, in_axes = "dense", _infer_in_axes(where, shape, n_in, n_out)
    out_axes = tuple(i for i in range(nd) if i not in in_axes)
    in_shape = tuple(shape[i] for i in in_axes)
    out_shape = tuple(shape[i] for i in out_axes)
    if math.prod(in_shape) != n_in or math.prod(out_shape) != n_out:
        raise misfit(
            f"lora_A (r, {math.prod(in_shape)}) and lora_B ({math.prod(out_shape)}, r) for input "
            f"axes {in_axes}"
        )
    return lora_a.T.reshape(*in_shape, r), lora_b.T.reshape(r, *out_shape), kind, in_axes


def _infer_in_axes(where: str, shape: tuple[int, ...], n_in: int, n_out: int) -> tuple[int, ...]:
    """The one set of axes whose sizes multiply to ``n_in`` (the rest to ``n_out``)."""
    nd = len(shape)
    fits = [
        axes
        for k in range(1, nd)
        for axes in itertools.combinations(range(nd), k)
        if math.prod(shape[i] for i in axes) == n_in
        and math.prod(shape[i] for i in range(nd) if i not in axes) == n_out
    ]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise ValueError(
            f"{where}: no split of its axes into {n_in} input and {n_out} output features "
            "(PEFT's lora_A / lora_B shapes). Was the adapter made for another model?"
        )
    raise ValueError(
        f"{where}: its input axes are ambiguous from PEFT's {n_in} -> {n_out} features "
        f"(any of {fits} fits). Pass probe=lambda p: model.apply(p, x) to load_peft."
    )
