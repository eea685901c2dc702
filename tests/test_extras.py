"""Trained copies (``modules_to_save``, ``bias``) and token deltas (``trainable_token_indices``).

References are independent of the code under test: the un-adapted model run on params built by
hand in numpy (each copy put in place of its leaf, the token rows added to the table, each
LoRA kernel ``W0 + scale * a @ b`` in float64 from ``support.refs.ref_merged_kernel``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support.internal import StackedCopy, split_plain, split_stacked
from support.refs import ref_merged_kernel
from support.trees import leaves_by_path, perturb, replace_leaves

import flax_lora as lora

TOL = 2e-5
TOKENS = (1, 6, 9)


class Net(nn.Module):
    """An Embed looked up and used tied (``attend``), an adapted Dense, a head."""

    @nn.compact
    def __call__(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        embed = nn.Embed(12, 8, name="embed")
        x = embed(ids)
        x = jnp.tanh(nn.Dense(8, name="q")(x))
        x = x + nn.Dense(8, name="mlp")(x)
        logits = nn.Dense(3, name="head")(x.mean(1))
        return logits, embed.attend(x)


class NoBias(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(3, use_bias=False, name="q")(nn.Dense(4, name="other")(x))


IDS = jnp.array([[1, 2, 6, 9], [9, 9, 0, 4], [3, 6, 1, 11]])


def setup(**kw: Any) -> tuple[Net, Any, lora.LoraConfig]:
    model = Net()
    params = model.init(jax.random.key(0), IDS)
    config = lora.LoraConfig(rank=2, alpha=4.0, init="random", targets=r".*/q/kernel", **kw)
    return model, params, config


FULL = dict(modules_to_save=["params/head"], trainable_token_indices=list(TOKENS), bias="lora_only")


def reference_params(params: Any, adapters: Any) -> Any:
    """The params the adapted model should run on, built by hand in numpy."""
    flat = leaves_by_path(params)
    new = {}
    q = adapters["params"]["q"]["kernel"]
    new["params/q/kernel"] = ref_merged_kernel(flat["params/q/kernel"], q.a, q.b, (0,), 4.0 / 2)
    if "bias" in adapters["params"]["q"]:
        new["params/q/bias"] = np.asarray(adapters["params"]["q"]["bias"].value)
    if "head" in adapters["params"]:
        for leaf in ("kernel", "bias"):
            new[f"params/head/{leaf}"] = np.asarray(adapters["params"]["head"][leaf].value)
    if "embed" in adapters["params"]:
        node = adapters["params"]["embed"]["embedding"]
        table = np.asarray(flat["params/embed/embedding"], np.float64)
        for row, i in enumerate(node.indices):
            table[i] += np.asarray(node.delta[row], np.float64)
        new["params/embed/embedding"] = table.astype(np.float32)
    return replace_leaves(params, {k: jnp.asarray(v) for k, v in new.items()})


def close(x: Any, y: Any, tol: float = TOL) -> None:
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=tol, rtol=0)


# -- init --------------------------------------------------------------------------------------
def test_init_adds_copies_and_zero_deltas_and_leaves_base_alone() -> None:
    _, params, config = setup(**FULL)
    before = jax.tree.map(np.array, params)
    adapters = lora.init(jax.random.key(1), params, config)
    ad = adapters["params"]
    assert set(ad) == {"q", "head", "embed"}
    assert (
        isinstance(ad["head"]["kernel"], lora.TrainedCopy) and ad["head"]["kernel"].role == "module"
    )
    assert isinstance(ad["q"]["bias"], lora.TrainedCopy) and ad["q"]["bias"].role == "bias"
    tok = ad["embed"]["embedding"]
    assert isinstance(tok, lora.TokenDelta) and tok.indices == TOKENS and tok.num_rows == 12
    np.testing.assert_array_equal(np.asarray(tok.delta), np.zeros((3, 8)))
    np.testing.assert_array_equal(ad["head"]["kernel"].value, params["params"]["head"]["kernel"])
    # the leaves are exactly the trainable arrays: 2 factors, 2 head leaves, 1 bias, 1 delta
    assert len(jax.tree.leaves(adapters)) == 6
    assert "mlp" not in ad  # lora_only: not the biases of modules without LoRA factors
    close(params, before, 0)
    # the head is a copy: not the base array (training it cannot write into the base)
    assert ad["head"]["kernel"].value is not params["params"]["head"]["kernel"]


def test_bias_all_and_head_kernels_are_not_factored() -> None:
    _, params, _ = setup()
    config = lora.LoraConfig(rank=2, modules_to_save=["params/head"], bias="all")
    ad = lora.init(jax.random.key(1), params, config)["params"]
    assert isinstance(ad["head"]["kernel"], lora.TrainedCopy)  # not LoRA: trained whole
    assert ad["head"]["bias"].role == "module"  # the head's bias is trained with the head
    assert {k for k, v in ad.items() if "bias" in v} == {"q", "mlp", "head"}
    assert isinstance(ad["q"]["kernel"], lora.LoraWeights)


def test_identity_at_init() -> None:
    model, params, _ = setup(**FULL)
    config = lora.LoraConfig(rank=2, targets=r".*/q/kernel", **FULL)  # b = 0
    adapters = lora.init(jax.random.key(1), params, config)
    close(lora.wrap(model.apply)(params, adapters, IDS), model.apply(params, IDS), 0)


# -- wrap / merge --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["auto", "factored", "merged"])
def test_wrap_and_merge_match_the_reference(mode: str) -> None:
    model, params, config = setup(**FULL)
    adapters = perturb(lora.init(jax.random.key(1), params, config), 2, 0.5)
    expected = model.apply(reference_params(params, adapters), IDS)
    assert np.abs(np.asarray(expected[1] - model.apply(params, IDS)[1])).max() > 1e-2
    close(jax.jit(lora.wrap(model.apply, mode))(params, adapters, IDS), expected)
    close(model.apply(lora.merge(params, adapters), IDS), expected)


def test_tied_attend_sees_the_token_rows() -> None:
    model, params, config = setup(trainable_token_indices={r"params/embed": [4]})
    adapters = perturb(lora.init(jax.random.key(1), params, config), 3, 0.5)
    ids = jnp.array([[0, 1, 2, 3]])  # token 4 is never looked up: only attend uses its row
    expected = model.apply(reference_params(params, adapters), ids)
    got = lora.wrap(model.apply, "factored")(params, adapters, ids)
    close(got, expected)
    base = lora.wrap(model.apply)(params, {"params": {"q": adapters["params"]["q"]}}, ids)
    assert np.abs(np.asarray(got[1][..., 4] - base[1][..., 4])).max() > 1e-3
    np.testing.assert_allclose(np.asarray(got[1][..., :4]), np.asarray(base[1][..., :4]), atol=TOL)


def test_gradients_reach_copies_and_token_rows() -> None:
    model, params, config = setup(**FULL)
    adapters = perturb(lora.init(jax.random.key(1), params, config), 4, 0.5)
    loss = lambda out: jnp.sum(out[0] ** 2) + jnp.sum(jnp.sin(out[1]))
    grads = jax.grad(lambda ad: loss(lora.wrap(model.apply)(params, ad, IDS)))(adapters)
    ref = jax.grad(lambda p: loss(model.apply(p, IDS)))(reference_params(params, adapters))
    g, r = grads["params"], ref["params"]
    close(g["head"]["kernel"].value, r["head"]["kernel"], 1e-4)
    close(g["q"]["bias"].value, r["q"]["bias"], 1e-4)
    close(g["embed"]["embedding"].delta, r["embed"]["embedding"][np.asarray(TOKENS)], 1e-4)


def test_unmerge_refuses_copies_naming_them_and_undoes_token_rows() -> None:
    _, params, config = setup(**FULL)
    adapters = perturb(lora.init(jax.random.key(1), params, config), 5, 0.5)
    merged = lora.merge(params, adapters)
    with pytest.raises(ValueError, match=r"params/head/bias.*params/head/kernel.*params/q/bias"):
        lora.unmerge(merged, adapters)
    _, params, config = setup(trainable_token_indices=list(TOKENS))
    adapters = perturb(lora.init(jax.random.key(1), params, config), 5, 0.5)
    close(lora.unmerge(lora.merge(params, adapters), adapters), params, 1e-5)


# -- bad input -----------------------------------------------------------------------------------
def test_modules_to_save_matching_nothing_names_the_pattern() -> None:
    _, params, config = setup(modules_to_save=["params/classifier"])
    with pytest.raises(ValueError, match=r"modules_to_save.*'params/classifier'.*params/head"):
        lora.init(jax.random.key(1), params, config)


def test_token_ids_out_of_range_name_the_table() -> None:
    _, params, config = setup(trainable_token_indices=[3, 12])
    with pytest.raises(ValueError, match=r"\[12\] are out of range.*params/embed/embedding.*12"):
        lora.init(jax.random.key(1), params, config)


def test_bias_lora_only_without_biases_names_the_paths() -> None:
    params = NoBias().init(jax.random.key(0), jnp.ones((1, 2)))
    config = lora.LoraConfig(targets=r".*/q/kernel", bias="lora_only")
    with pytest.raises(ValueError, match=r"lora_only.*params/q/bias"):
        lora.init(jax.random.key(1), params, config)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(bias="some"), ValueError, "bias must be one of"),
        (dict(trainable_token_indices=[1, 1]), ValueError, "repeats"),
        (dict(trainable_token_indices=[-1]), ValueError, ">= 0"),
        (dict(trainable_token_indices=[1.5]), TypeError, "int token ids"),
        (dict(trainable_token_indices={"(": [1]}), ValueError, "not a valid regex"),
        (dict(modules_to_save=[3]), TypeError, "modules_to_save"),
    ],
)
def test_config_checks(kw: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        lora.LoraConfig(**kw)


def test_table_with_factors_and_tokens_is_refused() -> None:
    _, params, _ = setup()
    config = lora.LoraConfig(trainable_token_indices=[1])  # targets=None adapts the table too
    with pytest.raises(ValueError, match=r"params/embed/embedding.*also gets LoRA factors"):
        lora.init(jax.random.key(1), params, config)


def test_config_round_trips_and_hashes() -> None:
    config = setup(**FULL)[2]
    assert lora.LoraConfig.from_dict(config.to_dict()) == config
    assert hash(config) == hash(lora.LoraConfig.from_dict(config.to_dict()))


# -- training, checkpoints, summary ------------------------------------------------------------
def test_trainable_mask_and_freeze_base_train_the_copies() -> None:
    model, params, config = setup(**FULL)
    adapters = lora.init(jax.random.key(1), params, config)
    tree = {"params": params, "lora": adapters}
    mask = lora.trainable(tree)
    assert all(jax.tree.leaves(mask["lora"])) and not any(jax.tree.leaves(mask["params"]))
    tx = lora.freeze_base(optax.sgd(0.1), tree)
    loss = lambda t: jnp.sum(lora.wrap(model.apply)(t["params"], t["lora"], IDS)[0] ** 2)
    grads = jax.grad(loss)(tree)
    updates, _ = tx.update(grads, tx.init(tree), tree)
    new = optax.apply_updates(tree, updates)
    close(new["params"], params, 0)
    head = new["lora"]["params"]["head"]["kernel"].value
    assert np.abs(np.asarray(head - params["params"]["head"]["kernel"])).max() > 0


def test_orbax_round_trip_is_exact(tmp_path: Path) -> None:
    _, params, config = setup(**FULL)
    adapters = perturb(lora.init(jax.random.key(1), params, config), 6, 0.5)
    lora.save(tmp_path / "ck", adapters, config)
    back = lora.load(tmp_path / "ck")
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    close(back, adapters, 0)
    assert lora.load_config(tmp_path / "ck") == config


def test_summary_counts_the_copies_and_rows() -> None:
    _, params, config = setup(**FULL)
    adapters = lora.init(jax.random.key(1), params, config)
    s = lora.summary(params, adapters, show=False)
    kinds = {r.path: r.kind for r in s.rows}
    assert kinds == {
        "params/q/kernel": "lora",
        "params/q/bias": "bias",
        "params/head/kernel": "module",
        "params/head/bias": "module",
        "params/embed/embedding": "tokens",
    }
    assert s.trainable_params == 8 * 2 + 2 * 8 + 8 + 8 * 3 + 3 + 3 * 8
    assert "copy" in str(s) and "rows" in str(s)


# -- several adapters ----------------------------------------------------------------------------
def test_routing_gives_each_example_its_own_head() -> None:
    model, params, config = setup(**FULL)
    sets = [perturb(lora.init(jax.random.key(1), params, config), s, 0.5) for s in (7, 8)]
    stacked = lora.stack(sets)
    ids = jnp.array([1, -1, 0])
    for mode in ("auto", "merged"):
        got = jax.jit(lora.wrap(model.apply, mode))(params, stacked, IDS, lora_ids=ids)
        for j, k in enumerate(ids.tolist()):
            p = params if k < 0 else reference_params(params, sets[k])
            want = model.apply(p, IDS[j : j + 1])
            close(jax.tree.map(lambda y, j=j: y[j : j + 1], got), want)
    back = lora.unstack(stacked, 1)["params"]
    close(back["head"], sets[1]["params"]["head"], 1e-6)


def test_stack_refuses_sets_with_different_copies() -> None:
    _, params, config = setup(**FULL)
    a = lora.init(jax.random.key(1), params, config)
    b = lora.init(jax.random.key(1), params, setup()[2])
    with pytest.raises(ValueError, match=r"same paths.*params/head/kernel"):
        lora.stack([a, b])


def test_combine_sums_the_copies_with_the_weights() -> None:
    _, params, config = setup(**FULL)
    a, b = (perturb(lora.init(jax.random.key(1), params, config), s, 0.5) for s in (9, 10))
    out = lora.combine([a, b], [0.25, 0.75], method="cat")["params"]
    for leaf in ("kernel", "bias"):
        want = 0.25 * np.asarray(a["params"]["head"][leaf].value, np.float64) + 0.75 * np.asarray(
            b["params"]["head"][leaf].value, np.float64
        )
        np.testing.assert_allclose(np.asarray(out["head"][leaf].value), want, atol=1e-6)
    want = 0.25 * np.asarray(a["params"]["embed"]["embedding"].delta) + 0.75 * np.asarray(
        b["params"]["embed"]["embedding"].delta
    )
    np.testing.assert_allclose(np.asarray(out["embed"]["embedding"].delta), want, atol=1e-6)


# -- PEFT files without torch -------------------------------------------------------------------
def test_peft_files_round_trip(tmp_path: Path) -> None:
    _, params, config = setup(**FULL)
    adapters = perturb(lora.init(jax.random.key(1), params, config), 11, 0.5)
    lora.save_peft(tmp_path, adapters, config, params=params, task_type="SEQ_CLS")
    back = lora.load_peft(tmp_path, params)
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    close(back, adapters, 1e-6)
    with pytest.raises(ValueError, match="task_type must be one of"):
        lora.save_peft(tmp_path, adapters, config, params=params, task_type="seq_cls")


def test_save_peft_refuses_copies_of_kernels_with_ambiguous_layouts(tmp_path: Path) -> None:
    class Heads(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            h = nn.DenseGeneral((2, 3), name="head")(nn.Dense(4, name="q")(x))
            return h.sum(-1)

    params = Heads().init(jax.random.key(0), jnp.ones((1, 5)))
    config = lora.LoraConfig(targets=r".*/q/kernel", modules_to_save=["params/head"])
    adapters = lora.init(jax.random.key(1), params, config)
    with pytest.raises(ValueError, match=r"3-D kernel at 'params/head/kernel'.*ambiguous"):
        lora.save_peft(tmp_path, adapters, config)


def test_split_keeps_plain_and_stacked_extras_apart() -> None:
    """One adapter set holds plain extras, a stack stacked ones; the other kind is refused with
    a TypeError naming its path."""
    plain = {"head": {"bias": lora.TrainedCopy(jnp.ones(3))}}
    stacked = {"head": {"bias": StackedCopy(values=jnp.ones((2, 3)))}}
    rest, extras = split_plain(plain, "merge")
    assert rest is None and list(extras) == ["head/bias"]
    np.testing.assert_array_equal(extras["head/bias"].value, np.ones(3))
    assert list(split_stacked(stacked)[1]) == ["head/bias"]
    with pytest.raises(TypeError, match="head/bias"):
        split_plain(stacked, "merge")
    with pytest.raises(TypeError, match="head/bias"):
        split_stacked(plain)
