"""Which kernels `lora.init` adapts: the config's patterns and the probe's uses choose them
(`select_kernels`: each one's kind and input axes), and the probe's scans give the layer axes
of the layered ones and the layers picked on them (`layered_kernels`).

Without a probe the candidates are the 2-D leaves named ``kernel`` or ``embedding`` (Flax's
names, `flax_lora._paths.KERNEL_LEAVES`) or, with explicit targets, every 2-D leaf they match;
with a probe, every leaf it contracts or gathers.
"""

from __future__ import annotations

import re

import jax.numpy as jnp

from flax_lora._config import LoraConfig, layer_index
from flax_lora._paths import KERNEL_LEAVES, describe, leaf_name
from flax_lora._probe import Use
from flax_lora._typing import Kind, PyTree


def select_kernels(
    leaves: dict[str, PyTree], config: LoraConfig, uses: dict[str, Use] | None
) -> dict[str, tuple[Kind, tuple[int, ...]]]:
    """Path -> (kind, input axes) of every kernel the config adapts."""
    candidates = {}
    for path, leaf in leaves.items():
        ndim = getattr(leaf, "ndim", 0)
        if ndim < 2:
            continue
        if uses is not None:
            if path in uses or (config.targets is not None and config.matches(path)):
                candidates[path] = leaf
        elif config.targets is not None or leaf_name(path) in KERNEL_LEAVES:
            candidates[path] = leaf
    targeted = {p: x for p, x in candidates.items() if config.matches(p, layer_in_path=False)}
    _check_layers_found(targeted, config, uses)
    # a layered kernel's layers are the entries of its leading axis, not a number in its
    # path: `layered_kernels` picks them
    is_layered = lambda p: uses is not None and p in uses and bool(uses[p].layer_axes)
    chosen = [p for p in candidates if config.matches(p, layer_in_path=not is_layered(p))]
    if not chosen:
        raise ValueError(
            f"LoraConfig(targets={config.targets!r}, exclude={config.exclude!r}, "
            f"layers={config.layers!r}) matches no kernel. Kernels seen: "
            f"{describe(candidates, limit=40)}." + _no_probe_hint(leaves, config, uses)
        )
    out = {}
    for path in chosen:
        leaf = candidates[path]
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                f"Kernel {path!r} has dtype {leaf.dtype}; LoRA adapts floating-point kernels only."
            )
        if 0 in leaf.shape:
            raise ValueError(
                f"Kernel {path!r} has shape {tuple(leaf.shape)}: an axis of size 0 leaves nothing "
                "to adapt. Exclude it (LoraConfig.exclude) or give the layer a nonzero size."
            )
        is_embedding = leaf.ndim == 2 and leaf_name(path) == "embedding"
        if uses is not None and path in uses and not (is_embedding and uses[path].kind == "dense"):
            kind, in_axes = uses[path].kind, uses[path].in_axes
        elif leaf.ndim == 2:
            # An embedding's rows are its input axis also when the probe only contracts it
            # (``attend``), as without a probe.
            kind = "embed" if leaf_name(path) == "embedding" else "dense"
            in_axes = (0,)
        elif uses is not None:
            raise ValueError(
                f"Kernel {path!r} of shape {tuple(leaf.shape)} is matched by targets but the probe "
                "never contracts or gathers it, so its input axes are unknown."
            )
        else:
            raise ValueError(
                f"Kernel {path!r} has shape {tuple(leaf.shape)} ({leaf.ndim} dimensions): pass "
                "probe=lambda p: model.apply(p, x) to lora.init so that its input axes can be "
                "learned (2-D kernels need no probe)."
            )
        n_experts = len(uses[path].expert_axes) if uses is not None and path in uses else 0
        if not in_axes or len(in_axes) + n_experts >= leaf.ndim:
            raise ValueError(
                f"Kernel {path!r} of shape {tuple(leaf.shape)}: the probe contracts axes "
                f"{in_axes}, which leaves no input or no output axis to factor."
            )
        out[path] = (kind, tuple(in_axes))
    return out


