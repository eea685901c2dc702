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
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from flax_lora._adapters._weights import AdapterLayout, LoraWeights
from flax_lora._paths import describe, flatten, nest
from flax_lora._peft._adapter_config import rank_and_scale, read_config
from flax_lora._peft._config_checks import PeftConfig
from flax_lora._peft._expert_params import (
    KEYS,
    ParamOrder,
    expert_axes_of,
    expert_spec,
    read_expert,
)
from flax_lora._peft._extra_tensors import load_extras
from flax_lora._peft._files import Weights, open_weights
from flax_lora._peft._fused import (
    fuse_parts,
    joined_target,
    part_target,
    split_joined,
    trim_joined,
)
from flax_lora._peft._layered import join_layer_modules, layer_use, scan_layouts
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
from flax_lora._peft._per_expert import expert_axis, expert_use, join_experts
from flax_lora._peft._sites import (
    Kernel,
    Site,
    expert_sites,
    kernel_sites,
    kernels_of,
    match,
    param_namer,
    template,
)
from flax_lora._peft._tensor_layouts import Factors, Target, from_peft, magnitude_from_peft
from flax_lora._probe import Use, kernel_uses
from flax_lora._typing import Leaf, PyTree

Piece = tuple[int | None, int | None, int | None]  # a module's layer, expert and part

HEADER_BASE = 1 << 20  # bytes of safetensors header allowed for any params tree ...
HEADER_PER_TENSOR = 1 << 10  # ... and per tensor a file for it may hold (names ~100 bytes)


