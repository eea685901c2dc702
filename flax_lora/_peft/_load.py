"""`lora.load_peft`: a HuggingFace PEFT LoRA adapter directory as adapters on a params tree.

Each LoRA module of the file is matched with a kernel of ``params`` through the key map (a
``{layer}`` name with each layer of a layered kernel: `flax_lora._peft._layered`), read through
`flax_lora._peft._layout` with PEFT's rank and scale (`flax_lora._peft._adapter_config`); the
other tensors load through `flax_lora._peft._extras`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from flax_lora._adapters import LoraWeights
from flax_lora._paths import KERNEL_LEAVES, describe, flatten, nest
from flax_lora._peft._adapter_config import rank_and_scale, read_config
from flax_lora._peft._experts import (
    KEYS,
    ExpertSpec,
    ParamOrder,
    expert_axes_of,
    expert_spec,
    nesting,
    read_expert,
)
from flax_lora._peft._extras import load_extras
from flax_lora._peft._files import read_tensors
from flax_lora._peft._layered import join_layers, layer_use
from flax_lora._peft._layout import Target, from_peft, magnitude_from_peft
from flax_lora._peft._names import (
    LAYER,
    MAGNITUDE,
    WEIGHTS_NAME,
    KeyMap,
    Namer,
    layer_name,
    namer,
)
from flax_lora._probe import Use, kernel_uses
from flax_lora._typing import PyTree

Kernel = ArrayLike | jax.ShapeDtypeStruct
Site = tuple[str, int | None]  # a module's kernel path and layer (None: an unlayered kernel)


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
    per expert (`LoraWeights.expert_axes`, see `flax_lora._peft._experts`): under
    ``<module>.base_layer...`` as PEFT nests several parameters of one module by PyTorch's
    registration order, which ``param_order`` gives (as for `save_peft`; needed when the
    config targets several parameters of a module), and read reversed for the names in
    ``reversed_params``. The expert axis is the probe's (a probe that knows expert axes), else
    the kernel's first axis (after a layer axis), as in PEFT's parameter ``(E, s1, s2)``. The
    input axis is the probe's, which checks the orientation; without a probe the kernel must be
    ``(E, s1, s2)`` and the input axis is the one whose size is PEFT's ``in`` features (its
    ``out`` ones for a reversed parameter); a wrong ``reversed_params`` then gives the same
    delta with the other factor called ``a``.

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
      ValueError: the adapter uses options these adapters cannot honour (``lora_bias``,
        ``layer_replication``, ...); a module has several targeted expert parameters and
        ``param_order`` does not order them, or ParamWrapper tensors do not fit their kernel
        (named, with a hint when the other orientation fits); tensors besides the LoRA factors
        that the config does not account for, or that match no leaf or do not fit it, token
        ids out of range (each named); tensors match no kernel, or the key map
        names kernels not in ``params`` (both listed); a tensor does not fit its kernel (the path
        is named); the input axes of a kernel are ambiguous without ``probe``; the layers of a
        stacked kernel differ in rank, scale or DoRA-ness, or the probe's view of a kernel
        (stacked or not) disagrees with ``{layer}`` in its name; a stacked DoRA adapter lacks
        layers but ``params`` holds no values (``jax.ShapeDtypeStruct``) for their norms.
    """
    directory = Path(directory)
    spec = expert_spec(param_order, reversed_params, "load_peft")
    cfg = read_config(directory)
    modules, others = read_tensors(directory)
    _check_dora(cfg, modules)
    kernels = _kernels(params, key_map)
    name_of = namer(key_map)
    sites, templates = _sites(kernels, _param_namer(name_of, key_map is None, cfg))
    sites, expert_of = _expert_sites(sites, templates, cfg, spec)
    site_of = _match(modules, sites, directory)
    uses = kernel_uses(probe, params) if probe is not None else None
    per_kernel: dict[str, dict[int | None, LoraWeights]] = {}
    for name, tensors in modules.items():
        path, layer = site_of[name]
        shape = tuple(int(s) for s in kernels[path].shape)
        if layer is not None:  # the module is one layer of a layered kernel
            shape = shape[1:]
        use = layer_use(_use(uses, path, name), path, name, layer)
        if name in expert_of:  # an expert kernel: PEFT's target_parameters
            param, template = expert_of[name]
            target = Target(path, param, shape, use, tensors)
            w = _expert_weights(target, cfg, dtype, spec.is_reversed(template))
        else:
            w = _module_weights(Target(path, name, shape, use, tensors), cfg, dtype)
        per_kernel.setdefault(path, {})[layer] = w
    entries = [
        (path, join_layers(path, templates[path], kernels[path], pieces))
        if path in templates
        else (path, pieces[None])
        for path, pieces in per_kernel.items()
    ]
    extras = load_extras(others, cfg, params, name_of, str(directory / WEIGHTS_NAME), dtype)
    return nest(entries + list(extras.items()))


