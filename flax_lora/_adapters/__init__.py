"""The adapter data types and what their factors stand for.

- `_weights`: `LoraWeights` (one kernel's factors), `StackedLoraWeights` (a stack of them for
  routing), `Axes`, the axis layout they share (input, output and carried axes), and
  `AdapterLayout`, a `LoraWeights`'s static fields without its arrays;
- `_extras`: the extras, adapter entries beside the factors (`TrainedCopy`, `TokenDelta`, and
  their stacked forms), each applying itself to its leaf;
- `_substitute`: the extras applied to a params tree (`substitute`, `unmerge_extras`);
- `_tables`: the tables of an adapter tree (path -> entry), and its split into factors and extras;
- `_delta`: the update ``scale * a @ b`` in the kernel's layout, the masks of carried indices
  an adapter does not adapt, and the check that an adapter fits its kernel;
- `_dora`: DoRA's norms and kernels.
"""
