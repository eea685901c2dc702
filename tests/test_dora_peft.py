"""DoRA against real PEFT (CPU PyTorch), both ways: a PEFT-written DoRA adapter loads and gives
PyTorch's outputs and gradients (PEFT's own autograd), and `save_peft`'s file loads in PEFT. The
float64 numpy reference checks are in tests/test_dora.py.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import INTEROP
from support.compare import rel_err
from support.trees import is_lora

pytest.importorskip("torch", reason=INTEROP)
pytest.importorskip("peft", reason=INTEROP)
pytest.importorskip("transformers", reason=INTEROP)
import peft
import torch
from support.peft_models import perturb_peft_dora, t2n
from transformers.pytorch_utils import Conv1D

import flax_lora as lora

PEFT_TOL = 1e-4
GRAD_TOL = 1e-4  # relative, for float32 gradients against PyTorch's float32
MODES = ("merged", "factored", "auto")
torch.set_num_threads(1)


# -- PEFT, both ways -------------------------------------------------------------------------
class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(11, 6)
        self.conv = torch.nn.Conv2d(6, 5, 3, padding=1)
        self.g = Conv1D(5, 5)  # GPT-2's layer (fan_in_fan_out): weight (in, out)
        self.lin = torch.nn.Linear(5, 3)
        with torch.no_grad():
            self.g.weight.normal_(0, 0.5)

    def forward(self, ids: Any) -> Any:  # ids (B, 4, 4)
        x = self.emb(ids).permute(0, 3, 1, 2)  # (B, 6, 4, 4)
        x = torch.tanh(self.conv(x)).permute(0, 2, 3, 1)  # (B, 4, 4, 5)
        return self.lin(torch.tanh(self.g(x)))


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        x = nn.Embed(11, 6, name="emb")(ids)
        x = jnp.tanh(nn.Conv(5, (3, 3), padding=1, name="conv")(x))
        x = jnp.tanh(nn.Dense(5, name="g")(x))
        return nn.Dense(3, name="lin")(x)


def _net_params(tm: TorchNet) -> dict[str, Any]:
    p = {
        "emb": {"embedding": t2n(tm.emb.weight)},
        "conv": {"kernel": t2n(tm.conv.weight).transpose(2, 3, 1, 0), "bias": t2n(tm.conv.bias)},
        "g": {"kernel": t2n(tm.g.weight), "bias": t2n(tm.g.bias)},
        "lin": {"kernel": t2n(tm.lin.weight).T, "bias": t2n(tm.lin.bias)},
    }
    return {"params": jax.tree.map(jnp.asarray, p)}


IDS = np.random.default_rng(50).integers(0, 11, size=(2, 4, 4))
TARGETS = ["emb", "conv", "g", "lin"]


def _peft_model(tm: TorchNet, **kw: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS, use_dora=True, **kw)
        return peft.get_peft_model(tm, cfg)


def _torch_out(model: Any) -> np.ndarray:
    with torch.no_grad():
        return t2n(model(torch.as_tensor(IDS)))


def test_twins_agree_and_init_magnitudes_match_peft() -> None:
    tm = TorchNet().eval()
    params = _net_params(tm)
    np.testing.assert_allclose(
        np.asarray(FlaxNet().apply(params, IDS)), _torch_out(tm), atol=PEFT_TOL
    )
    pm = _peft_model(TorchNet())
    ours = lora.init(
        jax.random.key(0),
        params,
        lora.LoraConfig(rank=2, alpha=3.0, dora=True),
        probe=lambda p: FlaxNet().apply(p, IDS),
    )
    for name in TARGETS:
        leaf = "embedding" if name == "emb" else "kernel"
        m = ours["params"][name][leaf].m
        theirs = pm.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight
        np.testing.assert_allclose(np.asarray(m).reshape(-1), t2n(theirs).reshape(-1), rtol=1e-5)


def _perturbed_peft_model(tm: Any, seed: int) -> Any:
    """A PEFT DoRA model on ``tm`` with random nonzero A, B and magnitudes, in eval mode."""
    return perturb_peft_dora(_peft_model(tm), seed)


def test_peft_written_dora_adapter_loads(tmp_path: Path) -> None:
    tm = TorchNet()
    params = _net_params(tm)
    pm = _perturbed_peft_model(tm, seed=1)
    expected = _torch_out(pm)
    pm.save_pretrained(str(tmp_path))

    adapters = lora.load_peft(tmp_path, params)
    for w in jax.tree.leaves(adapters, is_leaf=is_lora):
        assert w.m is not None and w.m.shape == w.out_shape
    base = np.asarray(FlaxNet().apply(params, IDS))
    assert np.abs(expected - base).max() > 0.1  # the adapter really changes the model
    for mode in MODES:
        got = jax.jit(lora.wrap(FlaxNet().apply, mode=mode))(params, adapters, IDS)
        np.testing.assert_allclose(np.asarray(got), expected, atol=PEFT_TOL)


def test_gradients_match_peft_autograd(tmp_path: Path) -> None:
    """PEFT's own backward pass (its norm detached as ours) gives our gradients for a, b and m."""
    tm = TorchNet()
    params = _net_params(tm)
    pm = _perturbed_peft_model(tm, seed=2)
    pm.save_pretrained(str(tmp_path))
    out = pm(torch.as_tensor(IDS))
    c = np.random.default_rng(80).normal(size=tuple(out.shape)).astype(np.float32)
    (out * torch.as_tensor(c)).sum().backward()
    theirs = {n: t2n(p.grad) for n, p in pm.named_parameters() if p.grad is not None}

    adapters = lora.load_peft(tmp_path, params)
    fn = lora.wrap(FlaxNet().apply)
    grads = jax.grad(lambda ad: jnp.sum(fn(params, ad, IDS) * c))(adapters)["params"]
    prefix = "base_model.model."
    for name in TARGETS:
        ours = grads[name]["embedding" if name == "emb" else "kernel"]
        a, b = np.asarray(ours.a), np.asarray(ours.b)
        if name == "emb":  # lora_embedding_A (r, num) = a.T, lora_embedding_B (dim, r) = b.T
            ga, gb = (
                theirs[f"{prefix}emb.lora_embedding_A.default"],
                theirs[f"{prefix}emb.lora_embedding_B.default"],
            )
            pairs = [(a.T, ga), (b.T, gb)]
        else:
            ga = theirs[f"{prefix}{name}.lora_A.default.weight"]
            gb = theirs[f"{prefix}{name}.lora_B.default.weight"]
            if name == "conv":  # a (kh, kw, in, r) -> (r, in, kh, kw); b (r, out) -> (out, r, 1, 1)
                pairs = [(a.transpose(3, 2, 0, 1), ga), (b.T[:, :, None, None], gb)]
            else:
                pairs = [(a.T, ga), (b.T, gb)]
        gm = theirs[f"{prefix}{name}.lora_magnitude_vector.default.weight"].reshape(-1)
        pairs.append((np.asarray(ours.m).reshape(-1), gm))
        for got, want in pairs:
            assert got.shape == want.shape
            assert rel_err(got, want.astype(np.float64)) < GRAD_TOL, name


