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
  delta`` in our terms (`TokenDelta` holds the additive delta), so writing needs the base table
  and reading subtracts it.

Flax leaf -> PyTorch parameter: ``kernel`` -> ``weight`` (a 2-D Dense kernel transposed; a
kernel of 3+ dimensions is refused on save, since a conv and a multi-axis Dense kernel need
different layouts; on load a conv weight ``(out, in, *window)`` is read into Flax's
``(*window, in, out)``), ``embedding`` and ``scale`` -> ``weight``, ``bias`` -> ``bias``
(flattened), any other leaf name as itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._extras import TokenDelta, TrainedCopy, check_token_delta
from flax_lora._paths import describe, flatten

PyTree = Any
PREFIX = "base_model.model."
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"
TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
_TORCH_PARAM = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def torch_param(path: str) -> str:
    """The PyTorch parameter name of the Flax leaf at ``path`` (its last component)."""
    leaf = path.rsplit("/", 1)[-1]
    return _TORCH_PARAM.get(leaf, leaf)


def module_of(fn: Callable[[str], str | None], path: str, module_name: Callable[..., Any]) -> Any:
    """The PyTorch module name of the leaf at ``path``: the key map of the path itself, else of
    its module's ``kernel`` / ``embedding`` (a dict key map names kernels only)."""
    module = path.rsplit("/", 1)[0] if "/" in path else ""
    for candidate in (path, f"{module}/kernel", f"{module}/embedding"):
        name = module_name(fn, candidate)
        if name is not None:
            return name
    return None


def to_torch(path: str, x: Any) -> np.ndarray:
    """A Flax leaf in its PyTorch twin's layout, float32.

    Raises:
      ValueError: a kernel of 3 or more dimensions that is not a conv kernel PEFT could hold.
    """
    x = np.asarray(jax.device_get(x)).astype(np.float32)
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "kernel":
        if x.ndim == 2:
            x = x.T
        elif x.ndim >= 3:  # Flax conv (*window, in, out) -> PyTorch (out, in, *window)
            x = np.moveaxis(np.moveaxis(x, -1, 0), -1, 1)
    elif leaf == "bias":
        x = x.reshape(-1)
    return np.ascontiguousarray(x)


