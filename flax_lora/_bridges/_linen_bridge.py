"""`lora.LinenBridge`: a Linen module whose params are a base model's params and its adapters.

Samplers of the ``gemma`` kind take a Linen ``(model, params)`` pair and call
``model.apply({"params": params, "cache": cache}, tokens, ..., mutable=["cache"])``. With
``model = lora.LinenBridge(base)`` and ``params = {"base": base_params, "lora": adapters}`` that
call runs ``base`` through `lora.wrap`; every other collection (the KV cache) is the base
model's own, passed through and written back.
"""

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax.core import DenyList
from flax.core.scope import CollectionFilter

from flax_lora._typing import MODES, Mode, PyTree
from flax_lora._wrap import wrap

Streams = dict[str, jax.Array] | None
"""The RNG streams of a bridge's call, by name (``None``: none)."""


def _run_module(
    params: PyTree,
    *args: PyTree,
    lora_bridge: tuple[nn.Module, PyTree, CollectionFilter, Streams],
    **kwargs: PyTree,
) -> PyTree:
    """``module.apply`` on the base params and the other collections, ``mutable`` and the RNG
    streams passed on.

    ``lora_bridge`` is ``(module, other collections, mutable, rngs)``: a keyword, so that
    `lora.wrap` with ``lora_ids`` routes the model's own positional inputs only and hands it to
    every example whole."""
    module, others, mutable, rngs = lora_bridge
    variables = {"params": params, **others}
    return module.apply(variables, *args, mutable=mutable, rngs=rngs, **kwargs)


# one wrapped runner per mode, shared by every Linen bridge
RUNNERS: dict[str, Callable[..., PyTree]] = {
    "auto": wrap(_run_module, "auto"),
    "factored": wrap(_run_module, "factored"),
    "merged": wrap(_run_module, "merged"),
}


class LinenBridge(nn.Module):
    """A base Linen module run with flax_lora adapters that live in its params.

    ``bridge.apply({"params": {"base": base_params, "lora": adapters}, **collections}, *args,
    **kwargs)`` is ``model.apply({"params": base_params, **collections}, *args, **kwargs)`` with
    every adapted kernel ``W0 + scale * a @ b``, computed by `lora.wrap` in ``mode``. The other
    collections (``"cache"``, ``"batch_stats"``, ...) are the base model's, at the same paths;
    those the call may change (``mutable=["cache"]``) come back as the base model's would, so a
    sampler's decoding loop runs unchanged. The merged ``(model, params)`` pair is
    ``(bridge.model, lora.merge(params["base"], params["lora"]))``. Guide:
    `docs/guides/bridges.md`.

    Sharp edges: only ``__call__`` runs through the bridge (a sampler calling
    ``apply(..., method=...)`` of the base model needs the merged pair); ``bridge.init`` has
    nothing to build: make the params from ``model.init`` and `lora.init`.

    Examples:
      >>> model, x = nn.Dense(4), jnp.ones((2, 3))
      >>> base_params = model.init(jax.random.key(0), x)["params"]
      >>> adapters = lora.init(jax.random.key(1), base_params, lora.LoraConfig(rank=2))
      >>> bridge, params = lora.LinenBridge(model), {"base": base_params, "lora": adapters}
      >>> bridge.apply({"params": params}, x).shape  # other collections pass as the model's
      (2, 4)

    Attributes:
      model: the base Linen module.
      mode: `lora.wrap`'s mode: ``"auto"``, ``"factored"`` or ``"merged"``.

    Raises:
      ValueError: at ``apply``: params that are not ``{"base": ..., "lora": ...}``; an unknown
        ``mode``; adapters that do not fit the base params (as `lora.wrap`).
      TypeError: at ``apply``: ``model`` is not a Linen module.
    """

    model: nn.Module
    mode: Mode = "auto"

    @nn.nowrap
    def _check(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(
                f"lora.LinenBridge: model must be a Linen nn.Module; got "
                f"{type(self.model).__name__}. For an NNX model use lora.NnxBridge."
            )
        if self.mode not in MODES:
            raise ValueError(f"lora.LinenBridge: mode must be one of {MODES}; got {self.mode!r}.")

    # quoted: this module is evaluated without postponed annotations (a Linen module's fields),
    # and the signature should read PyTree, not the Any it aliases
    def __call__(self, *args: "PyTree", **kwargs: "PyTree") -> "PyTree":
        """The base model's ``__call__`` with the adapters (run it through ``bridge.apply``).

        Args:
          *args: the base model's positional inputs.
          **kwargs: its keyword inputs, and ``lora_rng`` / ``lora_ids`` as in `lora.wrap`.

        Returns:
          What the base model returns.
        """
        self._check()
        variables = self.variables
        params = variables.get("params")
        if not isinstance(params, Mapping) or set(params) != {"base", "lora"}:
            got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
            raise ValueError(
                "lora.LinenBridge: the 'params' collection must be {'base': base_params, "
                "'lora': adapters} (adapters from lora.init on base_params); got "
                f"{got}."
            )
        others = {name: tree for name, tree in variables.items() if name != "params"}
        mutable = _inner_mutable(self.scope.mutable if self.scope is not None else False)
        base = self.model.clone(parent=None)  # unbound: run by its own apply
        streams = self.scope.rngs if self.scope is not None else {}
        rngs = {name: self.make_rng(name) for name in streams if name != "params"} or None
        parts = (base, others, mutable, rngs)
        out = RUNNERS[self.mode](params["base"], params["lora"], *args, lora_bridge=parts, **kwargs)
        if mutable is False:
            return out
        out, updated = out
        for collection, tree in updated.items():
            for name, value in tree.items():
                self.put_variable(collection, name, value)
        return out


# the dataclass signature lists Linen's ``parent`` (its default a sentinel object whose address
# changes per run) and ``name``: show the fields a user passes
LinenBridge.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=nn.Module),
        inspect.Parameter(
            "mode", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="auto", annotation=Mode
        ),
    ]
)


def _inner_mutable(outer: CollectionFilter) -> CollectionFilter:
    """The collections the base model may change: those of the bridge's call but ``params``."""
    if outer is False:
        return False
    if outer is True:
        return DenyList("params")
    if isinstance(outer, DenyList):
        denied: Any = outer.deny  # a collection filter: a name, names, or a bool
        deny = (denied,) if isinstance(denied, str) else tuple(denied)
        return DenyList((*deny, "params"))
    names = (outer,) if isinstance(outer, str) else tuple(outer)
    kept = tuple(name for name in names if name != "params")
    return kept or False