def test_save_peft_dora_loads_in_peft(tmp_path: Path) -> None:
    tm = TorchNet()
    params = _net_params(tm)
    config = lora.LoraConfig(rank=2, alpha=3.0, init="random", dora=True)
    adapters = lora.init(jax.random.key(4), params, config, probe=lambda p: FlaxNet().apply(p, IDS))
    rng = np.random.default_rng(60)
    adapters = jax.tree.map(
        lambda w: w.replace(m=w.m * (1.0 + 0.3 * jnp.asarray(rng.normal(size=w.m.shape)))),
        adapters,
        is_leaf=is_lora,
    )
    expected = np.asarray(jax.jit(lora.wrap(FlaxNet().apply))(params, adapters, IDS))
    lora.save_peft(tmp_path, adapters, config)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    from safetensors.numpy import load_file

    shapes = {k: v.shape for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    assert shapes["base_model.model.lin.lora_magnitude_vector"] == (3,)
    assert shapes["base_model.model.conv.lora_magnitude_vector"] == (1, 5, 1, 1)
    assert shapes["base_model.model.emb.lora_magnitude_vector"] == (6,)
    assert shapes["base_model.model.g.lora_magnitude_vector"] == (5,)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(TorchNet(), str(tmp_path)).eval()
    np.testing.assert_allclose(_torch_out(pm), expected, atol=PEFT_TOL)
    base = np.asarray(FlaxNet().apply(params, IDS))
    assert np.abs(expected - base).max() > 0.1

    back = lora.load_peft(tmp_path, params)  # and our own reader gives the same adapters
    for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
