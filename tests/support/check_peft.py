"""PEFT files across the model kinds, checked against the real HuggingFace `peft` package (rows
that need PyTorch): scan-stacked adapters, plain and DoRA (``peft-twin``).

The PyTorch model keeps its ``L`` identical blocks in a ``torch.nn.ModuleList`` (PEFT names one
module per layer: ``layers.0.q``, ``layers.1.q``, ...); its Flax twin stacks the same blocks with
``nn.scan`` (kernels ``(L, in, out)``), the PyTorch weights copied in by hand (stacked on axis 0,
``kernel = weight.T``); the twin is in tests/support/peft_stack.py. PEFT stores one
``lora_magnitude_vector`` ``(out_features,)`` per Linear; our ``m`` is ``(L, out)``. References
are PyTorch's own outputs with PEFT's adapters, and for the layers a file lacks, the base
kernel's column norms in float64 numpy (``||W0[l]||`` over the input rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import flax_lora as lora

from .cases import check
from .peft_models import (
    assert_same_adapters,
    get_peft_model,
    peft_from_pretrained,
    perturb_peft_dora,
    randomize_lora,
    torch_out,
)
from .peft_stack import (
    STACKED,
    TOL,
    D,
    FlaxStack,
    L,
    TorchStack,
    X,
    flax_out,
    key_map,
    our_adapters,
    probe,
    stack_params,
)
from .trees import adapter_entries, leaves_by_path

MODES = ("auto", "factored", "merged")
PREFIX = "base_model.model."


def peft_written(directory: Path, seed: int, **config: Any) -> np.ndarray:
    """Writes PEFT's adapter of ``TorchStack`` (random nonzero factors); returns its outputs."""
    pm = get_peft_model(TorchStack(), **config)
    randomize_lora(pm, seed=seed)
    pm.eval()
    pm.save_pretrained(str(directory))
    return torch_out(pm, X)


@check
def twin_base_models_agree() -> None:
    tm = TorchStack().eval()
    params = stack_params(tm)
    assert params["params"]["layers"]["fc"]["kernel"].shape == (L, D, 2 * D)
    np.testing.assert_allclose(flax_out(params, None), torch_out(tm, X), atol=TOL)


@check
def peft_written_adapter_loads_stacked(tmp_path: Path, with_probe: bool) -> None:
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


@check
def save_peft_stacked_loads_in_peft(tmp_path: Path, layers: tuple[int, ...] | None) -> None:
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


@check
def stacked_round_trip_is_exact(tmp_path: Path, layers: tuple[int, ...] | None) -> None:
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


@check
def peft_file_missing_a_layer(tmp_path: Path) -> None:
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
@check
def default_key_map_refuses_stacked_adapters(tmp_path: Path) -> None:
    adapters, config = our_adapters()
    with pytest.raises(ValueError, match=r"params/layers/q/kernel.*key_map.*\{layer\}"):
        lora.save_peft(tmp_path, adapters, config)
    assert not (tmp_path / "adapter_config.json").exists()


@check
def stacked_name_without_placeholder_is_refused(tmp_path: Path) -> None:
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


@check
def two_layer_axes_are_refused(tmp_path: Path) -> None:
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


@check
def unequal_ranks_across_layers_are_refused(tmp_path: Path) -> None:
    peft_written(tmp_path, 3, target_modules=["q", "fc"], r=2, lora_alpha=4,
                 rank_pattern={"layers.1.q": 3})  # fmt: skip
    params = stack_params(TorchStack())
    with pytest.raises(
        ValueError, match=r"'params/layers/q/kernel'.*0: rank 2.*1: rank 3.*2: rank 2"
    ):
        lora.load_peft(tmp_path, params, key_map)


@check
def probe_disagreeing_with_placeholder_is_refused(tmp_path: Path) -> None:
    peft_written(tmp_path, 4, target_modules=["head"], r=2, lora_alpha=4)
    params = stack_params(TorchStack())
    with pytest.raises(ValueError, match=r"'params/layers/q/kernel'.*stacked by 1 scan.*lacks"):
        lora.load_peft(tmp_path, params, {"params/layers/q/kernel": "head"}, probe=probe)
    peft_written(tmp_path / "q", 4, target_modules=["q"], r=2, lora_alpha=4)  # layers.{0,1,2}.q
    bad = {"params/head/kernel": "layers.{layer}.q"}
    with pytest.raises(ValueError, match=r"'params/head/kernel'.*unstacked.*has the placeholder"):
        lora.load_peft(tmp_path / "q", params, bad, probe=probe)


