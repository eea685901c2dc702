"""Selection you can see: `lora.select` lists the kernels a config picks and the leaves it skips,
with the reason, before training; it agrees with what `lora.init` adapts. `lora.quantize` warns
of the leaves a probe sees used as kernels that it leaves alone only because of their names."""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.target_models import IDS, LMS

import flax_lora as lora

D = 6
X = np.random.default_rng(0).normal(size=(2, 3, D)).astype(np.float32)


class TunixLike(nn.Module):
    """Kernels under the names tunix and Gemma give them (``w``, ``gating_einsum``), a Flax
    ``kernel``, and a 2-D position table that is added, not contracted."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pos = self.param("pos", nn.initializers.normal(), (3, D))
        w = self.param("w", nn.initializers.normal(), (D, 2, 3))
        gate = self.param("gating_einsum", nn.initializers.normal(), (2, D, 4))
        h = jnp.einsum("btd,dhk->bthk", x + pos, w).reshape(x.shape)
        g = jnp.einsum("btd,cdf->cbtf", h, gate)
        return nn.Dense(D, name="out")(jax.nn.gelu(g[0]) * g[1])


def _tunix() -> tuple[dict, object]:
    model = TunixLike()
    params = jax.eval_shape(model.init, jax.random.key(0), X)
    return params, lambda p: model.apply(p, X)


@pytest.mark.parametrize("kind", sorted(LMS))
@pytest.mark.parametrize(
    "config",
    [
        lora.LoraConfig(),
        lora.LoraConfig(targets="all-linear"),
        lora.LoraConfig(targets=["query", "value", "fc2"]),
        lora.LoraConfig(targets=r".*kernel", exclude=["head", "conv"]),
        lora.LoraConfig(modules_to_save=[r"(params/)?head"]),
    ],
)
def test_select_agrees_with_init(kind: str, config: lora.LoraConfig) -> None:
    apply, params, _ = LMS[kind]()
    probe = lambda p: apply(p, IDS)
    shapes = jax.eval_shape(lambda p: lora.init(jax.random.key(0), p, config, probe), params)
    entry = lambda x: isinstance(x, lora.LoraWeights | lora.TrainedCopy | lora.TokenDelta)
    flat = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=entry)[0]
    adapted = {"/".join(k.key for k in kp) for kp, x in flat if isinstance(x, lora.LoraWeights)}
    selection = lora.select(params, config, probe)
    assert set(selection.picked) == adapted
    big = {c.path for c in selection.choices}
    assert set(selection.skipped) == big - adapted


def test_reasons() -> None:
    """Each reason a leaf is left out, in words; and the reason of each pick."""
    params, probe = _tunix()
    s = lora.select(params, lora.LoraConfig(), probe)
    assert s.picked == ["params/gating_einsum", "params/out/kernel", "params/w"]  # tree order
    assert s.skipped == {"params/pos": "the probe does not contract or gather it"}
    assert "the probe sees it as a dense kernel" in str(s)
    no_probe = lora.select(params, lora.LoraConfig()).skipped
    assert set(no_probe) == {"params/pos", "params/w", "params/gating_einsum"}
    assert "not named 'kernel' or 'embedding'" in no_probe["params/w"]
    cfg = lora.LoraConfig(targets=["w", "gating_einsum", "kernel"], exclude=r".*/out/.*")
    s = lora.select(params, cfg, probe)
    assert s.picked == ["params/gating_einsum", "params/w"]
    assert s.skipped["params/out/kernel"] == "excluded by '.*/out/.*'"
    assert (
        "targets do not match it"
        in lora.select(params, lora.LoraConfig(targets="w"), probe).skipped["params/out/kernel"]
    )
    layered = lora.select(params, lora.LoraConfig(layers=[1]), probe).skipped
    assert layered["params/w"] == "no layer number in its path (layers=[1])"
    saved = lora.select(params, lora.LoraConfig(modules_to_save=["params/out"]), probe)
    assert saved.skipped["params/out/kernel"] == "trained whole (modules_to_save)"


def test_layer_reason_and_table() -> None:
    _, params, _ = LMS["linen"]()
    config = lora.LoraConfig(targets=["query"], layers=[0])
    s = lora.select({"params": {"h1": params["params"]["attn"]}}, config)
    assert s.skipped["params/h1/query/kernel"] == "layer 1 is not in layers=[0]"
    table = str(s)
    assert table.splitlines()[0].split()[:2] == ["path", "shape"]
    assert "params/h1/query/kernel" in table and "skipped" in table
    assert table.splitlines()[-1] == f"picked: 0 || skipped: {len(s.choices)}"


def test_select_prints_and_checks_its_config(capsys: pytest.CaptureFixture[str]) -> None:
    params, probe = _tunix()
    lora.select(params, lora.LoraConfig(), probe, show=True)
    assert "params/gating_einsum" in capsys.readouterr().out
    with pytest.raises(TypeError, match=r"lora\.select expects a LoraConfig"):
        lora.select(params, {"rank": 2}, probe)  # type: ignore[arg-type]


def test_quantize_warns_of_kernels_left_by_name() -> None:
    """With a probe and no targets, lora.quantize takes Flax's names only: the kernels named
    ``w`` and ``gating_einsum`` are left float, and it says so naming them."""
    model = TunixLike()
    params = model.init(jax.random.key(0), X)
    probe = lambda p: model.apply(p, X)
    with pytest.warns(
        UserWarning,
        match=r"'params/gating_einsum', 'params/w'.*"
        r"targets=\['kernel', 'embedding', 'gating_einsum', 'w'\]",
    ):
        q = lora.quantize(params, dtype="int8", probe=probe)
    assert isinstance(q["params"]["out"]["kernel"], lora.QuantizedKernel)
    assert not isinstance(q["params"]["w"], lora.QuantizedKernel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # targets given, or no probe: nothing to say
        lora.quantize(params, targets=["w", "gating_einsum", "out"], dtype="int8", probe=probe)
        lora.quantize(params, dtype="int8")
