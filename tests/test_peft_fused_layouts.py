"""PEFT files of fused kernels without PyTorch (the py3.13 leg runs these): the tensors a tuple
of module names gives, against float64 numpy deltas, and the exact round trip.

- Gemma's ``qkv_einsum`` ``(3, N, D, H)`` (einsum ``BTD,SNDH->SBTNH``) as ``q_proj``,
  ``k_proj``, ``v_proj``: ``lora_A (r, D)`` shared, ``lora_B (N * H, r)`` per part;
- an expert kernel ``(E, D, 2F)`` whose output holds gate and up side by side, written per
  expert as ``("experts.{expert}.gate_proj", "experts.{expert}.up_proj")``;
- separate expert gate and up kernels ``(E, D, F)`` as one ``gate_up_proj`` module per expert
  (``"experts.{expert}.gate_up_proj[i]"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import flax_lora as lora

PRE = "base_model.model."
N, D, H, E, F = 2, 8, 4, 3, 5
X = np.random.default_rng(0).normal(size=(2, 3, D)).astype(np.float32)


def _same(x: Any, y: Any) -> None:
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _tensors(directory: Path) -> dict[str, np.ndarray]:
    file = load_file(str(directory / "adapter_model.safetensors"))
    return {k: v.astype(np.float64) for k, v in file.items()}


def _qkv(params: Any, x: Any) -> Any:
    q, k, v = jnp.einsum("BTD,SNDH->SBTNH", x, params["attn"]["qkv_einsum"]["kernel"])
    return q * k + v


def test_qkv_einsum_as_three_modules(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    params = {"attn": {"qkv_einsum": {"kernel": jnp.asarray(rng.normal(size=(3, N, D, H)))}}}
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    probe = lambda p: _qkv(p, X)
    config = lora.LoraConfig(rank=2, alpha=3.0, init="random")
    adapters = lora.init(jax.random.key(0), params, config, probe=probe)
    names = ("attn.q_proj", "attn.k_proj", "attn.v_proj")
    key_map = {"attn/qkv_einsum/kernel": names}
    lora.save_peft(tmp_path, adapters, config, key_map=key_map)
    t = _tensors(tmp_path)
    assert {k: v.shape for k, v in t.items()} == {
        f"{PRE}{n}.lora_{x}.weight": s for n in names for x, s in (("A", (2, D)), ("B", (N * H, 2)))
    }
    w = adapters["attn"]["qkv_einsum"]["kernel"]
    a, b = np.asarray(w.a, np.float64), np.asarray(w.b, np.float64)  # (D, r), (r, 3, N, H)
    assert w.in_axes == (2,)
    delta = 1.5 * np.einsum("dr,rsnh->sndh", a, b)  # the kernel's delta, (3, N, D, H)
    for j, n in enumerate(names):
        peft = 1.5 * t[f"{PRE}{n}.lora_B.weight"] @ t[f"{PRE}{n}.lora_A.weight"]  # (N * H, D)
        np.testing.assert_allclose(peft.reshape(N, H, D).transpose(0, 2, 1), delta[j], atol=1e-6)
    back = lora.load_peft(tmp_path, params, key_map=key_map, probe=probe)
    _same(back, adapters)
    with pytest.raises(ValueError, match=r"input axes are ambiguous.*Pass probe="):
        lora.load_peft(tmp_path, params, key_map=key_map)  # N * H == D: no unique split


def _experts(params: Any, x: Any) -> Any:
    xe = jnp.broadcast_to(x.reshape(-1, D), (E, x.shape[0] * x.shape[1], D))
    h = jnp.einsum("etd,edf->etf", xe, params["experts"]["gate_up"])
    return jax.nn.silu(h[..., :F]) * h[..., F:]


def test_fused_expert_kernel_per_expert(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    params = {"experts": {"gate_up": jnp.asarray(rng.normal(size=(E, D, 2 * F)), jnp.float32)}}
    probe = lambda p: _experts(p, X)
    config = lora.LoraConfig(rank=2, alpha=3.0, init="random")
    adapters = lora.init(jax.random.key(0), params, config, probe=probe)
    w = adapters["experts"]["gate_up"]
    assert w.expert_axes == (0,) and w.in_axes == (1,)
    names = ("experts.{expert}.gate_proj", "experts.{expert}.up_proj")
    key_map = {"experts/gate_up": names}
    lora.save_peft(tmp_path, adapters, config, key_map=key_map)
    t = _tensors(tmp_path)
    assert len(t) == E * 2 * 2
    delta = 1.5 * np.einsum(
        "edr,erf->edf", np.asarray(w.a, np.float64), np.asarray(w.b, np.float64)
    )
    for e in range(E):
        for j, part in enumerate(("gate_proj", "up_proj")):
            m = f"{PRE}experts.{e}.{part}"
            assert t[m + ".lora_A.weight"].shape == (2, D) and t[m + ".lora_B.weight"].shape == (
                F,
                2,
            )
            peft = 1.5 * t[m + ".lora_B.weight"] @ t[m + ".lora_A.weight"]  # (F, D)
            np.testing.assert_allclose(peft.T, delta[e][:, j * F : (j + 1) * F], atol=1e-6)
    _same(lora.load_peft(tmp_path, params, key_map=key_map, probe=probe), adapters)
    _same(lora.load_peft(tmp_path, params, key_map=key_map), adapters)  # expert axis first


def _gate_up(params: Any, x: Any) -> Any:
    xe = jnp.broadcast_to(x.reshape(-1, D), (E, x.shape[0] * x.shape[1], D))
    p = params["experts"]
    h = jnp.einsum("etd,edf->etf", xe, p["gate"])
    return jax.nn.silu(h) * jnp.einsum("etd,edf->etf", xe, p["up"])


def test_separate_expert_kernels_as_one_module_per_expert(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    params = {
        "experts": {k: jnp.asarray(rng.normal(size=(E, D, F)), jnp.float32) for k in ("gate", "up")}
    }
    probe = lambda p: _gate_up(p, X)
    config = lora.LoraConfig(rank=2, alpha=3.0, init="random")
    adapters = lora.init(jax.random.key(0), params, config, probe=probe)
    key_map = {
        f"experts/{k}": f"experts.{{expert}}.gate_up_proj[{i}]"
        for i, k in enumerate(("gate", "up"))
    }
    lora.save_peft(tmp_path, adapters, config, key_map=key_map)
    t = _tensors(tmp_path)
    assert {k: v.shape for k, v in t.items()} == {
        f"{PRE}experts.{e}.gate_up_proj.lora_{x}.weight": s
        for e in range(E)
        for x, s in (("A", (4, D)), ("B", (2 * F, 4)))
    }
    for e in range(E):
        m = f"{PRE}experts.{e}.gate_up_proj"
        peft = 1.5 * t[m + ".lora_B.weight"] @ t[m + ".lora_A.weight"]  # (2F, D)
        for i, k in enumerate(("gate", "up")):
            w = adapters["experts"][k]
            ref = 1.5 * np.asarray(w.a[e], np.float64) @ np.asarray(w.b[e], np.float64)
            np.testing.assert_allclose(peft[i * F : (i + 1) * F].T, ref, atol=1e-6)
    _same(lora.load_peft(tmp_path, params, key_map=key_map, probe=probe), adapters)


def test_tuple_that_does_not_divide_the_kernel_is_refused_on_load(tmp_path: Path) -> None:
    params = {"attn": {"qkv_einsum": {"kernel": jnp.ones((3, N, D, H), jnp.float32)}}}
    probe = lambda p: _qkv(p, X)
    adapters = lora.init(jax.random.key(0), params, lora.LoraConfig(rank=2), probe=probe)
    names = ("attn.q_proj", "attn.k_proj", "attn.v_proj")
    lora.save_peft(tmp_path, adapters, key_map={"attn/qkv_einsum/kernel": names})
    file = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(file)).items() if "v_proj" not in k}, str(file))
    two = {"attn/qkv_einsum/kernel": names[:2]}
    with pytest.raises(ValueError, match=r"first output axis 0 does not divide into its 2") as e:
        lora.load_peft(tmp_path, params, key_map=two, probe=probe)
    assert "adapter_model.safetensors" in str(e.value) and "attn/qkv_einsum/kernel" in str(e.value)
    assert "module 'attn.q_proj'" in str(e.value) or "module 'attn.k_proj'" in str(e.value)
