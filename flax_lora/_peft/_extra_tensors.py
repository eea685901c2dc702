"""PEFT files: the tensors beyond the LoRA factors: ``modules_to_save``, ``bias``, tokens.

PEFT's names (checked against ``peft`` 0.21's ``save_pretrained``):

- ``modules_to_save``: ``base_model.model.<module>.<param>`` (``weight``, ``bias``; the
  wrapper's ``modules_to_save.<adapter>`` part is dropped on save), with the module names in
  ``adapter_config.json``'s ``modules_to_save``.
- ``bias="all"`` / ``"lora_only"``: ``base_model.model.<module>.bias``, or
  ``<module>.base_layer.bias`` for a module that has LoRA factors.
- ``trainable_token_indices``: ``base_model.model.<embedding>.token_adapter.trainable_tokens_delta``
  of shape ``(k, dim)``, the ids in ``adapter_config.json`` (``{module name: [ids]}``). Despite
  its name it holds the *new rows* (PEFT writes them with ``index_copy``), i.e. ``W0[ids] +
  delta`` in our terms (`TokenDelta` holds the additive delta), so writing needs the base embedding
  and reading subtracts it.

Flax leaf -> PyTorch parameter: ``kernel`` -> ``weight`` (a 2-D Dense kernel transposed; a
kernel of 3+ dimensions is refused on save, since a conv and a multi-axis Dense kernel need
different layouts; on load a conv weight ``(out, in, *window)`` is read into Flax's
``(*window, in, out)``), ``embedding`` and ``scale`` -> ``weight``, ``bias`` -> ``bias``
(flattened), any other leaf name as itself (`flax_lora._peft._tensor_layouts.to_torch`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from flax_lora import _regex
from flax_lora._adapters._extras import Extra, TokenDelta, TrainedCopy, check_token_delta
from flax_lora._config import LoraConfig
from flax_lora._paths import describe, flatten, leaf_name, module_path
from flax_lora._peft._names import (
    BASE_LAYER,
    LAYER,
    PREFIX,
    TOKENS,
    Namer,
    module_of,
    split_tensor_key,
    torch_param,
)
from flax_lora._peft._tensor_layouts import from_torch, to_torch
from flax_lora._typing import PyTree


# -- save ----------------------------------------------------------------------------------------
def save_extras(
    extras: Mapping[str, Extra],
    name_of: Namer,
    lora_modules: set[str],
    lora_kernels: Iterable[str],
    params: PyTree,
    config: LoraConfig | None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors of the extra nodes in PEFT's names, and the ``adapter_config.json`` fields
    they need (``modules_to_save``, ``trainable_token_indices``, ``bias``); ``lora_modules``
    and ``lora_kernels`` are the module names and kernel paths that have LoRA factors.

    Raises:
      ValueError: a leaf without a module name, a token delta without ``params`` (PEFT stores
        the rows themselves), or a layout PEFT cannot hold; each names the paths.
    """
    tensors: dict[str, np.ndarray] = {}
    saved_modules: set[str] = set()
    tokens: dict[str, list[int]] = {}
    biases: list[str] = []
    unmapped = []
    base = flatten(params) if params is not None else None
    for path, node in extras.items():
        name = module_of(name_of, path)
        if name is None:
            unmapped.append(path)
            continue
        if LAYER in name:
            raise ValueError(
                f"save_peft: {path!r} is named {name!r}, a scan-stacked module; trained copies "
                "and token deltas of scan-stacked leaves cannot be written as PEFT modules yet."
            )
        if isinstance(node, TokenDelta):
            tensors[f"{PREFIX}{name}{TOKENS}"] = _token_rows(path, node, base)
            tokens[name] = list(node.indices)
            continue
        if node.role == "module":
            saved_modules.add(name)
            key = f"{PREFIX}{name}.{torch_param(path)}"
        else:
            biases.append(path)
            base_layer = BASE_LAYER if name in lora_modules else ""
            key = f"{PREFIX}{name}{base_layer}.{torch_param(path)}"
        if key in tensors:
            raise ValueError(f"save_peft: two leaves map to the PEFT tensor {key!r} ({path!r}).")
        tensors[key] = _copy_tensor(path, node)
    if unmapped:
        raise ValueError(
            "save_peft: key_map gives no PyTorch module name for the trained copies / token "
            f"deltas at {describe(unmapped)}."
        )
    fields = {
        "modules_to_save": sorted(saved_modules) or None,
        "trainable_token_indices": tokens or None,
        "bias": _bias_mode(biases, lora_kernels, config),
    }
    return tensors, fields


