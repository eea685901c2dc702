"""The scan-stacked PyTorch / Flax twin of the capability matrix's PEFT checks
(tests/support/check_peft.py, plain and DoRA adapters).

The PyTorch model keeps its ``L`` identical blocks in a ``torch.nn.ModuleList`` (PEFT names one
module per layer: ``layers.0.q``, ``layers.1.q``, ...); its Flax twin stacks the same blocks with
``nn.scan`` (kernels ``(L, in, out)``), the PyTorch weights copied in by hand (stacked on axis 0,
``kernel = weight.T``).

Imports torch: only a module that has already skipped without it (``pytest.importorskip``)
imports this one.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

import flax_lora as lora

from .peft_models import t2n

L, D = 3, 4  # layers, model width
TOL = 1e-5
X = np.random.default_rng(0).normal(size=(2, 5, D)).astype(np.float32)
STACKED = ("params/layers/q/kernel", "params/layers/fc/kernel")


class TorchBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(D, D)
        self.fc = torch.nn.Linear(D, 2 * D)

    def forward(self, x: Any) -> Any:
        u = self.fc(torch.tanh(self.q(x)))
        return x + u[..., :D] * torch.tanh(u[..., D:])


class TorchStack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.layers = torch.nn.ModuleList([TorchBlock() for _ in range(L)])
        self.head = torch.nn.Linear(D, 3)

    def forward(self, x: Any) -> Any:
        for block in self.layers:
            x = block(x)
        return self.head(x)


class FlaxBlock(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        u = nn.Dense(2 * D, name="fc")(jnp.tanh(nn.Dense(D, name="q")(x)))
        return x + u[..., :D] * jnp.tanh(u[..., D:]), None


class FlaxStack(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        stack = nn.scan(
            FlaxBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=L
        )
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(3, name="head")(x)


def stack_params(tm: TorchStack) -> dict[str, Any]:
    def stacked(name: str, leaf: str) -> np.ndarray:
        ws = [t2n(getattr(getattr(b, name), leaf)) for b in tm.layers]
        return np.stack([w.T for w in ws] if leaf == "weight" else ws)

    p = {
        "layers": {
            n: {"kernel": stacked(n, "weight"), "bias": stacked(n, "bias")} for n in ("q", "fc")
        },
        "head": {"kernel": t2n(tm.head.weight).T, "bias": t2n(tm.head.bias)},
    }
    return {"params": jax.tree.map(jnp.asarray, p)}


def key_map(path: str) -> str:
    """``params/layers/q/kernel`` -> ``layers.{layer}.q``; ``params/head/kernel`` -> ``head``
    (the stacked biases ``(L, out)`` map to their module's name too: the kernel is picked)."""
    parts = path.split("/")[1:-1]
    if parts[0] == "layers":
        return "layers.{layer}." + ".".join(parts[1:])
    return ".".join(parts)


def probe(p: Any) -> Any:
    return FlaxStack().apply(p, X)


def flax_out(params: Any, adapters: Any) -> np.ndarray:
    return np.asarray(jax.jit(lora.wrap(FlaxStack().apply))(params, adapters, X))


@functools.cache
def our_adapters(
    layers: tuple[int, ...] | None = None, dora: bool = False
) -> tuple[Any, lora.LoraConfig]:
    """Stacked adapters from `lora.init` on the scan model, with random nonzero factors on the
    adapted layers (zeros elsewhere, as `lora.init` leaves them); with ``dora``, DoRA adapters
    whose magnitudes on the adapted layers are also scaled by ``1 + 0.3 N(0, 1)``."""
    config = lora.LoraConfig(
        rank=2,
        alpha=3.0,
        rank_pattern={"fc": 3},
        targets=r".*/(q|fc|head)/kernel",
        layers=layers,
        dora=dora,
    )
    params = stack_params(TorchStack())
    adapters = lora.init(jax.random.key(0), params, config, probe=probe)
    rng = np.random.default_rng(1)

    def perturb(w: lora.LoraWeights) -> lora.LoraWeights:
        mask = np.ones(L) if w.layers is None else np.isin(np.arange(L), w.layers)
        mask = mask.reshape((L,) + (1,) * (w.b.ndim - 1)) if w.layer_axes else 1.0
        b = w.b + jnp.asarray(rng.normal(size=w.b.shape) * 0.5 * mask, w.b.dtype)
        if w.m is None:
            return w.replace(b=b)
        mask = mask.reshape(mask.shape[: w.m.ndim]) if w.layer_axes else 1.0
        m = w.m * jnp.asarray(1.0 + 0.3 * rng.normal(size=w.m.shape) * mask, w.m.dtype)
        return w.replace(b=b, m=m)

    adapters = jax.tree.map(perturb, adapters, is_leaf=lambda x: isinstance(x, lora.LoraWeights))
    return adapters, config
