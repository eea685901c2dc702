"""PEFT files of scan-stacked adapters, checked against the real HuggingFace `peft` package.

The PyTorch model keeps its ``L`` identical blocks in a ``torch.nn.ModuleList`` (PEFT names one
module per layer: ``layers.0.q``, ``layers.1.q``, ...); its Flax twin stacks the same blocks with
``nn.scan`` (kernels ``(L, in, out)``), the PyTorch weights copied in by hand (stacked on axis 0,
``kernel = weight.T``); the twin is in tests/support/peft_stack.py. References are PyTorch's own
outputs with PEFT's adapters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from support import INTEROP

pytest.importorskip("torch", reason=INTEROP)
pytest.importorskip("peft", reason=INTEROP)
from support.peft_models import (
    assert_same_adapters,
    get_peft_model,
    peft_from_pretrained,
    randomize_lora,
    torch_out,
)
from support.peft_stack import (
    STACKED,
    TOL,
    D,
    L,
    TorchStack,
    X,
    flax_out,
    key_map,
    our_adapters,
    probe,
    stack_params,
)
from support.trees import adapter_entries

import flax_lora as lora


def peft_written(directory: Path, seed: int, **config: Any) -> np.ndarray:
    """Writes PEFT's adapter of ``TorchStack`` (random nonzero factors); returns its outputs."""
    pm = get_peft_model(TorchStack(), **config)
    randomize_lora(pm, seed=seed)
    pm.eval()
    pm.save_pretrained(str(directory))
    return torch_out(pm, X)


def test_twin_base_models_agree() -> None:
    tm = TorchStack().eval()
    params = stack_params(tm)
    assert params["params"]["layers"]["fc"]["kernel"].shape == (L, D, 2 * D)
    np.testing.assert_allclose(flax_out(params, None), torch_out(tm, X), atol=TOL)


@pytest.mark.parametrize("with_probe", [False, True])
def test_peft_written_adapter_loads_stacked(tmp_path: Path, with_probe: bool) -> None:
    expected = peft_written(tmp_path, 1, target_modules=["q", "fc", "head"], r=2, lora_alpha=4)
    params = stack_params(TorchStack())
    adapters = lora.load_peft(tmp_path, params, key_map, probe=probe if with_probe else None)
    table = adapter_entries(adapters)
    assert sorted(table) == sorted([*STACKED, "params/head/kernel"])
    for path in STACKED:
        w = table[path]
        assert (w.layer_axes, w.layers, w.in_axes, w.scale) == (1, None, (1,), 2.0)
        assert w.a.shape[:1] == w.b.shape[:1] == (L,)
    assert table["params/head/kernel"].layer_axes == 0
    got = flax_out(params, adapters)
    np.testing.assert_allclose(got, expected, atol=TOL)
    assert np.abs(expected - flax_out(params, None)).max() > 0.1  # the adapter changes the model


