"""`LoraConfig`: path matching, per-path rank/alpha/scale, serialisation, bad input."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.trees import adapter_entries

import flax_lora as lora


def test_defaults_follow_peft() -> None:
    c = lora.LoraConfig()
    assert (c.rank, c.alpha, c.init, c.dropout, c.rslora) == (8, 8.0, "lora", 0.0, False)
    assert c.targets is None and c.exclude == () and c.layers is None
    assert jnp.dtype(c.dtype) == jnp.float32
    assert c.scale_for("anything") == 1.0


def test_targets_fullmatch_and_exclude() -> None:
    c = lora.LoraConfig(targets=r".*/(query|value)/kernel", exclude=r"params/h1/.*")
    assert c.matches("params/h0/attn/query/kernel")
    assert not c.matches("params/h0/attn/query/kernel_extra")  # fullmatch, not search
    assert not c.matches("params/h0/attn/key/kernel")
    assert not c.matches("params/h1/attn/query/kernel")
    many = lora.LoraConfig(targets=["a/kernel", r"b/\w+"])
    assert many.matches("a/kernel") and many.matches("b/kernel") and not many.matches("c/kernel")
    assert lora.LoraConfig().matches("any/path/at/all")


def test_layers() -> None:
    c = lora.LoraConfig(layers=[0, 2])
    assert c.matches("layers/0/kernel") and c.matches("params/h2/mlp/kernel")
    assert not c.matches("layers/1/kernel")
    assert not c.matches("head/kernel")  # no layer index: not selected when layers is given
    assert lora.LoraConfig(layers=3).layers == (3,)


def test_patterns_first_match_wins() -> None:
    c = lora.LoraConfig(
        rank=8,
        alpha=16.0,
        rank_pattern={"query": 4, "attn": 2},
        alpha_pattern={"attn": 3.0, "query": 5.0},
    )
    q, k, mlp = "h0/attn/query/kernel", "h0/attn/key/kernel", "h0/mlp/kernel"
    assert (c.rank_for(q), c.rank_for(k), c.rank_for(mlp)) == (4, 2, 8)
    assert (c.alpha_for(q), c.alpha_for(k), c.alpha_for(mlp)) == (3.0, 3.0, 16.0)
    assert c.scale_for(q) == 3.0 / 4 and c.scale_for(k) == 3.0 / 2 and c.scale_for(mlp) == 2.0
    rs = lora.LoraConfig(rank=9, alpha=6.0, rslora=True, rank_pattern={"mlp": 4})
    assert rs.scale_for(q) == pytest.approx(6.0 / 3.0)
    assert rs.scale_for(mlp) == pytest.approx(6.0 / math.sqrt(4))


def test_dict_round_trip() -> None:
    c = lora.LoraConfig(
        rank=3,
        targets=".*kernel",
        exclude=["x", "y"],
        rank_pattern={"a": 2},
        alpha_pattern={"b": 0.5},
        init="olora",
        dtype=jnp.bfloat16,
        layers=(1,),
    )
    d = c.to_dict()
    assert d["dtype"] == "bfloat16" and d["targets"] == [".*kernel"]
    import json

    assert lora.LoraConfig.from_dict(json.loads(json.dumps(d))) == c


# ---------------------------------------------------------------------------------------------
# bad input: error type, and a message naming the field and what was expected
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, -1])
def test_rank_below_one(rank) -> None:
    with pytest.raises(ValueError) as e:
        lora.LoraConfig(rank=rank)
    assert "LoraConfig.rank" in str(e.value) and "at least 1" in str(e.value)
    with pytest.raises(ValueError) as e:
        lora.LoraConfig(rank_pattern={r"attn/query": rank})
    msg = str(e.value)
    assert "rank_pattern" in msg and "attn/query" in msg and "at least 1" in msg


def test_rank_not_an_int() -> None:
    with pytest.raises(TypeError, match=r"LoraConfig\.rank must be an int"):
        lora.LoraConfig(rank=2.0)
    with pytest.raises(TypeError, match="rank_pattern"):
        lora.LoraConfig(rank_pattern={"q": "4"})


def test_unknown_init() -> None:
    with pytest.raises(ValueError) as e:
        lora.LoraConfig(init="kaiming")
    msg = str(e.value)
    assert "LoraConfig.init" in msg and "'kaiming'" in msg
    for name in ("lora", "gaussian", "pissa", "olora", "random"):
        assert name in msg


@pytest.mark.parametrize("dtype", [jnp.int32, "int8", jnp.bool_, "not-a-dtype"])
def test_dtype_not_floating(dtype) -> None:
    with pytest.raises(TypeError) as e:
        lora.LoraConfig(dtype=dtype)
    assert "LoraConfig.dtype" in str(e.value) and "floating" in str(e.value)


def test_bad_regex_and_dropout() -> None:
    with pytest.raises(ValueError, match=r"LoraConfig.targets: '\(' is not a valid regex"):
        lora.LoraConfig(targets="(")
    with pytest.raises(ValueError, match=r"rank_pattern"):
        lora.LoraConfig(rank_pattern={"[": 2})
    with pytest.raises(ValueError, match="dropout"):
        lora.LoraConfig(dropout=1.0)
    with pytest.raises(TypeError, match="exclude"):
        lora.LoraConfig(exclude=[3])


def test_frozen() -> None:
    c = lora.LoraConfig()
    with pytest.raises(AttributeError):
        c.rank = 3


# every field is checked when the config is made: wrong type -> TypeError, bad value -> ValueError,
# the message starts with the field's name and shows what was given
@pytest.mark.parametrize(
    ("kw", "error", "field", "shown"),
    [
        (dict(alpha="abc"), TypeError, "alpha", "'abc'"),
        (dict(alpha=True), TypeError, "alpha", "True"),
        (dict(alpha=None), TypeError, "alpha", "None"),
        (dict(alpha=float("nan")), ValueError, "alpha", "nan"),
        (dict(alpha=float("inf")), ValueError, "alpha", "inf"),
        (dict(rank=True), TypeError, "rank", "True"),
        (dict(rank="4"), TypeError, "rank", "'4'"),
        (dict(dropout="x"), TypeError, "dropout", "'x'"),
        (dict(dropout=-0.1), ValueError, "dropout", "-0.1"),
        (dict(dropout=1.5), ValueError, "dropout", "1.5"),
        (dict(alpha_pattern={"q": "x"}), TypeError, "alpha_pattern['q']", "'x'"),
        (dict(alpha_pattern={"q": False}), TypeError, "alpha_pattern['q']", "False"),
        (dict(alpha_pattern={3: 1.0}), TypeError, "alpha_pattern", "3"),
        (dict(alpha_pattern=[("q", 1.0)]), TypeError, "alpha_pattern", "[('q', 1.0)]"),
        (dict(rank_pattern={"q": "x"}), TypeError, "rank_pattern['q']", "'x'"),
        (dict(rank_pattern={"q": True}), TypeError, "rank_pattern['q']", "True"),
        (dict(rank_pattern={("a", "b"): 2}), TypeError, "rank_pattern", "('a', 'b')"),
        (dict(rank_pattern="q"), TypeError, "rank_pattern", "'q'"),
        (dict(layers=["a"]), TypeError, "layers", "'a'"),
        (dict(layers=[1.0]), TypeError, "layers", "1.0"),
        (dict(layers=[True]), TypeError, "layers", "True"),
        (dict(layers="12"), TypeError, "layers", "'12'"),
        (dict(layers=2.5), TypeError, "layers", "2.5"),
        (dict(layers=[0, -1]), ValueError, "layers", "-1"),
        (dict(targets=5), TypeError, "targets", "5"),
        (dict(targets=[r"q", 5]), TypeError, "targets", "5"),
        (dict(targets=b"q"), TypeError, "targets", "b'q'"),
        (dict(exclude=5), TypeError, "exclude", "5"),
        (dict(init=5), TypeError, "init", "5"),
        (dict(rslora=1), TypeError, "rslora", "1"),
        (dict(rslora="yes"), TypeError, "rslora", "'yes'"),
        (dict(dora=None), TypeError, "dora", "None"),
        (dict(dtype=None), TypeError, "dtype", "None"),
        (dict(loftq_iter=1.0), TypeError, "loftq_iter", "1.0"),
        (dict(loftq_dtype=4), TypeError, "loftq_dtype", "4"),
    ],
)
def test_every_field_is_checked(kw, error, field, shown) -> None:
    with pytest.raises(error) as e:
        lora.LoraConfig(**kw)
    msg = str(e.value)
    assert type(e.value) is error
    assert msg.startswith(f"LoraConfig.{field}"), msg
    assert shown in msg, msg
    # says what was expected, not a bare Python conversion message
    assert any(w in msg for w in ("must", "takes")), msg
    assert "could not convert" not in msg and "invalid literal" not in msg


def test_accepted_inputs_are_normalised() -> None:
    c = lora.LoraConfig(
        rank=np.int64(3),
        alpha=np.float32(1.5),
        rank_pattern={"q": np.int32(2)},
        alpha_pattern={"k": 2, "v": np.float64(0.25), "o": jnp.asarray(4.0)},
        dropout=np.float32(0.5),
        rslora=np.bool_(True),
        layers=np.array([2, 0]),
        loftq_iter=np.int8(2),
    )
    assert c.rank == 3 and type(c.rank) is int
    assert c.alpha == 1.5 and type(c.alpha) is float
    assert c.rank_pattern == {"q": 2} and type(c.rank_pattern["q"]) is int
    assert c.alpha_pattern == {"k": 2.0, "v": 0.25, "o": 4.0}
    assert all(type(a) is float for a in c.alpha_pattern.values())
    assert c.dropout == 0.5 and c.rslora is True and c.loftq_iter == 2
    assert c.layers == (2, 0) and all(type(i) is int for i in c.layers)
    assert lora.LoraConfig(alpha=16).alpha == 16.0
    assert lora.LoraConfig(layers=np.int64(1)).layers == (1,)
    assert lora.LoraConfig(layers=(1, 3)).layers == lora.LoraConfig(layers=[1, 3]).layers
    assert lora.LoraConfig(targets=("a", "b")).targets == ("a", "b")
    import json

    json.dumps(c.to_dict())  # plain Python numbers: JSON-ready
    assert lora.LoraConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


# ---------------------------------------------------------------------------------------------
# hashing: a config is a jax.jit static argument and a dict key
# ---------------------------------------------------------------------------------------------
def _config(**kw) -> lora.LoraConfig:
    base = dict(rank=4, alpha=8.0, rank_pattern={"query": 2}, alpha_pattern={"mlp": 3.0})
    return lora.LoraConfig(**{**base, **kw})


def test_equal_configs_hash_equal() -> None:
    a, b = _config(), _config()
    assert a is not b and a == b and hash(a) == hash(b)
    assert hash(lora.LoraConfig()) == hash(lora.LoraConfig())
    # equal after normalisation: equal hashes too
    assert lora.LoraConfig(alpha=16) == lora.LoraConfig(alpha=16.0)
    assert hash(lora.LoraConfig(alpha=16)) == hash(lora.LoraConfig(alpha=16.0))
    x, y = lora.LoraConfig(dtype=jnp.bfloat16), lora.LoraConfig(dtype=np.dtype(jnp.bfloat16))
    assert x == y and hash(x) == hash(y)
    assert lora.LoraConfig(targets="a") == lora.LoraConfig(targets=["a"])
    table = {a: "first"}
    assert table[b] == "first" and len({a, b, _config(rank=5)}) == 2


@pytest.mark.parametrize(
    "kw",
    [
        dict(rank_pattern={"query": 3}),
        dict(rank_pattern={"query": 2, "key": 2}),
        dict(alpha_pattern={"mlp": 4.0}),
        dict(alpha_pattern={}),
        dict(layers=(0,)),
        dict(exclude="x"),
        dict(dtype=jnp.bfloat16),
    ],
)
def test_configs_that_differ_compare_and_hash_differently(kw) -> None:
    a, b = _config(), _config(**kw)
    assert a != b and hash(a) != hash(b) and len({a: 0, b: 1}) == 2


def test_pattern_order_is_part_of_equality() -> None:
    # first match wins: these two give "attn/query" different ranks, so they must differ
    qa = lora.LoraConfig(rank_pattern={"query": 4, "attn": 2})
    aq = lora.LoraConfig(rank_pattern={"attn": 2, "query": 4})
    assert (qa.rank_for("attn/query"), aq.rank_for("attn/query")) == (4, 2)
    assert qa != aq and hash(qa) != hash(aq)


def test_config_as_a_jit_static_argument() -> None:
    traces = []

    @functools.partial(jax.jit, static_argnums=1)
    def scaled(x, config):
        traces.append(config)
        return x * config.scale_for("h0/attn/query/kernel")

    x = jnp.ones(3)
    # scale = alpha / rank of the first matching rank_pattern: 8 / 2
    np.testing.assert_allclose(scaled(x, _config()), np.full(3, 8.0 / 2))
    np.testing.assert_allclose(scaled(x, _config()), np.full(3, 8.0 / 2))  # equal config: cached
    assert len(traces) == 1
    np.testing.assert_allclose(scaled(x, _config(rank_pattern={"query": 4})), np.full(3, 2.0))
    assert len(traces) == 2
    # same dict contents in another order: another first match, so no stale cache hit
    qa = lora.LoraConfig(alpha=8.0, rank_pattern={"query": 4, "attn": 2})
    aq = lora.LoraConfig(alpha=8.0, rank_pattern={"attn": 2, "query": 4})
    np.testing.assert_allclose(scaled(x, qa), np.full(3, 8.0 / 4))
    np.testing.assert_allclose(scaled(x, aq), np.full(3, 8.0 / 2))
    assert len(traces) == 4


def test_layers_pattern_picks_the_layer_component() -> None:
    """PEFT's layers_pattern: the index is read from the named component (or the next one),
    not from the first number in the path."""

    paths = [f"params/stage_{s}/block_{b}/kernel" for s in range(2) for b in range(3)]
    params = {
        "params": {
            f"stage_{s}": {f"block_{b}": {"kernel": jnp.ones((4, 4))} for b in range(3)}
            for s in range(2)
        }
    }
    by_block = lora.LoraConfig(layers=(1,), layers_pattern=r"block_\d+")
    adapted = set(adapter_entries(lora.init(jax.random.key(0), params, by_block)))
    assert adapted == {"params/stage_0/block_1/kernel", "params/stage_1/block_1/kernel"}
    first_number = lora.LoraConfig(layers=(1,))  # the default reads the stage number
    adapted = set(adapter_entries(lora.init(jax.random.key(0), params, first_number)))
    assert adapted == {p for p in paths if p.startswith("params/stage_1/")}
    # a component without a number: the index is in the next one
    nested = lora.LoraConfig(layers=(2,), layers_pattern="layers")
    assert nested.matches("params/encoder/layers/2/attn/kernel")
    assert not nested.matches("params/encoder/layers/1/attn/kernel")
    assert not nested.matches("params/decoder_2/attn/kernel")  # no 'layers' component
    with pytest.raises(ValueError, match=r"LoraConfig.layers_pattern: '\(' is not a valid regex"):
        lora.LoraConfig(layers=(1,), layers_pattern="(")
    assert lora.LoraConfig.from_dict(by_block.to_dict()) == by_block
    assert by_block != lora.LoraConfig(layers=(1,))
