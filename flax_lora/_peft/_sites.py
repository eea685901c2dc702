"""Which kernel of ``params`` each module of a PEFT file goes to: the kernels and their
PyTorch names by the key map (one name per layer of a layered kernel: `flax_lora._peft._layered`;
a targeted parameter's name, nested as PEFT nests it: `flax_lora._peft._expert_params`), matched
with the modules of the file.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import jax
from jax.typing import ArrayLike

from flax_lora._paths import KERNEL_LEAVES, describe, flatten, leaf_name
from flax_lora._peft._expert_params import ExpertSpec, nesting
from flax_lora._peft._names import LAYER, KeyMap, Namer, layer_name
from flax_lora._typing import PyTree

Kernel = ArrayLike | jax.ShapeDtypeStruct
Site = tuple[str, int | None]  # a module's kernel path and layer (None: an unlayered kernel)


def kernels_of(params: PyTree, key_map: KeyMap) -> dict[str, Kernel]:
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


def kernel_sites(
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


def param_namer(name_of: Namer, default: bool, cfg: Mapping[str, Any]) -> Namer:
    """The key map, where it is the default one naming a kernel's module whose parameter (the
    kernel's leaf name) PEFT targets: that parameter's name (``experts.w_in``)."""
    if not default:
        return name_of

    def name(path: str) -> str | None:
        module = name_of(path)
        param = f"{module}.{leaf_name(path)}"
        return param if module and _targeted(cfg, param) else module

    return name


def expert_sites(
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


def match(
    modules: Mapping[str, Mapping[str, Any]], sites: dict[str, list[Site]], directory: Path
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
        named = [s for s in sites[n] if leaf_name(s[0]) in KERNEL_LEAVES]
        found[n] = named if len(sites[n]) > 1 and len(named) == 1 else sites[n]
    twice = {n: [path for path, _ in s] for n, s in found.items() if len(s) > 1}
    if twice:
        raise ValueError(f"load_peft: key_map maps several kernels to one module: {twice}.")
    return {n: s[0] for n, s in found.items()}


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
