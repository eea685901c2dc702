"""`lora.save_peft` / `lora.load_peft` of expert kernels as PEFT's ``target_parameters``
(``lora.ParamWrapper``), checked both ways against the real peft on the PyTorch twin of the MoE
block (tests/support/peft_moe.py: ``experts.w_in`` laid out (E, in, out), ``experts.w_out``
(E, out, in), both used by ``torch.einsum``), with and without ``is_transposed`` (so each of
the two parameters is, in one of the two cases, read "reversed" by PEFT):

- ours -> PEFT: adapters built by hand (one LoRA per expert) -> ``save_peft`` ->
  ``PeftModel.from_pretrained`` gives the float64 reference of the adapted Flax block;
- PEFT -> ours: ``save_pretrained`` -> ``load_peft`` (with and without a probe) gives per-expert
  deltas equal to PEFT's ``get_delta_weight``, and the adapted block equals PEFT's forward;
- two parameters of one module (``param_order``), a scan stack (``{layer}``), rank / alpha
  patterns, the default key map, and errors that name the path or module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from support import INTEROP

import flax_lora as lora

pytest.importorskip("torch", reason=INTEROP)
pytest.importorskip("peft", reason=INTEROP)

from support.compare import assert_close
from support.moe_adapters import nest
from support.moe_models import E, L, build, random_factors, ref_output
from support.peft_models import t2n
from support.peft_moe import (
    EXPERT_PARAMS,
    PREFIX,
    TorchMoe,
    TorchMoeStack,
    from_pretrained,
    get_moe_peft_model,
    read_peft_files,
    same_side,
    torch_forward,
    wrapper_prefixes,
    wrappers,
)
from support.trees import leaves_by_path

R, ALPHA = 2, 3.0
TRANSPOSED = [pytest.param(None, id="default"), pytest.param(True, id="is_transposed")]
KEY_MAP = {
    "params/router/kernel": "router",
    "params/experts/w_in": "experts.w_in",
    "params/experts/w_out": "experts.w_out",
}
STACK_MAP = {
    "params/layers/moe/router/kernel": "layers.{layer}.router",
    "params/layers/moe/experts/w_in": "layers.{layer}.experts.w_in",
    "params/layers/moe/experts/w_out": "layers.{layer}.experts.w_out",
}


def _reversed(is_transposed: bool | None, names: dict[str, str] = KEY_MAP) -> set[str]:
    """The key-map names of the parameters PEFT reads reversed on the twin."""
    return {
        n
        for p, n in names.items()
        if "experts" in p and not same_side(p.rsplit("/", 1)[-1], is_transposed)
    }


def _adapters(case: Any, factors: dict[str, tuple]) -> dict[str, Any]:
    """Hand-built adapters (``lora.init`` does not make expert adapters yet): one LoRA per
    expert, ``a (*C, *I, r)``, ``b (*C, r, *O)``."""
    shapes = {p: tuple(np.shape(v)) for p, v in leaves_by_path(case.params).items()}
    layer_axes = int(case.stacked)
    entries = {}
    for path, (a, b, scale) in factors.items():
        axes = case.kernels[path]
        entries[path] = lora.LoraWeights(
            a=jnp.asarray(a),
            b=jnp.asarray(b),
            scale=scale,
            in_axes=axes.inputs,
            kernel_shape=shapes[path],
            layer_axes=layer_axes,
            expert_axes=axes.carried[layer_axes:],
        )
    return nest(entries)


def _torch_delta(path: str, w: Any) -> np.ndarray:
    """PEFT's ``get_delta_weight`` of a wrapper in the Flax kernel's layout (the twin's
    ``w_out`` is the Flax kernel transposed)."""
    d = t2n(w.get_delta_weight("default"))
    return np.swapaxes(d, 1, 2) if path.endswith("w_out") else d


# -- ours -> PEFT --------------------------------------------------------------------------------
@pytest.mark.parametrize("is_transposed", TRANSPOSED)
def test_saved_experts_load_in_peft(tmp_path: Path, is_transposed: bool | None) -> None:
    case = build("linen", "einsum")
    factors = random_factors(case, rank=R, scale=ALPHA / R, seed=5)
    adapters = _adapters(case, factors)
    lora.save_peft(
        tmp_path,
        adapters,
        lora.LoraConfig(rank=R, alpha=ALPHA),
        KEY_MAP,
        param_order=EXPERT_PARAMS,
        reversed_params=_reversed(is_transposed),
    )
    tensors, config = read_peft_files(tmp_path)
    prefixes = wrapper_prefixes("experts", EXPERT_PARAMS)
    want = {f"{PREFIX}router.lora_{x}.weight" for x in "AB"}
    want |= {f"{PREFIX}{m}.lora_{x}.weight" for m in prefixes.values() for x in "AB"}
    assert set(tensors) == want
    assert config["target_parameters"] == ["experts.w_in", "experts.w_out"]
    assert config["target_modules"] == ["router"]
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (R, ALPHA, 0.0)
    pm = from_pretrained(TorchMoe(case.params, is_transposed), tmp_path)
    ref = ref_output(case, case.params, factors)
    assert_close(torch_forward(pm, case.x), ref, 1e-5)
    assert np.max(np.abs(ref - ref_output(case, case.params))) > 0.1
    # the adapters are the ones the reference describes: merged Flax model == reference
    merged = lora.merge(case.params, adapters)
    assert_close(np.asarray(case.apply(merged, case.x)), ref, 1e-4)
    # and PEFT's per-expert deltas are ours
    for param, w in wrappers(pm).items():
        path = f"params/experts/{param}"
        got = lora.delta(adapters["params"]["experts"][param])
        np.testing.assert_allclose(np.asarray(got), _torch_delta(path, w), atol=1e-5)


# -- PEFT -> ours --------------------------------------------------------------------------------
@pytest.mark.parametrize("probe", [False, True], ids=["no_probe", "probe"])
@pytest.mark.parametrize("is_transposed", TRANSPOSED)
def test_peft_files_load_as_expert_adapters(
    tmp_path: Path, is_transposed: bool | None, probe: bool
) -> None:
    case = build("linen", "einsum")
    pm = get_moe_peft_model(TorchMoe(case.params, is_transposed), R, ALPHA, seed=2)
    pm.save_pretrained(str(tmp_path))
    adapters = lora.load_peft(
        tmp_path,
        case.params,
        KEY_MAP,
        probe=(lambda p: case.apply(p, case.x)) if probe else None,
        param_order=EXPERT_PARAMS,
        reversed_params=_reversed(is_transposed),
    )
    entries = {p: adapters["params"][p.split("/")[1]][p.split("/")[2]] for p in KEY_MAP}
    for param, w in wrappers(pm).items():
        path = f"params/experts/{param}"
        ours = entries[path]
        assert ours.expert_axes == (0,) and ours.in_axes == (1,)
        assert ours.a.shape[:2] == (E, case.params["params"]["experts"][param].shape[1])
        assert ours.scale == ALPHA / R
        np.testing.assert_allclose(np.asarray(lora.delta(ours)), _torch_delta(path, w), atol=1e-5)
    factors = {p: (w.a, w.b, w.scale) for p, w in entries.items()}
    assert_close(torch_forward(pm, case.x), ref_output(case, case.params, factors), 1e-5)


def test_ragged_transposed_flax_layout_round_trip(tmp_path: Path) -> None:
    """The Flax layout of the kernel does not matter: the ragged block with ``w_out (E, D, F)``
    (input axis 2) writes and reads the same factors, and the file equals the one of the
    einsum block with ``w_out (E, F, D)`` holding the same per-expert deltas."""
    case = build("linen", "ragged", transposed_out=True)
    factors = random_factors(case, rank=R, scale=ALPHA / R, seed=7)
    adapters = _adapters(case, factors)
    lora.save_peft(tmp_path / "r", adapters, None, KEY_MAP, param_order=EXPERT_PARAMS)
    back = lora.load_peft(tmp_path / "r", case.params, KEY_MAP, param_order=EXPERT_PARAMS)
    for path in KEY_MAP:
        _, mod, leaf = path.split("/")
        w, v = adapters["params"][mod][leaf], back["params"][mod][leaf]
        assert (v.in_axes, v.expert_axes) == (w.in_axes, w.expert_axes)
        np.testing.assert_array_equal(np.asarray(v.a), np.asarray(w.a))
        np.testing.assert_array_equal(np.asarray(v.b), np.asarray(w.b))
    # the same deltas on the einsum block's (E, F, D) w_out: the same file
    einsum = build("linen", "einsum")
    a, b, s = factors["params/experts/w_out"]  # a (E, F, r) for (E, D, F) with input axis 2
    same = dict(factors) | {"params/experts/w_out": (a, b, s)}
    lora.save_peft(
        tmp_path / "e", _adapters(einsum, same), None, KEY_MAP, param_order=EXPERT_PARAMS
    )
    t_r, _ = read_peft_files(tmp_path / "r")
    t_e, _ = read_peft_files(tmp_path / "e")
    assert t_r.keys() == t_e.keys()
    for k in t_r:
        np.testing.assert_array_equal(t_r[k], t_e[k])


# -- scan stacks, patterns, the default key map ---------------------------------------------------
@pytest.mark.parametrize("is_transposed", TRANSPOSED)
def test_scan_stacked_experts_both_ways(tmp_path: Path, is_transposed: bool | None) -> None:
    case = build("linen", "einsum", stacked=True)
    factors = random_factors(case, rank=R, scale=ALPHA / R, seed=11)
    adapters = _adapters(case, factors)
    options = dict(
        param_order={"layers.{layer}.experts": EXPERT_PARAMS},
        reversed_params=_reversed(is_transposed, STACK_MAP),
    )
    lora.save_peft(tmp_path / "ours", adapters, None, STACK_MAP, **options)
    tensors, config = read_peft_files(tmp_path / "ours")
    assert f"{PREFIX}layers.1.experts.base_layer.lora_A.weight" in tensors
    assert config["target_parameters"] == [
        f"layers.{i}.experts.{p}" for i in range(L) for p in EXPERT_PARAMS
    ]
    pm = from_pretrained(TorchMoeStack(case.params, is_transposed), tmp_path / "ours")
    assert_close(torch_forward(pm, case.x), ref_output(case, case.params, factors), 1e-5)
    # PEFT -> ours
    pm = get_moe_peft_model(TorchMoeStack(case.params, is_transposed), R, ALPHA, seed=4)
    pm.save_pretrained(str(tmp_path / "peft"))
    back = lora.load_peft(tmp_path / "peft", case.params, STACK_MAP, **options)
    entries = leaves_by_path(back, is_leaf=lambda x: isinstance(x, lora.LoraWeights))
    w_in = entries["params/layers/moe/experts/w_in"]
    assert (w_in.layer_axes, w_in.expert_axes, w_in.in_axes) == (1, (1,), (2,))
    got = {p: (w.a, w.b, w.scale) for p, w in entries.items()}
    assert_close(torch_forward(pm, case.x), ref_output(case, case.params, got), 1e-5)


def test_rank_and_alpha_patterns_both_ways(tmp_path: Path) -> None:
    case = build("linen", "einsum")
    patterns = dict(rank_pattern={"experts.w_out": 3}, alpha_pattern={"experts.w_in": 5.0})
    pm = get_moe_peft_model(TorchMoe(case.params, None), R, ALPHA, seed=6, **patterns)
    pm.save_pretrained(str(tmp_path / "peft"))
    opts = dict(param_order=EXPERT_PARAMS, reversed_params=_reversed(None))
    adapters = lora.load_peft(tmp_path / "peft", case.params, KEY_MAP, **opts)
    experts = adapters["params"]["experts"]
    assert (experts["w_in"].rank, experts["w_in"].scale) == (R, 5.0 / R)
    assert (experts["w_out"].rank, experts["w_out"].scale) == (3, ALPHA / 3)
    entries = {p: adapters["params"][p.split("/")[1]][p.split("/")[2]] for p in KEY_MAP}
    factors = {p: (w.a, w.b, w.scale) for p, w in entries.items()}
    ref = ref_output(case, case.params, factors)
    assert_close(torch_forward(pm, case.x), ref, 1e-5)
    # ours -> PEFT: the patterns are written per parameter and PEFT gives the same model
    lora.save_peft(tmp_path / "ours", adapters, None, KEY_MAP, **opts)
    _, config = read_peft_files(tmp_path / "ours")
    assert config["rank_pattern"]["experts.w_out"] == 3
    assert config["alpha_pattern"]["experts.w_in"] == 5.0
    pm2 = from_pretrained(TorchMoe(case.params, None), tmp_path / "ours")
    assert_close(torch_forward(pm2, case.x), ref, 1e-5)


def test_default_key_map_names_the_parameters(tmp_path: Path) -> None:
    case = build("nnx", "einsum")
    factors = random_factors(case, rank=R, scale=0.5, seed=8)
    adapters = _adapters(case, factors)
    lora.save_peft(tmp_path, adapters, param_order=EXPERT_PARAMS)
    tensors, config = read_peft_files(tmp_path)
    assert config["target_parameters"] == ["experts.w_in", "experts.w_out"]
    assert f"{PREFIX}experts.base_layer.lora_A.weight" in tensors
    back = lora.load_peft(tmp_path, case.params, param_order=EXPERT_PARAMS)
    for path in factors:
        mod, leaf = path.split("/")
        np.testing.assert_array_equal(
            np.asarray(back[mod][leaf].a), np.asarray(adapters[mod][leaf].a)
        )


# -- errors ---------------------------------------------------------------------------------------
def test_errors_name_the_path_or_module(tmp_path: Path) -> None:
    case = build("linen", "einsum")
    factors = random_factors(case, rank=R, scale=ALPHA / R, seed=5)
    adapters = _adapters(case, factors)
    with pytest.raises(ValueError, match=r"module 'experts'.*registration order.*param_order"):
        lora.save_peft(tmp_path, adapters, None, KEY_MAP)
    with pytest.raises(ValueError, match=r"param_order lacks \['w_out'\]"):
        lora.save_peft(tmp_path, adapters, None, KEY_MAP, param_order=["w_in"])
    with pytest.raises(ValueError, match=r"'params/experts/w_in'.*'<module>.<param>'"):
        lora.save_peft(tmp_path, adapters, None, KEY_MAP | {"params/experts/w_in": "w_in"})
    with pytest.raises(ValueError, match=r"\['experts'\] are adapted as modules"):
        lora.save_peft(
            tmp_path,
            adapters,
            None,
            KEY_MAP | {"params/router/kernel": "experts"},
            param_order=EXPERT_PARAMS,
        )
    w = adapters["params"]["experts"]["w_in"]
    dora = {"w_in": w.replace(m=jnp.ones((E, 16)))}
    with pytest.raises(ValueError, match=r"'params/experts/w_in'.*DoRA"):
        lora.save_peft(tmp_path, {"params": {"experts": dora}}, None, KEY_MAP)
    with pytest.warns(UserWarning, match="lora_dropout=0.1 is written as 0.0"):
        lora.save_peft(
            tmp_path,
            adapters,
            lora.LoraConfig(rank=R, alpha=ALPHA, dropout=0.1),
            KEY_MAP,
            param_order=EXPERT_PARAMS,
        )
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_dropout"] == 0.0
    with pytest.raises(TypeError, match="not a single string"):
        lora.save_peft(tmp_path, adapters, None, KEY_MAP, reversed_params="experts.w_in")

    pm = get_moe_peft_model(TorchMoe(case.params, None), R, ALPHA, seed=2)
    pm.save_pretrained(str(tmp_path / "peft"))
    directory = tmp_path / "peft"
    with pytest.raises(ValueError, match=r"module 'experts'.*registration order"):
        lora.load_peft(directory, case.params, KEY_MAP)
    # only w_out named: the tensors of w_in (under base_layer) cannot be attributed
    only_out = {k: v for k, v in KEY_MAP.items() if not k.endswith("w_in")}
    with pytest.raises(ValueError, match=r"experts.base_layer.*param_order"):
        lora.load_peft(directory, case.params, only_out)
    # the wrong orientation: with a probe (the input axes known) the shapes do not fit, and
    # the error says how they would (without one, PEFT's `in` side is taken for the input
    # axis: the same delta, the other factor called `a`)
    probe = lambda p: case.apply(p, case.x)
    with pytest.raises(ValueError, match=r"'params/experts/w_in'.*add 'experts.w_in' to rev"):
        lora.load_peft(directory, case.params, KEY_MAP, probe=probe, param_order=EXPERT_PARAMS)
    wrong = lora.load_peft(directory, case.params, KEY_MAP, param_order=EXPERT_PARAMS)
    right = lora.load_peft(
        directory, case.params, KEY_MAP, param_order=EXPERT_PARAMS, reversed_params=_reversed(None)
    )
    w_wrong, w_right = (t["params"]["experts"]["w_in"] for t in (wrong, right))
    assert (w_wrong.in_axes, w_right.in_axes) == ((2,), (1,))
    np.testing.assert_allclose(np.asarray(lora.delta(w_wrong)), np.asarray(lora.delta(w_right)))
    cfg = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps(cfg | {"r": 3}))
    with pytest.raises(ValueError, match=r"'params/experts/w_\w+'.*of rank 3"):
        lora.load_peft(
            directory,
            case.params,
            KEY_MAP,
            param_order=EXPERT_PARAMS,
            reversed_params=_reversed(None),
        )
