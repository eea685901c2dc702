"""`lora.load_peft`: a HuggingFace PEFT LoRA adapter directory as adapters on a params tree.

The config is read and checked first (`flax_lora._peft._adapter_config`), then the kernels of
``params`` named by the key map (`flax_lora._peft._sites`) give a bound on the safetensors
header, whose entries are checked and grouped by module (`flax_lora._peft._files`). Every
module's tensors are then checked against their kernel on stand-ins (arrays of the header's
shapes that hold no memory) through `flax_lora._peft._tensor_layouts` /
`flax_lora._peft._expert_params`, with PEFT's rank and scale; only then are tensors read, one
module at a time, and made into adapters (a layered kernel's layers joined by
`flax_lora._peft._layered`); the other tensors load through `flax_lora._peft._extra_tensors`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from flax_lora._adapters._weights import LoraWeights
from flax_lora._paths import describe, flatten, nest
from flax_lora._peft._adapter_config import rank_and_scale, read_config
from flax_lora._peft._expert_params import (
    KEYS,
    ParamOrder,
    expert_axes_of,
    expert_spec,
    read_expert,
)
from flax_lora._peft._extra_tensors import load_extras
from flax_lora._peft._files import Weights, open_weights
from flax_lora._peft._layered import join_layer_modules, layer_use
from flax_lora._peft._names import (
    CONFIG_NAME,
    MAGNITUDE,
    PREFIX,
    KeyMap,
    Namer,
    module_of,
    namer,
    split_tensor_key,
    torch_param,
)
from flax_lora._peft._sites import (
    expert_sites,
    kernel_sites,
    kernels_of,
    match,
    param_namer,
)
from flax_lora._peft._tensor_layouts import Factors, Target, from_peft, magnitude_from_peft
from flax_lora._probe import Use, kernel_uses
from flax_lora._typing import PyTree

HEADER_BASE = 1 << 20  # bytes of safetensors header allowed for any params tree ...
HEADER_PER_TENSOR = 1 << 10  # ... and per tensor a file for it may hold (names ~100 bytes)


class _Module(NamedTuple):
    """How one module of the file is read: its kernel's path and layer, its target (tensors
    to be filled in), and for an expert kernel whether PEFT reads it reversed."""

    path: str
    layer: int | None
    target: Target
    expert: bool
    reversed_: bool


class _Read(NamedTuple):
    """A module's tensors in our layout, with its scale, magnitude and expert axis."""

    factors: Factors
    scale: float
    m: np.ndarray | None
    expert_axes: tuple[int, ...]


