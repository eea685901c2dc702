"""PEFT files of fused kernels (a tuple of module names), against the real `peft` and
transformers' ``LlamaForCausalLM``.

The JAX twin (support/fused_models.py) keeps k and v as one ``kv_einsum`` kernel ``(2, K, D, H)``
and gate and up as one ``gating`` kernel ``(2, F, D)``, as Gemma does; PyTorch keeps them as
``k_proj`` / ``v_proj`` and ``gate_proj`` / ``up_proj``. Checked: `save_peft` -> PEFT's logits
equal `lora.wrap`'s; PEFT (random nonzero factors, shared or different ``lora_A`` per module,
different alphas) -> `load_peft` gives PEFT's logits, and kernel deltas equal a float64 numpy
delta of the file's tensors; the round trip is exact; bad names and files are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import INTEROP

pytest.importorskip("torch", reason=INTEROP)
pytest.importorskip("peft", reason=INTEROP)
pytest.importorskip("transformers", reason=INTEROP)
import torch
import transformers
from safetensors.numpy import load_file, save_file
from support import fused_models as fm
from support.peft_models import (
    assert_same_adapters,
    get_peft_model,
    peft_from_pretrained,
    perturb_peft_dora,
    randomize_lora,
    t2n,
)
from support.trees import leaves_by_path

import flax_lora as lora

TOL = 1e-5
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = np.array([[1, 5, 9, 2, 33, 7], [60, 3, 3, 18, 0, 41]], np.int64)


def _torch_llama(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**fm.hf_config(), attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a wrong norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape))
    return model


def _logits(model: Any) -> np.ndarray:
    with torch.no_grad():
        return t2n(model(torch.as_tensor(IDS)).logits)


def _twin(layered: bool) -> tuple[Any, dict[str, Any]]:
    model = _torch_llama()
    state = {k: t2n(v) for k, v in model.state_dict().items()}
    return model, fm.from_torch_state(state, layered)


def _probe(params: Any) -> Any:
    return fm.apply(params, jnp.asarray(IDS))


def _ref_deltas(directory: Path, layered: bool) -> dict[str, np.ndarray]:
    """Each adapted kernel's delta in float64 numpy from the file's tensors (PEFT's formula
    ``alpha / r * B @ A`` per module, patterns resolved by hand), in the kernel's layout."""
    file = load_file(str(directory / "adapter_model.safetensors"))
    tensors = {k: v.astype(np.float64) for k, v in file.items()}
    cfg = json.loads((directory / "adapter_config.json").read_text())

    def delta(module: str) -> np.ndarray:
        a = tensors[f"base_model.model.{module}.lora_A.weight"]
        b = tensors[f"base_model.model.{module}.lora_B.weight"]
        short = module.rsplit(".", 1)[1]
        r = next((v for k, v in cfg["rank_pattern"].items() if k.endswith(short)), cfg["r"])
        alpha = next(
            (v for k, v in cfg["alpha_pattern"].items() if k.endswith(short)), cfg["lora_alpha"]
        )
        assert a.shape[0] == r
        return alpha / r * (b @ a)

    out: dict[str, list[np.ndarray]] = {}
    for i in range(fm.L):
        m = f"model.layers.{i}."
        d = {
            "attn/q_einsum/kernel": delta(m + "self_attn.q_proj")
            .reshape(fm.N, fm.H, fm.D)
            .transpose(0, 2, 1),
            "attn/kv_einsum/kernel": np.stack(
                [
                    delta(m + f"self_attn.{x}_proj").reshape(fm.K, fm.H, fm.D).transpose(0, 2, 1)
                    for x in "kv"
                ]
            ),
            "attn/o_einsum/kernel": delta(m + "self_attn.o_proj").T.reshape(fm.N, fm.H, fm.D),
            "mlp/gating/kernel": np.stack([delta(m + f"mlp.{x}_proj") for x in ("gate", "up")]),
            "mlp/down/kernel": delta(m + "mlp.down_proj").T,
        }
        for k, v in d.items():
            out.setdefault(k if layered else f"layers_{i}/{k}", []).append(v)
    return {
        (f"layers/{k}" if layered else k): (np.stack(v) if layered else v[0])
        for k, v in out.items()
    }


def _our_deltas(params: Any, adapters: Any) -> dict[str, np.ndarray]:
    merged, base = leaves_by_path(lora.merge(params, adapters)), leaves_by_path(params)
    return {
        p: np.asarray(merged[p], np.float64) - np.asarray(base[p], np.float64)
        for p in merged
        if not np.array_equal(merged[p], base[p])
    }


@pytest.mark.parametrize("layered", [False, True], ids=["layers", "layered"])
def test_twin_is_the_torch_model(layered: bool) -> None:
    model, params = _twin(layered)
    np.testing.assert_allclose(fm.apply(params, jnp.asarray(IDS)), _logits(model), atol=TOL)


@pytest.mark.parametrize("layered", [False, True], ids=["layers", "layered"])
def test_save_peft_fused_loads_in_peft(tmp_path: Path, layered: bool) -> None:
    model, params = _twin(layered)
    config = lora.LoraConfig(
        rank=4, alpha=8.0, init="random", targets=r".*(einsum|gating|down)/kernel"
    )
    adapters = lora.init(jax.random.key(1), params, config, probe=_probe)
    lora.save_peft(tmp_path, adapters, config, key_map=fm.key_map(layered))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    pre = "base_model.model.model.layers.1."
    assert tensors[pre + "self_attn.k_proj.lora_B.weight"].shape == (fm.K * fm.H, 4)
    np.testing.assert_array_equal(  # the fused kernel's one lora_A, in both modules
        tensors[pre + "self_attn.k_proj.lora_A.weight"],
        tensors[pre + "self_attn.v_proj.lora_A.weight"],
    )
    pm = peft_from_pretrained(model, tmp_path)
    ours = lora.wrap(fm.apply)(params, adapters, jnp.asarray(IDS))
    np.testing.assert_allclose(ours, _logits(pm), atol=TOL)
    assert np.abs(ours - fm.apply(params, jnp.asarray(IDS))).max() > 1e-2  # not a no-op
    back = lora.load_peft(tmp_path, params, key_map=fm.key_map(layered), probe=_probe)
    assert_same_adapters(back, adapters)  # equal lora_A per module: rank 4 again, exactly


