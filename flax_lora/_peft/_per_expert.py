"""Expert kernels as one PyTorch module per expert (``{expert}`` in a key map's name).

An expert kernel (`LoraWeights.expert_axes`, one expert axis) named
``"model.layers.{layer}.mlp.experts.{expert}.gate_proj"`` is written as ``E`` ordinary modules,
module ``e`` holding exactly what an adapter of the kernel's expert ``e`` (the kernel without its
expert axis) would: the layout vLLM serves, instead of PEFT's ``target_parameters``. Read back,
the modules of every expert are needed (one rank and scale for all); the expert axis is the
probe's, else the kernel's first (after its layer axis).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from flax_lora._adapters._weights import LoraWeights
from flax_lora._peft._layered import Module
from flax_lora._peft._names import EXPERT, has, layer_name
from flax_lora._probe import Use


# -- save ----------------------------------------------------------------------------------------
def expert_modules(m: Module) -> list[Module]:
    """One module per expert of an expert kernel's adapter whose name has ``{expert}``, else
    ``[m]``.

    Raises:
      ValueError: ``{expert}`` in the name of a kernel with no expert axis or several, or
        missing from the name of one written by module (naming the kernel).
    """
    w = m.w
    if not has(m.name, EXPERT):
        return [m]
    if len(w.expert_axes) != 1 or w.m is not None:
        raise ValueError(
            f"save_peft: key_map names the kernel {m.path!r} {m.name!r}, with the placeholder "
            f"{EXPERT!r}, but its adapter has {len(w.expert_axes)} expert axes"
            + (" and a DoRA magnitude" if w.m is not None else "")
            + "; one module per expert needs exactly one expert axis (no DoRA)."
        )
    return [
        Module(m.path, layer_name(m.name, e, EXPERT), w.carried_slice(a=w.a[e], b=w.b[e]))
        for e in range(w.carried_shape[0])
    ]


# -- load ----------------------------------------------------------------------------------------
def expert_axis(use: Use | None) -> int:
    """The expert axis of an (unlayered) kernel: the probe's, else 0."""
    experts = tuple(use.expert_axes) if use is not None else ()
    return experts[0] if experts else 0


def expert_use(use: Use | None, axis: int) -> Use | None:
    """What the probe saw of one expert's kernel (the expert axis ``axis`` dropped)."""
    if use is None:
        return None
    return Use(use.kind, tuple(d - (d > axis) for d in use.in_axes if d != axis))


def join_experts(
    path: str,
    template: str,
    axis: int,
    shape: tuple[int, ...],
    pieces: Mapping[int, LoraWeights],
    where: str,
) -> LoraWeights:
    """One expert adapter of the (unlayered) kernel of ``shape`` with expert axis ``axis`` from
    its experts' adapters (by expert).

    Raises:
      ValueError: experts missing, or differing in rank, scale or layout (naming the modules
        ``template`` and the file ``where``).
    """
    count = shape[axis]
    missing = [e for e in range(count) if e not in pieces]
    how = {(w.rank, float(w.scale), w.in_axes, w.kind) for w in pieces.values()}
    if missing or len(how) > 1:
        raise ValueError(
            f"load_peft: {where!r}: the expert kernel {path!r} of shape {shape} is the modules "
            f"{template!r}, one per expert; "
            + (
                f"the file lacks experts {missing} (every expert's module is needed)."
                if missing
                else f"its experts differ in rank, scale or layout: {sorted(map(str, how))}."
            )
        )
    first = pieces[0]
    return first.replace(
        a=jnp.stack([pieces[e].a for e in range(count)]),
        b=jnp.stack([pieces[e].b for e in range(count)]),
        in_axes=tuple(d + (d >= axis) for d in first.in_axes),
        kernel_shape=shape,
        expert_axes=(axis,),
    )
