"""Several adapter sets of one model: stacked for per-example routing, or combined into one.

- `_stack`: `lora.stack` / `lora.unstack`, and what a routed call reads from a stack (the
  per-example factors and DoRA factors);
- `_stack_extras`: the extras (trained copies, token deltas) stacked, picked and combined;
- `_combine`: `lora.combine`, PEFT's ``add_weighted_adapter`` methods.
"""