class _Module(NamedTuple):
    """How one module of the file is read: its kernels' sites (several for a module several
    kernels make, then ``parts`` their layouts), its target (tensors to be filled in; the
    kernel's part, expert or layer it is read for), and for an expert kernel (PEFT's
    ``target_parameters``) whether PEFT reads it reversed."""

    sites: list[Site]
    target: Target
    expert: bool
    reversed_: bool
    parts: list[AdapterLayout]


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
    probe: Callable[[PyTree], PyTree] | None = None,
    dtype: DTypeLike | None = None,
    param_order: ParamOrder = None,
    reversed_params: Collection[str] = (),
) -> PyTree:
    """Reads a HuggingFace PEFT LoRA adapter (written by PEFT or by `save_peft`) onto ``params``.

    Each module's tensors go to the kernel the key map names with PEFT's scale
    (``lora_alpha / r``, ``/ sqrt(r)`` with ``use_rslora``; patterns resolved as PEFT does),
    DoRA magnitudes to `LoraWeights.m`, ``modules_to_save`` / bias / token tensors to
    `TrainedCopy` / `TokenDelta` entries. A name with ``{layer}`` gathers one module per layer
    into a layered kernel; expert kernels read PEFT's ``target_parameters``. Both files are
    untrusted input: every field used and the safetensors header are checked before any tensor
    is read, and only the tensors used are read. A tensor the config does not account for is an
    error, never dropped. Guide: `docs/guides/peft.md`.

    Sharp edge: a dense kernel of 3 or more dimensions has its input axes from ``probe``;
    without one the load accepts only an unambiguous split of PEFT's ``in`` / ``out`` features
    (a ``(384, 12, 32)`` q kernel is ambiguous) and otherwise raises: it never guesses. A
    name with ``{layer}`` reads onto the kernel's first axis unless ``probe`` shows the scan
    slicing another (MaxText's ``(d, L, mlp)``, `LoraWeights.layer_at`): pass it for those.

    Examples:
      >>> params = {"params": {"lin": {"kernel": jnp.ones((3, 4))}}}  # PyTorch's module "lin"
      >>> config = lora.LoraConfig(rank=2, init="random")
      >>> path = lora.save_peft(tempfile.mkdtemp(), lora.init(jax.random.key(0), params, config))
      >>> adapters = lora.load_peft(path, params)  # a folder PEFT wrote reads the same way
      >>> w = adapters["params"]["lin"]["kernel"]
      >>> w.a.shape, w.b.shape, w.scale
      ((3, 2), (2, 4), 4.0)

    Args:
      directory: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the Flax params tree the adapter is for (a Linen variables dict, an NNX state).
      key_map: kernel path -> PyTorch module name, as for `save_peft` (a function may return
        ``None``; every key of a dict must be a path in ``params``): a tuple of names reads
        the modules onto one fused kernel (their rank, or their summed rank where their
        ``lora_A`` differ), ``"<module>[i]"`` names give kernel ``i`` its block of the
        module's output features, ``{expert}`` reads one module per expert.
      probe: an optional function of the params alone, e.g. ``lambda p: model.apply(p, x)``.
      dtype: the dtype of the factors; ``None`` keeps the file's (float32 as PEFT saves).
      param_order: PyTorch's registration order of expert parameters (as for `save_peft`).
      reversed_params: key-map names of expert parameters PEFT reads reversed.

    Returns:
      The adapters: nested dicts mirroring the adapted kernels' paths, each a `LoraWeights`,
      and the `TrainedCopy` / `TokenDelta` entries the file holds.

    Warns:
      UserWarning: the adapter was made with a PEFT init that rewrites the base (PiSSA, OLoRA,
        CorDA, LoftQ, LoRA-GA) and not converted: it fits only that changed base.

    Raises:
      TypeError: ``adapter_config.json`` is not a JSON object, or a field has the wrong type.
      ValueError: a config field out of range; a damaged or non-floating safetensors file, or
        tensors `save_peft` wrote with another config; options these adapters cannot honour
        (``lora_bias``, ...); tensors or key-map names that match no kernel, or do not fit;
        ambiguous input axes without ``probe``; a fused kernel's or an expert kernel's
        modules missing some parts or experts, or not fitting them; expert parameters
        ``param_order`` does not order. Each names the file and the field, tensor or path
        (full list in the guide).
    """
    directory = Path(directory)
    spec = expert_spec(param_order, reversed_params, "load_peft")
    cfg, config_sha = read_config(directory)
    kernels = kernels_of(params, key_map)
    name_of = namer(key_map)
    uses = kernel_uses(probe, params) if probe is not None else None
    moved = scan_layouts(kernels, uses)  # layer axes not leading: read in the scan layout
    sites, templates = kernel_sites(kernels, param_namer(name_of, key_map is None, cfg), uses)
    sites, expert_of = expert_sites(sites, templates, cfg, spec)
    leaves = flatten(params)
    limit = HEADER_BASE + HEADER_PER_TENSOR * (3 * len(sites) + len(leaves))
    with open_weights(directory, limit, config_sha) as weights:
        _check_dora(cfg, weights)
        site_of = match(weights.modules, sites, directory)
        plan = {}
        for name in weights.modules:  # every module checked on stand-ins: nothing read yet
            template = expert_of.get(name, (name, None))[1]
            target, parts = _target(name, site_of[name], kernels, uses, expert_of, weights)
            module = _Module(
                site_of[name], target, template is not None, spec.is_reversed(template), parts
            )
            try:
                _read(module, cfg)
            except ValueError as e:  # the layouts' errors name the module and kernel
                raise ValueError(f"{e} File: {weights.file!r}.") from None
            plan[name] = module
        others = _other_tensors(weights, leaves, name_of)
        extras = load_extras(others, cfg, params, name_of, weights.file, dtype)
        pieces: dict[str, dict[Piece, LoraWeights]] = {}
        for name, module in plan.items():
            module = module._replace(
                target=dataclasses.replace(module.target, tensors=weights.tensors(name))
            )
            w = _weights(module.target, _read(module, cfg), cfg, dtype)
            if module.parts:  # a module several kernels make: each kernel its columns
                for site, part in zip(module.sites, split_joined(w, module.parts), strict=True):
                    pieces.setdefault(site.path, {})[(site.layer, site.expert, None)] = part
            else:
                s = module.sites[0]
                pieces.setdefault(s.path, {})[(s.layer, s.expert, s.part)] = w
    joined = {  # kernel -> its place among those that make one module
        s.path: (s.part or 0, len(m.sites)) for m in plan.values() if m.parts for s in m.sites
    }
    entries = [
        (path, _assemble(path, by, kernels[path], templates, joined, uses, name_of, weights.file))
        for path, by in pieces.items()
    ]
    entries = [(p, w.replace(layer_at=moved[p]) if p in moved else w) for p, w in entries]
    return nest(entries + list(extras.items()))


