"""`lora.NnxBridge`: a base NNX model and its adapters as one ``nnx.Module``.

NNX tools find LoRA by its variable type: tunix's ``PeftTrainer`` turns LoRA on when the model
holds ``nnx.LoRAParam`` variables, differentiates and optimizes ``wrt=nnx.LoRAParam``, and saves
``nnx.state(model, nnx.LoRAParam)`` as its LoRA-only checkpoint; its samplers take a module. The
bridge holds the adapters' arrays as ``nnx.LoRAParam`` (and nothing else as one) and runs the
base model through `lora.wrap` in its ``__call__``, so those tools train, save and sample
flax_lora adapters as they are.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from flax_lora._adapters._weights import is_stacked
from flax_lora._merge import merge
from flax_lora._multi._stack import unstack
from flax_lora._paths import describe, flatten, path_str
from flax_lora._typing import MODES, Mode, PyTree
from flax_lora._wrap import wrap


def _is_variable(x: object) -> bool:
    return isinstance(x, nnx.Variable)


def _run_model(
    params: PyTree,
    *args: PyTree,
    lora_bridge: tuple[nnx.GraphDef[nnx.Module], PyTree],
    **kwargs: PyTree,
) -> tuple[PyTree, nnx.State]:
    """The base model rebuilt from its params and other state, called; with its new state.

    ``lora_bridge`` is ``(graphdef, non-param state)``, a keyword: `lora.wrap` traces its arrays
    like the positional inputs'. Returns the model's output and its non-``Param`` state after
    the call (a KV cache, batch statistics, RNG counts), which the bridge writes back.
    """
    graphdef, rest = lora_bridge
    model = nnx.merge(graphdef, params, rest, copy=True)  # variables of this trace
    out = model(*args, **kwargs)
    return out, nnx.state(model, nnx.Not(nnx.Param))


# one wrapped runner per mode, shared by every bridge: its trace cache is keyed by the model's
# graphdef, shapes and statics, so bridges of one model structure share their traces
RUNNERS: dict[str, Callable[..., PyTree]] = {
    "auto": wrap(_run_model, "auto"),
    "factored": wrap(_run_model, "factored"),
    "merged": wrap(_run_model, "merged"),
}


class NnxBridge(nnx.Module):
    """A base NNX model run with flax_lora adapters held as ``nnx.LoRAParam`` variables.

    ``bridge(*args, **kwargs)`` is ``model(*args, **kwargs)`` with every adapted kernel
    ``W0 + scale * a @ b``, computed by `lora.wrap` in ``mode`` (factored: no adapted kernel is
    formed). ``nnx.state(bridge, nnx.LoRAParam)`` is exactly the adapters' arrays (under
    ``adapters/<kernel path>/a`` and ``/b``), so ``nnx.Optimizer(bridge, tx,
    wrt=nnx.LoRAParam)``, ``nnx.grad(..., argnums=nnx.DiffState(0, nnx.LoRAParam))`` and tunix's
    ``PeftTrainer`` train only them; the base params stay ``nnx.Param`` and no gradient is taken
    for them. The base model's other state (a KV cache, batch statistics, RNG counts) that the
    call changes is written back to ``bridge.model``. Public attributes the bridge lacks are
    read from the base model (``config``, ``init_cache``, ``num_embed``, ``embedder``, ...), as
    samplers do. Guide: `docs/guides/bridges.md`.

    Sharp edges: ``nnx.LoRAParam`` is a subclass of ``nnx.Param``, so a plain
    ``nnx.grad(loss)(bridge)`` or ``wrt=nnx.Param`` takes the base params too: name
    ``nnx.LoRAParam``. Only ``__call__`` runs with the adapters. A method read from the base model
    through the bridge (``bridge.embedder.decode``, ``bridge.init_cache``) is the base model's own
    and sees its plain kernels; that is right for cache set-up, not for a method that computes
    with an adapted kernel.

    Examples:
      >>> model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      >>> params = nnx.state(model, nnx.Param)
      >>> adapters = lora.init(jax.random.key(1), params, lora.LoraConfig(rank=2))
      >>> bridge = lora.NnxBridge(model, adapters)
      >>> bridge(jnp.ones((2, 3))).shape  # model(x) with the adapters
      (2, 4)
      >>> opt = nnx.Optimizer(bridge, optax.adam(1e-3), wrt=nnx.LoRAParam)  # a and b only
      >>> lora.to_adapters(bridge)["kernel"].a.shape  # the plain adapter tree
      (3, 2)

    Args:
      model: the base ``nnx.Module``; it holds no ``nnx.LoRAParam`` of its own.
      adapters: adapters for ``nnx.state(model, nnx.Param)`` (from `lora.init`, `lora.load`,
        `lora.load_peft`, ...): their paths are the model's param paths. A `lora.stack` tree
        routes each example through its own set with ``bridge(x, lora_ids=ids)``.
      mode: `lora.wrap`'s mode: ``"auto"``, ``"factored"`` or ``"merged"``.

    Raises:
      TypeError: ``model`` is not an ``nnx.Module``, or an adapter leaf is not an array.
      ValueError: an unknown ``mode``; adapters without arrays, or for paths that are not
        kernels of the model's params (or of the wrong shape); a base model that already holds
        ``nnx.LoRAParam`` variables (a trainer would train them too), naming their paths.
    """

    def __init__(self, model: nnx.Module, adapters: PyTree, *, mode: Mode = "auto") -> None:
        if not isinstance(model, nnx.Module):
            raise TypeError(
                f"lora.NnxBridge: model must be an nnx.Module; got {type(model).__name__}. For "
                "a Linen module use lora.LinenBridge."
            )
        if mode not in MODES:
            raise ValueError(f"lora.NnxBridge: mode must be one of {MODES}; got {mode!r}.")
        _check_base(model)
        _check_adapters(model, adapters)
        self.model = model
        self.adapters = nnx.data(jax.tree.map(nnx.LoRAParam, adapters))
        self.mode = mode

    def __call__(self, *args: PyTree, **kwargs: PyTree) -> PyTree:
        """``model(*args, **kwargs)`` with the adapters.

        Args:
          *args: the base model's positional inputs.
          **kwargs: its keyword inputs, and ``lora_rng`` / ``lora_ids`` as in `lora.wrap`.

        Returns:
          What the base model returns.
        """
        graphdef, *states = nnx.split(self.model, nnx.Param, ...)
        params, rest = states
        out, new_rest = RUNNERS[self.mode](
            params, to_adapters(self), *args, lora_bridge=(graphdef, rest), **kwargs
        )
        nnx.update(self.model, new_rest)
        return out

    def __getattr__(self, name: str) -> Any:
        # reached only when ordinary lookup fails: public names go to the base model
        model = vars(self).get("model")
        if model is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(model, name)


# NNX's metaclass hides ``__init__``'s signature behind ``(*args, **kwargs)``: show the real one
_INIT = inspect.signature(NnxBridge.__init__)
NnxBridge.__signature__ = _INIT.replace(  # type: ignore[attr-defined]
    parameters=list(_INIT.parameters.values())[1:], return_annotation=inspect.Signature.empty
)


def to_adapters(bridge: NnxBridge) -> PyTree:
    """The bridge's adapters as a plain flax_lora adapter tree (arrays, no NNX variables).

    Examples:
      >>> model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      >>> params = nnx.state(model, nnx.Param)
      >>> config = lora.LoraConfig(rank=2)
      >>> bridge = lora.NnxBridge(model, lora.init(jax.random.key(1), params, config))
      >>> adapters = lora.to_adapters(bridge)  # e.g. for lora.save or lora.merge
      >>> type(adapters["kernel"]).__name__, adapters["kernel"].a.shape
      ('LoraWeights', (3, 2))

    Args:
      bridge: an `NnxBridge`.

    Returns:
      The adapter tree the bridge was made with, holding the current (trained) arrays.

    Raises:
      TypeError: ``bridge`` is not an `NnxBridge`.
    """
    if not isinstance(bridge, NnxBridge):
        raise TypeError(f"lora.to_adapters: expected an NnxBridge; got {type(bridge).__name__}.")
    return jax.tree.map(lambda v: v.get_value(), bridge.adapters, is_leaf=_is_variable)


def merged(bridge: NnxBridge) -> nnx.Module:
    """A plain NNX model of the base's type with ``W0 + scale * a @ b`` merged (`lora.merge`).

    The new model shares no variable with the bridge: its params are the merged arrays, its
    other state (a KV cache, ...) a copy of the base model's; the bridge is left as it was.

    Examples:
      >>> model, x = nnx.Linear(3, 4, rngs=nnx.Rngs(0)), jnp.ones((2, 3))
      >>> config = lora.LoraConfig(rank=2, init="random")  # "random": b != 0, a real update
      >>> adapters = lora.init(jax.random.key(1), nnx.state(model, nnx.Param), config)
      >>> bridge = lora.NnxBridge(model, adapters)
      >>> plain = lora.merged(bridge)  # e.g. for a sampler or an export without flax_lora
      >>> type(plain).__name__, bool(jnp.allclose(plain(x), bridge(x), atol=1e-5))
      ('Linear', True)

    Args:
      bridge: an `NnxBridge`.

    Returns:
      A new module of ``type(bridge.model)``.

    Raises:
      TypeError: ``bridge`` is not an `NnxBridge`.
      ValueError: the bridge holds a `lora.stack` tree (no one merged model; unstack a set).
    """
    if not isinstance(bridge, NnxBridge):
        raise TypeError(f"lora.merged: expected an NnxBridge; got {type(bridge).__name__}.")
    adapters = to_adapters(bridge)
    if _is_stack(adapters):
        raise ValueError(
            "lora.merged: the bridge holds a lora.stack of adapter sets (for lora_ids routing), "
            "which has no one merged model; merge one set: lora.merged(lora.NnxBridge(model, "
            "lora.unstack(lora.to_adapters(bridge), i)))."
        )
    graphdef, *states = nnx.split(bridge.model, nnx.Param, ...)
    params, rest = states
    return nnx.merge(graphdef, merge(params, adapters), rest, copy=True)


def _check_base(model: nnx.Module) -> None:
    """A base model with LoRAParam variables of its own would be trained beside the adapters."""
    own = flatten(nnx.state(model, nnx.LoRAParam))
    if own:
        raise ValueError(
            "lora.NnxBridge: the base model already holds nnx.LoRAParam variables at "
            f"{describe(own)}; a trainer that optimizes "
            "wrt=nnx.LoRAParam would train them with the adapters. Give the bridge a model "
            "without NNX's own LoRA layers (or make those variables nnx.Param)."
        )


def _check_adapters(model: nnx.Module, adapters: PyTree) -> None:
    """The adapters are arrays and fit the model's params (checked abstractly: no FLOPs)."""
    flat = jax.tree_util.tree_flatten_with_path(adapters)[0]
    if not flat:
        raise ValueError(
            "lora.NnxBridge: adapters hold no arrays, so nothing would be an nnx.LoRAParam (and "
            "tunix would train the whole model); pass the tree from lora.init."
        )
    for path, leaf in flat:
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(
                f"lora.NnxBridge: adapter leaf {path_str(path)!r} must be an array; "
                f"got {type(leaf).__name__}."
            )
    if _is_stack(adapters):  # a routing stack: its first set stands for all (lora.stack checked)
        jax.eval_shape(lambda p, s: merge(p, unstack(s, 0)), nnx.state(model, nnx.Param), adapters)
    else:
        jax.eval_shape(merge, nnx.state(model, nnx.Param), adapters)


def _is_stack(adapters: PyTree) -> bool:
    return any(is_stacked(x) for x in jax.tree.leaves(adapters, is_leaf=is_stacked))