def _check_layers_found(
    candidates: dict[str, PyTree], config: LoraConfig, uses: dict[str, Use] | None
) -> None:
    """Raises if an index of ``config.layers`` picks no layer of any of the ``candidates`` (the
    kernels that targets / exclude select): not a position on a layered kernel's layer
    axis (the probe found it) nor the layer number of another kernel's path. An index that is
    in range for some kernels only (layer axes of different lengths) adapts those."""
    if config.layers is None or not candidates:
        return  # nothing selected at all: `select_kernels` says so
    counts: dict[int, list[str]] = {}  # number of layers -> the layered kernels with that many
    numbers: dict[str, int | None] = {}  # other kernels -> the layer number in their paths
    for path, leaf in candidates.items():
        layer_axes = tuple(uses[path].layer_axes) if uses is not None and path in uses else ()
        if layer_axes:
            counts.setdefault(int(leaf.shape[layer_axes[0]]), []).append(path)
        else:
            numbers[path] = layer_index(path, config.layers_pattern)
    found = {i for i in numbers.values() if i is not None}
    bad = sorted({i for i in config.layers if i not in found and not any(i < n for n in counts)})
    if not bad:
        return
    seen = [f"{describe(ps)} stacked by a scan, with {n} layer(s)" for n, ps in counts.items()]
    if numbers:
        where = f"layer numbers {sorted(found)}" if found else "no layer number"
        seen.append(
            f"{len(numbers)} other kernel(s) with {where} in their paths ("
            + (
                "the first number in a path)"
                if config.layers_pattern is None
                else "the number in the component that layers_pattern matches, or the next one)"
            )
        )
    hint = ""
    if uses is None and any(candidates[p].ndim > 2 for p in numbers):
        hint = (
            " A kernel of 3 or more dimensions may be stacked by nn.scan / nnx.scan: pass "
            "probe=lambda p: model.apply(p, x) so that its layer axis is found."
        )
    raise ValueError(
        f"LoraConfig(layers={config.layers!r}) matches no kernel at layer index(es) {bad}: the "
        f"kernels that targets / exclude select are {'; '.join(seen)}.{hint}"
    )


def _no_probe_hint(
    leaves: dict[str, PyTree], config: LoraConfig, uses: dict[str, Use] | None
) -> str:
    """For a config that matches nothing without a probe and with ``targets=None``: the rule
    that picked the candidates, the leaves it passed over, and what to pass instead."""
    if uses is not None or config.targets is not None:
        return ""
    big = [p for p, leaf in leaves.items() if getattr(leaf, "ndim", 0) >= 2]
    others = [p for p in big if leaf_name(p) not in KERNEL_LEAVES]
    if others:
        example = "|".join(re.escape(p) for p in others[:2])
        todo = (
            f"To adapt other leaves, pass targets= (regexes that re.fullmatch their paths, e.g. "
            f"targets={example!r}; 2-D leaves then take their rows as the input axis) or "
            "probe=lambda p: apply_fn(p, x) (every leaf the traced function contracts or "
            "gathers becomes a kernel)."
        )
    else:
        todo = "The tree has no other leaf of 2 or more dimensions to adapt."
    return (
        " Without a probe and with targets=None, only leaves named 'kernel' or 'embedding' "
        f"(Flax's names) are candidates. Leaves of 2 or more dimensions in params: "
        f"{describe(big, limit=10)}. {todo}"
    )


def layered_kernels(
    selected: dict[str, tuple[Kind, tuple[int, ...]]],
    uses: dict[str, Use] | None,
    leaves: dict[str, PyTree],
    config: LoraConfig,
) -> dict[str, tuple[int, tuple[int, ...] | None]]:
    """Path -> (number of leading layer axes, picked layers or ``None``) of the layered kernels
    among ``selected``; drops from ``selected`` the layered kernels with no picked layer.

    Raises:
      ValueError: a scan slices a kernel on an axis that is not leading, a layered kernel has
        no output axis, or no kernel is left once ``layers`` is applied.
    """
    if uses is None:
        return {}
    out: dict[str, tuple[int, tuple[int, ...] | None]] = {}
    for path in list(selected):
        use = uses.get(path)
        lax_ = tuple(getattr(use, "layer_axes", ()) or ())
        if not lax_:
            continue
        shape = tuple(leaves[path].shape)
        n = len(lax_)
        if lax_ != tuple(range(n)):
            raise ValueError(
                f"Kernel {path!r} of shape {shape} is sliced by a scan on axes {lax_}; stacked "
                "layers must be its leading axes."
            )
        in_axes = selected[path][1]
        experts = tuple(getattr(use, "expert_axes", ()) or ())
        if any(i < n for i in (*in_axes, *experts)) or len(in_axes) + len(experts) + n >= len(
            shape
        ):
            raise ValueError(
                f"Kernel {path!r} of shape {shape} with {n} layer axis(es): the probe contracts "
                f"axes {in_axes}, which leaves no input or no output axis to factor."
            )
        layers = None
        if config.layers is not None:
            layers = tuple(sorted({i for i in config.layers if 0 <= i < shape[0]}))
            if not layers:
                del selected[path]
                continue
        out[path] = (n, layers)
    if not selected:
        raise ValueError(
            f"LoraConfig(layers={config.layers!r}) picks no layer of the stacked kernels "
            f"{describe(list(uses))}."
        )
    return out
