"""The factored engine: runs a model with its adapters without forming an adapted kernel.

The data path of one call, file by file:

- `_trace`: the entry points (`call_factored`, `call_routed`) and the trace cache;
- `_view`: each adapted kernel enters as a `KernelView` (plain, layered or routed), whose
  carried axes this module lays out, slices and maps; `_quant_base`: a quantized ``W0`` in a
  view, or alone, dequantized at its uses;
- `_interpreter`: evaluates the jaxpr, one rule per primitive (the rule table `RULES`), with
  the typed result of `_contract` (`Unfactored`) when a use cannot be factored;
- the rules: `_layout_ops` (casts, transposes, reshapes on views), `_scale` (a view scaled
  by a scalar, ``w * c``), `_rules` (``dot_general``,
  ``gather``, ``conv_general_dilated``), `_expert_rules` (``dot_general`` and
  ``ragged_dot_general`` of expert kernels, the expert axis kept a batch / group dimension),
  `_lowrank` (their low-rank branches and the Dense branch's hand-written VJP), `_scan`
  (layered kernels, sliced per layer), `_routing` (per-example adapters).
"""