@pytest.mark.parametrize("layered", [False, True], ids=["layers", "layered"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_A", "own_A"])
def test_load_peft_fused_from_peft(tmp_path: Path, layered: bool, shared: bool) -> None:
    model, params = _twin(layered)
    options = {} if shared else {"alpha_pattern": {"v_proj": 16.0, "up_proj": 2.0}}
    pm = get_peft_model(model, r=4, lora_alpha=8, target_modules=MODULES, **options)
    randomize_lora(pm, seed=3)
    if shared:  # k and v (gate and up) trained with one lora_A: one adapter of rank 4
        with torch.no_grad():
            for layer in pm.base_model.model.model.layers:
                at, mlp = layer.self_attn, layer.mlp
                at.v_proj.lora_A["default"].weight.copy_(at.k_proj.lora_A["default"].weight)
                mlp.up_proj.lora_A["default"].weight.copy_(mlp.gate_proj.lora_A["default"].weight)
    pm.eval().save_pretrained(tmp_path)
    adapters = lora.load_peft(tmp_path, params, key_map=fm.key_map(layered), probe=_probe)
    prefix = "layers/" if layered else "layers_0/"
    kv = leaves_by_path(adapters)[prefix + "attn/kv_einsum/kernel/a"]
    assert kv.shape[-1] == (4 if shared else 8)  # summed rank where the lora_As differ
    ours = lora.wrap(fm.apply)(params, adapters, jnp.asarray(IDS))
    np.testing.assert_allclose(ours, _logits(pm), atol=TOL)
    ref, got = _ref_deltas(tmp_path, layered), _our_deltas(params, adapters)
    assert sorted(got) == sorted(ref)
    for path, d in ref.items():
        np.testing.assert_allclose(got[path], d, atol=1e-6, err_msg=path)


def _files(tmp_path: Path) -> tuple[Any, Path]:
    _, params = _twin(False)
    config = lora.LoraConfig(rank=2, init="random", targets=r".*kv_einsum/kernel")
    adapters = lora.init(jax.random.key(0), params, config, probe=_probe)
    keys = {k: v for k, v in fm.key_map(False).items() if "kv_einsum" in k}
    lora.save_peft(tmp_path, adapters, config, key_map=keys)
    return params, tmp_path


def test_fused_parts_must_divide_the_axis(tmp_path: Path) -> None:
    params = {"w": {"kernel": jnp.ones((4, 6))}}
    adapters = lora.init(jax.random.key(0), params, lora.LoraConfig(rank=2))
    with pytest.raises(ValueError, match=r"'w/kernel'.*cannot be split into the 4 modules"):
        lora.save_peft(tmp_path, adapters, key_map={"w/kernel": ("a", "b", "c", "d")})
    assert not (tmp_path / "adapter_config.json").exists()


def test_file_missing_a_part_is_refused(tmp_path: Path) -> None:
    params, directory = _files(tmp_path)
    file = directory / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(str(file)).items() if "0.self_attn.v_proj" not in k}
    save_file(tensors, str(file))
    keys = {k: v for k, v in fm.key_map(False).items() if "kv_einsum" in k}
    with pytest.raises(ValueError, match=r"adapter_model.safetensors.*lacks part\(s\) \[1\]") as e:
        lora.load_peft(directory, params, key_map=keys, probe=_probe)
    assert "layers_0/attn/kv_einsum/kernel" in str(e.value)
    assert "model.layers.0.self_attn.v_proj" in str(e.value)


def test_file_with_a_misshapen_part_is_refused(tmp_path: Path) -> None:
    params, directory = _files(tmp_path)
    file = directory / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = np.ones((fm.K * fm.H + 2, 2), np.float32)
    save_file(tensors, str(file))
    keys = {k: v for k, v in fm.key_map(False).items() if "kv_einsum" in k}
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.v_proj") as e:
        lora.load_peft(directory, params, key_map=keys, probe=_probe)
    assert "adapter_model.safetensors" in str(e.value) and "kv_einsum" in str(e.value)


def test_dora_fused_both_ways(tmp_path: Path) -> None:
    model, params = _twin(False)
    pm = get_peft_model(model, r=4, lora_alpha=8, target_modules=MODULES, use_dora=True)
    perturb_peft_dora(pm, seed=7)  # own lora_A per module, magnitudes away from ||W0||
    pm.save_pretrained(tmp_path / "peft")
    adapters = lora.load_peft(tmp_path / "peft", params, key_map=fm.key_map(False), probe=_probe)
    ours = lora.wrap(fm.apply)(params, adapters, jnp.asarray(IDS))
    np.testing.assert_allclose(ours, _logits(pm), atol=TOL)
    lora.save_peft(tmp_path / "ours", adapters, key_map=fm.key_map(False))
    back = peft_from_pretrained(_twin(False)[0], tmp_path / "ours")
    np.testing.assert_allclose(_logits(back), ours, atol=TOL)
