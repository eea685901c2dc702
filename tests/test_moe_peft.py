"""PEFT's ``target_parameters`` files (``lora.ParamWrapper``) for expert kernels, with the real
peft: the ground truth issue 16's ``save_peft`` / ``load_peft`` of expert kernels must meet.

On the PyTorch twin of the MoE test block (tests/support/peft_moe.py: ``experts.w_in`` laid out
(E, in, out), ``experts.w_out`` (E, out, in), both used by ``torch.einsum``; the router an
ordinary ``target_modules`` Linear), with and without ``is_transposed`` on the experts module:

- the file's tensor names (nested ``base_layer.`` by registration order), shapes and config;
- the order of the ``r * E`` axis (A expert-major, B rank-major) and the per-expert delta, against
  ``ParamWrapper.get_delta_weight``;
- PEFT's forward equals the float64 numpy reference of tests/support/moe_models.py with the
  per-expert factors read from PEFT's tensors (PEFT -> our layout);
- files written from per-expert factors load in ``PeftModel.from_pretrained`` and give the
  reference's output (our layout -> PEFT).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support import INTEROP

pytest.importorskip("torch", reason=INTEROP)
pytest.importorskip("peft", reason=INTEROP)

from support.moe_models import D, E, F, build, random_factors, ref_output
from support.peft_models import t2n
from support.peft_moe import (
    EXPERT_PARAMS,
    PREFIX,
    TorchMoe,
    from_pretrained,
    get_moe_peft_model,
    kernel_factors,
    peft_expert_delta64,
    peft_tensors,
    peft_view_factors,
    read_peft_files,
    same_side,
    torch_forward,
    wrapper_prefixes,
    wrappers,
    write_peft_files,
)

R, ALPHA = 2, 3.0
TRANSPOSED = [pytest.param(None, id="default"), pytest.param(True, id="is_transposed")]


def _peft_model(is_transposed: bool | None, seed: int = 0) -> tuple:
    case = build("linen", "einsum")
    return case, get_moe_peft_model(TorchMoe(case.params, is_transposed), R, ALPHA, seed)


@pytest.mark.parametrize("is_transposed", TRANSPOSED)
def test_file_names_shapes_and_config(tmp_path: Path, is_transposed: bool | None) -> None:
    _, pm = _peft_model(is_transposed)
    pm.save_pretrained(str(tmp_path))
    tensors, config = read_peft_files(tmp_path)
    want = {f"{PREFIX}router.lora_A.weight": (R, D), f"{PREFIX}router.lora_B.weight": (E, R)}
    for module in wrapper_prefixes("experts", EXPERT_PARAMS).values():
        s1, s2 = D, F  # both torch parameters are (E, D, F)
        p_in, p_out = (s1, s2) if is_transposed else (s2, s1)  # PEFT's (E, out, in) by default
        want[f"{PREFIX}{module}.lora_A.weight"] = (R * E, p_in)
        want[f"{PREFIX}{module}.lora_B.weight"] = (p_out, R * E)
    assert {k: v.shape for k, v in tensors.items()} == want
    assert sorted(config["target_parameters"]) == ["experts.w_in", "experts.w_out"]
    assert config["target_modules"] == ["router"]
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (R, ALPHA, "LORA")
    assert config["lora_dropout"] == 0.0 and not config["use_dora"] and not config["use_rslora"]


@pytest.mark.parametrize("is_transposed", TRANSPOSED)
def test_delta_per_expert_and_axis_order(is_transposed: bool | None) -> None:
    _, pm = _peft_model(is_transposed)
    found = wrappers(pm)
    assert list(found) == ["w_out", "w_in"]  # outermost first: the last registered is outermost
    for param, w in found.items():
        lora_a = t2n(w.lora_A["default"].weight)
        lora_b = t2n(w.lora_B["default"].weight)
        scaling = w.scaling["default"]
        assert scaling == ALPHA / R and w.num_experts == E
        swapped = not is_transposed
        want = t2n(w.get_delta_weight("default"))
        np.testing.assert_allclose(
            peft_expert_delta64(lora_a, lora_b, E, scaling, swapped), want, atol=1e-5
        )
        lhs, rhs = peft_view_factors(lora_a, lora_b, E)
        view = scaling * np.einsum("eir,ero->eio", lhs, rhs)
        np.testing.assert_allclose(np.swapaxes(view, 1, 2) if swapped else view, want, atol=1e-5)
        back = peft_tensors(lhs, rhs)
        assert np.array_equal(back[0], lora_a) and np.array_equal(back[1], lora_b)
        # one nonzero row of A touches expert row // r; one nonzero column of B expert col % E
        for row in range(R * E):
            one = np.zeros_like(lora_a)
            one[row] = 1.0
            d = peft_expert_delta64(one, lora_b, E, 1.0, swapped)
            assert [bool(np.any(d[e])) for e in range(E)] == [e == row // R for e in range(E)]
        for col in range(R * E):
            one = np.zeros_like(lora_b)
            one[:, col] = 1.0
            d = peft_expert_delta64(lora_a, one, E, 1.0, swapped)
            assert [bool(np.any(d[e])) for e in range(E)] == [e == col % E for e in range(E)]
        # PEFT's in_features is the contracted size (w_in: D, w_out: F) exactly when same_side
        assert same_side(param, is_transposed) == (w.in_features == {"w_in": D, "w_out": F}[param])


def _factors_from_peft(tensors: dict, is_transposed: bool | None) -> dict:
    """The per-expert factors of the Flax kernels (our layout) from PEFT's file tensors."""
    scale = ALPHA / R
    out = {
        "params/router/kernel": (
            tensors[f"{PREFIX}router.lora_A.weight"].T,
            tensors[f"{PREFIX}router.lora_B.weight"].T,
            scale,
        )
    }
    for param, module in wrapper_prefixes("experts", EXPERT_PARAMS).items():
        lhs, rhs = peft_view_factors(
            tensors[f"{PREFIX}{module}.lora_A.weight"],
            tensors[f"{PREFIX}{module}.lora_B.weight"],
            E,
        )
        a, b = kernel_factors(lhs, rhs, same_side(param, is_transposed))
        out[f"params/experts/{param}"] = (a, b, scale)
    return out


