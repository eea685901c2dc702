"""PEFT files of layered kernels whose layer axis is not their first (MaxText's
``param_scan_axis: 1``), against the real PEFT in PyTorch.

The PyTorch model is tests/support/peft_stack.py's ``TorchStack`` (``L`` blocks in a
``ModuleList``: PEFT names one module per layer, ``layers.0.q``, ...); its Flax twin here is the
same ``nn.scan`` of blocks with ``variable_axes={"params": 1}``: kernels ``(in, L, out)`` and
biases ``(out, L)``, the PyTorch weights copied in by hand. The reference is PyTorch's output
with PEFT's adapter (no flax_lora code on that side).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import INTEROP

pytest.importorskip("torch", reason=INTEROP)
pytest.importorskip("peft", reason=INTEROP)
pytest.importorskip("transformers", reason=INTEROP)
from support.peft_models import get_peft_model, peft_from_pretrained, randomize_lora, torch_out
from support.peft_stack import TOL, FlaxBlock, L, TorchStack, X, key_map, stack_params
from support.trees import adapter_entries

import flax_lora as lora

MODES = ("auto", "factored", "merged")
LAYERED = ("params/layers/q/kernel", "params/layers/fc/kernel")


class FlaxStackAxis1(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        stack = nn.scan(
            FlaxBlock, variable_axes={"params": 1}, split_rngs={"params": True}, length=L
        )
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(3, name="head")(x)


def axis1_params(tm: Any) -> Any:
    """The PyTorch weights with the layer axis second: kernels (in, L, out), biases (out, L)."""
    p = stack_params(tm)
    layers = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), p["params"]["layers"])
    return {"params": {**p["params"], "layers": layers}}


def probe(p: Any) -> Any:
    return FlaxStackAxis1().apply(p, X)


def flax_out(params: Any, adapters: Any, mode: str = "auto") -> np.ndarray:
    return np.asarray(jax.jit(lora.wrap(FlaxStackAxis1().apply, mode=mode))(params, adapters, X))


def test_twin_base_models_agree() -> None:
    tm = TorchStack().eval()
    params = axis1_params(tm)
    assert params["params"]["layers"]["fc"]["kernel"].shape == (4, L, 8)
    np.testing.assert_allclose(flax_out(params, None), torch_out(tm, X), atol=TOL)


def test_peft_written_adapter_loads_on_the_kernels_layer_axis(tmp_path: Path) -> None:
    pm = get_peft_model(TorchStack(), target_modules=["q", "fc", "head"], r=2, lora_alpha=4)
    randomize_lora(pm, seed=1)
    pm.eval()
    pm.save_pretrained(str(tmp_path))
    expected = torch_out(pm, X)
    params = axis1_params(TorchStack())
    adapters = lora.load_peft(tmp_path, params, key_map, probe=probe)
    table = adapter_entries(adapters)
    for path in LAYERED:
        w = table[path]
        assert (w.layer_axes, w.layer_at, w.in_axes, w.scale) == (1, 1, (1,), 2.0)
        assert w.stored_shape == params["params"]["layers"][path.split("/")[2]]["kernel"].shape
    for mode in MODES:
        np.testing.assert_allclose(flax_out(params, adapters, mode), expected, atol=TOL)
    assert np.abs(expected - flax_out(params, None)).max() > 0.1  # the adapter changes the model


@pytest.mark.parametrize(("layers", "dora"), [(None, False), ((0, 2), False), (None, True)])
def test_save_peft_loads_in_peft(
    tmp_path: Path, layers: tuple[int, ...] | None, dora: bool
) -> None:
    params = axis1_params(TorchStack())
    config = lora.LoraConfig(
        rank=2,
        alpha=3.0,
        targets=r".*/(q|fc|head)/kernel",
        layers=layers,
        init="random",
        dora=dora,
    )
    adapters = lora.init(jax.random.key(0), params, config, probe=probe)
    if dora:  # magnitudes off ||V||, so that DoRA's rescaling shows
        adapters = jax.tree.map(
            lambda w: w.replace(m=w.m * 1.3),
            adapters,
            is_leaf=lambda x: isinstance(x, lora.LoraWeights),
        )
    expected = flax_out(params, adapters)
    assert np.abs(expected - flax_out(params, None)).max() > 0.1
    lora.save_peft(tmp_path, adapters, config, key_map=key_map)
    pm = peft_from_pretrained(TorchStack(), tmp_path)
    np.testing.assert_allclose(torch_out(pm, X), expected, atol=TOL)
    if layers is not None:  # PEFT made no LoRA layer for the layers not in the file
        assert not hasattr(pm.base_model.model.layers[1].q, "lora_A")
