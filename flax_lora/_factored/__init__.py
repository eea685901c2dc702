"""The factored engine: run a model with its adapters without forming an adapted kernel."""

from flax_lora._factored._routing import RoutingFallback
from flax_lora._factored._trace import Tracer, call_factored

__all__ = ["RoutingFallback", "Tracer", "call_factored"]
