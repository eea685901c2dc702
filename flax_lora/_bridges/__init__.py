"""Bridges: flax_lora adapters inside the loops that expect a module (tunix, gemma samplers).

- `_nnx_bridge`: `lora.NnxBridge`, an ``nnx.Module`` holding a base NNX model and its adapters
  as ``nnx.LoRAParam`` variables, run through `lora.wrap`; `lora.to_adapters`, `lora.merged`;
- `_linen_bridge`: `lora.LinenBridge`, a Linen module whose params are
  ``{"base": ..., "lora": adapters}``, run through `lora.wrap` (``mutable=["cache"]`` passed
  through for decoding).
"""
