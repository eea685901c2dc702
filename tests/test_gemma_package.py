"""The catalogue's ``gemma/gemma3`` key map on Google DeepMind's ``gemma`` package (``gm.nn``).

The package needs Python >= 3.12 and pulls TensorFlow through kauldron, so it is no extra of
this project and not in CI: this module skips without it and runs where it is installed (the
README's "Supported versions" says when and with which versions it last passed).

A tiny random Gemma 3 (``gm.nn.Transformer``, 2 layers, float32), once with ``num_kv_heads <
num_heads`` (``q_einsum`` and the fused ``kv_einsum``) and once with them equal (the fused
``qkv_einsum``); LoRA (nonzero ``b``) on every attention and MLP kernel, the fused
``gating_einsum`` included:

- `lora.wrap` (``auto`` and ``factored``, jitted) equals the merged model, and `lora.merge`
  equals a float64 numpy merge of each kernel;
- `save_peft` with ``lora.key_map("gemma/gemma3")`` writes exactly the modules of
  transformers' ``Gemma3ForCausalLM`` (computed from the config: ``model.layers.{i}.self_attn.
  {q,k,v,o}_proj``, ``model.layers.{i}.mlp.{gate,up,down}_proj``; torch is not there on 3.13),
  each with the float64 delta of its part of the kernel (gate: the part the package passes
  through its GELU), and `load_peft` reads the adapters back exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

GEMMA = (
    "the gemma package (Python >= 3.12; it pulls TensorFlow through kauldron) is not installed: "
    "pip install gemma"
)
pytest.importorskip("gemma", reason=GEMMA)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from gemma import gm  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from support.refs import as_matrix, ref_delta64  # noqa: E402
from support.trees import adapter_entries, leaves_by_path  # noqa: E402

import flax_lora as lora  # noqa: E402

LAYERS, VOCAB, D, HIDDEN, HEADS, HEAD_DIM = 2, 64, 32, 48, 4, 8
TARGETS = r"params/layer_\d+/(attn/(q|kv|qkv|attn_vec)_einsum/w|mlp/(gating_einsum|linear))"
PRE = "base_model.model."
R, ALPHA = 2, 4.0


def _model(num_kv_heads: int) -> Any:
    """A tiny Gemma 3 text model as the package's ``Gemma3_*`` classes configure it."""
    kinds = gm.nn.config.AttentionType
    types = gm.nn.config.make_attention_layers_types(
        (kinds.LOCAL_SLIDING, kinds.GLOBAL), num_layers=LAYERS
    )  # Gemma 3's pattern is 5 local layers to 1 global: here one of each
    config = gm.nn.config.TransformerConfig(
        num_embed=VOCAB, embed_dim=D, hidden_dim=HIDDEN, num_heads=HEADS, head_dim=HEAD_DIM,
        num_kv_heads=num_kv_heads, final_logit_softcap=None, use_post_attn_norm=True,
        use_post_ffw_norm=True, use_qk_norm=True, attention_types=types,
        sliding_window_size=4, transpose_gating_einsum=True, local_base_frequency=10_000,
        global_base_frequency=1_000_000, vision_encoder=None,
    )  # fmt: skip
    return gm.nn.Transformer(config=config, dtype=jnp.float32)


def _hf_modules(num_layers: int) -> set[str]:
    """The ``nn.Linear`` modules of transformers' ``Gemma3ForCausalLM`` but its ``lm_head``
    (tied to the embedding, which the package decodes with)."""
    attn = [f"self_attn.{x}_proj" for x in "qkvo"]
    mlp = [f"mlp.{x}_proj" for x in ("gate", "up", "down")]
    return {f"model.layers.{i}.{m}" for i in range(num_layers) for m in attn + mlp}