def _token_rows(path: str, node: TokenDelta, base: dict[str, Any] | None) -> np.ndarray:
    """PEFT's ``trainable_tokens_delta`` of a token delta: the trained rows ``W0[ids] + delta``,
    float32."""
    if base is None or path not in base or not hasattr(base[path], "dtype"):
        raise ValueError(
            f"save_peft: the adapters hold a token delta for {path!r}; PEFT stores the "
            "trained rows themselves (W0[ids] + delta), so pass params=<the base params> "
            "to save_peft."
        )
    embedding = jnp.asarray(base[path])
    check_token_delta(path, node, tuple(embedding.shape), "save_peft")
    rows = embedding[jnp.asarray(node.indices)].astype(jnp.float32) + jnp.asarray(
        node.delta, jnp.float32
    )
    return np.ascontiguousarray(np.asarray(jax.device_get(rows), np.float32))


def _copy_tensor(path: str, node: TrainedCopy) -> np.ndarray:
    """A trained copy in its PyTorch twin's layout, float32.

    Raises:
      ValueError: a kernel of 3 or more dimensions, whose PyTorch layout is ambiguous.
    """
    if leaf_name(path) == "kernel" and node.value.ndim > 2:
        # a conv (*window, in, out) and a multi-axis Dense kernel need different PyTorch
        # layouts, and a trained copy does not say which it is: never guess
        raise ValueError(
            f"save_peft: the trained copy of the {node.value.ndim}-D kernel at {path!r} "
            "(modules_to_save) has no unambiguous PyTorch layout (a conv weight, or a "
            "Linear weight of a multi-axis Dense kernel?); only 2-D kernels (Linear), "
            "embeddings, biases and norm scales are written."
        )
    return to_torch(path, node.value)


def _bias_mode(biases: list[str], lora_kernels: Iterable[str], config: LoraConfig | None) -> str:
    """PEFT's ``bias``: ``"none"`` without trained biases, else the config's, else
    ``"lora_only"`` when every trained bias belongs to a module with LoRA factors."""
    if not biases:
        return "none"
    if config is not None and config.bias != "none":
        return config.bias
    module = lambda p: module_path(p) or p  # a top-level leaf counts as its own module
    lora_paths = {module(p) for p in lora_kernels}
    return "lora_only" if all(module(b) in lora_paths for b in biases) else "all"


# -- load ----------------------------------------------------------------------------------------
def load_extras(
    raw: Mapping[str, np.ndarray],
    cfg: Mapping[str, Any],
    params: PyTree,
    name_of: Namer,
    file: str,
    dtype: DTypeLike | None,
) -> dict[str, Extra]:
    """Path -> `TrainedCopy` / `TokenDelta` from the non-LoRA tensors of a PEFT file.

    Raises:
      ValueError: a tensor the config does not account for (it would be dropped), one that
        matches no leaf of ``params`` or does not fit it, token ids out of range or missing
        from the config; each names the tensor or path.
    """
    leaves = flatten(params) if raw else {}
    names: dict[tuple[str, str], str] = {}  # (module name, torch param) -> leaf path
    for path in leaves:
        name = module_of(name_of, path)
        if name is not None:
            names.setdefault((name, torch_param(path)), path)
    out: dict[str, Extra] = {}
    unknown = []
    for key, tensor in raw.items():
        read = _read_extra(key, tensor, cfg, leaves, names, file, dtype)
        if read is None:
            unknown.append(key)
        else:
            out[read[0]] = read[1]
    if unknown:
        raise ValueError(
            f"load_peft: {file!r} holds tensors that its adapter_config.json does not account "
            f"for (modules_to_save={list(cfg.get('modules_to_save') or [])}, "
            f"bias={cfg.get('bias') or 'none'!r}): {describe([PREFIX + k for k in unknown])}; "
            "loading part of the adapter would silently change the model."
        )
    if cfg.get("trainable_token_indices") and not any(
        isinstance(v, TokenDelta) for v in out.values()
    ):
        raise ValueError(
            f"load_peft: {file!r} sets trainable_token_indices but holds no '{TOKENS[1:]}' tensor."
        )
    return out