def from_torch(path: str, t: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A PyTorch tensor as the Flax leaf of ``shape`` at ``path`` (the inverse of `to_torch`).

    Raises:
      ValueError: the tensor does not fit (naming the path and both shapes).
    """
    leaf = path.rsplit("/", 1)[-1]
    t = np.asarray(t)
    if leaf == "kernel" and len(shape) == 2 and t.shape == shape[::-1]:
        return t.T
    if leaf == "kernel" and len(shape) >= 3:
        conv = (shape[-1], shape[-2], *shape[:-2])
        if t.shape == conv:
            return np.moveaxis(np.moveaxis(t, 0, -1), 0, -2)
    elif t.shape == shape or (leaf != "kernel" and t.size == int(np.prod(shape))):
        return t.reshape(shape)
    raise ValueError(
        f"{where}: the tensor for {path!r} has shape {tuple(t.shape)}, which does not fit the "
        f"Flax leaf of shape {shape} (a Linear weight is the transposed kernel, a conv weight "
        "(out, in, *window))."
    )


# -- save ----------------------------------------------------------------------------------------
def save_extras(
    extras: dict[str, Any],
    fn: Callable[[str], str | None],
    module_name: Callable[..., Any],
    lora_modules: set[str],
    params: PyTree,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors of the extra nodes in PEFT's names and the config fields they need
    (``modules_to_save``, ``trainable_token_indices``, whether biases were written).

    Raises:
      ValueError: a leaf without a module name, a token delta without ``params`` (PEFT stores
        the rows themselves), or a layout PEFT cannot hold; each names the paths.
    """
    tensors: dict[str, np.ndarray] = {}
    saved_modules: list[str] = []
    tokens: dict[str, list[int]] = {}
    biases: list[str] = []
    unmapped = []
    base = flatten(params) if params is not None else None
    for path, node in extras.items():
        name = module_of(fn, path, module_name)
        if name is None:
            unmapped.append(path)
            continue
        if "{layer}" in name:
            raise ValueError(
                f"save_peft: {path!r} is named {name!r}, a scan-stacked module; trained copies "
                "and token deltas of scan-stacked leaves cannot be written as PEFT modules yet."
            )
        if isinstance(node, TokenDelta):
            if base is None or path not in base or not hasattr(base[path], "dtype"):
                raise ValueError(
                    f"save_peft: the adapters hold a token delta for {path!r}; PEFT stores the "
                    "trained rows themselves (W0[ids] + delta), so pass params=<the base params> "
                    "to save_peft."
                )
            table = jnp.asarray(base[path])
            check_token_delta(path, node, tuple(table.shape), "save_peft")
            rows = table[jnp.asarray(node.indices)].astype(jnp.float32) + jnp.asarray(
                node.delta, jnp.float32
            )
            tensors[f"{PREFIX}{name}{TOKENS_SUFFIX}"] = np.ascontiguousarray(
                np.asarray(jax.device_get(rows), np.float32)
            )
            tokens[name] = list(node.indices)
            continue
        param = torch_param(path)
        if path.rsplit("/", 1)[-1] == "kernel" and node.value.ndim > 2:
            # a conv (*window, in, out) and a multi-axis Dense kernel need different PyTorch
            # layouts, and a trained copy does not say which it is: never guess
            raise ValueError(
                f"save_peft: the trained copy of the {node.value.ndim}-D kernel at {path!r} "
                "(modules_to_save) has no unambiguous PyTorch layout (a conv weight, or a "
                "Linear weight of a multi-axis Dense kernel?); only 2-D kernels (Linear), "
                "embeddings, biases and norm scales are written."
            )
        if node.role == "module":
            saved_modules.append(name)
            key = f"{PREFIX}{name}.{param}"
        else:
            biases.append(path)
            key = f"{PREFIX}{name}{'.base_layer' if name in lora_modules else ''}.{param}"
        if key in tensors:
            raise ValueError(f"save_peft: two leaves map to the PEFT tensor {key!r} ({path!r}).")
        tensors[key] = to_torch(path, node.value)
    if unmapped:
        raise ValueError(
            "save_peft: key_map gives no PyTorch module name for the trained copies / token "
            f"deltas at {describe(unmapped)}."
        )
    fields = {
        "modules_to_save": sorted(set(saved_modules)) or None,
        "trainable_token_indices": tokens or None,
        "biases": biases,
    }
    return tensors, fields


# -- load ----------------------------------------------------------------------------------------
def split_tensor_key(key: str) -> tuple[str, str, str] | None:
    """``(kind, module, param)`` of a non-LoRA PEFT tensor name (prefix removed): kind
    ``"tokens"``, ``"base_bias"`` (``<module>.base_layer.bias``) or ``"plain"``."""
    if key.endswith(TOKENS_SUFFIX):
        return "tokens", key[: -len(TOKENS_SUFFIX)], ""
    if key.endswith(".base_layer.bias"):
        return "base_bias", key[: -len(".base_layer.bias")], "bias"
    if "." not in key:
        return None
    module, param = key.rsplit(".", 1)
    return "plain", module, param


def load_extras(
    raw: dict[str, np.ndarray],
    cfg: dict[str, Any],
    params: PyTree,
    fn: Callable[[str], str | None],
    module_name: Callable[..., Any],
    file: str,
    dtype: Any,
) -> dict[str, Any]:
    """Path -> `TrainedCopy` / `TokenDelta` from the non-LoRA tensors of a PEFT file.

    Raises:
      ValueError: a tensor the config does not account for (it would be dropped), one that
        matches no leaf of ``params`` or does not fit it, token ids out of range or missing
        from the config; each names the tensor or path.
    """
    if not raw:
        if cfg.get("trainable_token_indices"):
            raise ValueError(
                f"load_peft: {file!r} sets trainable_token_indices but holds no "
                f"'{TOKENS_SUFFIX[1:]}' tensor."
            )
        return {}
    leaves = flatten(params)
    names: dict[tuple[str, str], str] = {}  # (module name, torch param) -> leaf path
    for path in leaves:
        name = module_of(fn, path, module_name)
        if name is not None:
            names.setdefault((name, torch_param(path)), path)
    saved = list(cfg.get("modules_to_save") or [])
    bias = cfg.get("bias") or "none"
    token_spec = cfg.get("trainable_token_indices")
    out: dict[str, Any] = {}
    unknown = []
    for key, tensor in raw.items():
        kind, module, param = split_tensor_key(key) or ("?", "", "")
        if kind == "tokens":
            ids = _token_ids(token_spec, module, file)
            path = names.get((module, "weight"))
            if path is None:
                raise ValueError(
                    f"load_peft: the trainable tokens of {module!r} in {file!r} match no Embed "
                    "table of params (the key map names none so)."
                )
            table = leaves[path]
            if not hasattr(table, "dtype") or isinstance(table, jax.ShapeDtypeStruct):
                raise ValueError(
                    f"load_peft: the trainable tokens of {module!r} are stored as rows; the delta "
                    f"needs the base table's values at {path!r}, but params hold none there."
                )
            bad = [i for i in ids if not 0 <= i < table.shape[0]]
            if bad:
                raise ValueError(
                    f"load_peft: token ids {bad} of {module!r} are out of range for the table "
                    f"{path!r} of shape {tuple(table.shape)}."
                )
            expected = (len(ids), *table.shape[1:])
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"load_peft: {key!r} has shape {tuple(tensor.shape)}; the table {path!r} "
                    f"with ids {ids} needs {expected}."
                )
            base_rows = np.asarray(jax.device_get(table), np.float32)[np.asarray(ids)]
            delta = np.asarray(tensor, np.float32) - base_rows
            out[path] = TokenDelta(
                delta=jnp.asarray(delta, dtype or jnp.float32),
                indices=tuple(ids),
                num_rows=int(table.shape[0]),
            )
            continue
        is_saved = kind == "plain" and any(module.endswith(m) for m in saved)
        is_bias = param == "bias" and bias != "none"
        if kind == "?" or not (is_saved or is_bias):
            unknown.append(key)
            continue
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
        out[path] = TrainedCopy(value=value, role="module" if is_saved else "bias")
    if unknown:
        raise ValueError(
            f"load_peft: {file!r} holds tensors that its adapter_config.json does not account "
            f"for (modules_to_save={saved}, bias={bias!r}): "
            f"{describe([PREFIX + k for k in unknown])}; loading part of the adapter would "
            "silently change the model."
        )
    if token_spec and not any(isinstance(v, TokenDelta) for v in out.values()):
        raise ValueError(
            f"load_peft: {file!r} sets trainable_token_indices but holds no "
            f"'{TOKENS_SUFFIX[1:]}' tensor."
        )
    return out


def _token_ids(spec: Any, module: str, file: str) -> list[int]:
    """The ids of ``module``'s trainable tokens from PEFT's ``trainable_token_indices`` (a list,
    or ``{name: ids}`` with PEFT's suffix match on the module name)."""
    if isinstance(spec, dict):
        hits = [ids for k, ids in spec.items() if module.endswith(k) or re.fullmatch(k, module)]
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
