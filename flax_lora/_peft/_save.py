"""`lora.save_peft`: adapters as a HuggingFace PEFT LoRA adapter directory.

The LoRA factors go through `flax_lora._peft._tensor_layouts` (one PEFT module per kernel, or per
layer of a layered kernel: `flax_lora._peft._layered`), the trained copies and token deltas
through `flax_lora._peft._extra_tensors`, the ranks and alphas into
`flax_lora._peft._adapter_config`.
"""

from __future__ import annotations

import collections
import json
import os
import warnings
from collections.abc import Collection
from pathlib import Path

import numpy as np

from flax_lora._adapters._extras import Extra
from flax_lora._adapters._tables import adapter_table, split, split_plain
from flax_lora._adapters._weights import LoraWeights, is_lora
from flax_lora._config import LoraConfig
from flax_lora._paths import describe, leaf_name
from flax_lora._peft._adapter_config import (
    BASE_CHANGING_INITS,
    TASK_TYPES,
    alpha_for,
    config_json,
)
from flax_lora._peft._config_checks import MAX_ALPHA
from flax_lora._peft._expert_params import (
    ExpertSpec,
    ParamOrder,
    check_expert,
    expert_spec,
    nesting,
    split_param,
    to_peft_expert,
)
from flax_lora._peft._extra_tensors import save_extras
from flax_lora._peft._files import write_adapter
from flax_lora._peft._fused import join_modules, split_modules
from flax_lora._peft._layered import Module, layer_modules
from flax_lora._peft._names import LAYER, PREFIX, KeyMap, Name, Namer, namer, plain
from flax_lora._peft._per_expert import expert_modules
from flax_lora._peft._tensor_layouts import to_peft
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
    param_order: ParamOrder = None,
    reversed_params: Collection[str] = (),
    overwrite: bool = True,
) -> Path:
    """Writes adapters as a HuggingFace PEFT LoRA adapter that PEFT loads onto the PyTorch twin.

    ``adapter_config.json`` and ``adapter_model.safetensors`` use PEFT's names: float32
    factors, per-module ranks and alphas resolved into ``rank_pattern`` / ``alpha_pattern``
    (alphas derived from the scales where needed, so `combine` results save too), DoRA
    magnitudes, trained copies, biases and token rows; layered kernels (``{layer}`` in the key
    map's name) as one module per layer, expert kernels as ``target_parameters``. Writes are
    safe as `save`'s (renamed into place; a pair `save_peft` did not write is never replaced).
    Guide: `docs/guides/peft.md`.

    Sharp edge: PEFT also matches a listed name as a suffix (``lin`` targets ``block.lin``); such
    an extra module starts as PEFT's no-op (``B = 0``), but PEFT may warn about missing keys.

    Examples:
      >>> params = {"params": {"lin": {"kernel": jnp.ones((3, 4))}}}  # PyTorch's module "lin"
      >>> config = lora.LoraConfig(rank=2)
      >>> adapters = lora.init(jax.random.key(0), params, config)
      >>> path = lora.save_peft(tempfile.mkdtemp(), adapters, config)
      >>> # PyTorch: PeftModel.from_pretrained(torch_model, path)
      >>> lora.load_peft(path, params)["params"]["lin"]["kernel"].a.shape
      (3, 2)

    Args:
      directory: the output directory (created, or a folder whose other files are left alone).
      adapters: adapters of kinds ``dense``, ``conv`` (Flax's ``(*window, in, out)``) and
        ``embed`` (a 2-D embedding), with any trained copies and token deltas.
      config: the `LoraConfig` they were made with; ``None`` takes the most common rank,
        alphas from the scales and no rsLoRA.
      key_map: kernel path -> PyTorch module name, a function (``None`` for no twin) or a dict;
        ``None`` drops a leading ``params`` and the leaf name and joins with ``"."``. A tuple of
        names: a fused kernel PyTorch keeps as several modules (its first output axis cut into
        equal parts: ``("attn.k_proj", "attn.v_proj")``); ``"<module>[i]"``: the kernel is the
        ``i``-th block of output features of one module several kernels make (``qkv_proj[0]``);
        ``{layer}`` / ``{expert}``: one module per layer / per expert.
      base_model_name_or_path: written to the config.
      task_type: PEFT's ``task_type`` (``"SEQ_CLS"``, ``"CAUSAL_LM"``, ...); ``None``: none.
      params: the base params, needed only for token deltas (PEFT stores the trained rows).
      param_order: PyTorch's registration order of a module's adapted expert parameters.
      reversed_params: key-map names of expert parameters PEFT reads reversed.
      overwrite: ``False`` refuses a ``directory`` holding either file already.

    Returns:
      The directory's absolute path.

    Warns:
      UserWarning: ``config.init`` is ``"pissa"``, ``"olora"`` or ``"loftq"`` (the adapters fit
        the base `lora.init` returned, not the original); dropout with expert kernels
        (written as 0.0).

    Raises:
      ValueError: an empty tree; paths the key map names no module (or one twice) for; an
        unknown ``task_type``; token deltas without ``params``; ``{layer}`` missing or
        misplaced; ``{expert}`` on a kernel without one expert axis; a fused kernel whose first
        output axis does not divide into its names, or ``[i]`` parts not numbered from 0 or
        not sharing their input; a layout PEFT cannot express; expert parameters
        ``param_order`` does not order; an alpha beyond ``|alpha| <= 1e6``; a ``directory``
        that is a file or holds files `save_peft` did not write. Nothing is written then; the
        guide lists every case.
    """
    table, extras = _parts(adapters)
    _check_options(config, task_type)
    spec = expert_spec(param_order, reversed_params, "save_peft")
    name_of = namer(key_map)
    names = _names(table, name_of, default=key_map is None)
    modules = _modules(table, names)
    names = {p: plain(n) if isinstance(n, str) else n for p, n in names.items()}  # "[i]" dropped
    _check_dora(table)
    rslora = bool(config.rslora) if config is not None else False
    files = _expert_files(modules, names, spec)
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path, name, w in modules:
        assert isinstance(name, str)  # tuples split by _modules
        if name in files:  # an expert kernel: PEFT's target_parameters
            part = to_peft_expert(w, spec.is_reversed(_str(names[path])))
            tensors |= {f"{PREFIX}{files[name]}{key}": t for key, t in part.items()}
        else:
            tensors |= {f"{PREFIX}{name}{key}": t for key, t in to_peft(path, w).items()}
        ranks[name] = w.rank
        alphas[name] = _checked_alpha(path, name, w, alpha_for(path, w, config, rslora))
    extra_tensors, fields = save_extras(
        extras, name_of, {_str(m.name) for m in modules}, table, params, config
    )
    peft_config = config_json(
        ranks,
        alphas,
        config,
        dropout=float(next(iter(table.values())).dropout),
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        use_dora=any(w.m is not None for w in table.values()),
        parameters=files,
        **fields,
    )
    if files and peft_config["lora_dropout"]:
        warnings.warn(
            f"save_peft: lora_dropout={peft_config['lora_dropout']} is written as 0.0: PEFT's "
            "ParamWrapper (target_parameters, the expert kernels) refuses dropout. It is a "
            "training-time setting; the adapted model is the same.",
            stacklevel=2,
        )
        peft_config["lora_dropout"] = 0.0
    text = json.dumps(peft_config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    return write_adapter(
        Path(directory).absolute(), tensors | extra_tensors, text.encode(), overwrite
    )


def _checked_alpha(path: str, name: str, w: LoraWeights, alpha: float) -> float:
    """``alpha`` when `load_peft` would accept it (finite, ``|alpha| <= MAX_ALPHA``).

    Raises:
      ValueError: it is not (naming the kernel and module).
    """
    if not abs(alpha) <= MAX_ALPHA:
        raise ValueError(
            f"save_peft: the adapter at {path!r} (module {name!r}, scale {float(w.scale)!r}, "
            f"rank {w.rank}) needs lora_alpha={alpha!r}; PEFT files hold a finite alpha, and "
            f"load_peft refuses |alpha| > {MAX_ALPHA:g}. Nothing was written."
        )
    return alpha


def _parts(adapters: PyTree) -> tuple[dict[str, LoraWeights], dict[str, Extra]]:
    """The adapters' LoRA entries and their other entries, by path.

    Raises:
      ValueError: no LoRA entries.
      TypeError: stacked trained copies or token deltas (of `lora.stack`), naming their paths.
    """
    table = adapter_table(adapters)
    if not table:
        extras = split(adapters, is_lora)[1]
        raise ValueError(
            "lora.save_peft: the adapter tree holds no LoRA factors"
            + (" (only trained copies / token deltas)." if extras else " (it is empty).")
        )
    return table, split_plain(adapters, "save_peft")[1]


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


def _str(name: Name) -> str:
    return name if isinstance(name, str) else ", ".join(name)


def _names(table: dict[str, LoraWeights], name_of: Namer, default: bool) -> dict[str, Name]:
    """The key map's name of each kernel (an expert kernel's, a parameter's: with the default
    key map its leaf name is kept, ``experts.w_in``); ``default``: the key map is the default.

    Raises:
      ValueError: kernels without a module name; layered kernels named by the default key map.
    """
    names = {path: name_of(path) for path in table}
    if default:
        names |= {
            p: f"{names[p]}.{leaf_name(p)}" for p, w in table.items() if w.expert_axes and names[p]
        }
    unmapped = [path for path, name in names.items() if name is None]
    if unmapped:
        raise ValueError(
            f"save_peft: key_map gives no PyTorch module name for the adapters at "
            f"{describe(unmapped)}; every adapted kernel needs one."
        )
    layered = [p for p, w in table.items() if w.layer_axes]
    if default and layered:
        raise ValueError(
            f"save_peft: {describe(layered)} adapt layered kernels (a leading layer axis), "
            "which PEFT stores as one module per layer; pass a key_map whose names for them "
            f"contain {LAYER!r} (e.g. 'layers.{LAYER}.attn.query'), replaced by each layer index."
        )
    return {path: name for path, name in names.items() if name is not None}


def _modules(table: dict[str, LoraWeights], names: dict[str, Name]) -> list[Module]:
    """The PEFT modules (or parameters) the adapters make: layer by layer for layered kernels,
    expert by expert for names with ``{expert}``, part by part for fused kernels (a tuple of
    names), and one module of the kernels named ``"<module>[i]"`` together.

    Raises:
      ValueError: several kernels with one name; a name that does not fit a kernel.
    """
    modules = [m for path, w in table.items() for m in layer_modules(path, names[path], w)]
    modules = [x for m in modules for x in expert_modules(m)]
    modules = join_modules([x for m in modules for x in split_modules(m)])
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


def _expert_files(
    modules: list[Module], names: dict[str, Name], spec: ExpertSpec
) -> dict[str, str]:
    """The parameter name -> its file module name (``.base_layer`` nesting), of each expert
    kernel's module (``w.expert_axes``), checked.

    Raises:
      ValueError: an adapter ParamWrapper cannot hold; a parameter name without a module; a
        module both adapted as a module and holding adapted parameters; several parameters of
        a module without their order (each names the paths or module).
    """
    experts = [m for m in modules if m.w.expert_axes]
    for m in experts:
        check_expert(m.path, m.w)
        if not split_param(_str(m.name))[0]:
            raise ValueError(
                f"save_peft: the expert kernel {m.path!r} is named {m.name!r}; PEFT targets a "
                "parameter of a submodule as '<module>.<param>' (e.g. 'experts.w1')."
            )
    owners = {split_param(_str(m.name))[0] for m in experts}
    both = sorted(owners & {_str(m.name) for m in modules if not m.w.expert_axes})
    if both:
        raise ValueError(
            f"save_peft: modules {both} are adapted as modules (target_modules) and hold adapted "
            "expert parameters (target_parameters); PEFT refuses a module targeted both ways."
        )
    templates = {_str(m.name): _str(names[m.path]) for m in experts}
    return nesting([_str(m.name) for m in experts], templates, spec, "save_peft")
