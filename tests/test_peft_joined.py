"""Several Flax kernels as ONE PyTorch module or parameter (key-map names ``"<module>[i]"``):
separate q / k / v kernels as a fused ``qkv_proj`` (Phi-3), separate expert gate and up kernels
as transformers 5's ``experts.gate_up_proj`` (Mixtral, Qwen3-MoE; PEFT's ``target_parameters``).

Checked: the file's ``lora_A`` stacks the kernels' (summed rank) and its ``lora_B`` is
block-diagonal, against a float64 numpy delta of each kernel; the round trip is exact (equal
ranks: the same factors; different ranks or alphas: the same deltas); bad part numbers are
refused; with torch, the real peft loads the files onto an ``nn.Linear`` ``qkv_proj`` and onto
transformers' ``MixtralExperts``, and `load_peft` reads PEFT's files back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from support import INTEROP
from support.trees import leaves_by_path

import flax_lora as lora

PRE = "base_model.model."
D, E, FF, TOP = 8, 4, 6, 2
OUT = {"q": 8, "k": 4, "v": 4}
X = np.random.default_rng(0).normal(size=(5, D)).astype(np.float32)
QKV = {f"{n}/kernel": f"attn.qkv_proj[{i}]" for i, n in enumerate(OUT)}


def _qkv_params() -> dict[str, Any]:
    rng = np.random.default_rng(1)
    return {
        n: {"kernel": jnp.asarray(rng.normal(size=(D, o)), jnp.float32)} for n, o in OUT.items()
    }


def _qkv(params: Any, x: Any) -> Any:
    return jnp.concatenate([x @ params[n]["kernel"] for n in OUT], axis=-1)


def _tensors64(directory: Path) -> dict[str, np.ndarray]:
    file = load_file(str(directory / "adapter_model.safetensors"))
    return {k: v.astype(np.float64) for k, v in file.items()}


def _is_lora(x: Any) -> bool:
    return isinstance(x, lora.LoraWeights)


def _delta64(adapters: Any, path: str) -> np.ndarray:
    """``scale * a @ b`` of a 2-D kernel's adapter in float64 (the adapter's own numbers)."""
    w = adapters[path.split("/")[0]]["kernel"]
    return float(w.scale) * np.asarray(w.a, np.float64) @ np.asarray(w.b, np.float64)


PATTERNS = {
    "equal_ranks": {},
    "own_ranks": {"rank_pattern": {"^k/": 3}, "alpha_pattern": {"^k/": 6.0}},  # one scale
    "own_ranks_alphas": {"rank_pattern": {"^k/": 3}, "alpha_pattern": {"^v/": 5.0}},
}


@pytest.mark.parametrize("case", list(PATTERNS))
def test_qkv_as_one_module(tmp_path: Path, case: str) -> None:
    params = _qkv_params()
    patterns, same = PATTERNS[case], case == "equal_ranks"
    config = lora.LoraConfig(rank=2, alpha=4.0, init="random", **patterns)
    adapters = lora.init(jax.random.key(0), params, config)
    lora.save_peft(tmp_path, adapters, config, key_map=QKV)
    tensors = _tensors64(tmp_path)
    ranks = (2, 2, 2) if same else (2, 3, 2)
    la, lb = (
        tensors[PRE + "attn.qkv_proj.lora_A.weight"],
        tensors[PRE + "attn.qkv_proj.lora_B.weight"],
    )
    assert la.shape == (sum(ranks), D) and lb.shape == (sum(OUT.values()), sum(ranks))
    c = json.loads((tmp_path / "adapter_config.json").read_text())
    r = c["rank_pattern"].get("attn.qkv_proj", c["r"])
    alpha = c["alpha_pattern"].get("attn.qkv_proj", c["lora_alpha"])
    assert r == sum(ranks)
    fused = alpha / r * (lb @ la)  # (out, in) of the fused module
    o0, r0 = 0, 0
    for (name, n), rk in zip(OUT.items(), ranks, strict=True):
        np.testing.assert_allclose(fused[o0 : o0 + n].T, _delta64(adapters, name), atol=1e-6)
        assert not np.any(lb[o0 : o0 + n, :r0]) and not np.any(lb[o0 : o0 + n, r0 + rk :])
        o0, r0 = o0 + n, r0 + rk
    back = lora.load_peft(tmp_path, params, key_map=QKV)
    if case != "own_ranks_alphas":  # each kernel its own block of the rank: the same factors
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(adapters), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert jax.tree.structure(back) == jax.tree.structure(adapters)
    else:  # the module's one scale is 1: the kernels' own scales folded into b
        assert {float(w.scale) for w in jax.tree.leaves(back, is_leaf=_is_lora)} == {1.0}
        assert [back[n]["kernel"].rank for n in OUT] == [2, 3, 2]
    for name in OUT:  # exact deltas either way
        np.testing.assert_allclose(
            _delta64(back, name), _delta64(adapters, name), atol=1e-6, err_msg=name
        )
    np.testing.assert_allclose(
        lora.wrap(_qkv)(params, back, X), lora.wrap(_qkv)(params, adapters, X), atol=1e-5
    )


LAYERS = 3
QKV_LAYERED = {f"{n}/kernel": f"layers.{{layer}}.attn.qkv_proj[{i}]" for i, n in enumerate(OUT)}


def _qkv_layered(params: Any, x: Any) -> Any:
    def body(h: Any, p: Any) -> Any:
        return jnp.tanh(_qkv(p, h)[..., :D]), None  # q's block feeds the next layer

    return jax.lax.scan(body, x, params)[0]


@pytest.mark.parametrize("layers", [None, (0, 2)], ids=["all_layers", "some_layers"])
def test_qkv_as_one_module_per_layer(tmp_path: Path, layers: Any) -> None:
    rng = np.random.default_rng(4)
    params = {
        n: {"kernel": jnp.asarray(0.3 * rng.normal(size=(LAYERS, D, o)), jnp.float32)}
        for n, o in OUT.items()
    }
    probe = lambda p: _qkv_layered(p, X)
    config = lora.LoraConfig(rank=2, alpha=4.0, init="random", layers=layers)
    adapters = lora.init(jax.random.key(1), params, config, probe=probe)
    lora.save_peft(tmp_path, adapters, config, key_map=QKV_LAYERED)
    tensors = _tensors64(tmp_path)
    c = json.loads((tmp_path / "adapter_config.json").read_text())
    kept = [0, 1, 2] if layers is None else list(layers)
    assert sorted(k.split(".")[3] for k in tensors if k.endswith("lora_A.weight")) == [
        str(i) for i in kept
    ]
    for i in kept:
        la = tensors[f"{PRE}layers.{i}.attn.qkv_proj.lora_A.weight"]
        lb = tensors[f"{PRE}layers.{i}.attn.qkv_proj.lora_B.weight"]
        module = f"layers.{i}.attn.qkv_proj"
        r = c["rank_pattern"].get(module, c["r"])
        assert r == 6 and la.shape == (6, D)  # 3 kernels of rank 2
        fused, o0 = c["alpha_pattern"].get(module, c["lora_alpha"]) / r * (lb @ la), 0
        for name, n in OUT.items():
            w = adapters[name]["kernel"]
            ref = 2.0 * np.asarray(w.a[i], np.float64) @ np.asarray(w.b[i], np.float64)
            np.testing.assert_allclose(fused[o0 : o0 + n].T, ref, atol=1e-6)
            o0 += n
    back = lora.load_peft(tmp_path, params, key_map=QKV_LAYERED, probe=probe)
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_parts_must_be_numbered_from_zero(tmp_path: Path) -> None:
    params = _qkv_params()
    adapters = lora.init(jax.random.key(0), params, lora.LoraConfig(rank=2, init="random"))
    bad = QKV | {"v/kernel": "attn.qkv_proj[3]"}
    with pytest.raises(ValueError, match=r"parts \[0, 1, 3\] of the module 'attn.qkv_proj'"):
        lora.save_peft(tmp_path, adapters, key_map=bad)
    lora.save_peft(tmp_path, adapters, key_map=QKV)
    with pytest.raises(ValueError, match=r"parts \[0, 1, 3\] of the module 'attn.qkv_proj'") as e:
        lora.load_peft(tmp_path, params, key_map=bad)
    assert str(tmp_path) in str(e.value)


def test_parts_must_share_the_input(tmp_path: Path) -> None:
    params = _qkv_params() | {"k": {"kernel": jnp.ones((D + 1, 4))}}
    adapters = lora.init(jax.random.key(0), params, lora.LoraConfig(rank=2, init="random"))
    with pytest.raises(ValueError, match=r"make one module 'attn.qkv_proj'.*'k/kernel'"):
        lora.save_peft(tmp_path, adapters, key_map=QKV)


# -- with torch: the real peft ---------------------------------------------------------------
def _torch() -> Any:
    torch = pytest.importorskip("torch", reason=INTEROP)
    pytest.importorskip("peft", reason=INTEROP)
    pytest.importorskip("transformers", reason=INTEROP)
    return torch


def test_peft_loads_qkv_proj(tmp_path: Path) -> None:
    torch = _torch()
    from support.peft_models import peft_from_pretrained

    params = _qkv_params()
    config = lora.LoraConfig(rank=2, alpha=4.0, init="random", rank_pattern={"^k/": 3})
    adapters = lora.init(jax.random.key(0), params, config)
    lora.save_peft(tmp_path, adapters, config, key_map=QKV)

    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv_proj = torch.nn.Linear(D, sum(OUT.values()), bias=False)
            w = np.concatenate([np.asarray(params[n]["kernel"]) for n in OUT], axis=1)
            with torch.no_grad():
                self.qkv_proj.weight.copy_(torch.tensor(w.T))

        def forward(self, x: Any) -> Any:
            return self.qkv_proj(x)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = Attn()

        def forward(self, x: Any) -> Any:
            return self.attn(x)

    with torch.no_grad():
        got = peft_from_pretrained(Model().eval(), tmp_path)(torch.tensor(X)).numpy()
    np.testing.assert_allclose(got, lora.wrap(_qkv)(params, adapters, X), atol=1e-5)


# transformers 5's Mixtral experts: gate_up_proj (E, 2F, D), down_proj (E, D, F)
GATE_UP = {
    "params/experts/gate": "experts.gate_up_proj[0]",
    "params/experts/up": "experts.gate_up_proj[1]",
    "params/experts/down": "experts.down_proj",
}
ORDER = ("gate_up_proj", "down_proj")  # MixtralExperts' registration order
IDX = np.array([[0, 2], [1, 3], [2, 0], [3, 1], [1, 2]], np.int64)
WTS = np.random.default_rng(2).uniform(0.1, 1.0, size=(5, TOP)).astype(np.float32)


def _moe_params() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    shapes = {"gate": (E, D, FF), "up": (E, D, FF), "down": (E, FF, D)}
    experts = {k: jnp.asarray(0.5 * rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    return {"params": {"experts": experts}}


def _moe(params: Any, x: Any, idx: Any, wts: Any) -> Any:
    p = params["params"]["experts"]
    comb = jnp.zeros((x.shape[0], E)).at[jnp.arange(x.shape[0])[:, None], idx].add(wts)
    xe = jnp.broadcast_to(x, (E, *x.shape))  # every expert sees every token
    h = jax.nn.silu(jnp.einsum("etd,edf->etf", xe, p["gate"]))
    h = h * jnp.einsum("etd,edf->etf", xe, p["up"])
    return jnp.einsum("etd,te->td", jnp.einsum("etf,efd->etd", h, p["down"]), comb)


def _moe_probe(params: Any) -> Any:
    return _moe(params, X, IDX, WTS)


def _mixtral(params: Any) -> Any:
    torch = _torch()
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    p = {k: np.asarray(v) for k, v in params["params"]["experts"].items()}
    cfg = MixtralConfig(hidden_size=D, intermediate_size=FF, num_local_experts=E)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = MixtralExperts(cfg)
            gate_up = np.concatenate([p["gate"], p["up"]], axis=2).transpose(0, 2, 1)
            with torch.no_grad():
                self.experts.gate_up_proj.copy_(torch.tensor(np.ascontiguousarray(gate_up)))
                self.experts.down_proj.copy_(torch.tensor(p["down"].transpose(0, 2, 1).copy()))

        def forward(self, x: Any) -> Any:
            return self.experts(x, torch.tensor(IDX), torch.tensor(WTS))

    return torch, Block().eval()


def test_peft_loads_gate_up_proj(tmp_path: Path) -> None:
    params = _moe_params()
    torch, block = _mixtral(params)
    from support.peft_models import peft_from_pretrained

    config = lora.LoraConfig(rank=2, alpha=3.0, init="random")
    adapters = lora.init(jax.random.key(4), params, config, probe=_moe_probe)
    lora.save_peft(tmp_path, adapters, config, key_map=GATE_UP, param_order=ORDER)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors[PRE + "experts.base_layer.lora_A.weight"].shape == (2 * 2 * E, D)
    assert tensors[PRE + "experts.base_layer.lora_B.weight"].shape == (2 * FF, 2 * 2 * E)
    with torch.no_grad():
        base = block(torch.tensor(X)).numpy()
        got = peft_from_pretrained(block, tmp_path)(torch.tensor(X)).numpy()
    np.testing.assert_allclose(base, _moe(params, X, IDX, WTS), atol=1e-5)
    ours = lora.wrap(_moe)(params, adapters, X, IDX, WTS)
    np.testing.assert_allclose(got, ours, atol=1e-5)
    assert np.abs(ours - base).max() > 1e-2
    back = lora.load_peft(tmp_path, params, key_map=GATE_UP, probe=_moe_probe, param_order=ORDER)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_load_peft_reads_gate_up_proj(tmp_path: Path) -> None:
    params = _moe_params()
    torch, block = _mixtral(params)
    from support.peft_models import get_peft_model, randomize_lora, t2n

    pm = get_peft_model(
        block,
        r=2,
        lora_alpha=3.0,
        target_modules=[],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )
    randomize_lora(pm, seed=5)
    pm.eval().save_pretrained(str(tmp_path))
    with torch.no_grad():
        want = t2n(pm(torch.tensor(X)))
    adapters = lora.load_peft(
        tmp_path, params, key_map=GATE_UP, probe=_moe_probe, param_order=ORDER
    )
    np.testing.assert_allclose(lora.wrap(_moe)(params, adapters, X, IDX, WTS), want, atol=1e-5)
    # each kernel's delta against PEFT's tensors in float64: delta[e] = s * B_e @ A_e (out, in)
    t = _tensors64(tmp_path)
    la, lb = (
        t[PRE + "experts.base_layer.lora_A.weight"],
        t[PRE + "experts.base_layer.lora_B.weight"],
    )
    a = la.reshape(E, 2, D)  # rows e * r + k
    b = lb.reshape(2 * FF, 2, E)  # columns k * E + e
    fused = 1.5 * np.einsum("ore,eri->eio", b, a)  # (E, D, 2F) in the kernels' (in, out) layout
    got = leaves_by_path(lora.merge(params, adapters))
    for i, name in enumerate(("gate", "up")):
        path = f"params/experts/{name}"
        base = np.asarray(params["params"]["experts"][name], np.float64)
        np.testing.assert_allclose(
            np.asarray(got[path], np.float64) - base, fused[..., i * FF : (i + 1) * FF], atol=1e-6
        )


def test_key_map_names_must_be_strings_or_tuples_of_them(tmp_path: Path) -> None:
    params = _qkv_params()
    adapters = lora.init(jax.random.key(0), params, lora.LoraConfig(rank=2, init="random"))
    for bad in [(), ("attn.k", 3), ["attn.k", "attn.v"]]:
        with pytest.raises(TypeError, match=r"key_map\('q/kernel'\) must return a module name"):
            lora.save_peft(tmp_path, adapters, key_map=QKV | {"q/kernel": bad})


def test_biases_of_parts_are_refused(tmp_path: Path) -> None:
    params = {n: p | {"bias": jnp.ones(OUT[n])} for n, p in _qkv_params().items()}
    config = lora.LoraConfig(rank=2, init="random", bias="all")
    adapters = lora.init(jax.random.key(0), params, config)
    with pytest.raises(ValueError, match=r"no PyTorch module name .*'k/bias', 'q/bias', 'v/bias'"):
        lora.save_peft(tmp_path, adapters, config, key_map=QKV)
    assert not (tmp_path / "adapter_model.safetensors").exists()
