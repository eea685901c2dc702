"""The tiny Linen and NNX models of tests/test_routing.py (Embed, attention, Conv, Dense), the
per-example reference of routing, and the adapter sets the capability matrix routes
(support/check_routing.py, check_stack.py): three sets on a scan model, one of them on some
layers only (`scan_sets`), and DoRA sets mixed with plain LoRA (`dora_sets`)."""

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

from .scan_models import X as SCAN_X
from .scan_models import scan_model
from .trees import adapter_entries, is_lora

VOCAB, SEQ, DIM, BATCH = 24, 6, 16, 6
IDS = [0, 2, -1, 1, 2, 0]


class LinenTiny(nn.Module):
    """Embed lookup, self-attention (DenseGeneral q/k/v/out), a 1-D Conv and a Dense head."""

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = nn.Embed(VOCAB, DIM)(tokens)
        h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=DIM)(h)
        h = nn.gelu(nn.Conv(DIM, kernel_size=(3,))(h))
        return nn.Dense(5)(h.mean(axis=1))


class NnxTiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=DIM, qkv_features=DIM, decode=False, rngs=rngs
        )
        self.conv = nnx.Conv(DIM, DIM, kernel_size=(3,), rngs=rngs)
        self.head = nnx.Linear(DIM, 5, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        h = h + self.attn(h)
        h = nnx.gelu(self.conv(h))
        return self.head(h.mean(axis=1))


def tiny_tokens(batch: int = BATCH) -> jax.Array:
    """A batch of token ids for the tiny models."""
    return jax.random.randint(jax.random.key(7), (batch, SEQ), 0, VOCAB)


def linen_tiny() -> tuple[Callable[..., Any], Any]:
    """``(apply, params)`` of `LinenTiny`."""
    model = LinenTiny()
    return model.apply, model.init(jax.random.key(0), tiny_tokens())


def nnx_tiny() -> tuple[Callable[..., Any], Any]:
    """``(apply, state)`` of `NnxTiny`."""
    graphdef, state = nnx.split(NnxTiny(nnx.Rngs(0)))
    return (lambda s, t: nnx.merge(graphdef, s)(t)), state


def routed_reference(
    apply_fn: Callable[..., Any], params: Any, sets: list[Any], x: Any, ids: Any = IDS
) -> np.ndarray:
    """Example ``j`` run alone through ``merge(params, sets[ids[j]])`` (the base for -1)."""
    rows = []
    for j, k in enumerate(ids):
        p = params if k < 0 else lora.merge(params, sets[k])
        rows.append(np.asarray(apply_fn(p, x[j : j + 1]))[0])
    return np.stack(rows)


# -- adapter sets ------------------------------------------------------------------------------
KERNELS = r".*kernel"


def _union(x: Any, y: Any) -> Any:
    """Two adapter trees (nested dicts) with disjoint leaves, as one."""
    if not isinstance(x, dict):
        return x
    return {k: _union(x[k], y[k]) if k in x and k in y else x.get(k, y.get(k)) for k in {*x, *y}}


def scan_sets(apply: Callable, params: Any, x: Any, stacked: str) -> list[Any]:
    """Three adapter sets of ranks 2, 4 (rsLoRA) and 3, all random (nonzero ``b``). Set 1 adapts
    only layers 0 and 2 of the kernels matching ``stacked`` (its other kernels get their own
    adapters, as `LoraConfig(layers=...)` leaves out kernels without a layer index)."""
    probe = lambda p: apply(p, x)
    init = lambda i, c: lora.init(jax.random.key(10 + i), params, c, probe=probe)
    sets = [
        init(0, lora.LoraConfig(rank=2, alpha=3.0, init="random", targets=KERNELS)),
        init(1, lora.LoraConfig(rank=4, alpha=2.0, init="random", rslora=True, targets=stacked)),
        init(2, lora.LoraConfig(rank=3, alpha=6.0, init="random", targets=KERNELS)),
    ]
    picked = init(
        1,
        lora.LoraConfig(
            rank=4, alpha=2.0, init="random", rslora=True, targets=stacked, layers=(0, 2)
        ),
    )
    others = {p for p in adapter_entries(sets[0]) if p not in adapter_entries(picked)}
    sets[1] = picked
    if others:
        rest = init(3, lora.LoraConfig(rank=4, alpha=2.0, init="random", targets=[*others]))
        sets[1] = _union(picked, rest)
    assert adapter_entries(sets[1]).keys() == adapter_entries(sets[0]).keys()
    return sets


@functools.cache
def scan_model_and_sets(name: str) -> tuple[Callable, Any, list[Any]]:
    """`support.scan_models.scan_model` ``name`` and its `scan_sets` on every layered kernel
    (cached for the session: the tests only read them)."""
    apply, params = scan_model(name)
    return apply, params, scan_sets(apply, params, SCAN_X, r".*layers.*kernel")


def perturbed(adapters: Any, seed: int) -> Any:
    """Moves each magnitude away from the column norms it is initialised to."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda w: w.replace(m=w.m * (1.0 + 0.3 * jnp.asarray(rng.normal(size=w.m.shape)))),
        adapters,
        is_leaf=is_lora,
    )


def dora_sets(apply_fn: Callable[..., Any], params: Any, batch: int) -> list[Any]:
    """DoRA (rank 2), plain LoRA (rank 4, rsLoRA), DoRA (rank 3): nonzero b, perturbed m."""
    probe = lambda p: apply_fn(p, tiny_tokens(batch))
    configs = [
        lora.LoraConfig(rank=2, alpha=4.0, init="random", dora=True),
        lora.LoraConfig(rank=4, alpha=2.0, init="random", rslora=True),
        lora.LoraConfig(rank=3, alpha=6.0, init="random", dora=True),
    ]
    sets = [
        lora.init(jax.random.key(10 + i), params, c, probe=probe) for i, c in enumerate(configs)
    ]
    return [perturbed(s, 20 + i) if i != 1 else s for i, s in enumerate(sets)]
