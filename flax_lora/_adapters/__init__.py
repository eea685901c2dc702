"""The adapter data types and what their factors stand for.

- `_weights`: `LoraWeights` (one kernel's factors), `StackedLoraWeights` (a stack of them for
  routing) and `AdapterLayout`, the axis layout they share (input, output and carried axes);
- `_extras`: the extras, adapter entries beside the factors (`TrainedCopy`, `TokenDelta`, and
  their stacked forms), and how they apply to the params;
- `_tables`: the tables of an adapter tree (path -> entry), and its split into factors and extras;
- `_delta`: the update ``scale * a @ b`` in the kernel's layout, the masks of carried indices
  an adapter does not adapt, and the check that an adapter fits its kernel;
- `_dora`: DoRA's norms and kernels.
"""
