"""`lora.select`: which kernels a config adapts and which it skips, and why, before `lora.init`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flax_lora._config import LoraConfig
from flax_lora._init._init_extras import saved_leaves
from flax_lora._init._select import choose, kind_of
from flax_lora._paths import flatten
from flax_lora._probe import kernel_uses
from flax_lora._quant._formats import as_shapes, has_quantized
from flax_lora._typing import Kind, PyTree


@dataclasses.dataclass(frozen=True)
class Choice:
    """One leaf of 2 or more dimensions: whether `lora.init` adapts it, and why.

    Examples:
      >>> params = {"dense": {"kernel": jnp.ones((3, 4))}, "w": jnp.ones((2, 2))}
      >>> picked, skipped = lora.select(params, lora.LoraConfig(rank=2)).choices
      >>> picked.path, picked.shape, picked.picked, picked.reason
      ('dense/kernel', (3, 4), True, "named 'kernel' (Flax's name)")
      >>> skipped.path, skipped.picked, skipped.reason
      ('w', False, "not named 'kernel' or 'embedding' ...")

    Attributes:
      path: the leaf's path.
      shape: its shape.
      picked: whether `lora.init` gives it an adapter.
      reason: why it is picked or skipped, in words.
      kind: ``"dense"``, ``"embed"`` or ``"conv"`` where known (the probe's, or by name for a
        2-D leaf), else ``None``.
      in_axes: its input axes where known (the probe's; the rows of a 2-D leaf), else ``None``.
    """

    path: str
    shape: tuple[int, ...]
    picked: bool
    reason: str
    kind: Kind | None
    in_axes: tuple[int, ...] | None


@dataclasses.dataclass(frozen=True)
class Selection:
    """What `lora.select` found: one `Choice` per leaf of 2 or more dimensions, in tree order.

    ``str(selection)`` is a table (path, shape, picked or skipped, kind, reason).

    Examples:
      >>> model = nn.Sequential([nn.Embed(10, 8), nn.Dense(8), nn.Dense(2)])  # a tiny LM
      >>> tokens = jnp.ones((1, 4), int)
      >>> params, probe = model.init(jax.random.key(0), tokens), lambda p: model.apply(p, tokens)
      >>> s = lora.select(params, lora.LoraConfig(targets="all-linear"), probe=probe)
      >>> s.picked  # the paths lora.init adapts
      ['params/layers_1/kernel']
      >>> s.skipped["params/layers_2/kernel"]
      "all-linear: the model's output head (its product is an output of the probe)"

    Attributes:
      choices: one `Choice` per leaf of 2 or more dimensions.
    """

    choices: tuple[Choice, ...]

    @property
    def picked(self) -> list[str]:
        """The paths `lora.init` adapts, in tree order."""
        return [c.path for c in self.choices if c.picked]

    @property
    def skipped(self) -> dict[str, str]:
        """Path -> the reason, of every leaf of 2 or more dimensions left out."""
        return {c.path: c.reason for c in self.choices if not c.picked}

    def __str__(self) -> str:
        width = max([len(c.path) for c in self.choices] + [4])
        lines = [f"{'path':<{width}}  {'shape':>14}  {'':7}  {'kind':5}  reason"]
        for c in self.choices:
            shape = "x".join(map(str, c.shape))
            lines.append(
                f"{c.path:<{width}}  {shape:>14}  {'picked' if c.picked else 'skipped':7}  "
                f"{c.kind or '':5}  {c.reason}"
            )
        lines.append(f"picked: {len(self.picked)} || skipped: {len(self.skipped)}")
        return "\n".join(lines)


def select(
    params: PyTree,
    config: LoraConfig,
    probe: Callable[[PyTree], PyTree] | None = None,
    show: bool = False,
) -> Selection:
    """Lists which kernels ``config`` picks for `lora.init` and which leaves it skips, and why.

    The same rule as `lora.init` (with the same ``probe``), run without making any adapter and
    without raising when nothing matches: each leaf of 2 or more dimensions gets a `Choice`
    whose ``reason`` says what picked it (the probe's use, Flax's leaf name, ``targets``,
    ``"all-linear"``) or what left it out (no use seen by the probe, its leaf name, ``targets``,
    ``exclude``, ``layers``, ``modules_to_save``, or for ``"all-linear"``: an embedding, a
    convolution, the output head). `lora.init` may still refuse a picked kernel (a kernel of 3
    or more dimensions without a probe, a size-0 axis, a non-floating dtype).

    What ``"all-linear"`` takes as the model's output head: `docs/guides/config.md`.

    Examples:
      >>> model = nn.Sequential([nn.Embed(10, 8), nn.Dense(8), nn.Dense(2)])  # a tiny LM
      >>> tokens = jnp.ones((1, 4), int)
      >>> params, probe = model.init(jax.random.key(0), tokens), lambda p: model.apply(p, tokens)
      >>> s = lora.select(params, lora.LoraConfig(targets="all-linear"), probe=probe, show=True)
      path                           shape           kind   reason
      params/layers_0/embedding       10x8  skipped  embed  all-linear: an embedding (Embed table)
      params/layers_1/kernel           8x8  picked   dense  all-linear: contracted as a linear map
      params/layers_2/kernel           8x2  skipped  dense  all-linear: the model's output head ...
      picked: 1 || skipped: 2

    Args:
      params: a Linen variables dict, an NNX state, or any pytree (a quantized tree is read
        for its shapes).
      config: the config to check.
      probe: as `lora.init`'s: a function of the params alone, traced abstractly.
      show: print the table.

    Returns:
      A `Selection`: ``.picked`` (paths), ``.skipped`` (path -> reason), ``.choices``.

    Raises:
      TypeError: ``config`` is not a `LoraConfig`.
      ValueError: ``modules_to_save`` matches no module; a probe that reads no leaf.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"lora.select expects a LoraConfig; got {type(config).__name__}.")
    if has_quantized(params):
        params = as_shapes(params)
    leaves = flatten(params)
    uses = None if probe is None else kernel_uses(probe, params)
    saved = set(saved_leaves(leaves, config))
    found = choose({p: x for p, x in leaves.items() if p not in saved}, config, uses)
    choices = []
    for path, leaf in leaves.items():
        if getattr(leaf, "ndim", 0) < 2:
            continue
        kind = kind_of(path, leaf, uses)
        in_axes = None
        if uses is not None and path in uses and kind != "embed":
            in_axes = tuple(uses[path].in_axes)
        elif kind is not None:
            in_axes = (0,)
        if path in saved:
            picked, reason = False, "trained whole (modules_to_save)"
        else:
            picked, reason = found[path].picked, found[path].reason
        choices.append(Choice(path, tuple(leaf.shape), picked, reason, kind, in_axes))
    result = Selection(tuple(choices))
    if show:
        print(result)
    return result
