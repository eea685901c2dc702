"""Google MaxText's own decoders at tiny sizes, built as MaxText builds them, and the glue a
MaxText user writes around flax_lora (imports maxtext: only modules that have already skipped
without it import this one).

A model comes from ``pyconfig.initialize`` on the package's ``configs/base.yml`` with a
``model_name`` (``llama2-7b``, ``gemma3-4b``, ``mixtral-8x7b``) and size overrides, then
``model_creation_utils.from_config(config, rngs=nnx.Rngs(0))`` (an NNX ``Transformer``). The glue:

- ``nnx.split(model, nnx.Param, ...)`` -> ``(graphdef, params, rest)``; flax_lora adapts
  ``params`` (an ``nnx.State``; its paths read ``decoder/layers/mlp/wi_0/kernel``);
- an apply function of the params that rebuilds the model with ``nnx.merge(graphdef, params,
  rest, copy=True)`` (without ``copy=True``, `lora.wrap` under ``jax.jit`` raises flax's
  ``TraceContextError``: the merged model would hold the traced arrays of the caller's state);
- MaxText's own loss, ``maxtext.trainers.pre_train.train.loss_fn(model, config, data, ...)``,
  over the same rebuilt model.

``merged64`` is the independent reference of the tests: ``W0 + scale * a @ b`` in float64 numpy
written from MaxText's ``DenseGeneral`` conventions (a kernel is its input axes then its output
axes; ``scan_layers=True`` inserts the layer axis at ``param_scan_axis``; the MoE block's raw
expert params are ``(E, in, out)``), not from flax_lora's probe.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import maxtext
import numpy as np
from flax import nnx
from maxtext.configs import pyconfig
from maxtext.trainers.pre_train import train
from maxtext.utils import model_creation_utils

MODEL_NAMES = {"llama2": "llama2-7b", "gemma3": "gemma3-4b", "mixtral": "mixtral-8x7b"}
"""Our family name -> the ``model_name`` of MaxText's config whose layer code builds it."""

LAYOUTS = {
    "scan1": dict(scan_layers=True, param_scan_axis=1),  # MaxText's default
    "scan0": dict(scan_layers=True, param_scan_axis=0),
    "unscanned": dict(scan_layers=False),
}
"""How the decoder layers are stored: scanned with the layer axis at 1 (MaxText's default,
``(d, L, heads, head_dim)``) or at 0, or one module per layer (``layers_0``, ...)."""

TARGETS = (
    r".*self_attention/(query|key|value|out)/kernel"
    r"|.*mlp/(wi_0|wi_1|wo)/kernel"
    r"|.*MoeBlock_0/(wi_0|wi_1|wo)"
)
"""Every attention and MLP kernel of MaxText's names, and the routed experts (raw params of the
MoE block), not the router (``MoeBlock_0/gate``), the embedding or ``logits_dense``."""

VOCAB, SEQ, BATCH = 64, 8, 2
EMB, HEADS, KV_HEADS, HEAD_DIM, MLP = 32, 4, 2, 8, 48
EXPERTS, TOP_K = 4, 2
LAYERS = {"llama2": 2, "gemma3": 12, "mixtral": 2}
"""Gemma 3 repeats a block of 6 layers (5 local, 1 global): 12 layers scan that block twice."""


def config(family: str, layout: str, sparse: bool = False, **overrides: Any) -> Any:
    """MaxText's config of a tiny ``family`` model (float32, dot-product attention, no dropout);
    ``sparse`` picks the MoE block's ``jax.lax.ragged_dot`` path (``sparse_matmul=True,
    megablox=False``) over the dense einsum path."""
    base = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
    sizes: dict[str, Any] = dict(
        base_emb_dim=EMB,
        base_num_decoder_layers=LAYERS[family],
        base_num_query_heads=HEADS,
        base_num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        base_mlp_dim=MLP,
        vocab_size=VOCAB,
    )
    if family == "mixtral":
        sizes.update(
            num_experts=EXPERTS,
            num_experts_per_tok=TOP_K,
            base_moe_mlp_dim=MLP,
            sparse_matmul=sparse,
            megablox=False,
            capacity_factor=-1.0,
        )
    if family == "gemma3":
        sizes.update(sliding_window_size=4)
    kwargs = dict(
        model_name=MODEL_NAMES[family],
        override_model_config=True,
        max_target_length=SEQ,
        per_device_batch_size=BATCH,
        enable_checkpointing=False,
        attention="dot_product",
        dtype="float32",
        weight_dtype="float32",
        matmul_precision="highest",
        enable_dropout=False,
        run_name="flax_lora_test",
        skip_jax_distributed_system=True,
        **sizes,
        **LAYOUTS[layout],
    )
    kwargs.update(overrides)
    return pyconfig.initialize([None, base], **kwargs)


