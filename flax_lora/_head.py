"""The model's output head, seen in a traced probe: the kernels whose product *is* an output.

PEFT's ``target_modules="all-linear"`` leaves out the output layer (a transformers model's
``get_output_embeddings()``, the LM head; for sequence classification the classifier). A Flax
model has no such method, so the head is found by following values forward through the probe's
jaxpr, each value in one of four states:

- a **side** value: computed from literals and the params' leaves of fewer than 2 dimensions
  only (biases, norm scales, a softcap), never from the model's input or a kernel (not tracked);
- a **kernel**: a leaf of 2 or more dimensions, or one taken through ops with side values only
  (a cast, a transpose, ``w * w_scale``);
- a **head** value of kernel ``p``: the product (``dot_general``, ``ragged_dot_general``,
  ``conv_general_dilated``) of an activation with ``p``, then changed by ops whose other operands
  are side values or the same head value (a bias, a cast, a softcap, ``log_softmax``);
- **data**: anything else (the model's input, closed over by the probe; a residual sum of a
  product with the stream it came from).

A kernel is a head when a head value of it is an output of the traced function. So an LM's
``lm_head`` and a classifier's last Dense are heads, and so is a plain MLP's last layer (nothing
follows it); the last projection of a residual block is not (its output is added to the
stream), nor is a kernel followed by another product. Call-like equations (``jit``, remat,
custom derivatives, ``scan``) are followed into their bodies. The probe's input must come from
outside the traced function (``lambda p: model.apply(p, x)``): an input made inside it from
literals would count as a side value.
"""

from __future__ import annotations

from typing import Literal

from flax_lora import _jaxpr as jx

State = tuple[Literal["kernel", "head", "data"], str]
"""A tracked value's state and, for a kernel or head value, the kernel's path."""

DATA: State = ("data", "")
PRODUCTS = frozenset({"dot_general", "ragged_dot_general", "conv_general_dilated"})
"""The primitives whose output is the product of an activation with a kernel."""


def output_heads(jaxpr: jx.Jaxpr, kernels: dict[jx.Var, str]) -> set[str]:
    """The paths of the kernels that are output heads of the traced function ``jaxpr``, whose
    invars ``kernels`` are the kernel leaves (var -> path); its constvars are the model's
    input."""
    env: dict[jx.Var, State] = {v: ("kernel", p) for v, p in kernels.items()}
    env.update((c, DATA) for c in jaxpr.constvars)
    outs = _flow(jaxpr, env)
    return {s[1] for s in outs if s is not None and s[0] == "head"}


def _flow(jaxpr: jx.Jaxpr, env: dict[jx.Var, State]) -> list[State | None]:
    """The states of ``jaxpr``'s outvars given those of its vars in ``env`` (others: side)."""
    for eqn in jaxpr.eqns:
        ins = [None if isinstance(v, jx.Literal) else env.get(v) for v in eqn.invars]
        if not any(ins):
            continue
        sub = jx.sub_body(eqn)
        if sub is not None:
            inner = {iv: s for iv, s in zip(sub.jaxpr.invars, ins, strict=True) if s is not None}
            outs = _flow(sub.jaxpr, inner)
        else:
            outs = [_state(eqn.primitive.name, ins)] * len(eqn.outvars)
        env.update((o, s) for o, s in zip(eqn.outvars, outs, strict=True) if s is not None)
    return [None if isinstance(v, jx.Literal) else env.get(v) for v in jaxpr.outvars]


def _state(name: str, ins: list[State | None]) -> State:
    """The state of the outputs of a primitive (not call-like) whose operands are ``ins``."""
    states = {s for s in ins if s is not None}
    kernels = [s for s in ins if s is not None and s[0] == "kernel"]
    if name in PRODUCTS and len(kernels) == 1:
        return ("head", kernels[0][1])
    if len(states) == 1:  # one tracked value, the other operands side values
        (only,) = states
        if only[0] in ("kernel", "head") and (only[0] == "head" or len(kernels) == 1):
            return only
    return DATA
