"""The entries of `lora.init` beside the factors: trained copies (``modules_to_save``, trained
biases) and trainable token rows (``trainable_token_indices``), chosen from the config."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_lora import _regex
from flax_lora._adapters._extras import TokenDelta, TrainedCopy
from flax_lora._config import LoraConfig
from flax_lora._paths import describe, flatten, leaf_name, module_path
from flax_lora._probe import Use
from flax_lora._typing import Kind, PyTree


def saved_leaves(leaves: dict[str, PyTree], config: LoraConfig) -> list[str]:
    """The floating leaves of the modules in ``config.modules_to_save`` (a module's path, or
    that of a module it is inside, fullmatches a pattern)."""
    if not config.modules_to_save:
        return []
    out, used, what = [], set(), "LoraConfig.modules_to_save"
    for path, leaf in leaves.items():
        parts = path.split("/")
        for k in range(1, len(parts)):
            module = "/".join(parts[:k])
            hit = [p for p in config.modules_to_save if _regex.fullmatch(p, module, what)]
            if hit:
                used.update(hit)
                if jnp.issubdtype(getattr(leaf, "dtype", jnp.int32), jnp.floating):
                    out.append(path)
                break
    unused = [p for p in config.modules_to_save if p not in used]
    if unused:
        modules = list(dict.fromkeys(module_path(p) for p in leaves if "/" in p))
        raise ValueError(
            f"LoraConfig.modules_to_save: {unused} match no module of params (a pattern must "
            f"re.fullmatch a module's path, the path of its leaves without the leaf name). "
            f"Modules seen: {describe(modules, limit=40)}."
        )
    return out


def init_extras(
    original: PyTree,
    leaves: dict[str, PyTree],
    saved: list[str],
    selected: dict[str, tuple[Kind, tuple[int, ...]]],
    config: LoraConfig,
    uses: dict[str, Use] | None,
) -> dict[str, TrainedCopy | TokenDelta]:
    """Path -> `TrainedCopy` / `TokenDelta` for modules_to_save, trained biases and tokens.

    ``original`` is the params tree as passed to `lora.init` (its values are copied), ``leaves``
    its flat leaves as `lora.init` chose kernels among them (a quantized kernel as its shape),
    ``saved`` the leaves of ``modules_to_save`` (`saved_leaves`), ``selected`` the adapted
    kernels.
    """
    values = flatten(original)  # the real values (a quantized base stands in as shapes above)

    def copy_of(path: str) -> jax.Array:
        if path not in values or not hasattr(values[path], "dtype"):
            raise TypeError(
                f"lora.init: {path!r} is to be trained whole (modules_to_save / bias), but params "
                f"hold no plain array there ({type(leaves[path]).__name__}); pass the float "
                "params (e.g. lora.dequantize(params))."
            )
        return jnp.array(values[path], copy=True)

    out: dict[str, TrainedCopy | TokenDelta] = {}
    for path in saved:
        out[path] = TrainedCopy(value=copy_of(path), role="module")
    if config.bias != "none":
        floating = lambda p: jnp.issubdtype(getattr(leaves[p], "dtype", jnp.int32), jnp.floating)
        if config.bias == "all":
            biases = [p for p in leaves if leaf_name(p) == "bias" and floating(p)]
            if not biases:
                raise ValueError(
                    "LoraConfig(bias='all'): params hold no floating leaf named 'bias'. Leaves: "
                    f"{describe(leaves, limit=20)}."
                )
        else:
            modules = [module_path(p) for p in selected if "/" in p]
            biases = [f"{m}/bias" for m in modules if f"{m}/bias" in leaves]
            if not biases:
                raise ValueError(
                    "LoraConfig(bias='lora_only') trains the biases of the adapted modules, but "
                    f"none of them has a leaf named 'bias': looked for "
                    f"{describe([f'{m}/bias' for m in modules])}. Use bias='none' for modules "
                    "without biases."
                )
        for path in biases:
            if path not in out:  # a bias of a module in modules_to_save is trained there
                out[path] = TrainedCopy(value=copy_of(path), role="bias")
    if config.trainable_token_indices is not None:
        for path, ids in _token_embeddings(leaves, config, uses).items():
            embedding = leaves[path]
            if path in selected or path in out:
                raise ValueError(
                    f"LoraConfig.trainable_token_indices: the table {path!r} also gets "
                    f"{'LoRA factors' if path in selected else 'a trained copy'}; a table can "
                    "have one of the two. Exclude it from targets (exclude=...) or from "
                    "modules_to_save."
                )
            bad = [i for i in ids if i >= embedding.shape[0]]
            if bad:
                raise ValueError(
                    f"LoraConfig.trainable_token_indices: token ids {bad} are out of range for "
                    f"the table {path!r} of shape {tuple(embedding.shape)} (ids must be below "
                    f"{embedding.shape[0]})."
                )
            delta = jnp.zeros((len(ids), *embedding.shape[1:]), config.dtype)
            out[path] = TokenDelta(
                delta=delta, indices=tuple(ids), num_rows=int(embedding.shape[0])
            )
    return out


def _token_embeddings(
    leaves: dict[str, PyTree], config: LoraConfig, uses: dict[str, Use] | None
) -> dict[str, tuple[int, ...]]:
    """Embedding path -> token ids, for ``config.trainable_token_indices``."""
    spec = config.trainable_token_indices
    embed = lambda p: uses is not None and p in uses and uses[p].kind == "embed"
    is_embedding = lambda p: (
        getattr(leaves[p], "ndim", 0) == 2 and (leaf_name(p) == "embedding" or embed(p))
    )
    embeddings = [p for p in leaves if is_embedding(p)]
    if not isinstance(spec, dict):
        if not embeddings:
            raise ValueError(
                "LoraConfig.trainable_token_indices: params hold no Embed table (a 2-D leaf named "
                "'embedding'); pass {regex: ids} to name the table."
            )
        return {p: spec for p in embeddings}
    out: dict[str, tuple[int, ...]] = {}
    what = "LoraConfig.trainable_token_indices"
    for pattern, ids in spec.items():
        hits = [
            p
            for p in leaves
            if getattr(leaves[p], "ndim", 0) >= 2
            and any(_regex.fullmatch(pattern, q, what) for q in (p, module_path(p) or p))
        ]
        if not hits:
            raise ValueError(
                f"LoraConfig.trainable_token_indices: {pattern!r} matches no table of params (it "
                "must re.fullmatch a 2-D table's path or its module's path). Embed tables seen: "
                f"{describe(embeddings)}."
            )
        for p in hits:
            if leaves[p].ndim != 2:
                raise ValueError(
                    f"LoraConfig.trainable_token_indices: {pattern!r} matches {p!r} of shape "
                    f"{tuple(leaves[p].shape)}; token rows need a 2-D (num, features) table."
                )
            if p in out:
                raise ValueError(
                    f"LoraConfig.trainable_token_indices: {p!r} is matched by several patterns."
                )
            out[p] = ids
    return out
