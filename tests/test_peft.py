"""PEFT files, checked against the real HuggingFace `peft` package on CPU PyTorch.

Each case is a small PyTorch model and its Flax twin holding the same base weights (copied from
PyTorch into Flax's layout by hand here). An adapter written by PEFT must give the Flax twin
(through `load_peft` and `lora.wrap`) PyTorch's outputs, and an adapter written by `save_peft`
must give the PyTorch model (through `PeftModel.from_pretrained`) the Flax twin's outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import INTEROP

pytest.importorskip("torch", reason=INTEROP)
pytest.importorskip("peft", reason=INTEROP)
pytest.importorskip("transformers", reason=INTEROP)
import peft  # the `interop` extra (torch==2.13.0 CPU, peft, transformers)
import torch
from support.peft_models import (
    assert_same_adapters,
    get_peft_model,
    peft_from_pretrained,
    randomize_lora,
    t2n,
    torch_out,
)
from support.trees import adapter_entries, replace_leaves
from transformers.pytorch_utils import Conv1D  # GPT-2's fan_in_fan_out layer

import flax_lora as lora

TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# case 1: Embedding, Conv2d, Conv1d, GPT-2 Conv1D and Linear
# ---------------------------------------------------------------------------------------------
class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(11, 6)
        self.conv = torch.nn.Conv2d(6, 5, 3, padding=1)
        self.c1 = torch.nn.Conv1d(5, 4, 2)
        self.g = Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs; weight (4, 6)
        self.lin = torch.nn.Linear(6, 3)
        with torch.no_grad():  # Conv1D starts with zero bias and tiny weights
            self.g.weight.normal_(0, 0.5)
            self.g.bias.normal_(0, 0.5)

    def forward(self, ids: Any) -> Any:  # ids (B, 4, 4)
        x = self.emb(ids).permute(0, 3, 1, 2)  # (B, 6, 4, 4)
        x = self.conv(x)  # (B, 5, 4, 4)
        x = x.flatten(2)  # (B, 5, 16)
        x = self.c1(x).transpose(1, 2).contiguous()  # (B, 15, 4)
        x = torch.tanh(self.g(x))  # (B, 15, 6)
        return self.lin(x)


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        x = nn.Embed(11, 6, name="emb")(ids)  # (B, 4, 4, 6)
        x = nn.Conv(5, (3, 3), padding=1, name="conv")(x)  # (B, 4, 4, 5)
        x = x.reshape(x.shape[0], 16, 5)
        x = nn.Conv(4, (2,), padding="VALID", name="c1")(x)  # (B, 15, 4)
        x = jnp.tanh(nn.Dense(6, name="g")(x))
        return nn.Dense(3, name="lin")(x)


def net_params(tm: TorchNet) -> dict[str, Any]:
    """The PyTorch weights in Flax's layout, written out layer by layer."""
    p = {
        "emb": {"embedding": t2n(tm.emb.weight)},  # (num, dim) both
        "conv": {  # (out, in, kh, kw) -> (kh, kw, in, out)
            "kernel": t2n(tm.conv.weight).transpose(2, 3, 1, 0),
            "bias": t2n(tm.conv.bias),
        },
        "c1": {"kernel": t2n(tm.c1.weight).transpose(2, 1, 0), "bias": t2n(tm.c1.bias)},
        "g": {"kernel": t2n(tm.g.weight), "bias": t2n(tm.g.bias)},  # Conv1D is (in, out) already
        "lin": {"kernel": t2n(tm.lin.weight).T, "bias": t2n(tm.lin.bias)},
    }
    return {"params": jax.tree.map(jnp.asarray, p)}


NET_IDS = np.random.default_rng(0).integers(0, 11, size=(2, 4, 4))
NET_TARGETS = ["emb", "conv", "c1", "g", "lin"]
VARIANTS = {
    "plain": dict(peft=dict(r=2, lora_alpha=4), ours=dict(rank=2, alpha=4.0)),
    "patterns_rslora": dict(
        peft=dict(
            r=2,
            lora_alpha=4,
            rank_pattern={"lin": 3, "c1": 1},
            alpha_pattern={"conv": 5, "emb": 1.5},
            use_rslora=True,
        ),
        ours=dict(
            rank=2,
            alpha=4.0,
            rank_pattern={"lin": 3, "c1": 1},
            alpha_pattern={"conv": 5.0, "emb": 1.5},
            rslora=True,
        ),
    ),
}


