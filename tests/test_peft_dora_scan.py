"""PEFT files of scan-stacked DoRA adapters, checked against the real HuggingFace `peft` package.

The twin models are those of ``tests/test_peft_scan.py`` (``tests/support/peft_stack.py``): a
torch ``ModuleList`` of ``L`` blocks (PEFT names one module per layer, ``layers.0.q``, ...) and its
``nn.scan`` Flax twin (kernels ``(L, in, out)``). PEFT stores one ``lora_magnitude_vector``
``(out_features,)`` per Linear; our ``m`` is ``(L, out)``. References: PEFT's own outputs, and for
the layers a file lacks, the base kernel's column norms in float64 numpy (``||W0[l]||`` over the
input rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from support import INTEROP

pytest.importorskip("torch", reason=INTEROP)
pytest.importorskip("peft", reason=INTEROP)
from support.peft_models import (
    get_peft_model,
    peft_from_pretrained,
    perturb_peft_dora,
    torch_out,
)
from support.peft_stack import (
    STACKED,
    TOL,
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
from support.trees import adapter_entries, leaves_by_path

import flax_lora as lora

MODES = ("auto", "factored", "merged")
PREFIX = "base_model.model."


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


@pytest.mark.parametrize("layers", [None, (0, 2)])
def test_save_peft_stacked_dora_loads_in_peft(
    tmp_path: Path, layers: tuple[int, ...] | None
) -> None:
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


@pytest.mark.parametrize("layers_to_transform", [None, [0, 2]])
def test_peft_written_stacked_dora_loads(
    tmp_path: Path, layers_to_transform: list[int] | None
) -> None:
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


def test_wrong_layer_magnitude_shape_names_module_and_path(tmp_path: Path) -> None:
    tensors = peft_dora_tensors(tmp_path, 6)
    tensors[f"{PREFIX}layers.1.q.lora_magnitude_vector"] = np.ones(5, np.float32)  # out is 4
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(
        ValueError, match=r"'layers\.1\.q' -> kernel 'params/layers/q/kernel'.*\(5,\).*4 entries"
    ):
        lora.load_peft(tmp_path, stack_params(TorchStack()), key_map)


def test_layer_without_magnitude_is_refused(tmp_path: Path) -> None:
    tensors = peft_dora_tensors(tmp_path, 7)
    del tensors[f"{PREFIX}layers.2.q.lora_magnitude_vector"]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"use_dora=True.*layers\.2\.q.*lack"):
        lora.load_peft(tmp_path, stack_params(TorchStack()), key_map)


def test_absent_dora_layers_need_concrete_params(tmp_path: Path) -> None:
    peft_dora_written(tmp_path, 8, target_modules=["q"], r=2, lora_alpha=3,
                      layers_to_transform=[0, 2], layers_pattern="layers")  # fmt: skip
    abstract = jax.eval_shape(lambda: stack_params(TorchStack()))
    with pytest.raises(ValueError, match=r"'params/layers/q/kernel'.*lacks layers \[1\].*params"):
        lora.load_peft(tmp_path, abstract, key_map)