@dataclasses.dataclass(frozen=True)
class MaxTextModel:
    """A MaxText model split for flax_lora: ``params`` to adapt, ``apply``/``loss`` functions
    whose first argument is the params.

    Attributes:
      family, layout, sparse: how it was built (see `config`).
      config: MaxText's config.
      graphdef, params, rest: ``nnx.split(model, nnx.Param, ...)``.
    """

    family: str
    layout: str
    sparse: bool
    config: Any
    graphdef: Any
    params: Any
    rest: Any

    def model(self, params: Any) -> Any:
        """The NNX model on ``params`` (a copy: safe inside ``jax.jit``/`lora.wrap`)."""
        return nnx.merge(self.graphdef, params, self.rest, copy=True)

    def apply(self, params: Any, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """The logits ``(B, S, V)`` of the model on ``params``."""
        return self.model(params)(tokens, positions, enable_dropout=False)

    def loss(self, params: Any, data: dict[str, jax.Array]) -> jax.Array:
        """MaxText's own training loss (``train.loss_fn``) of the model on ``params``."""
        loss, _ = train.loss_fn(self.model(params), self.config, data, None, None, is_train=True)
        return loss

    @property
    def layer_axis(self) -> int | None:
        """The axis of a scanned layer kernel that holds the layers (``None``: unscanned)."""
        return self.config.param_scan_axis if self.config.scan_layers else None

    @property
    def num_layers(self) -> int:
        """The size of the scanned layer axis (layers per scanned block for Gemma 3)."""
        return LAYERS[self.family] // (6 if self.family == "gemma3" else 1)


@functools.cache
def build(family: str, layout: str, sparse: bool = False) -> MaxTextModel:
    """A tiny MaxText ``family`` model (random weights, ``nnx.Rngs(0)``), cached per case."""
    cfg = config(family, layout, sparse)
    model = model_creation_utils.from_config(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return MaxTextModel(family, layout, sparse, cfg, graphdef, params, rest)


def tokens(seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """Random token ids ``(BATCH, SEQ)`` and their positions."""
    ids = jax.random.randint(jax.random.key(seed), (BATCH, SEQ), 0, VOCAB)
    return ids, jnp.broadcast_to(jnp.arange(SEQ), (BATCH, SEQ))


def batch(seed: int = 0) -> dict[str, jax.Array]:
    """A batch as MaxText's input pipeline gives ``train.loss_fn``: a fixed token pattern
    (something to learn), its next tokens as targets, one segment per row."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, VOCAB, SEQ + 1)
    rows = np.stack([np.roll(pattern, i) for i in range(BATCH)])
    ones = np.ones((BATCH, SEQ), np.int32)
    return {
        "inputs": jnp.asarray(rows[:, :-1], jnp.int32),
        "targets": jnp.asarray(rows[:, 1:], jnp.int32),
        "inputs_position": jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (BATCH, SEQ)),
        "targets_position": jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (BATCH, SEQ)),
        "inputs_segmentation": jnp.asarray(ones),
        "targets_segmentation": jnp.asarray(ones),
    }


# MaxText's DenseGeneral kernels: (input axes..., output axes...); the MoE block's raw experts:
# (E, in, out). Name -> (number of input axes, has an expert axis 0).
_CONVENTIONS = (
    (r".*self_attention/(query|key|value)/kernel", 1, False),
    (r".*self_attention/out/kernel", 2, False),  # (heads, head_dim, emb)
    (r".*mlp/(wi_0|wi_1|wo)/kernel", 1, False),
    (r".*MoeBlock_0/(wi_0|wi_1|wo)", 1, True),  # (E, emb, mlp) / (E, mlp, emb)
)


def conventions(path: str) -> tuple[int, bool]:
    """``(number of input axes, expert axis)`` of the MaxText kernel at ``path``."""
    for pattern, n_in, expert in _CONVENTIONS:
        if re.fullmatch(pattern, path):
            return n_in, expert
    raise KeyError(path)


def is_layered_path(m: MaxTextModel, path: str) -> bool:
    """As `is_layered`; Gemma 3's scanned block holds its 6 layers as ``layers/layers_i``."""
    if m.layer_axis is None:
        return False
    return path.startswith("decoder/layers/") and "layers_remainder" not in path


def merged64(m: MaxTextModel, path: str, w0: Any, a: Any, b: Any, scale: float) -> np.ndarray:
    """``W0 + scale * a @ b`` in float64 in the kernel's layout, one product per layer and per
    expert: ``a (L?, E?, *I, r)``, ``b (L?, E?, r, *O)`` (carried axes first: layer, expert)."""
    n_in, expert = conventions(path)
    k = np.asarray(w0, np.float64)
    layered = is_layered_path(m, path)
    if layered:
        k = np.moveaxis(k, m.layer_axis, 0)
    lead = (1 if layered else 0) + (1 if expert else 0)
    carried, body = k.shape[:lead], k.shape[lead:]
    a64 = np.asarray(a, np.float64).reshape(*carried, math.prod(body[:n_in]), -1)
    b64 = np.asarray(b, np.float64).reshape(*carried, -1, math.prod(body[n_in:]))
    out = k + scale * np.matmul(a64, b64).reshape(k.shape)
    return np.moveaxis(out, 0, m.layer_axis) if layered else out
