"""A tiny Llama in plain JAX whose attention keeps k and v as ONE fused einsum kernel (Gemma's
``kv_einsum``) and whose MLP keeps gate and up as one (Gemma's ``gating_einsum``): the JAX twin
of transformers' ``LlamaForCausalLM`` (eager attention, default RoPE), for the PEFT files of
fused kernels (tests/test_peft_fused.py).

Kernels (per layer; ``layered=True`` stacks them on a leading layer axis run by ``lax.scan``):

    attn/q_einsum   (N, D, H)     "BTD,NDH->BTNH"     <-> self_attn.q_proj
    attn/kv_einsum  (2, K, D, H)  "BTD,SKDH->SBTKH"   <-> (self_attn.k_proj, self_attn.v_proj)
    attn/o_einsum   (N, H, D)     "BTNH,NHD->BTD"     <-> self_attn.o_proj
    mlp/gating      (2, F, D)     "BTD,SFD->SBTF"     <-> (mlp.gate_proj, mlp.up_proj)
    mlp/down        (F, D)        Dense               <-> mlp.down_proj

No torch here: the test module converts the PyTorch weights (`from_torch_state`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

V, D, F, N, K, H, L = 64, 32, 48, 4, 2, 8, 2
EPS = 1e-6
THETA = 10000.0


def hf_config() -> dict[str, Any]:
    """The ``LlamaConfig`` fields of the PyTorch twin."""
    return dict(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=F,
        num_hidden_layers=L,
        num_attention_heads=N,
        num_key_value_heads=K,
        head_dim=H,
        rms_norm_eps=EPS,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )


def from_torch_state(state: Mapping[str, np.ndarray], layered: bool) -> dict[str, Any]:
    """The JAX params from a ``LlamaForCausalLM`` state dict (numpy float32)."""

    def layer(i: int) -> dict[str, Any]:
        p = f"model.layers.{i}."
        q = state[p + "self_attn.q_proj.weight"].reshape(N, H, D).transpose(0, 2, 1)
        k = state[p + "self_attn.k_proj.weight"].reshape(K, H, D).transpose(0, 2, 1)
        v = state[p + "self_attn.v_proj.weight"].reshape(K, H, D).transpose(0, 2, 1)
        o = state[p + "self_attn.o_proj.weight"].T.reshape(N, H, D)
        gate, up = state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]
        return {
            "attn": {
                "q_einsum": {"kernel": q},
                "kv_einsum": {"kernel": np.stack([k, v])},
                "o_einsum": {"kernel": o},
            },
            "mlp": {
                "gating": {"kernel": np.stack([gate, up])},
                "down": {"kernel": state[p + "mlp.down_proj.weight"].T},
            },
            "norm1": {"scale": state[p + "input_layernorm.weight"]},
            "norm2": {"scale": state[p + "post_attention_layernorm.weight"]},
        }

    layers = [layer(i) for i in range(L)]
    params: dict[str, Any] = {
        "embedder": {"embedding": state["model.embed_tokens.weight"]},
        "final_norm": {"scale": state["model.norm.weight"]},
        "head": {"kernel": state["lm_head.weight"].T},
    }
    if layered:
        params["layers"] = jax.tree.map(lambda *x: np.stack(x), *layers)
    else:
        params |= {f"layers_{i}": p for i, p in enumerate(layers)}
    return jax.tree.map(jnp.asarray, params)


def key_map(layered: bool) -> dict[str, str | tuple[str, str]]:
    """Kernel path -> PyTorch module name(s); ``{layer}`` for a layered model."""
    out: dict[str, str | tuple[str, str]] = {}
    for i in ["{layer}"] if layered else [str(j) for j in range(L)]:
        p, m = ("layers/" if layered else f"layers_{i}/"), f"model.layers.{i}."
        out |= {
            f"{p}attn/q_einsum/kernel": m + "self_attn.q_proj",
            f"{p}attn/kv_einsum/kernel": (m + "self_attn.k_proj", m + "self_attn.v_proj"),
            f"{p}attn/o_einsum/kernel": m + "self_attn.o_proj",
            f"{p}mlp/gating/kernel": (m + "mlp.gate_proj", m + "mlp.up_proj"),
            f"{p}mlp/down/kernel": m + "mlp.down_proj",
        }
    return out


def _rms(x: jax.Array, scale: jax.Array) -> jax.Array:
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + EPS) * scale


def _rope(x: jax.Array) -> jax.Array:
    """HF's default rotary embedding (``rotate_half``) of ``x (B, T, heads, H)``."""
    t = x.shape[1]
    inv = 1.0 / THETA ** (np.arange(0, H, 2, dtype=np.float32) / H)
    freqs = np.outer(np.arange(t, dtype=np.float32), inv)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.asarray(np.cos(emb))[None, :, None], jnp.asarray(np.sin(emb))[None, :, None]
    x1, x2 = x[..., : H // 2], x[..., H // 2 :]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _block(x: jax.Array, p: Mapping[str, Any]) -> jax.Array:
    h = _rms(x, p["norm1"]["scale"])
    q = _rope(jnp.einsum("BTD,NDH->BTNH", h, p["attn"]["q_einsum"]["kernel"]))
    k, v = jnp.einsum("BTD,SKDH->SBTKH", h, p["attn"]["kv_einsum"]["kernel"])
    k = jnp.repeat(_rope(k), N // K, axis=2)
    v = jnp.repeat(v, N // K, axis=2)
    t = x.shape[1]
    s = jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(H)
    s = jnp.where(np.tril(np.ones((t, t), bool)), s, -jnp.inf)
    o = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(s, axis=-1), v)
    x = x + jnp.einsum("BTNH,NHD->BTD", o, p["attn"]["o_einsum"]["kernel"])
    h = _rms(x, p["norm2"]["scale"])
    gate, up = jnp.einsum("BTD,SFD->SBTF", h, p["mlp"]["gating"]["kernel"])
    return x + (jax.nn.silu(gate) * up) @ p["mlp"]["down"]["kernel"]


def apply(params: Mapping[str, Any], ids: jax.Array) -> jax.Array:
    """The logits ``(B, T, V)`` of token ids ``(B, T)``."""
    x = params["embedder"]["embedding"][ids]
    if "layers" in params:
        x = jax.lax.scan(lambda c, p: (_block(c, p), None), x, params["layers"])[0]
    else:
        for i in range(L):
            x = _block(x, params[f"layers_{i}"])
    return _rms(x, params["final_norm"]["scale"]) @ params["head"]["kernel"]
