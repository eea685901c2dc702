"""Layered models that store each kernel's layer axis elsewhere than in front, as MaxText does
with ``scan_layers=True`` and its default ``param_scan_axis: 1`` (tests/test_layered_axis.py and
its 8-device checks, support/axis_mesh_checks.py), with each kernel's layer axis and input axes
written by hand, and a float64 numpy merge of their adapters.

- ``"linen"``: ``nn.scan`` with ``variable_axes={"params": 1}``: kernels ``(d, L, f)``,
  ``(d, L, heads, head_dim)`` and ``(heads, L, head_dim, d)`` (input axes on both sides of the
  layer axis); Flax moves the layer axis first in the traced model, before the scan.
- ``"jax"``: plain JAX, a hand-written `jax.lax.scan` over ``jnp.moveaxis(kernel, p, 0)``, one
  kernel with its layer axis in the middle, ``(d, L, f)``, one with it last, ``(f, d, L)``.
- ``"nnx"``: NNX blocks built by ``nnx.vmap(..., out_axes=1)`` and run by
  ``nnx.scan(..., in_axes=(nnx.Carry, 1))``: kernels ``(d, L, f)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flax_lora as lora

from .models import fill_abstract
from .refs import dora_carried64, ref_delta64
from .trees import adapter_entries, leaves_by_path

L, D, H, K, F = 3, 8, 2, 4, 16  # layers, width, heads, head size, MLP width
X = np.random.default_rng(0).normal(size=(4, 5, D)).astype(np.float32)
MODELS = ["linen", "jax", "nnx"]


class Block(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        q = nn.DenseGeneral((H, K), name="query")(x)  # (d, H, K)
        x = x + nn.DenseGeneral(D, axis=(-2, -1), name="out")(jnp.tanh(q))  # (H, K, d)
        h = nn.Dense(F, name="wi")(x)  # (d, F)
        return x + nn.Dense(D, name="wo")(jnp.tanh(h)), None


class MaxTextLike(nn.Module):
    """``nn.scan`` over the blocks with the params' layer axis at 1 (``param_scan_axis: 1``)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        stack = nn.scan(Block, variable_axes={"params": 1}, split_rngs={"params": True}, length=L)
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(3, name="head")(x)


def jax_apply(p: Any, x: jax.Array) -> jax.Array:
    """A hand-written scan over kernels stored ``(d, L, f)`` and ``(f, d, L)``."""

    def body(h: jax.Array, w: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        w_in, w_out = w
        return h + jnp.tanh(h @ w_in) @ w_out, None

    xs = (jnp.moveaxis(p["w_in"], 1, 0), jnp.moveaxis(p["w_out"], 2, 0))
    h, _ = jax.lax.scan(body, x, xs)
    return h @ p["head"]


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.wi = nnx.Linear(D, F, rngs=rngs)
        self.wo = nnx.Linear(F, D, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.wo(jnp.tanh(self.wi(x)))


class NnxModel(nnx.Module):
    """Blocks whose parameters are stacked on axis 1, scanned on that axis."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=1)
        def build(rngs: nnx.Rngs) -> NnxBlock:
            return NnxBlock(rngs)

        self.layers = build(rngs)
        self.head = nnx.Linear(D, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        def body(x: jax.Array, block: NnxBlock) -> jax.Array:
            return block(x)

        x = nnx.scan(body, in_axes=(nnx.Carry, 1), out_axes=nnx.Carry)(x, self.layers)
        return self.head(x)


# path -> (the kernel's layer axis, its input axes), in the kernel's own layout, by hand
SPECS: dict[str, dict[str, tuple[int | None, tuple[int, ...]]]] = {
    "linen": {
        "params/layers/query/kernel": (1, (0,)),
        "params/layers/out/kernel": (1, (0, 2)),
        "params/layers/wi/kernel": (1, (0,)),
        "params/layers/wo/kernel": (1, (0,)),
        "params/head/kernel": (None, (0,)),
    },
    "jax": {"w_in": (1, (0,)), "w_out": (2, (0,)), "head": (None, (0,))},
    "nnx": {
        "layers/wi/kernel": (1, (0,)),
        "layers/wo/kernel": (1, (0,)),
        "head/kernel": (None, (0,)),
    },
}


@functools.cache
def axis_model(name: str) -> tuple[Callable[..., Any], Any]:
    """``(apply, params)`` of model ``name`` (one of `MODELS`), params N(0, 0.4^2)."""
    if name == "linen":
        model = MaxTextLike()
        shapes = jax.eval_shape(model.init, jax.random.key(0), X)
        return model.apply, fill_abstract(shapes, 1, 0.4)
    if name == "nnx":
        graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxModel(nnx.Rngs(0))))
        return (lambda s, x: nnx.merge(graphdef, s)(x)), fill_abstract(state, 1, 0.4)
    rng = np.random.default_rng(1)
    params = {
        "w_in": (0.4 * rng.normal(size=(D, L, F))).astype(np.float32),
        "w_out": (0.4 * rng.normal(size=(F, D, L))).astype(np.float32),
        "head": (0.4 * rng.normal(size=(D, 3))).astype(np.float32),
    }
    return jax_apply, params


def probe_of(apply: Callable[..., Any]) -> Callable[[Any], Any]:
    return lambda p: apply(p, X)


def init_adapters(name: str, config: lora.LoraConfig) -> Any:
    apply, params = axis_model(name)
    return lora.init(jax.random.key(2), params, config, probe=probe_of(apply))


def ref_delta_layered64(w: Any, layer_axis: int | None, in_axes: tuple[int, ...]) -> np.ndarray:
    """``scale * a @ b`` of an adapter in float64, in the kernel's own layout: for a layered
    kernel one product per layer (``a[l]``, ``b[l]``; zeros on the layers ``w.layers`` leaves
    out), stacked on the kernel's layer axis."""
    if layer_axis is None:
        return ref_delta64(w.a, w.b, in_axes, w.scale)
    inner = tuple(d - (d > layer_axis) for d in in_axes)  # one layer's kernel
    picked = range(w.a.shape[0]) if w.layers is None else w.layers
    per = [
        ref_delta64(w.a[i], w.b[i], inner, w.scale)
        if i in picked
        else np.zeros_like(ref_delta64(w.a[i], w.b[i], inner, w.scale))
        for i in range(w.a.shape[0])
    ]
    return np.stack(per, axis=layer_axis)


def ref_merge64(name: str, params: Any, adapters: Any) -> dict[str, np.ndarray]:
    """Path -> the merged kernel in float64 (DoRA's ``m * V / ||V||`` for a DoRA adapter)."""
    kernels = leaves_by_path(params)
    out = {}
    for path, w in adapter_entries(adapters).items():
        axis, ins = SPECS[name][path]
        w0 = np.asarray(kernels[path], np.float64)
        v = w0 + ref_delta_layered64(w, axis, ins)
        if w.m is not None:
            carried = [] if axis is None else [axis]
            v = dora_carried64(w0, v - w0, np.asarray(w.m, np.float64), carried, ins)
        out[path] = v
    return out