def _check_dora(cfg: Mapping[str, Any], modules: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Raises unless the modules have magnitudes exactly when the config says ``use_dora``."""
    use_dora = bool(cfg.get("use_dora", False))
    wrong = [n for n, t in modules.items() if (MAGNITUDE in t) != use_dora]
    if wrong:
        raise ValueError(
            f"load_peft: adapter_config.json has use_dora={use_dora}, but modules "
            f"{describe(wrong)} {'lack' if use_dora else 'have'} a lora_magnitude_vector."
        )


def _kernels(params: PyTree, key_map: KeyMap) -> dict[str, Kernel]:
    """The leaves of 2 or more dimensions of ``params``, by path.

    Raises:
      ValueError: a dict key map names paths that are not such leaves.
    """
    kernels = {p: x for p, x in flatten(params).items() if getattr(x, "ndim", 0) >= 2}
    if isinstance(key_map, Mapping):
        absent = [p for p in key_map if p not in kernels]
        if absent:
            raise ValueError(
                f"load_peft: key_map names paths that are not kernels (2+ dims) of params: "
                f"{describe(absent)}. Kernels in params: {describe(kernels, limit=20)}."
            )
    return kernels


def _sites(
    kernels: Mapping[str, Kernel], name_of: Namer
) -> tuple[dict[str, list[Site]], dict[str, str]]:
    """Module name -> the kernels (and layers) the key map gives that name, and layered kernel
    path -> its name with ``{layer}``."""
    sites: dict[str, list[Site]] = {}
    templates: dict[str, str] = {}
    for path, kernel in kernels.items():
        name = name_of(path)
        if name is None:
            continue
        if LAYER not in name:
            sites.setdefault(name, []).append((path, None))
            continue
        templates[path] = name
        for i in range(kernel.shape[0]):
            sites.setdefault(layer_name(name, i), []).append((path, i))
    return sites, templates


def _targeted(cfg: Mapping[str, Any], name: str) -> bool:
    """Whether PEFT's ``target_parameters`` name the parameter ``name`` (exactly, or as a
    suffix after a dot, as PEFT matches them)."""
    return any(name == t or name.endswith(f".{t}") for t in cfg.get("target_parameters") or ())


def _param_namer(name_of: Namer, default: bool, cfg: Mapping[str, Any]) -> Namer:
    """The key map, where it is the default one naming a kernel's module whose parameter (the
    kernel's leaf name) PEFT targets: that parameter's name (``experts.w_in``)."""
    if not default:
        return name_of

    def name(path: str) -> str | None:
        module = name_of(path)
        param = f"{module}.{path.rsplit('/', 1)[-1]}"
        return param if module and _targeted(cfg, param) else module

    return name


def _expert_sites(
    sites: dict[str, list[Site]],
    templates: Mapping[str, str],
    cfg: Mapping[str, Any],
    spec: ExpertSpec,
) -> tuple[dict[str, list[Site]], dict[str, tuple[str, str]]]:
    """The sites by the file's module names (a targeted parameter's: its module with its
    ``.base_layer`` nesting), and for those file modules (parameter name, key-map name).

    Raises:
      ValueError: a module with several targeted parameters and no order for them.
    """
    params = [n for n in sites if _targeted(cfg, n)]
    key_names = {
        n: templates.get(sites[n][0][0], n) if sites[n][0][1] is not None else n for n in params
    }

    def targeted(module: str, param: str) -> bool:
        return _targeted(cfg, f"{module}.{param}")

    files = nesting(params, key_names, spec, "load_peft", targeted)
    renamed = {files.get(n, n): s for n, s in sites.items()}
    return renamed, {files[n]: (n, key_names[n]) for n in params}


def _expert_weights(
    t: Target, cfg: Mapping[str, Any], dtype: DTypeLike | None, reversed_: bool
) -> LoraWeights:
    """The expert adapter one ParamWrapper's tensors make for its (unlayered) kernel.

    Raises:
      ValueError: the tensors do not fit the kernel; a DoRA magnitude (ParamWrapper has none).
    """
    if MAGNITUDE in t.tensors or KEYS[0] not in t.tensors:
        raise ValueError(
            f"{t.where}: PEFT's target_parameters (ParamWrapper) hold lora_A.weight and "
            f"lora_B.weight only; the file has {sorted(k[1:] for k in t.tensors)}."
        )
    r, scale = rank_and_scale(cfg, t.module)
    contracted = t.tensors[KEYS[1]].shape[0] if reversed_ else t.tensors[KEYS[0]].shape[1]
    axis, in_axes = expert_axes_of(t, int(contracted), t.where)
    f = read_expert(t, axis, in_axes, r, reversed_)
    return LoraWeights(
        a=jnp.asarray(f.a, dtype),
        b=jnp.asarray(f.b, dtype),
        scale=scale,
        in_axes=f.in_axes,
        kernel_shape=t.shape,
        dropout=float(cfg.get("lora_dropout") or 0.0),
        expert_axes=(axis,),
    )


def _match(
    modules: Mapping[str, Mapping[str, np.ndarray]], sites: dict[str, list[Site]], directory: Path
) -> dict[str, Site]:
    """The kernel (and layer) of each module of the file: of several with its name, the one
    whose leaf is a ``kernel`` / ``embedding`` (not, say, a multi-axis bias beside it).

    Raises:
      ValueError: modules that match no kernel, or several.
    """
    unmatched = [n for n in modules if n not in sites]
    if unmatched:
        raise ValueError(
            f"load_peft: the adapter in {str(directory)!r} has LoRA tensors for modules that "
            f"match no kernel of params: {describe(unmatched)}. The key map names these "
            f"kernels: {describe(sorted(sites), limit=20)}. Pass key_map= to map kernel "
            "paths to the PyTorch module names." + _nesting_hint(unmatched)
        )
    found = {}
    for n in modules:
        named = [s for s in sites[n] if s[0].rsplit("/", 1)[-1] in KERNEL_LEAVES]
        found[n] = named if len(sites[n]) > 1 and len(named) == 1 else sites[n]
    twice = {n: [path for path, _ in s] for n, s in found.items() if len(s) > 1}
    if twice:
        raise ValueError(f"load_peft: key_map maps several kernels to one module: {twice}.")
    return {n: s[0] for n, s in found.items()}


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


def _module_weights(t: Target, cfg: Mapping[str, Any], dtype: DTypeLike | None) -> LoraWeights:
    """The adapter one PEFT module's tensors make for its (unlayered) kernel.

    Raises:
      ValueError: the tensors do not fit the kernel, or their rank is not the config's.
    """
    r, scale = rank_and_scale(cfg, t.module)
    a, b, kind, in_axes = from_peft(t)
    if a.shape[-1] != r:
        raise ValueError(
            f"{t.where}: its tensors have rank {a.shape[-1]}, but adapter_config.json gives it "
            f"r={r}."
        )
    m = None
    if MAGNITUDE in t.tensors:  # DoRA
        out_shape = tuple(s for i, s in enumerate(t.shape) if i not in in_axes)
        m = jnp.asarray(magnitude_from_peft(t, out_shape), dtype or a.dtype)
    return LoraWeights(
        a=jnp.asarray(a, dtype),
        b=jnp.asarray(b, dtype),
        scale=scale,
        in_axes=in_axes,
        kernel_shape=t.shape,
        kind=kind,
        dropout=float(cfg.get("lora_dropout") or 0.0),
        m=m,
    )


def _nesting_hint(names: Collection[str]) -> str:
    """A hint for unmatched modules named ``....base_layer``: a targeted parameter's tensors."""
    nested = sorted(n for n in names if re.search(r"\.base_layer$", n))
    if not nested:
        return ""
    return (
        f" Modules {nested} hold a target parameter registered before another of the same "
        "module (PEFT nests them under '.base_layer'): name every targeted parameter of the "
        "module in key_map and pass param_order= (PyTorch's registration order)."
    )