# ---------------------------------------------------------------------------------------------
# DoRA
# ---------------------------------------------------------------------------------------------
def outputs(params: Any, adapters: Any, mode: str) -> np.ndarray:
    return np.asarray(jax.jit(lora.wrap(FlaxStack().apply, mode=mode))(params, adapters, X))


def base_norms64(params: Any, path: str) -> np.ndarray:
    """``||W0[l]||`` per output unit, ``(L, out)``, float64 (a Dense kernel's rows are inputs)."""
    kernel = np.asarray(leaves_by_path(params)[path], np.float64)
    return np.sqrt(np.sum(kernel**2, axis=1))


def peft_dora_written(directory: Path, seed: int, **config: Any) -> np.ndarray:
    """Writes PEFT's DoRA adapter of ``TorchStack`` (random nonzero A, B, perturbed magnitudes);
    returns its outputs."""
    pm = get_peft_model(TorchStack(), use_dora=True, **config)
    pm = perturb_peft_dora(pm, seed)
    pm.save_pretrained(str(directory))
    return torch_out(pm, X)


def assert_absent_layers_are_base(params: Any, adapters: Any, absent: list[int]) -> None:
    """On the ``absent`` layers: zero factors and ``m = ||W0||``; so even with the layer mask
    dropped (``layers=None``) the merged kernel is ``W0`` there."""
    unmasked = jax.tree.map(
        lambda w: w.replace(layers=None),
        adapters,
        is_leaf=lambda x: isinstance(x, lora.LoraWeights),
    )
    merged = leaves_by_path(lora.merge(params, unmasked))
    base = leaves_by_path(params)
    for path in STACKED:
        w = adapter_entries(adapters)[path]
        assert w.m.shape == (L, w.kernel_shape[-1])
        np.testing.assert_allclose(
            np.asarray(w.m)[absent], base_norms64(params, path)[absent], rtol=1e-6
        )
        assert not np.any(np.asarray(w.a)[absent]) and not np.any(np.asarray(w.b)[absent])
        np.testing.assert_allclose(
            np.asarray(merged[path])[absent], np.asarray(base[path])[absent], rtol=1e-6, atol=1e-7
        )


@check
def save_peft_stacked_dora_loads_in_peft(tmp_path: Path, layers: tuple[int, ...] | None) -> None:
    params = stack_params(TorchStack())
    adapters, config = our_adapters(layers, dora=True)
    expected = outputs(params, adapters, "auto")
    assert np.abs(expected - flax_out(params, None)).max() > 0.1
    lora.save_peft(tmp_path, adapters, config, key_map=key_map)

    picked = list(range(L)) if layers is None else list(layers)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    magnitudes = {k for k in tensors if k.endswith(".lora_magnitude_vector")}
    names = [f"layers.{i}.{n}" for i in picked for n in ("q", "fc")]
    names += ["head"] if layers is None else []
    assert magnitudes == {f"{PREFIX}{n}.lora_magnitude_vector" for n in names}
    pm = peft_from_pretrained(TorchStack(), tmp_path)
    for path, n in (("params/layers/q/kernel", "q"), ("params/layers/fc/kernel", "fc")):
        m = np.asarray(adapter_entries(adapters)[path].m)
        for i in picked:  # layer i's magnitude, PEFT's Linear shape (out_features,)
            key = f"{PREFIX}layers.{i}.{n}.lora_magnitude_vector"
            assert tensors[key].shape == (m.shape[1],) and tensors[key].dtype == np.float32
            np.testing.assert_array_equal(tensors[key], m[i])
            theirs = getattr(pm.base_model.model.layers[i], n).lora_magnitude_vector["default"]
            np.testing.assert_array_equal(theirs.weight.detach().numpy(), m[i])

    np.testing.assert_allclose(torch_out(pm, X), expected, atol=TOL)  # PEFT's own DoRA forward
    if layers is not None:  # PEFT made no (DoRA) layer for the layers not in the file
        assert not hasattr(pm.base_model.model.layers[1].q, "lora_magnitude_vector")

    back = lora.load_peft(tmp_path, params, key_map)
    for path, w in adapter_entries(adapters).items():
        v = adapter_entries(back)[path]
        static = ("layers", "layer_axes", "scale", "in_axes")
        assert [getattr(v, k) for k in static] == [getattr(w, k) for k in static]
        sel = picked if w.layer_axes else slice(None)  # the file's layers; all of head's
        for field in ("a", "b", "m"):
            np.testing.assert_array_equal(
                np.asarray(getattr(v, field))[sel], np.asarray(getattr(w, field))[sel]
            )
    if layers is not None:
        assert_absent_layers_are_base(params, back, [1])
    for mode in MODES:
        np.testing.assert_allclose(outputs(params, back, mode), expected, atol=TOL)