def _read_extra(
    key: str,
    tensor: np.ndarray,
    cfg: Mapping[str, Any],
    leaves: dict[str, Any],
    names: dict[tuple[str, str], str],
    file: str,
    dtype: DTypeLike | None,
) -> tuple[str, Extra] | None:
    """The path and node of the tensor named ``key`` (prefix removed); ``None`` for a tensor
    the config does not account for. ``names``: (module name, torch param) -> leaf path.

    Raises:
      ValueError: the tensor matches no leaf of ``params``, or does not fit it.
    """
    kind, module, param = split_tensor_key(key) or ("?", "", "")
    if kind == "tokens":
        ids = _token_ids(cfg.get("trainable_token_indices"), module, file)
        path = names.get((module, "weight"))
        if path is None:
            raise ValueError(
                f"load_peft: the trainable tokens of {module!r} in {file!r} match no Embed "
                "table of params (the key map names none so)."
            )
        return path, _token_delta(key, tensor, module, ids, path, leaves[path], dtype)
    saved = cfg.get("modules_to_save") or []
    is_saved = kind == "plain" and any(module.endswith(m) for m in saved)
    is_bias = param == "bias" and (cfg.get("bias") or "none") != "none"
    if kind == "?" or not (is_saved or is_bias):
        return None
    path = names.get((module, param))
    if path is None:
        raise ValueError(
            f"load_peft: {file!r} holds {PREFIX + key!r} ("
            f"{'modules_to_save' if is_saved else 'a trained bias'}), which matches no leaf "
            f"of params: the key map names no leaf {module!r} with a PyTorch {param!r}."
        )
    leaf = leaves[path]
    value = from_torch(path, tensor, tuple(np.shape(leaf)), "load_peft")
    value = jnp.asarray(value, dtype or getattr(leaf, "dtype", jnp.float32))
    return path, TrainedCopy(value=value, role="module" if is_saved else "bias")


def _token_delta(
    key: str,
    rows: np.ndarray,
    module: str,
    ids: list[int],
    path: str,
    embedding: ArrayLike | jax.ShapeDtypeStruct,
    dtype: DTypeLike | None,
) -> TokenDelta:
    """The `TokenDelta` ``rows - W0[ids]`` of PEFT's trained rows of the embedding at ``path``.

    Raises:
      ValueError: ``params`` holds no values for the embedding; ids out of range; a misfit.
    """
    if not hasattr(embedding, "dtype") or isinstance(embedding, jax.ShapeDtypeStruct):
        raise ValueError(
            f"load_peft: the trainable tokens of {module!r} are stored as rows; the delta "
            f"needs the base table's values at {path!r}, but params hold none there."
        )
    bad = [i for i in ids if not 0 <= i < embedding.shape[0]]
    if bad:
        raise ValueError(
            f"load_peft: token ids {bad} of {module!r} are out of range for the table "
            f"{path!r} of shape {tuple(embedding.shape)}."
        )
    expected = (len(ids), *embedding.shape[1:])
    if tuple(rows.shape) != expected:
        raise ValueError(
            f"load_peft: {key!r} has shape {tuple(rows.shape)}; the table {path!r} "
            f"with ids {ids} needs {expected}."
        )
    base_rows = np.asarray(jax.device_get(embedding), np.float32)[np.asarray(ids)]
    delta = np.asarray(rows, np.float32) - base_rows
    return TokenDelta(
        delta=jnp.asarray(delta, dtype or jnp.float32),
        indices=tuple(ids),
        num_rows=int(embedding.shape[0]),
    )


def _token_ids(spec: Any, module: str, file: str) -> list[int]:
    """The ids of ``module``'s trainable tokens from PEFT's ``trainable_token_indices`` (a list,
    or ``{name: ids}`` with PEFT's suffix match on the module name)."""
    if isinstance(spec, dict):
        what = f"load_peft: {file!r}: trainable_token_indices"
        hits = [
            ids
            for k, ids in spec.items()
            if module.endswith(k) or _regex.fullmatch(k, module, what)
        ]
        if len(hits) != 1:
            raise ValueError(
                f"load_peft: {file!r} has trainable tokens for {module!r}, but "
                f"trainable_token_indices={spec!r} gives {'no' if not hits else 'several'} id "
                "lists for it."
            )
        ids = hits[0]
    elif spec:
        ids = spec
    else:
        raise ValueError(
            f"load_peft: {file!r} has trainable tokens for {module!r} but no "
            "trainable_token_indices in adapter_config.json."
        )
    return [int(i) for i in ids]