def load_peft(
    directory: str | os.PathLike[str],
    params: PyTree,
    key_map: KeyMap = None,
    *,
    probe: Callable[[PyTree], Any] | None = None,
    dtype: DTypeLike | None = None,
    param_order: ParamOrder = None,
    reversed_params: Collection[str] = (),
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
    with ``{layer}`` replaced by ``0 ... L-1``), each read as for the single-layer kernel
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

    Expert kernels: a kernel whose key-map name PEFT's ``target_parameters`` match (the
    ``"<module>.<param>"`` name of a PyTorch parameter, ``"experts.w1"``; the default key map
    gives ``experts.w_in`` for ``params/experts/w_in`` when so targeted) is read from
    ParamWrapper's ``lora_A.weight (r * E, in)`` / ``lora_B.weight (out, r * E)`` as one LoRA
    per expert (`LoraWeights.expert_axes`, see `flax_lora._peft._expert_params`): under
    ``<module>.base_layer...`` as PEFT nests several parameters of one module by PyTorch's
    registration order, which ``param_order`` gives (as for `save_peft`; needed when the
    config targets several parameters of a module), and read reversed for the names in
    ``reversed_params``. The expert axis is the probe's (a probe that knows expert axes), else
    the kernel's first axis (after a layer axis), as in PEFT's parameter ``(E, s1, s2)``. The
    input axis is the probe's, which checks the orientation; without a probe the kernel must be
    ``(E, s1, s2)`` and the input axis is the one whose size is PEFT's ``in`` features (its
    ``out`` ones for a reversed parameter); a wrong ``reversed_params`` then gives the same
    delta with the other factor called ``a``.

    Both files are untrusted input (a file from a model hub may be anything): every field of
    ``adapter_config.json`` the load uses is checked for type and range, and the safetensors
    header is parsed and checked (names, floating dtypes, shapes and ranks against the kernels
    of ``params``) before any tensor is read; then only the tensors used are read, so memory is
    bounded by the adapters of ``params``, not by the file. Each error names the file and the
    field or tensor.

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
      param_order: PyTorch's registration order of the parameters of modules with several
        targeted expert parameters: a sequence for every module or a dict by module name as
        the key map spells it (see `save_peft`).
      reversed_params: key-map names of expert parameters PEFT reads reversed (see
        `save_peft`).

    Returns:
      The adapters: nested dicts mirroring the adapted kernels' paths, each a `LoraWeights`,
      and the paths of trained leaves (`TrainedCopy`) and token tables (`TokenDelta`), if any.

    Warns:
      UserWarning: the adapter was made with a PEFT init that rewrites the base weights
        (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) and not converted: it fits only that changed base.

    Raises:
      TypeError: ``adapter_config.json`` is not a JSON object, or a field it uses has the wrong
        JSON type (``r: "two"``, ``use_rslora: "false"``).
      ValueError: ``adapter_config.json`` is over 16 MiB, not UTF-8 or not JSON, or a field is
        out of range (``r`` an int >= 1, ``lora_alpha`` finite with ``|alpha| <= 1e6``,
        ``lora_dropout`` in [0, 1), pattern keys valid regexes, ...); the safetensors file is
        damaged (header length, JSON, offsets against the file's size), holds non-floating
        tensors (only F16, BF16, F32, F64) or factors of too few dimensions, or was written by
        `save_peft` with another ``adapter_config.json`` (an interrupted save, or a config
        edited since); a module's rank exceeds both its kernel's input and output features (no
        adapter needs it; a file could otherwise make one any size); the adapter uses options
        these adapters cannot honour (``lora_bias``, ``layer_replication``, ...); a module has
        several targeted expert parameters and ``param_order`` does not order them, or
        ParamWrapper tensors do not fit their kernel (named, with a hint when the other
        orientation fits); tensors besides the LoRA factors that the config does not account
        for, or that match no leaf or do not fit it, token ids out of range (each named);
        tensors match no kernel, or the key map names kernels not in ``params`` (both listed); a
        tensor does not fit its kernel (the path is named); the input axes of a kernel are
        ambiguous without ``probe``; the layers of a stacked kernel differ in rank, scale or
        DoRA-ness, or the probe's view of a kernel (stacked or not) disagrees with ``{layer}``
        in its name; a stacked DoRA adapter lacks layers but ``params`` holds no values
        (``jax.ShapeDtypeStruct``) for their norms.
    """
    directory = Path(directory)
    spec = expert_spec(param_order, reversed_params, "load_peft")
    cfg, config_sha = read_config(directory)
    kernels = kernels_of(params, key_map)
    name_of = namer(key_map)
    sites, templates = kernel_sites(kernels, param_namer(name_of, key_map is None, cfg))
    sites, expert_of = expert_sites(sites, templates, cfg, spec)
    leaves = flatten(params)
    limit = HEADER_BASE + HEADER_PER_TENSOR * (3 * len(sites) + len(leaves))
    with open_weights(directory, limit, config_sha) as weights:
        _check_dora(cfg, weights)
        site_of = match(weights.modules, sites, directory)
        uses = kernel_uses(probe, params) if probe is not None else None
        plan = {}
        for name in weights.modules:  # every module checked on stand-ins: nothing read yet
            path, layer = site_of[name]
            shape = tuple(int(s) for s in kernels[path].shape)[(layer is not None) :]
            use = layer_use(_use(uses, path, name), path, name, layer)
            param, template = expert_of.get(name, (name, None))
            target = Target(path, param, shape, use, weights.stand_ins(name))
            module = _Module(path, layer, target, template is not None, spec.is_reversed(template))
            try:
                _read(module, cfg)
            except ValueError as e:  # the layouts' errors name the module and kernel
                raise ValueError(f"{e} File: {weights.file!r}.") from None
            plan[name] = module
        others = _other_tensors(weights, leaves, name_of)
        extras = load_extras(others, cfg, params, name_of, weights.file, dtype)
        per_kernel: dict[str, dict[int | None, LoraWeights]] = {}
        for name, module in plan.items():
            module = module._replace(
                target=dataclasses.replace(module.target, tensors=weights.tensors(name))
            )
            w = _weights(module.target, _read(module, cfg), cfg, dtype)
            per_kernel.setdefault(module.path, {})[module.layer] = w
    entries = [
        (path, join_layer_modules(path, templates[path], kernels[path], pieces))
        if path in templates
        else (path, pieces[None])
        for path, pieces in per_kernel.items()
    ]
    return nest(entries + list(extras.items()))


def _check_dora(cfg: Mapping[str, Any], weights: Weights) -> None:
    """Raises unless the modules have magnitudes exactly when the config says ``use_dora``."""
    use_dora = cfg.get("use_dora", False)
    wrong = [n for n, t in weights.modules.items() if (MAGNITUDE in t) != use_dora]
    if wrong:
        config = str(Path(weights.file).with_name(CONFIG_NAME))
        raise ValueError(
            f"load_peft: {config!r} has use_dora={use_dora} (field 'use_dora'), but modules "
            f"{describe(wrong)} of {weights.file!r} {'lack' if use_dora else 'have'} a "
            "lora_magnitude_vector."
        )


def _use(uses: dict[str, Use] | None, path: str, name: str) -> Use | None:
    """What the probe saw of the kernel at ``path`` (``None`` without a probe).

    Raises:
      ValueError: the probe never uses the kernel.
    """
    if uses is None:
        return None
    if path not in uses:
        raise ValueError(
            f"load_peft: the probe never contracts or gathers the kernel {path!r} "
            f"(module {name!r}), so its input axes are unknown."
        )
    return uses[path]


def _read(module: _Module, cfg: Mapping[str, Any]) -> _Read:
    """A module's tensors (read, or stand-ins) in our layout, checked against its kernel.

    Raises:
      ValueError: the tensors do not fit the kernel (or what the probe saw of it), or their
        rank is not the config's, or more than both its input and its output features (a file
        could otherwise make a kernel's adapter any size); an expert module with tensors
        ParamWrapper does not have.
    """
    read = _factors(module, cfg)
    f, lead = read.factors, len(read.expert_axes)
    r, n_in, n_out = f.a.shape[-1], math.prod(f.a.shape[lead:-1]), math.prod(f.b.shape[lead + 1 :])
    if r > max(n_in, n_out):
        raise ValueError(
            f"{module.target.where}: its tensors have rank {r}, more than its {n_in} input and "
            f"{n_out} output features both: no adapter of this kernel has such a rank."
        )
    return read


def _factors(module: _Module, cfg: Mapping[str, Any]) -> _Read:
    """`_read` but for the bound on the rank."""
    t = module.target
    r, scale = rank_and_scale(cfg, t.module)
    if not module.expert:
        f = from_peft(t)
        if f.a.shape[-1] != r:
            raise ValueError(
                f"{t.where}: its tensors have rank {f.a.shape[-1]}, but "
                f"adapter_config.json gives it r={r} (field 'r' or 'rank_pattern')."
            )
        m = None
        if MAGNITUDE in t.tensors:  # DoRA
            out_shape = tuple(s for i, s in enumerate(t.shape) if i not in f.in_axes)
            m = magnitude_from_peft(t, out_shape)
        return _Read(f, scale, m, ())
    if MAGNITUDE in t.tensors or KEYS[0] not in t.tensors:
        raise ValueError(
            f"{t.where}: PEFT's target_parameters (ParamWrapper) hold lora_A.weight and "
            f"lora_B.weight only; the file has {sorted(k[1:] for k in t.tensors)}."
        )
    lora_a, lora_b = t.tensors[KEYS[0]], t.tensors[KEYS[1]]
    contracted = lora_b.shape[0] if module.reversed_ else lora_a.shape[1]
    axis, in_axes = expert_axes_of(t, int(contracted), t.where)
    return _Read(read_expert(t, axis, in_axes, r, module.reversed_), scale, None, (axis,))


def _weights(
    t: Target, read: _Read, cfg: Mapping[str, Any], dtype: DTypeLike | None
) -> LoraWeights:
    """The adapter of one module's tensors, read, for its (unlayered) kernel."""
    f = read.factors
    return LoraWeights(
        a=jnp.asarray(f.a, dtype),
        b=jnp.asarray(f.b, dtype),
        scale=read.scale,
        in_axes=f.in_axes,
        kernel_shape=t.shape,
        kind=f.kind,
        dropout=cfg.get("lora_dropout", 0.0),
        m=None if read.m is None else jnp.asarray(read.m, dtype or f.a.dtype),
        expert_axes=read.expert_axes,
    )


def _other_tensors(
    weights: Weights, leaves: Mapping[str, Any], name_of: Namer
) -> dict[str, np.ndarray]:
    """The tensors besides the LoRA factors (by name after ``PREFIX``), read when they belong
    to a leaf of ``params`` and are no larger than it; the others (which `load_extras` refuses
    by name, never using their values) as empty arrays, unread.

    Raises:
      ValueError: a tensor larger than the leaf it belongs to (named, with the leaf).
    """
    owner: dict[tuple[str, str], str] = {}  # (module name, torch param) -> leaf path
    for path in leaves:
        name = module_of(name_of, path)
        if name is not None:
            owner.setdefault((name, torch_param(path)), path)
    out = {}
    for key, tensor in weights.others.items():
        _, module, param = split_tensor_key(key) or ("?", "", "")
        path = owner.get((module, param or "weight"))  # trainable tokens: the embedding's weight
        if path is None:
            out[key] = np.empty((0,), weights.header.entries[tensor].dtype)
            continue
        size, limit = math.prod(weights.shape(tensor)), math.prod(np.shape(leaves[path]))
        if size > limit:
            raise ValueError(
                f"load_peft: {weights.file!r}: tensor {PREFIX + key!r} has shape "
                f"{weights.shape(tensor)}, more elements than the leaf {path!r} it belongs to "
                f"({tuple(np.shape(leaves[path]))})."
            )
        out[key] = weights.read(tensor)
    return out