@pytest.mark.parametrize("is_transposed", TRANSPOSED)
def test_peft_forward_equals_reference(tmp_path: Path, is_transposed: bool | None) -> None:
    case, pm = _peft_model(is_transposed, seed=1)
    pm.save_pretrained(str(tmp_path))
    tensors, _ = read_peft_files(tmp_path)
    factors = _factors_from_peft(tensors, is_transposed)
    assert factors["params/experts/w_in"][0].shape == (E, D, R)  # a (E, I, r)
    assert factors["params/experts/w_out"][1].shape == (E, R, D)  # b (E, r, O) of (E, F, D)
    ref = ref_output(case, case.params, factors)
    got = torch_forward(pm, case.x)
    assert np.max(np.abs(got - ref)) <= 1e-5 * max(1.0, np.max(np.abs(ref)))
    assert np.max(np.abs(ref - ref_output(case, case.params))) > 0.1


@pytest.mark.parametrize("is_transposed", TRANSPOSED)
def test_written_files_load_in_peft(tmp_path: Path, is_transposed: bool | None) -> None:
    case = build("linen", "einsum")
    factors = random_factors(case, rank=R, scale=ALPHA / R, seed=5)
    tensors = {}
    a, b, _ = factors["params/router/kernel"]
    tensors[f"{PREFIX}router.lora_A.weight"] = a.T
    tensors[f"{PREFIX}router.lora_B.weight"] = b.T
    for param, module in wrapper_prefixes("experts", EXPERT_PARAMS).items():
        a, b, _ = factors[f"params/experts/{param}"]
        same = same_side(param, is_transposed)
        lhs, rhs = kernel_factors(a, b, same)  # the map is its own inverse
        lora_a, lora_b = peft_tensors(lhs, rhs)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = lora_a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = lora_b
    write_peft_files(tmp_path, tensors, R, ALPHA, target_modules=["router"])
    pm = from_pretrained(TorchMoe(case.params, is_transposed), tmp_path)
    ref = ref_output(case, case.params, factors)
    got = torch_forward(pm, case.x)
    assert np.max(np.abs(got - ref)) <= 1e-5 * max(1.0, np.max(np.abs(ref)))
