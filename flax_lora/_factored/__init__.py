"""The factored engine: runs a model with its adapters without forming an adapted kernel.

The data path of one call, file by file:

- `_trace`: the entry points (`call_factored`, `call_routed`) and the trace cache;
- `_view`: each adapted kernel enters as a `KernelView` (plain, layer-stacked or routed), whose
  carried axes this module lays out, slices and maps; `_base`: a quantized ``W0`` in a view,
  or alone, dequantized at its uses;
- `_interpreter`: evaluates the jaxpr, one rule per primitive (`RULES`), with the typed result
  of `_contract` (`Unfactored`) when a use cannot be factored;
- the rules: `_layout` (casts, transposes, reshapes on views), `_rules` (``dot_general``,
  ``gather``, ``conv_general_dilated``), `_experts` (``dot_general`` and ``ragged_dot_general``
  of expert kernels, the expert axis kept a batch / group dimension), `_lowrank` (their
  low-rank branches and the Dense branch's hand-written VJP), `_scan` (stacked layers),
  `_routing` (per-example adapters).
"""

from flax_lora._factored._trace import RoutingFallback, Tracer, call_factored, call_routed

__all__ = ["RoutingFallback", "Tracer", "call_factored", "call_routed"]
