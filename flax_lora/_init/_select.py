"""Which kernels `lora.init` adapts: the config's patterns and the probe's uses choose them
(`choose`: each leaf picked or skipped, with the reason `lora.select` shows; `select_kernels`:
each chosen kernel's kind and input axes), and the probe's scans give the layer axes of the
layered ones and the layers picked on them (`layered_kernels`).

Candidates: with a probe, every leaf it contracts or gathers (and any leaf ``targets`` names
by its path); without one, the leaves of 2 or more dimensions named ``kernel`` or
``embedding`` (Flax's names, `flax_lora._paths.KERNEL_LEAVES`) or, with explicit targets,
every one they match (a module's plain name only its kernel). ``targets="all-linear"``: the
candidates contracted as linear maps, not embeddings, convolutions or the output head
(`flax_lora._head`; without a probe, 2-D ``kernel`` leaves, the head by the vocabulary size).
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp

from flax_lora._config import ALL_LINEAR, LoraConfig, layer_index, layer_tuple, target_matches
from flax_lora._paths import KERNEL_LEAVES, describe, leaf_name
from flax_lora._probe import Use
from flax_lora._typing import Kind, PyTree


@dataclasses.dataclass(frozen=True)
class Pick:
    """Whether `lora.init` adapts a leaf of 2 or more dimensions, and why.

    Attributes:
      picked: adapted.
      reason: why it is picked or skipped, in words.
      candidate: a kernel by the first rule (the probe's uses, Flax's leaf names, ``targets``
        without a probe, ``"all-linear"``), before ``targets`` / ``exclude`` / ``layers``.
    """

    picked: bool
    reason: str
    candidate: bool


def choose(
    leaves: dict[str, PyTree], config: LoraConfig, uses: dict[str, Use] | None
) -> dict[str, Pick]:
    """Path -> `Pick` of every leaf of 2 or more dimensions of ``leaves``."""
    out = {}
    embeddings = {p: x for p, x in leaves.items() if _is_embedding(p, x)}
    for path, leaf in leaves.items():
        if getattr(leaf, "ndim", 0) < 2:
            continue
        why_not = _not_candidate(path, leaf, config, uses, embeddings)
        if why_not is not None:
            out[path] = Pick(False, why_not, False)
            continue
        layered = uses is not None and path in uses and bool(uses[path].layer_axes)
        kernel = path in uses if uses is not None else leaf_name(path) in KERNEL_LEAVES
        why_not = _unmatched(path, config, layered, kernel)
        out[path] = Pick(why_not is None, why_not or _why_picked(path, config, uses), True)
    return out


def _is_embedding(path: str, leaf: PyTree) -> bool:
    return getattr(leaf, "ndim", 0) == 2 and leaf_name(path) == "embedding"


def kind_of(path: str, leaf: PyTree, uses: dict[str, Use] | None) -> Kind | None:
    """The kernel kind of a leaf: the probe's (an embedding contracted by ``attend`` only is
    still an Embed), or for a 2-D leaf without a use, by its name; ``None``: unknown."""
    if uses is not None and path in uses:
        return "embed" if _is_embedding(path, leaf) else uses[path].kind
    if getattr(leaf, "ndim", 0) == 2:
        return "embed" if leaf_name(path) == "embedding" else "dense"
    return None


def _not_candidate(
    path: str,
    leaf: PyTree,
    config: LoraConfig,
    uses: dict[str, Use] | None,
    embeddings: dict[str, PyTree],
) -> str | None:
    """Why the leaf at ``path`` is not a candidate kernel, or ``None`` when it is one."""
    unused = "the probe does not contract or gather it"
    if config.targets == ALL_LINEAR:
        return _not_linear(path, leaf, uses, embeddings)
    if uses is not None:
        if path in uses or (config.targets is not None and _targeted(path, config, False)):
            return None
        return unused + ("" if config.targets is None else ", and targets do not match it")
    if config.targets is not None or leaf_name(path) in KERNEL_LEAVES:
        return None
    return (
        "not named 'kernel' or 'embedding' (without a probe or targets only Flax's kernel "
        "names are candidates: pass probe= or targets=)"
    )


NOT_LINEAR: dict[Kind, str] = {
    "embed": "an embedding (Embed table)",
    "conv": "a convolution kernel",
}
"""The kernel kinds ``targets="all-linear"`` leaves out (as PEFT), and how `lora.select` says so."""


def _not_linear(
    path: str, leaf: PyTree, uses: dict[str, Use] | None, embeddings: dict[str, PyTree]
) -> str | None:
    """Why ``targets="all-linear"`` leaves the leaf out (PEFT's rule: every linear layer but the
    output head), or ``None``."""
    tag = "all-linear: "
    if uses is not None:
        if path not in uses:
            return tag + "the probe does not contract it"
        kind = kind_of(path, leaf, uses)
        if kind in NOT_LINEAR:
            return tag + NOT_LINEAR[kind]
        if uses[path].head:
            return tag + "the model's output head (its product is an output of the probe)"
        return None
    if leaf_name(path) == "embedding":
        return tag + NOT_LINEAR["embed"]
    if leaf_name(path) != "kernel":
        return tag + "without a probe only leaves named 'kernel' are linear kernels"
    if leaf.ndim != 2:
        return tag + (
            f"without a probe only 2-D kernels ({leaf.ndim}-D may be a convolution, an Einsum or "
            "a DenseGeneral kernel: pass probe=)"
        )
    vocab = [p for p, e in embeddings.items() if e.shape[0] == leaf.shape[1]]
    if vocab:
        return tag + (
            "taken as the output head: without a probe, a 2-D kernel whose output size is the "
            f"number of rows of the embedding {vocab[0]!r} (pass probe= to find the head by "
            "its use)"
        )
    return None


def _targeted(path: str, config: LoraConfig, kernel: bool) -> bool:
    """Whether an entry of ``config.targets`` (a tuple) selects ``path``; a module's plain name
    selects only a ``kernel`` leaf of it."""
    what = "LoraConfig.targets"
    return any(target_matches(p, path, what, kernel) for p in config.targets or ())


def _unmatched(path: str, config: LoraConfig, layered: bool, kernel: bool) -> str | None:
    """Why ``targets`` / ``exclude`` / ``layers`` leave out a candidate (a ``kernel``: used by
    the probe, or without one named as Flax names kernels), or ``None``."""
    if config.targets not in (None, ALL_LINEAR) and not _targeted(path, config, kernel):
        return "targets do not match it"
    what = "LoraConfig.exclude"
    hit = [p for p in config.exclude or () if target_matches(p, path, what)]
    if hit:
        return f"excluded by {hit[0]!r}"
    if config.layers is not None and not layered:
        index = layer_index(path, config.layers_pattern)
        if index is None:
            return f"no layer number in its path (layers={list(layer_tuple(config))})"
        if index not in layer_tuple(config):
            return f"layer {index} is not in layers={list(layer_tuple(config))}"
    return None


def _why_picked(path: str, config: LoraConfig, uses: dict[str, Use] | None) -> str:
    if config.targets == ALL_LINEAR:
        return "all-linear: contracted as a linear map"
    if config.targets is not None:
        return "targets match it"
    if uses is not None:
        return f"the probe sees it as a {uses[path].kind} kernel"
    return f"named {leaf_name(path)!r} (Flax's name)"


def select_kernels(
    leaves: dict[str, PyTree], config: LoraConfig, uses: dict[str, Use] | None
) -> dict[str, tuple[Kind, tuple[int, ...]]]:
    """Path -> (kind, input axes) of every kernel the config adapts."""
    choices = choose(leaves, config, uses)
    candidates = {p: leaves[p] for p, c in choices.items() if c.candidate}
    targeted = {p: x for p, x in candidates.items() if config.matches(p, layer_in_path=False)}
    _check_layers_found(targeted, config, uses)
    # a layered kernel's layers are the entries of its leading axis, not a number in its
    # path: `layered_kernels` picks them
    chosen = [p for p, c in choices.items() if c.picked]
    if not chosen:
        raise ValueError(
            f"LoraConfig(targets={config.targets!r}, exclude={config.exclude!r}, "
            f"layers={config.layers!r}) matches no kernel. Kernels seen: "
            f"{describe(candidates, limit=40)}."
            + _no_probe_hint(leaves, config, uses)
            + " lora.select(params, config, probe) lists why each leaf is skipped."
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
        kind = kind_of(path, leaf, uses)
        if (
            uses is not None
            and path in uses
            and not (_is_embedding(path, leaf) and uses[path].kind == "dense")
        ):
            kind, in_axes = uses[path].kind, uses[path].in_axes
        elif kind is not None:
            # An embedding's rows are its input axis also when the probe only contracts it
            # (``attend``), as without a probe.
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
    bad = sorted(
        {i for i in layer_tuple(config) if i not in found and not any(i < n for n in counts)}
    )
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
            " A kernel of 3 or more dimensions may be layered (nn.scan / nnx.scan): pass "
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
) -> tuple[
    dict[str, tuple[Kind, tuple[int, ...]]],
    dict[str, tuple[int, tuple[int, ...] | None, int]],
]:
    """``selected`` without the layered kernels with no picked layer, and path -> (number of
    layer axes, picked layers or ``None``, the kernel axis where its layer axes start:
    ``LoraWeights.layer_at``) of the layered kernels left. ``selected`` is not changed; its
    input axes stay in the kernel's own layout.

    Raises:
      ValueError: a scan slices a kernel on axes that are not next to each other, a layered
        kernel has no output axis, or no kernel is left once ``layers`` is applied.
    """
    if uses is None:
        return selected, {}
    kept = dict(selected)
    out: dict[str, tuple[int, tuple[int, ...] | None, int]] = {}
    for path in selected:
        use = uses.get(path)
        lax_ = tuple(getattr(use, "layer_axes", ()) or ())
        if not lax_:
            continue
        shape = tuple(leaves[path].shape)
        n = len(lax_)
        at = lax_[0]
        if lax_ != tuple(range(at, at + n)):
            raise ValueError(
                f"Kernel {path!r} of shape {shape} is sliced by scans on axes {lax_}; its "
                "layer axes must be next to each other, in order."
            )
        in_axes = selected[path][1]
        experts = tuple(getattr(use, "expert_axes", ()) or ())
        if any(i in lax_ for i in (*in_axes, *experts)) or len(in_axes) + len(experts) + n >= len(
            shape
        ):
            raise ValueError(
                f"Kernel {path!r} of shape {shape} with {n} layer axis(es): the probe contracts "
                f"axes {in_axes}, which leaves no input or no output axis to factor."
            )
        layers = None
        if config.layers is not None:
            layers = tuple(sorted({i for i in layer_tuple(config) if 0 <= i < shape[at]}))
            if not layers:
                del kept[path]
                continue
        out[path] = (n, layers, at)
    if not kept:
        raise ValueError(
            f"LoraConfig(layers={config.layers!r}) picks no layer of the layered kernels "
            f"{describe(list(uses))}."
        )
    return kept, out
