"""Expert kernels written and read as one PyTorch module per expert (``{expert}`` in a key-map
name, beside ``{layer}``): the layout vLLM serves, instead of PEFT's ``target_parameters``.

On the MoE test blocks of tests/support/moe_models.py (einsum dispatch; one block, and an
``nn.scan`` stack): the file's tensor names and shapes, its values against a float64 delta per
expert, the exact round trip, and (with torch) PEFT loading the file onto a PyTorch twin whose
experts are ``nn.Linear`` modules gives `lora.wrap`'s output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from support import INTEROP
from support.moe_models import D, E, F, L, build, carried_delta64
from support.trees import leaves_by_path

import flax_lora as lora

PRE = "base_model.model."
R, ALPHA = 2, 3.0


def _key_map(stacked: bool) -> dict[str, str]:
    layer, p = ("layers.{layer}.", "params/layers/moe/") if stacked else ("", "params/")
    return {
        f"{p}router/kernel": f"{layer}router",
        f"{p}experts/w_in": f"{layer}experts.{{expert}}.w_in",
        f"{p}experts/w_out": f"{layer}experts.{{expert}}.w_out",
    }


def _adapters(stacked: bool) -> tuple[Any, Any, lora.LoraConfig]:
    case = build("linen", "einsum", stacked=stacked)
    config = lora.LoraConfig(rank=R, alpha=ALPHA, init="random")
    return case, lora.init(jax.random.key(2), case.params, config, probe=case.probe), config


@pytest.mark.parametrize("stacked", [False, True], ids=["block", "layered"])
def test_one_module_per_expert(tmp_path: Path, stacked: bool) -> None:
    case, adapters, config = _adapters(stacked)
    key_map = _key_map(stacked)
    lora.save_peft(tmp_path, adapters, config, key_map=key_map)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    layers = [f"layers.{i}." for i in range(L)] if stacked else [""]
    sizes = {"w_in": (D, F), "w_out": (F, D)}  # (in, out) of each expert's matrix
    want = {}
    for layer in layers:
        want |= {
            f"{PRE}{layer}router.lora_A.weight": (R, D),
            f"{PRE}{layer}router.lora_B.weight": (E, R),
        }
        for e in range(E):
            for w, (n_in, n_out) in sizes.items():
                want[f"{PRE}{layer}experts.{e}.{w}.lora_A.weight"] = (R, n_in)
                want[f"{PRE}{layer}experts.{e}.{w}.lora_B.weight"] = (n_out, R)
    assert {k: v.shape for k, v in tensors.items()} == want
    entries = leaves_by_path(adapters)
    for path, axes in case.kernels.items():
        if "experts" not in path:
            continue
        a, b = np.asarray(entries[path + "/a"]), np.asarray(entries[path + "/b"])
        ref = carried_delta64(a, b, ALPHA / R, axes.carried, axes.inputs)  # kernel layout
        name = key_map[path]
        for i, layer in enumerate(layers):
            for e in range(E):
                module = PRE + name.replace("layers.{layer}.", layer).replace("{expert}", str(e))
                la = tensors[module + ".lora_A.weight"].astype(np.float64)
                lb = tensors[module + ".lora_B.weight"].astype(np.float64)
                expect = ref[i, e] if stacked else ref[e]  # (in, out)
                np.testing.assert_allclose(ALPHA / R * (lb @ la), expect.T, atol=1e-6)
    back = lora.load_peft(tmp_path, case.params, key_map=key_map, probe=case.probe)
    _same(back, adapters)
    if not stacked:  # without a probe: the expert axis first, each expert's kernel 2-D
        _same(lora.load_peft(tmp_path, case.params, key_map=key_map), adapters)


def _same(x: Any, y: Any) -> None:
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_missing_expert_is_refused(tmp_path: Path) -> None:
    case, adapters, config = _adapters(False)
    lora.save_peft(tmp_path, adapters, config, key_map=_key_map(False))
    file = tmp_path / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(str(file)).items() if "experts.2.w_in" not in k}
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=r"lacks experts \[2\]") as e:
        lora.load_peft(tmp_path, case.params, key_map=_key_map(False), probe=case.probe)
    assert "adapter_model.safetensors" in str(e.value) and "experts.{expert}.w_in" in str(e.value)


def test_expert_placeholder_needs_an_expert_kernel(tmp_path: Path) -> None:
    _, adapters, config = _adapters(False)
    key_map = _key_map(False) | {"params/router/kernel": "router.{expert}"}
    with pytest.raises(ValueError, match=r"'params/router/kernel'.*\{expert\}.*0 expert axes"):
        lora.save_peft(tmp_path, adapters, config, key_map=key_map)


def test_peft_loads_one_linear_per_expert(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason=INTEROP)
    pytest.importorskip("peft", reason=INTEROP)
    from support.peft_models import peft_from_pretrained

    nn = torch.nn

    class Expert(nn.Module):
        def __init__(self, w_in: np.ndarray, w_out: np.ndarray) -> None:
            super().__init__()
            self.w_in = nn.Linear(D, F, bias=False)
            self.w_out = nn.Linear(F, D, bias=False)
            with torch.no_grad():
                self.w_in.weight.copy_(torch.tensor(w_in.T))
                self.w_out.weight.copy_(torch.tensor(w_out.T))

        def forward(self, x: Any) -> Any:
            return self.w_out(nn.functional.silu(self.w_in(x)))

    class PerExpertMoe(nn.Module):  # the einsum block's twin, one nn.Linear per expert kernel
        def __init__(self, p: Any) -> None:
            super().__init__()
            self.router = nn.Linear(D, E, bias=False)
            with torch.no_grad():
                self.router.weight.copy_(torch.tensor(np.asarray(p["router"]["kernel"]).T))
            w_in, w_out = (np.asarray(p["experts"][k], np.float32) for k in ("w_in", "w_out"))
            self.experts = nn.ModuleList(Expert(w_in[e], w_out[e]) for e in range(E))

        def forward(self, x: Any) -> Any:
            x2 = x.reshape(-1, D)
            logits = self.router(x2)
            top, chosen = torch.topk(logits, 2, dim=-1)
            combine = torch.zeros_like(logits).scatter(1, chosen, torch.softmax(top, -1))
            ye = torch.stack([expert(x2) for expert in self.experts])  # (E, T, D)
            return torch.einsum("etd,te->td", ye, combine).reshape(x.shape)

    case, adapters, config = _adapters(False)
    lora.save_peft(tmp_path, adapters, config, key_map=_key_map(False))
    model = PerExpertMoe(case.params["params"]).eval()
    with torch.no_grad():
        base = model(torch.tensor(case.x)).numpy()
        got = peft_from_pretrained(model, tmp_path)(torch.tensor(case.x)).numpy()
    np.testing.assert_allclose(base, np.asarray(case.apply(case.params, case.x)), atol=1e-5)
    ours = np.asarray(lora.wrap(case.apply)(case.params, adapters, case.x))
    np.testing.assert_allclose(got, ours, atol=1e-5)
    assert np.abs(ours - base).max() > 1e-2