@check
def peft_written_stacked_dora_loads(tmp_path: Path, layers_to_transform: list[int] | None) -> None:
    subset = {"layers_to_transform": layers_to_transform, "layers_pattern": "layers"}
    expected = peft_dora_written(
        tmp_path,
        5,
        target_modules=["q", "fc"],
        r=2,
        lora_alpha=3,
        **(subset if layers_to_transform else {}),
    )
    params = stack_params(TorchStack())
    assert np.abs(expected - flax_out(params, None)).max() > 0.1
    for with_probe in (False, True):
        adapters = lora.load_peft(tmp_path, params, key_map, probe=probe if with_probe else None)
        assert sorted(adapter_entries(adapters)) == sorted(STACKED)
        for w in adapter_entries(adapters).values():
            assert w.layer_axes == 1 and w.m.shape == (L, w.kernel_shape[-1])
            assert w.layers == (None if layers_to_transform is None else (0, 2))
        for mode in MODES:
            np.testing.assert_allclose(outputs(params, adapters, mode), expected, atol=TOL)
    if layers_to_transform is not None:
        assert_absent_layers_are_base(params, adapters, [1])
        lora.save_peft(tmp_path / "ours", adapters, key_map=key_map)  # and back into PEFT
        pm = peft_from_pretrained(TorchStack(), tmp_path / "ours")
        np.testing.assert_allclose(torch_out(pm, X), expected, atol=TOL)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def peft_dora_tensors(directory: Path, seed: int) -> dict[str, np.ndarray]:
    """PEFT's DoRA adapter of the ``q`` modules, written to ``directory``; its tensors."""
    peft_dora_written(directory, seed, target_modules=["q"], r=2, lora_alpha=3)
    return load_file(str(directory / "adapter_model.safetensors"))


@check
def wrong_layer_magnitude_shape_names_module_and_path(tmp_path: Path) -> None:
    tensors = peft_dora_tensors(tmp_path, 6)
    tensors[f"{PREFIX}layers.1.q.lora_magnitude_vector"] = np.ones(5, np.float32)  # out is 4
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(
        ValueError, match=r"'layers\.1\.q' -> kernel 'params/layers/q/kernel'.*\(5,\).*4 entries"
    ):
        lora.load_peft(tmp_path, stack_params(TorchStack()), key_map)


@check
def layer_without_magnitude_is_refused(tmp_path: Path) -> None:
    tensors = peft_dora_tensors(tmp_path, 7)
    del tensors[f"{PREFIX}layers.2.q.lora_magnitude_vector"]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"use_dora=True.*layers\.2\.q.*lack"):
        lora.load_peft(tmp_path, stack_params(TorchStack()), key_map)


@check
def absent_dora_layers_need_concrete_params(tmp_path: Path) -> None:
    peft_dora_written(tmp_path, 8, target_modules=["q"], r=2, lora_alpha=3,
                      layers_to_transform=[0, 2], layers_pattern="layers")  # fmt: skip
    abstract = jax.eval_shape(lambda: stack_params(TorchStack()))
    with pytest.raises(ValueError, match=r"'params/layers/q/kernel'.*lacks layers \[1\].*params"):
        lora.load_peft(tmp_path, abstract, key_map)
