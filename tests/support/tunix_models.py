"""Tiny google-tunix models and their HuggingFace PyTorch twins, for the key-map catalogue's tests.

Imports tunix, torch and transformers: only test modules that skipped without them
(``pytest.importorskip``) import this one. A twin pair shares its weights by tunix's own
loader: the random PyTorch model is written with ``save_pretrained`` (HF's checkpoint layout)
and read back with tunix's ``create_model_from_safe_tensors`` of the family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx
from tunix.models.gemma import model as gemma_model
from tunix.models.gemma import params_safetensors as gemma_params
from tunix.models.gemma3 import model as gemma3_model
from tunix.models.gemma3 import params_safetensors as gemma3_params
from tunix.models.llama3 import model as llama3_model
from tunix.models.llama3 import params as llama3_params
from tunix.models.qwen2 import model as qwen2_model
from tunix.models.qwen2 import params as qwen2_params
from tunix.models.qwen3 import model as qwen3_model
from tunix.models.qwen3 import params as qwen3_params

from support.trees import leaves_by_path

# one size for every tiny model: 2 layers, d=32, 4 query heads of 8, 2 kv heads, MLP 48
DIMS = {"layers": 2, "vocab": 64, "d": 32, "hidden": 48, "heads": 4, "kv": 2, "head_dim": 8}
ROPE_THETA = 1_000_000  # tunix's Llama3 attention applies RoPE with this theta whatever its config


@dataclasses.dataclass(frozen=True)
class Family:
    """A tunix family with a PyTorch twin in transformers: how to make each side."""

    tunix_config: Callable[[], Any]
    load: Callable[..., Any]  # tunix's params.create_model_from_safe_tensors
    hf_config: Callable[[], Any]
    hf_model: Callable[[Any], Any]


def _tunix_kwargs() -> dict[str, Any]:
    d = DIMS
    return dict(
        num_layers=d["layers"], vocab_size=d["vocab"], embed_dim=d["d"], hidden_dim=d["hidden"],
        num_heads=d["heads"], head_dim=d["head_dim"], num_kv_heads=d["kv"],
        rope_theta=ROPE_THETA, norm_eps=1e-6,
    )  # fmt: skip


def _hf_kwargs() -> dict[str, Any]:
    d = DIMS
    return dict(
        vocab_size=d["vocab"], hidden_size=d["d"], intermediate_size=d["hidden"],
        num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
        num_key_value_heads=d["kv"], head_dim=d["head_dim"], rope_theta=float(ROPE_THETA),
        rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=64,
        attn_implementation="eager",
    )  # fmt: skip


_HF_MOE = dict(
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=DIMS["hidden"], norm_topk_prob=True
)  # tunix's Qwen3 MoE layer renormalizes the top-k routing weights

FAMILIES: dict[str, Family] = {
    "llama3": Family(
        lambda: llama3_model.ModelConfig(**_tunix_kwargs()),
        llama3_params.create_model_from_safe_tensors,
        lambda: transformers.LlamaConfig(**_hf_kwargs()),
        transformers.LlamaForCausalLM,
    ),
    "qwen2": Family(
        lambda: qwen2_model.ModelConfig(**_tunix_kwargs()),
        qwen2_params.create_model_from_safe_tensors,
        lambda: transformers.Qwen2Config(**_hf_kwargs()),
        transformers.Qwen2ForCausalLM,
    ),
    "qwen3": Family(
        lambda: qwen3_model.ModelConfig(**_tunix_kwargs()),
        qwen3_params.create_model_from_safe_tensors,
        lambda: transformers.Qwen3Config(**_hf_kwargs()),
        transformers.Qwen3ForCausalLM,
    ),
    "qwen3_moe": Family(
        lambda: _qwen3_moe_config(),
        qwen3_params.create_model_from_safe_tensors,
        lambda: transformers.Qwen3MoeConfig(**_hf_kwargs(), **_HF_MOE),
        transformers.Qwen3MoeForCausalLM,
    ),
    "gemma2": Family(  # num_kv_heads < num_heads: q_einsum and the fused kv_einsum
        lambda: _gemma_config(DIMS["kv"]),
        gemma_params.create_model_from_safe_tensors,
        lambda: _gemma2_hf_config(),
        transformers.Gemma2ForCausalLM,
    ),
    "gemma3": Family(
        lambda: _gemma3_config(DIMS["kv"]),
        gemma3_params.create_model_from_safe_tensors,
        lambda: _gemma3_hf_config(),
        transformers.Gemma3ForCausalLM,
    ),
}


@dataclasses.dataclass
class TwinPair:
    """A tunix model split into ``graphdef, state``, ``apply(state, tokens) -> logits``, and its
    PyTorch twin (eval mode) with the same weights."""

    graphdef: Any
    state: Any
    apply: Callable[[Any, jax.Array], jax.Array]
    torch_model: Any


def twin_pair(family: str, directory: Path, seed: int = 0) -> TwinPair:
    """A tiny random HF model of ``family``, saved to ``directory/model.safetensors`` and loaded
    into tunix by tunix's own loader."""
    fam = FAMILIES[family]
    torch.manual_seed(seed)
    hf = fam.hf_model(fam.hf_config()).eval()
    with torch.no_grad():  # nonzero norms and biases, so a transposed one would show
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(directory)  # HF's checkpoint layout (per-expert weights, tied head out)
    model = fam.load(str(directory), fam.tunix_config())
    graphdef, state = nnx.split(model)

    def apply(s: Any, tokens: jax.Array) -> jax.Array:
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
        logits, _ = nnx.merge(graphdef, s)(tokens, positions, None, mask)
        return logits

    return TwinPair(graphdef, state, apply, hf)