def _same(x: Any, y: Any) -> None:
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("num_kv_heads", [2, HEADS], ids=["kv_einsum", "qkv_einsum"])
def test_gemma3_through_the_catalogue(tmp_path: Path, num_kv_heads: int) -> None:
    model = _model(num_kv_heads)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 7)))
    params = model.init(jax.random.key(0), tokens)
    fused = "kv_einsum" if num_kv_heads < HEADS else "qkv_einsum"
    assert fused in params["params"]["layer_0"]["attn"]

    def apply(p: Any, t: jax.Array) -> jax.Array:
        return model.apply(p, t).logits

    config = lora.LoraConfig(rank=R, alpha=ALPHA, init="random", targets=TARGETS)
    probe = lambda p: apply(p, tokens)
    adapters = lora.init(jax.random.key(1), params, config, probe=probe)
    entries = adapter_entries(adapters)
    per_layer = 5 if fused == "kv_einsum" else 4  # q, kv, o, gating, linear / qkv, o, ...
    assert len(entries) == per_layer * LAYERS

    # lora.merge against a float64 numpy merge; lora.wrap against the merged model
    kernels = leaves_by_path(params)
    merged_params = lora.merge(params, adapters)
    merged = leaves_by_path(merged_params)
    deltas = {}
    for path, w in entries.items():
        deltas[path] = ref_delta64(w.a, w.b, w.in_axes, float(w.scale))
        want = np.asarray(kernels[path], np.float64) + deltas[path]
        np.testing.assert_allclose(np.asarray(merged[path]), want, rtol=1e-6, atol=1e-6)
    base = np.asarray(apply(params, tokens))
    reference = np.asarray(apply(merged_params, tokens))
    assert np.abs(reference - base).max() > 0.05  # the adapters matter
    for mode in ("auto", "factored"):
        ours = np.asarray(jax.jit(lora.wrap(apply, mode=mode))(params, adapters, tokens))
        np.testing.assert_allclose(ours, reference, atol=1e-5, err_msg=mode)

    # save_peft: the modules of Gemma3ForCausalLM, each with its part's delta
    km = lora.key_map("gemma/gemma3")
    lora.save_peft(tmp_path, adapters, config, key_map=km)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    written = {k.removeprefix(PRE).rsplit(".lora_", 1)[0] for k in tensors}
    assert written == _hf_modules(LAYERS)
    assert len(tensors) == 2 * len(written)
    file_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(file_config["target_modules"]) == written
    scale = file_config["lora_alpha"] / file_config["r"]
    checked = set()
    for path, w in entries.items():
        names = km(path)
        parts = [names] if isinstance(names, str) else list(names)
        delta = deltas[path]
        in_axes = tuple(w.in_axes)
        if len(parts) > 1:  # fused: the kernel's first output axis (axis 0 here) is cut
            assert 0 not in in_axes and delta.shape[0] == len(parts)
            pieces = [(delta[c], tuple(i - 1 for i in in_axes)) for c in range(len(parts))]
        else:
            pieces = [(delta, in_axes)]
        for name, (piece, piece_in) in zip(parts, pieces, strict=True):
            la = tensors[f"{PRE}{name}.lora_A.weight"].astype(np.float64)
            lb = tensors[f"{PRE}{name}.lora_B.weight"].astype(np.float64)
            want = as_matrix(piece, piece_in).T  # torch's (out, in)
            np.testing.assert_allclose(scale * lb @ la, want, rtol=1e-12, atol=1e-14)
            checked.add(name)
    assert checked == written
    back = lora.load_peft(tmp_path, params, key_map=km, probe=probe)
    _same(back, adapters)


def test_gate_is_the_part_through_the_activation() -> None:
    """The fused ``gating_einsum``'s part 0 (named ``gate_proj``) is the one the package passes
    through its GELU and part 1 (``up_proj``) the one it multiplies by: the package's MLP equals
    a float64 numpy MLP with that reading, and not with the parts swapped."""
    ffw = gm.nn.FeedForward(features=D, hidden_dim=HIDDEN, transpose_gating_einsum=True)
    x = np.random.default_rng(2).normal(size=(3, D))
    p = ffw.init(jax.random.key(3), jnp.asarray(x, jnp.float32))
    rng = np.random.default_rng(4)  # weights that put GELU far from linear
    p = jax.tree.map(lambda w: jnp.asarray(0.3 * rng.normal(size=w.shape), jnp.float32), p)
    y = np.asarray(ffw.apply(p, jnp.asarray(x, jnp.float32)), np.float64)

    gating = np.asarray(p["params"]["gating_einsum"], np.float64)  # (2, H, D)
    linear = np.asarray(p["params"]["linear"], np.float64)  # (H, D)

    def mlp(gate: int) -> np.ndarray:
        g, u = x @ gating[gate].T, x @ gating[1 - gate].T
        gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
        return (gelu * u) @ linear

    np.testing.assert_allclose(y, mlp(0), rtol=1e-4, atol=1e-5)
    assert np.abs(y - mlp(1)).max() > 0.1 * np.abs(y).max()
    names = lora.key_map("gemma/gemma3")("params/layer_0/mlp/gating_einsum")
    assert names == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