@pytest.mark.parametrize("layers", [None, (0, 2)])
def test_save_peft_stacked_loads_in_peft(tmp_path: Path, layers: tuple[int, ...] | None) -> None:
    from safetensors.numpy import load_file

    params = stack_params(TorchStack())
    adapters, config = our_adapters(layers)
    expected = flax_out(params, adapters)
    assert np.abs(expected - flax_out(params, None)).max() > 0.1
    lora.save_peft(tmp_path, adapters, config, key_map=key_map)

    picked = range(L) if layers is None else layers
    names = [f"layers.{i}.{n}" for i in picked for n in ("q", "fc")]
    names += ["head"] if layers is None else []  # `layers=` adapts no path without a number
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(names)
    assert cfg["rank_pattern"] == {n: 3 if n.endswith("fc") else 2 for n in names}
    shapes = {k: v.shape for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    assert len(shapes) == 2 * len(names)
    for i in picked:
        assert shapes[f"base_model.model.layers.{i}.fc.lora_A.weight"] == (3, D)
        assert shapes[f"base_model.model.layers.{i}.fc.lora_B.weight"] == (2 * D, 3)

    pm = peft_from_pretrained(TorchStack(), tmp_path)
    np.testing.assert_allclose(torch_out(pm, X), expected, atol=TOL)
    for i in picked:
        layer = pm.base_model.model.layers[i].fc
        assert layer.r["default"] == 3 and layer.scaling["default"] == pytest.approx(1.0)
    if layers is not None:  # PEFT made no LoRA layer for the layers not in the file
        assert not hasattr(pm.base_model.model.layers[1].q, "lora_A")


@pytest.mark.parametrize("layers", [None, (0, 2)])
def test_stacked_round_trip_is_exact(tmp_path: Path, layers: tuple[int, ...] | None) -> None:
    params = stack_params(TorchStack())
    adapters, config = our_adapters(layers)
    lora.save_peft(tmp_path, adapters, config, key_map=key_map)
    dict_map = {p: key_map(p) for p in [*STACKED, "params/head/kernel"]}
    for loaded in (
        lora.load_peft(tmp_path, params, key_map),
        lora.load_peft(tmp_path, params, dict_map, probe=probe),
    ):
        assert_same_adapters(loaded, adapters)  # factors and every static field
        for path, w in adapter_entries(adapters).items():
            v = adapter_entries(loaded)[path]
            assert (v.scale, v.in_axes, v.layers, v.layer_axes, v.kernel_shape) == (
                w.scale,
                w.in_axes,
                w.layers,
                w.layer_axes,
                w.kernel_shape,
            )


def test_peft_file_missing_a_layer(tmp_path: Path) -> None:
    """PEFT's own ``layers_to_transform`` writes no modules for layer 1: it loads with zero
    factors there and ``layers=(0, 2)``, gives PEFT's outputs and round-trips exactly."""
    expected = peft_written(
        tmp_path / "peft",
        2,
        target_modules=["q", "fc"],
        r=2,
        lora_alpha=4,
        layers_to_transform=[0, 2],
        layers_pattern="layers",
    )
    params = stack_params(TorchStack())
    adapters = lora.load_peft(tmp_path / "peft", params, key_map)
    for path in STACKED:
        w = adapter_entries(adapters)[path]
        assert w.layers == (0, 2) and w.layer_axes == 1
        assert not np.any(np.asarray(w.a[1])) and not np.any(np.asarray(w.b[1]))
        assert np.all(np.abs(np.asarray(w.b)[[0, 2]]) > 0)
    np.testing.assert_allclose(flax_out(params, adapters), expected, atol=TOL)

    lora.save_peft(tmp_path / "ours", adapters, key_map=key_map)
    assert_same_adapters(lora.load_peft(tmp_path / "ours", params, key_map), adapters)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_default_key_map_refuses_stacked_adapters(tmp_path: Path) -> None:
    adapters, config = our_adapters()
    with pytest.raises(ValueError, match=r"params/layers/q/kernel.*key_map.*\{layer\}"):
        lora.save_peft(tmp_path, adapters, config)
    assert not (tmp_path / "adapter_config.json").exists()


def test_stacked_name_without_placeholder_is_refused(tmp_path: Path) -> None:
    adapters, config = our_adapters()
    bad = {p: key_map(p).replace("{layer}.", "") for p in [*STACKED, "params/head/kernel"]}
    with pytest.raises(ValueError, match=r"stacked kernel 'params/layers/\w+/kernel'.*\{layer\}"):
        lora.save_peft(tmp_path, adapters, config, key_map=bad)
    bad = {p: key_map(p) for p in STACKED} | {"params/head/kernel": "head.{layer}"}
    with pytest.raises(ValueError, match=r"unstacked kernel 'params/head/kernel'.*\{layer\}"):
        lora.save_peft(tmp_path, adapters, config, key_map=bad)
    twice = {p: key_map(p) for p in STACKED} | {"params/head/kernel": "layers.1.q"}
    with pytest.raises(ValueError, match=r"same module.*layers\.1\.q"):
        lora.save_peft(tmp_path, adapters, config, key_map=twice)


def test_two_layer_axes_are_refused(tmp_path: Path) -> None:
    w = lora.LoraWeights(
        a=jnp.ones((2, L, D, 1)),
        b=jnp.ones((2, L, 1, D)),
        scale=1.0,
        in_axes=(2,),
        kernel_shape=(2, L, D, D),
        layer_axes=2,
    )
    with pytest.raises(ValueError, match=r"'nested/kernel'.*2 layer axes.*one layer axis"):
        lora.save_peft(tmp_path, {"nested": {"kernel": w}}, key_map=lambda p: "n.{layer}")


def test_unequal_ranks_across_layers_are_refused(tmp_path: Path) -> None:
    peft_written(tmp_path, 3, target_modules=["q", "fc"], r=2, lora_alpha=4,
                 rank_pattern={"layers.1.q": 3})  # fmt: skip
    params = stack_params(TorchStack())
    with pytest.raises(
        ValueError, match=r"'params/layers/q/kernel'.*0: rank 2.*1: rank 3.*2: rank 2"
    ):
        lora.load_peft(tmp_path, params, key_map)


def test_probe_disagreeing_with_placeholder_is_refused(tmp_path: Path) -> None:
    peft_written(tmp_path, 4, target_modules=["head"], r=2, lora_alpha=4)
    params = stack_params(TorchStack())
    with pytest.raises(ValueError, match=r"'params/layers/q/kernel'.*stacked by 1 scan.*lacks"):
        lora.load_peft(tmp_path, params, {"params/layers/q/kernel": "head"}, probe=probe)
    peft_written(tmp_path / "q", 4, target_modules=["q"], r=2, lora_alpha=4)  # layers.{0,1,2}.q
    bad = {"params/head/kernel": "layers.{layer}.q"}
    with pytest.raises(ValueError, match=r"'params/head/kernel'.*unstacked.*has the placeholder"):
        lora.load_peft(tmp_path / "q", params, bad, probe=probe)
