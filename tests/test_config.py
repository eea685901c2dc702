"""`LoraConfig`: path matching, per-path rank/alpha/scale, serialisation, bad input."""

from __future__ import annotations

import math

import jax.numpy as jnp
import pytest

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