def net_probe(p: Any) -> Any:
    return FlaxNet().apply(p, NET_IDS)


@functools.cache
def net_adapters(variant: str) -> tuple[Any, lora.LoraConfig]:
    """``lora.init(init="random")`` adapters of the Flax twin (cached: XLA compiles are slow)."""
    config = lora.LoraConfig(init="random", dropout=0.1, **VARIANTS[variant]["ours"])
    params = net_params(TorchNet())
    return lora.init(jax.random.key(3), params, config, probe=net_probe), config


def flax_out(model: nn.Module, params: Any, adapters: Any, x: Any) -> np.ndarray:
    return np.asarray(jax.jit(lora.wrap(model.apply))(params, adapters, x))


def test_twin_base_models_agree() -> None:
    tm = TorchNet().eval()
    np.testing.assert_allclose(
        flax_out(FlaxNet(), net_params(tm), None, NET_IDS), torch_out(tm, NET_IDS), atol=TOL
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peft_written_adapter_loads(tmp_path: Path, variant: str) -> None:
    tm = TorchNet()
    params = net_params(tm)
    pm = get_peft_model(tm, target_modules=NET_TARGETS, **VARIANTS[variant]["peft"])
    randomize_lora(pm, seed=1)
    pm.eval()
    expected = torch_out(pm, NET_IDS)
    pm.save_pretrained(str(tmp_path))

    adapters = lora.load_peft(tmp_path, params)
    got = flax_out(FlaxNet(), params, adapters, NET_IDS)
    np.testing.assert_allclose(got, expected, atol=TOL)
    base = flax_out(FlaxNet(), params, None, NET_IDS)
    assert np.abs(expected - base).max() > 0.1  # the adapter really changes the model

    # each module's scale, from PEFT's own layer objects
    table = {p.split("/")[1]: w for p, w in adapter_entries(adapters).items()}
    for name in NET_TARGETS:
        layer = pm.base_model.model.get_submodule(name)
        assert table[name].scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        assert table[name].rank == layer.r["default"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_save_peft_loads_in_peft(tmp_path: Path, variant: str) -> None:
    tm = TorchNet()
    params = net_params(tm)
    adapters, config = net_adapters(variant)
    expected = flax_out(FlaxNet(), params, adapters, NET_IDS)
    lora.save_peft(tmp_path, adapters, config)

    pm = peft_from_pretrained(TorchNet(), tmp_path)
    np.testing.assert_allclose(torch_out(pm, NET_IDS), expected, atol=TOL)
    base = flax_out(FlaxNet(), params, None, NET_IDS)
    assert np.abs(expected - base).max() > 0.1
    for path, w in adapter_entries(adapters).items():
        layer = pm.base_model.model.get_submodule(path.split("/")[1])
        assert layer.scaling["default"] == pytest.approx(w.scale, rel=1e-12)


def test_save_peft_replaces_only_its_own_files_and_peft_loads_them(tmp_path: Path) -> None:
    # save_peft's files carry metadata keys of their own (its mark, the config's SHA-256):
    # PEFT loads them, also after a second save replaced the first in the same folder
    params = net_params(TorchNet())
    first, config = net_adapters("plain")
    second, config2 = net_adapters("patterns_rslora")
    lora.save_peft(tmp_path / "ours", first, config)
    lora.save_peft(tmp_path / "ours", second, config2)
    pm = peft_from_pretrained(TorchNet(), tmp_path / "ours")
    expected = flax_out(FlaxNet(), params, second, NET_IDS)
    np.testing.assert_allclose(torch_out(pm, NET_IDS), expected, atol=TOL)
    # PEFT's own files are never replaced (nor is anything else in their folder touched)
    pm.save_pretrained(str(tmp_path / "peft"))
    files = lambda: {p.name: p.read_bytes() for p in (tmp_path / "peft").iterdir()}
    before = files()
    with pytest.raises(ValueError, match=r"/peft'.*did not write"):
        lora.save_peft(tmp_path / "peft", first, config)
    assert files() == before


def test_saved_files_are_named_as_peft_names_them(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    adapters, config = net_adapters("patterns_rslora")
    lora.save_peft(tmp_path, adapters, config)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    shapes = {k: v.shape for k, v in tensors.items()}
    assert shapes == {
        "base_model.model.emb.lora_embedding_A": (2, 11),
        "base_model.model.emb.lora_embedding_B": (6, 2),
        "base_model.model.conv.lora_A.weight": (2, 6, 3, 3),
        "base_model.model.conv.lora_B.weight": (5, 2, 1, 1),
        "base_model.model.c1.lora_A.weight": (1, 5, 2),
        "base_model.model.c1.lora_B.weight": (4, 1, 1),
        "base_model.model.g.lora_A.weight": (2, 4),
        "base_model.model.g.lora_B.weight": (6, 2),
        "base_model.model.lin.lora_A.weight": (3, 6),
        "base_model.model.lin.lora_B.weight": (3, 3),
    }
    assert all(v.dtype == np.float32 for v in tensors.values())
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 4
    assert sorted(cfg["target_modules"]) == sorted(NET_TARGETS)
    # resolved: one entry per module
    assert cfg["rank_pattern"] == {"lin": 3, "conv": 2, "emb": 2, "c1": 1, "g": 2}
    assert cfg["alpha_pattern"] == {"lin": 4, "conv": 5, "emb": 1.5, "c1": 4, "g": 4}
    assert cfg["use_rslora"] is True and cfg["lora_dropout"] == 0.1
    # and PEFT's own config class reads it without complaint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert loaded.rank_pattern == cfg["rank_pattern"]


# ---------------------------------------------------------------------------------------------
# case 2: multi-axis DenseGeneral / Einsum kernels <-> torch Linear
# ---------------------------------------------------------------------------------------------
D, H, K = 6, 2, 3  # d == heads * head_dim: the q kernel's input axes are ambiguous from shapes


class TorchAttnLike(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.q = torch.nn.Linear(D, H * K)  # Flax (d, heads, head_dim)
        self.o = torch.nn.Linear(H * K, D)  # Flax (heads, head_dim, d)
        self.e = torch.nn.Linear(D, 4 * 2)  # Flax Einsum kernel (4, d, 2), "bld,hdk->blhk"

    def forward(self, x: Any) -> Any:
        return self.e(torch.tanh(self.o(torch.tanh(self.q(x)))))


class FlaxAttnLike(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        q = jnp.tanh(nn.DenseGeneral((H, K), name="q")(x))
        y = jnp.tanh(nn.DenseGeneral(D, axis=(-2, -1), name="o")(q))
        y = nn.Einsum((4, D, 2), "bld,hdk->blhk", name="e")(y)
        return y.reshape(*y.shape[:-2], 8)


def attn_params(tm: TorchAttnLike) -> dict[str, Any]:
    wq, wo, we = t2n(tm.q.weight), t2n(tm.o.weight), t2n(tm.e.weight)
    p = {
        "q": {"kernel": wq.T.reshape(D, H, K), "bias": t2n(tm.q.bias).reshape(H, K)},
        "o": {"kernel": wo.T.reshape(H, K, D), "bias": t2n(tm.o.bias)},
        # kernel[h, d, k] = W[h * 2 + k, d]
        "e": {
            "kernel": we.reshape(4, 2, D).transpose(0, 2, 1),
            "bias": t2n(tm.e.bias).reshape(4, 2),
        },
    }
    return {"params": jax.tree.map(jnp.asarray, p)}


ATTN_X = np.random.default_rng(1).normal(size=(2, 3, D)).astype(np.float32)


def attn_probe(p: Any) -> Any:
    return FlaxAttnLike().apply(p, ATTN_X)


@functools.cache
def attn_adapters() -> tuple[Any, lora.LoraConfig]:
    params = attn_params(TorchAttnLike())
    config = lora.LoraConfig(rank=2, alpha=7.0, init="random", rank_pattern={"o": 3}, rslora=True)
    return lora.init(jax.random.key(7), params, config, probe=attn_probe), config


def test_multi_axis_kernels_from_peft(tmp_path: Path) -> None:
    tm = TorchAttnLike()
    params = attn_params(tm)
    np.testing.assert_allclose(
        flax_out(FlaxAttnLike(), params, None, ATTN_X), torch_out(tm, ATTN_X), atol=TOL
    )
    pm = get_peft_model(tm, target_modules=["q", "o", "e"], r=2, lora_alpha=3)
    randomize_lora(pm, seed=2)
    expected = torch_out(pm.eval(), ATTN_X)
    pm.save_pretrained(str(tmp_path))

    # q (6, 2, 3) is 6 -> 6 features either way: without a probe the load refuses to guess
    with pytest.raises(ValueError, match=r"params/[qo]/kernel.*ambiguous.*probe="):
        lora.load_peft(tmp_path, params)
    adapters = lora.load_peft(tmp_path, params, probe=attn_probe)
    table = adapter_entries(adapters)
    assert table["params/q/kernel"].in_axes == (0,)
    assert table["params/o/kernel"].in_axes == (0, 1)
    assert table["params/e/kernel"].in_axes == (1,)  # not a leading axis: found by the probe
    np.testing.assert_allclose(
        flax_out(FlaxAttnLike(), params, adapters, ATTN_X), expected, atol=TOL
    )


def test_multi_axis_kernels_to_peft(tmp_path: Path) -> None:
    params = attn_params(TorchAttnLike())
    adapters, config = attn_adapters()
    expected = flax_out(FlaxAttnLike(), params, adapters, ATTN_X)
    lora.save_peft(tmp_path, adapters, config)
    pm = peft_from_pretrained(TorchAttnLike(), tmp_path)
    np.testing.assert_allclose(torch_out(pm, ATTN_X), expected, atol=TOL)


def test_multi_axis_input_axes_inferred_when_unambiguous(tmp_path: Path) -> None:
    """A DenseGeneral (8 -> (2, 3)) and back: the shapes fix the input axes; no probe needed."""

    class Torch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(2)
            self.q, self.o = torch.nn.Linear(8, 6), torch.nn.Linear(6, 8)

        def forward(self, x: Any) -> Any:
            return self.o(torch.tanh(self.q(x)))

    class Flax(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            y = jnp.tanh(nn.DenseGeneral((2, 3), name="q")(x))
            return nn.DenseGeneral(8, axis=(-2, -1), name="o")(y)

    tm = Torch()
    p = {
        "q": {"kernel": t2n(tm.q.weight).T.reshape(8, 2, 3), "bias": t2n(tm.q.bias).reshape(2, 3)},
        "o": {"kernel": t2n(tm.o.weight).T.reshape(2, 3, 8), "bias": t2n(tm.o.bias)},
    }
    params = {"params": jax.tree.map(jnp.asarray, p)}
    x = np.random.default_rng(2).normal(size=(3, 8)).astype(np.float32)
    pm = get_peft_model(tm, target_modules=["q", "o"], r=2, lora_alpha=2)
    randomize_lora(pm, seed=3)
    expected = torch_out(pm.eval(), x)
    pm.save_pretrained(str(tmp_path))
    adapters = lora.load_peft(tmp_path, params)
    np.testing.assert_allclose(flax_out(Flax(), params, adapters, x), expected, atol=TOL)


def test_conv3d_both_ways(tmp_path: Path) -> None:
    """Conv3d: PEFT's file loads; re-saved by save_peft it loads in PEFT again."""

    class Torch3d(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(5)
            self.conv = torch.nn.Conv3d(2, 3, (2, 3, 2), padding=1)

        def forward(self, x: Any) -> Any:  # NDHWC in, NDHWC out
            return self.conv(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)

    class Flax3d(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            return nn.Conv(3, (2, 3, 2), padding=1, name="conv")(x)

    tm = Torch3d()
    p = {"kernel": t2n(tm.conv.weight).transpose(2, 3, 4, 1, 0), "bias": t2n(tm.conv.bias)}
    params = {"params": {"conv": jax.tree.map(jnp.asarray, p)}}
    x = np.random.default_rng(5).normal(size=(1, 3, 4, 3, 2)).astype(np.float32)
    pm = get_peft_model(tm, target_modules=["conv"], r=2, lora_alpha=3)
    randomize_lora(pm, seed=6)
    expected = torch_out(pm.eval(), x)
    pm.save_pretrained(str(tmp_path / "peft"))
    adapters = lora.load_peft(tmp_path / "peft", params)
    assert adapter_entries(adapters)["params/conv/kernel"].in_axes == (0, 1, 2, 3)
    np.testing.assert_allclose(flax_out(Flax3d(), params, adapters, x), expected, atol=TOL)
    lora.save_peft(tmp_path / "ours", adapters)
    again = peft_from_pretrained(Torch3d(), tmp_path / "ours")
    np.testing.assert_allclose(torch_out(again, x), expected, atol=TOL)


# ---------------------------------------------------------------------------------------------
# case 3: an NNX state (no collection in the paths), list layers
# ---------------------------------------------------------------------------------------------
class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([nnx.Linear(4, 5, rngs=rngs), nnx.Linear(5, 3, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layers[1](jnp.tanh(self.layers[0](x)))


class TorchList(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)])

    def forward(self, x: Any) -> Any:
        return self.layers[1](torch.tanh(self.layers[0](x)))


def test_nnx_state_default_key_map(tmp_path: Path) -> None:
    tm = TorchList()
    graphdef, state = nnx.split(NnxNet(nnx.Rngs(0)))
    new = {}
    for i, layer in enumerate(tm.layers):
        new[f"layers/{i}/kernel"] = jnp.asarray(t2n(layer.weight).T)
        new[f"layers/{i}/bias"] = jnp.asarray(t2n(layer.bias))
    state = replace_leaves(state, new)
    apply = lambda s, x: nnx.merge(graphdef, s)(x)
    x = np.random.default_rng(3).normal(size=(2, 4)).astype(np.float32)
    config = lora.LoraConfig(rank=2, alpha=5.0, init="random")
    adapters = lora.init(jax.random.key(5), state, config)
    expected = np.asarray(lora.wrap(apply)(state, adapters, x))
    lora.save_peft(tmp_path, adapters, config)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["layers.0", "layers.1"]
    pm = peft_from_pretrained(tm, tmp_path)
    np.testing.assert_allclose(torch_out(pm, x), expected, atol=TOL)
    back = lora.load_peft(tmp_path, state)
    assert_same_adapters(back, adapters)


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_is_exact(tmp_path: Path, variant: str) -> None:
    params = net_params(TorchNet())
    adapters, config = net_adapters(variant)
    lora.save_peft(tmp_path, adapters, config)
    assert_same_adapters(lora.load_peft(tmp_path, params), adapters)
    assert_same_adapters(lora.load_peft(tmp_path, params, probe=net_probe), adapters)


def test_round_trip_multi_axis_and_without_config(tmp_path: Path) -> None:
    params = attn_params(TorchAttnLike())
    adapters, config = attn_adapters()
    lora.save_peft(tmp_path / "with", adapters, config)
    assert_same_adapters(lora.load_peft(tmp_path / "with", params, probe=attn_probe), adapters)
    # without a config the alphas come from the scales; plain LoRA scaling then
    plain = lora.init(
        jax.random.key(8),
        params,
        lora.LoraConfig(
            rank=2, alpha=3.0, init="random", rank_pattern={"o": 3}, alpha_pattern={"q": 0.7}
        ),
        probe=attn_probe,
    )
    lora.save_peft(tmp_path / "without", plain)
    assert_same_adapters(lora.load_peft(tmp_path / "without", params, probe=attn_probe), plain)


def test_key_map_dict_and_function(tmp_path: Path) -> None:
    """A Flax model with Flax's automatic names, mapped onto the PyTorch names both ways."""

    class Auto(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            h = jnp.tanh(nn.Dense(5)(x))  # Dense_0
            return nn.Dense(3)(h)  # Dense_1

    torch.manual_seed(4)
    tm = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    p = {
        f"Dense_{i}": {"kernel": t2n(tm[j].weight).T, "bias": t2n(tm[j].bias)}
        for i, j in ((0, 0), (1, 2))
    }
    params = {"params": jax.tree.map(jnp.asarray, p)}
    key_map = {"params/Dense_0/kernel": "0", "params/Dense_1/kernel": "2"}
    x = np.random.default_rng(4).normal(size=(2, 4)).astype(np.float32)
    config = lora.LoraConfig(rank=2, init="random")
    adapters = lora.init(jax.random.key(9), params, config)
    expected = flax_out(Auto(), params, adapters, x)
    lora.save_peft(tmp_path, adapters, config, key_map=key_map)
    np.testing.assert_allclose(torch_out(peft_from_pretrained(tm, tmp_path), x), expected, atol=TOL)
    fn = lambda path: {"Dense_0": "0", "Dense_1": "2"}.get(path.split("/")[1])
    assert_same_adapters(lora.load_peft(tmp_path, params, key_map=fn), adapters)
    assert_same_adapters(lora.load_peft(tmp_path, params, key_map=key_map), adapters)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Any]:
    """A PEFT-written adapter on `TorchNet` and the Flax twin's params."""
    tm = TorchNet()
    params = net_params(tm)
    pm = get_peft_model(tm, target_modules=["lin", "conv"], r=2, lora_alpha=4)
    randomize_lora(pm, seed=5)
    pm.save_pretrained(str(tmp_path))
    return tmp_path, params


def test_dora_flag_and_magnitudes_must_agree(tmp_path: Path) -> None:
    # DoRA files load (tests/test_dora.py); with the flag removed from the config, the
    # magnitude tensor is not silently dropped
    tm = TorchNet()
    pm = get_peft_model(tm, target_modules=["lin"], r=2, lora_alpha=4, use_dora=True)
    pm.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        lora.load_peft(tmp_path, net_params(tm))


@pytest.mark.parametrize(
    "change",
    # modules_to_save, trainable_token_indices and bias load now (tests/test_peft_extras.py),
    # target_parameters too (tests/test_moe_peft_files.py)
    [{"lora_bias": True}, {"layer_replication": [[0, 1]]}],
)
def test_unsupported_options_are_refused(saved: tuple[Path, Any], change: dict) -> None:
    directory, params = saved
    cfg = json.loads((directory / "adapter_config.json").read_text())
    cfg.update(change)
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"cannot honour.*{key}="):
        lora.load_peft(directory, params)


def test_base_changing_init_warns(saved: tuple[Path, Any]) -> None:
    directory, params = saved
    cfg = json.loads((directory / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa_niter_4"
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="changes the base weights"):
        lora.load_peft(directory, params)


def test_unmatched_modules_are_listed(saved: tuple[Path, Any]) -> None:
    directory, params = saved
    no_conv = {"params": {k: v for k, v in params["params"].items() if k != "conv"}}
    with pytest.raises(ValueError, match=r"match no kernel of params: \['conv'\]"):
        lora.load_peft(directory, no_conv)
    renamed = lambda path: "other." + path.split("/")[1]
    with pytest.raises(ValueError, match=r"\['conv', 'lin'\]|\['lin', 'conv'\]"):
        lora.load_peft(directory, params, key_map=renamed)
    with pytest.raises(
        ValueError, match=r"not kernels \(2\+ dims\) of params: \['params/nope/kernel'\]"
    ):
        lora.load_peft(directory, params, key_map={"params/nope/kernel": "lin"})


def test_unmapped_adapters_are_listed_on_save(tmp_path: Path) -> None:
    adapters, _ = net_adapters("plain")
    with pytest.raises(ValueError, match=r"no PyTorch module name.*params/lin/kernel"):
        lora.save_peft(tmp_path, adapters, key_map={"params/g/kernel": "g"})
    with pytest.raises(ValueError, match=r"no PyTorch module name.*params/conv/kernel"):
        lora.save_peft(tmp_path, adapters, key_map=lambda p: None if "conv" in p else "x" + p[7:])
    with pytest.raises(ValueError, match="same module"):
        lora.save_peft(tmp_path, adapters, key_map=lambda p: "x")


def test_wrong_shapes_name_the_path(saved: tuple[Path, Any]) -> None:
    directory, params = saved
    bad = replace_leaves(params, {"params/lin/kernel": jnp.zeros((7, 3))})
    with pytest.raises(
        ValueError, match=r"module 'lin' -> kernel 'params/lin/kernel' of shape \(7, 3\)"
    ):
        lora.load_peft(directory, bad)
    bad_conv = replace_leaves(params, {"params/conv/kernel": jnp.zeros((3, 3, 4, 5))})
    with pytest.raises(ValueError, match=r"'params/conv/kernel' of shape \(3, 3, 4, 5\)"):
        lora.load_peft(directory, bad_conv)


def test_rank_disagreeing_with_config_is_refused(saved: tuple[Path, Any]) -> None:
    directory, params = saved
    cfg = json.loads((directory / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"lin": 4}
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'lin'.*rank 2.*r=4"):
        lora.load_peft(directory, params)


def test_save_peft_warns_for_base_changing_inits(tmp_path: Path) -> None:
    adapters, config = net_adapters("plain")
    for init in ("pissa", "olora", "loftq"):
        with pytest.warns(UserWarning, match=f"init='{init}'.*changed the base"):
            lora.save_peft(tmp_path / init, adapters, dataclasses.replace(config, init=init))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora.save_peft(tmp_path / "plain", adapters, config)  # init="random": no warning
