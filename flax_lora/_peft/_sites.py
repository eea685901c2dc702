"""Which kernel of ``params`` each module of a PEFT file goes to: the kernels and their
PyTorch names by the key map (one name per layer of a layered kernel: `flax_lora._peft._layered`;
a targeted parameter's name, nested as PEFT nests it: `flax_lora._peft._expert_params`), matched
with the modules of the file.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import NamedTuple

from flax_lora._paths import KERNEL_LEAVES, describe, flatten, leaf_name
from flax_lora._peft._config_checks import PeftConfig
from flax_lora._peft._expert_params import ExpertSpec, nesting
from flax_lora._peft._layered import layer_use
from flax_lora._peft._names import (
    EXPERT,
    LAYER,
    KeyMap,
    Name,
    Namer,
    has,
    layer_name,
    part_of,
    plain,
)
from flax_lora._peft._per_expert import expert_axis
from flax_lora._probe import Use
from flax_lora._typing import ArrayLeaf, PyTree

Kernel = ArrayLeaf


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


class Site(NamedTuple):
    """Where a module of a PEFT file goes: a kernel's path, and its layer (layered kernels),
    its expert (``{expert}`` names), its part: of a fused kernel's ``parts`` modules (a tuple
    of names), or, with ``parts == 0``, the kernel's place in a module several kernels make
    (``"<module>[i]"``)."""

    path: str
    layer: int | None = None
    expert: int | None = None
    part: int | None = None
    parts: int = 0

    @property
    def joined(self) -> bool:
        """Whether the module is made of several kernels, this one at ``part``."""
        return self.part is not None and not self.parts


def template(name: Name) -> str:
    """A key map's name for messages and for PEFT's parameter names: a part's ``[i]`` dropped,
    a tuple's names joined with ``", "``."""
    return plain(name) if isinstance(name, str) else ", ".join(name)


def kernel_sites(
    kernels: Mapping[str, Kernel], name_of: Namer, uses: Mapping[str, Use] | None
) -> tuple[dict[str, list[Site]], dict[str, str]]:
    """Module name -> the kernels (and layers, experts, parts) the key map gives that name, and
    layered kernel path -> its name with ``{layer}`` (`template`)."""
    sites: dict[str, list[Site]] = {}
    templates: dict[str, str] = {}
    for path, kernel in kernels.items():
        name = name_of(path)
        if name is None:
            continue
        layered = has(name, LAYER)
        if layered:
            templates[path] = template(name)
        experts: range | list[None] = [None]
        if has(name, EXPERT):  # one module per expert: as many as the expert axis is long
            shape = tuple(kernel.shape)[int(layered) :]
            use = None if uses is None else uses.get(path)
            at = 0 if layered else None
            axis = expert_axis(None if use is None else layer_use(use, path, template(name), at))
            experts = range(shape[axis]) if len(shape) > axis else [None]
        names = (name,) if isinstance(name, str) else name
        for j, n in enumerate(names):
            joined = part_of(n) if isinstance(name, str) else None
            part = j if isinstance(name, tuple) else (joined[1] if joined else None)
            base = joined[0] if joined else n
            for i in range(kernel.shape[0]) if layered else [None]:
                for e in experts:
                    module = base if i is None else layer_name(base, i)
                    module = module if e is None else layer_name(module, e, EXPERT)
                    site = Site(path, i, e, part, len(names) if isinstance(name, tuple) else 0)
                    sites.setdefault(str(module), []).append(site)
    return sites, templates


def _targeted(cfg: PeftConfig, name: str) -> bool:
    """Whether PEFT's ``target_parameters`` name the parameter ``name`` (exactly, or as a
    suffix after a dot, as PEFT matches them)."""
    return any(name == t or name.endswith(f".{t}") for t in cfg.get("target_parameters") or ())


def param_namer(name_of: Namer, default: bool, cfg: PeftConfig) -> Namer:
    """The key map, where it is the default one naming a kernel's module whose parameter (the
    kernel's leaf name) PEFT targets: that parameter's name (``experts.w_in``)."""
    if not default:
        return name_of

    def name(path: str) -> Name | None:
        module = name_of(path)
        if not isinstance(module, str):
            return module
        param = f"{module}.{leaf_name(path)}"
        return param if module and _targeted(cfg, param) else module

    return name


def expert_sites(
    sites: dict[str, list[Site]],
    templates: Mapping[str, str],
    cfg: PeftConfig,
    spec: ExpertSpec,
) -> tuple[dict[str, list[Site]], dict[str, tuple[str, str]]]:
    """The sites by the file's module names (a targeted parameter's: its module with its
    ``.base_layer`` nesting), and for those file modules (parameter name, key-map name).

    Raises:
      ValueError: a module with several targeted parameters and no order for them.
    """
    params = [n for n in sites if _targeted(cfg, n)]
    key_names = {
        n: templates.get(sites[n][0].path, n) if sites[n][0].layer is not None else n
        for n in params
    }

    def targeted(module: str, param: str) -> bool:
        return _targeted(cfg, f"{module}.{param}")

    files = nesting(params, key_names, spec, "load_peft", targeted)
    renamed = {files.get(n, n): s for n, s in sites.items()}
    return renamed, {files[n]: (n, key_names[n]) for n in params}


def match(
    modules: Mapping[str, Mapping[str, str]], sites: dict[str, list[Site]], directory: Path
) -> dict[str, list[Site]]:
    """The kernel (and layer, ...) of each module of the file: of several with its name, the
    one whose leaf is a ``kernel`` / ``embedding`` (not, say, a multi-axis bias beside it); the
    kernels of a module several make (``"<module>[i]"``), in order.

    Raises:
      ValueError: modules that match no kernel, or several; parts of a module missing or twice.
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
        if all(s.joined for s in sites[n]):
            parts = sorted(sites[n], key=lambda s: s.part or 0)
            if [s.part for s in parts] != list(range(len(parts))):
                raise ValueError(
                    f"load_peft: key_map names the kernels {[s.path for s in parts]} parts "
                    f"{[s.part for s in parts]} of the module {n!r} of {str(directory)!r}; "
                    f"parts [0] to [{len(parts) - 1}] are expected, each once."
                )
            found[n] = parts
            continue
        named = [s for s in sites[n] if leaf_name(s.path) in KERNEL_LEAVES]
        found[n] = named if len(sites[n]) > 1 and len(named) == 1 else sites[n]
        if len(found[n]) > 1:
            raise ValueError(
                f"load_peft: key_map maps several kernels to one module: "
                f"{ {n: [s.path for s in found[n]]} }."
            )
    return found


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