def _target(
    name: str,
    sites: list[Site],
    kernels: Mapping[str, Kernel],
    uses: dict[str, Use] | None,
    expert_of: Mapping[str, tuple[str, str]],
    weights: Weights,
) -> tuple[Target, list[AdapterLayout]]:
    """The target module ``name`` is read for (with its tensors' stand-ins): its kernel, one
    layer of it, one expert of that, one part of a fused kernel; or the module several kernels
    make together (then with their layouts).

    Raises:
      ValueError: the probe does not see a kernel, or not as the key map names it; the kernel
        does not split or join as named (naming the module, kernel and file).
    """
    stand_ins = weights.stand_ins(name)
    where = f"load_peft: {weights.file!r}: module {name!r}"
    seen = []
    for s in sites:
        shape = tuple(int(n) for n in kernels[s.path].shape)[(s.layer is not None) :]
        use = layer_use(_use(uses, s.path, name), s.path, name, s.layer)
        if s.expert is not None:  # one expert's kernel
            axis = expert_axis(use)
            shape, use = shape[:axis] + shape[axis + 1 :], expert_use(use, axis)
        seen.append((s.path, shape, use))
    param = expert_of.get(name, (name, None))[0]
    if sites[0].joined:
        joined_shape, joined_use, parts = joined_target(seen, where)
        return Target(sites[0].path, param, joined_shape, joined_use, stand_ins), parts
    (path, shape, use), s = seen[0], sites[0]
    if s.parts:
        shape, use = part_target(shape, use, s.parts, stand_ins, f"{where} -> kernel {path!r}")
    return Target(path, param, shape, use, stand_ins), []


def _assemble(
    path: str,
    pieces: dict[Piece, LoraWeights],
    kernel: Kernel,
    templates: Mapping[str, str],
    joined: Mapping[str, tuple[int, int]],
    uses: dict[str, Use] | None,
    name_of: Namer,
    file: str,
) -> LoraWeights:
    """The adapter of the kernel at ``path`` from its modules' adapters (by layer, expert and
    part): parts fused, experts joined, a joined module's rank block kept, layers joined."""
    layered = path in templates
    name = name_of(path)
    label = template(name) if name is not None else path
    fused_k = len(name) if isinstance(name, tuple) else 0
    if fused_k:
        by: dict[tuple[int | None, int | None], LoraWeights] = fuse_parts(
            path, label, fused_k, pieces, file
        )
    else:
        by = {(layer, expert): w for (layer, expert, _), w in pieces.items()}
    layers: dict[int | None, LoraWeights]
    if any(expert is not None for _, expert in by):
        shape = tuple(int(n) for n in kernel.shape)[int(layered) :]
        use = _use(uses, path, label) if uses is not None else None
        axis = expert_axis(layer_use(use, path, label, 0 if layered else None))
        per_layer: dict[int | None, dict[int, LoraWeights]] = {}
        for (layer, expert), w in by.items():
            per_layer.setdefault(layer, {})[int(expert or 0)] = w
        layers = {
            i: join_experts(path, label, axis, shape, ws, file) for i, ws in per_layer.items()
        }
    else:
        layers = {layer: w for (layer, _), w in by.items()}
    if path in joined:  # one of the kernels of a module several make
        layers = trim_joined(*joined[path], layers)
    if layered:
        return join_layer_modules(path, templates[path], kernel, _layers(layers))
    return layers[None]


def _check_dora(cfg: PeftConfig, weights: Weights) -> None:
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


def _read(module: _Module, cfg: PeftConfig) -> _Read:
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


def _factors(module: _Module, cfg: PeftConfig) -> _Read:
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


def _weights(t: Target, read: _Read, cfg: PeftConfig, dtype: DTypeLike | None) -> LoraWeights:
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


def _layers(pieces: dict[int | None, LoraWeights]) -> dict[int, LoraWeights]:
    """The adapters of a layered kernel's layers by layer (its modules all have one)."""
    return {i: w for i, w in pieces.items() if i is not None}


def _other_tensors(
    weights: Weights, leaves: Mapping[str, Leaf], name_of: Namer
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
        leaf = owner.get((module, param or "weight"))  # trainable tokens: the embedding's weight
        if leaf is None:
            out[key] = np.empty((0,), weights.header.entries[tensor].dtype)
            continue
        size, limit = math.prod(weights.shape(tensor)), math.prod(np.shape(leaves[leaf]))
        if size > limit:
            raise ValueError(
                f"load_peft: {weights.file!r}: tensor {PREFIX + key!r} has shape "
                f"{weights.shape(tensor)}, more elements than the leaf {leaf!r} it belongs to "
                f"({tuple(np.shape(leaves[leaf]))})."
            )
        out[key] = weights.read(tensor)
    return out