def torch_logits(model: Any, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def _gemma3_hf_config() -> Any:
    """A Gemma 3 (text) that tunix's ``Gemma3`` of `_gemma3_config` computes: RoPE base 10,000
    for local and global layers, no soft caps, queries scaled by ``head_dim ** -0.5``, a
    sliding window longer than the tests' sequences, the embedding tied to the head."""
    d = DIMS
    return transformers.Gemma3TextConfig(
        vocab_size=d["vocab"], hidden_size=d["d"], intermediate_size=d["hidden"],
        num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
        num_key_value_heads=d["kv"], head_dim=d["head_dim"], query_pre_attn_scalar=d["head_dim"],
        attn_logit_softcapping=None, final_logit_softcapping=None, sliding_window=16,
        rope_theta=10_000.0, rope_local_base_freq=10_000.0, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        attn_implementation="eager",
    )  # fmt: skip


# -- abstract tunix models of every family, for the name checks ------------------------------


def _gemma2_hf_config() -> Any:
    """A Gemma 2 that tunix's ``Gemma`` of `_gemma_config` computes: global attention only, no
    soft caps, queries scaled by ``head_dim ** -0.5``, the embedding tied to the head."""
    d = DIMS
    return transformers.Gemma2Config(
        vocab_size=d["vocab"], hidden_size=d["d"], intermediate_size=d["hidden"],
        num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
        num_key_value_heads=d["kv"], head_dim=d["head_dim"], query_pre_attn_scalar=d["head_dim"],
        attn_logit_softcapping=None, final_logit_softcapping=None, sliding_window=64,
        layer_types=["full_attention"] * d["layers"], rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        attn_implementation="eager",
    )  # fmt: skip


def _gemma_config(num_kv_heads: int) -> Any:
    d = DIMS
    return gemma_model.ModelConfig(
        num_layers=d["layers"], num_embed=d["vocab"], embed_dim=d["d"], hidden_dim=d["hidden"],
        num_heads=d["heads"], head_dim=d["head_dim"], num_kv_heads=num_kv_heads,
        final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True,
        attention_types=[gemma_model.AttentionType.GLOBAL] * d["layers"],
    )  # fmt: skip


def _gemma3_config(num_kv_heads: int) -> Any:
    d = DIMS
    return gemma3_model.ModelConfig(
        num_layers=d["layers"], num_embed=d["vocab"], embed_dim=d["d"], hidden_dim=d["hidden"],
        num_heads=d["heads"], head_dim=d["head_dim"], num_kv_heads=num_kv_heads,
        sliding_window_size=16, param_dtype=jnp.float32,
    )  # fmt: skip


def _qwen3_moe_config() -> Any:
    return qwen3_model.ModelConfig(**_tunix_kwargs(), num_experts=4, num_experts_per_tok=2)


ABSTRACT: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]] = {
    "llama3": (FAMILIES["llama3"].tunix_config, lambda c: llama3_model.Llama3(c, rngs=nnx.Rngs(0))),
    "qwen2": (FAMILIES["qwen2"].tunix_config, lambda c: qwen2_model.Qwen2(c, rngs=nnx.Rngs(0))),
    "qwen3": (FAMILIES["qwen3"].tunix_config, lambda c: qwen3_model.Qwen3(c, rngs=nnx.Rngs(0))),
    "qwen3_moe": (_qwen3_moe_config, lambda c: qwen3_model.Qwen3(c, rngs=nnx.Rngs(0))),
    "gemma": (lambda: _gemma_config(DIMS["kv"]), lambda c: gemma_model.Gemma(c, rngs=nnx.Rngs(0))),
    "gemma_qkv": (
        lambda: _gemma_config(DIMS["heads"]),
        lambda c: gemma_model.Gemma(c, rngs=nnx.Rngs(0)),
    ),
    "gemma3": (
        lambda: _gemma3_config(DIMS["kv"]),
        lambda c: gemma3_model.Gemma3(c, rngs=nnx.Rngs(0)),
    ),
}
"""Family -> (tunix config, model constructor); ``gemma_qkv`` has ``num_heads == num_kv_heads``
(tunix's fused ``qkv_einsum``)."""


def kernel_shapes(family: str) -> dict[str, tuple[int, ...]]:
    """The path and shape of every leaf of 2 or more dimensions of the abstract tunix model."""
    config, make = ABSTRACT[family]
    model = nnx.eval_shape(lambda: make(config()))
    _, state = nnx.split(model)
    return {p: x.shape for p, x in leaves_by_path(state).items() if len(x.shape) >= 2}
