"""PEFT's target conventions in `LoraConfig`: ``targets="all-linear"`` and plain module names.

The expected kernels are written by hand from PEFT's rules (`support.target_models`): PEFT's
``"all-linear"`` adapts every linear layer but the output layer; a plain name ``t`` selects a
module named ``key`` when ``key == t or key.endswith("." + t)``, here on paths joined with "/".
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.compare import rel_err
from support.target_models import ALL_LINEAR, ATTN, IDS, LMS, ExpertMLP, linen_lm

import flax_lora as lora


def _adapted(params, config, probe=None) -> list[str]:
    shapes = jax.eval_shape(lambda p: lora.init(jax.random.key(0), p, config, probe), params)
    return sorted(
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in kp[:-1])
        for kp, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]
        if str(getattr(kp[-1], "name", "")) == "a"
    )


@pytest.mark.parametrize("kind", sorted(LMS))
def test_all_linear_with_probe(kind: str) -> None:
    """Attention (DenseGeneral), Einsum and MLP kernels; not the embedding, the convolution or
    the head; factored == merged with those adapters."""
    apply, params, prefix = LMS[kind]()
    probe = lambda p: apply(p, IDS)
    config = lora.LoraConfig(rank=2, targets="all-linear", init="random")
    assert _adapted(params, config, probe) == sorted(prefix + p for p in ALL_LINEAR)
    skipped = lora.select(params, config, probe).skipped
    assert "an embedding" in skipped[prefix + "embed/embedding"]
    assert "a convolution" in skipped[prefix + "conv/kernel"]
    assert "output head" in skipped[prefix + "head/kernel"]
    adapters = lora.init(jax.random.key(1), params, config, probe)
    factored = lora.wrap(apply, mode="factored")(params, adapters, IDS)
    merged = apply(lora.merge(params, adapters), IDS)
    assert rel_err(factored, merged) < 1e-5


def test_all_linear_without_probe() -> None:
    """Without a probe: the 2-D leaves named ``kernel`` (fc1, fc2); the head found by its output
    size, the vocabulary of the embedding; 3-D kernels left out with the hint to pass a probe."""
    _, params, prefix = linen_lm()
    config = lora.LoraConfig(targets="all-linear")
    assert _adapted(params, config) == [prefix + "fc1/kernel", prefix + "fc2/kernel"]
    skipped = lora.select(params, config).skipped
    head = skipped[prefix + "head/kernel"]
    assert "number of rows of the embedding 'params/embed/embedding'" in head
    for path in [*ATTN, "proj/kernel", "conv/kernel"]:
        assert "pass probe=" in skipped[prefix + path], path


def test_all_linear_expert_kernel_and_plain_mlp_head() -> None:
    """An expert kernel (einsum with the expert axis as a batch dimension) is linear; the head of
    a model without embedding is found by its use (its product is the output)."""
    model = ExpertMLP()
    x = np.ones((5, 8), np.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    probe = lambda p: model.apply(p, x)
    config = lora.LoraConfig(targets="all-linear")
    assert _adapted(params, config, probe) == ["params/down/kernel", "params/experts_up"]
    adapters = jax.eval_shape(lambda p: lora.init(jax.random.key(0), p, config, probe), params)
    assert adapters["params"]["experts_up"].expert_axes == (0,)


def test_all_linear_spelling_and_round_trip() -> None:
    assert lora.LoraConfig(targets="ALL-LINEAR").targets == "all-linear"  # PEFT lowercases
    config = lora.LoraConfig(targets="all-linear", exclude=["fc1"])
    assert lora.LoraConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["targets"] == "all-linear"
    with pytest.raises(ValueError, match=r"LoraConfig.targets: 'all-linear' .* stands alone"):
        lora.LoraConfig(targets=["all-linear", "head"])
    _, params, prefix = LMS["linen"]()
    probe = lambda p: LMS["linen"]()[0](p, IDS)
    picked = _adapted(params, config, probe)
    assert picked == sorted(prefix + p for p in ALL_LINEAR if p != "fc1/kernel")


@pytest.mark.parametrize("kind", sorted(LMS))
@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["query", "value"], ["attn/query/kernel", "attn/value/kernel"]),
        ("fc1", ["fc1/kernel"]),
        (["out", "fc2"], ["attn/out/kernel", "fc2/kernel"]),
        ("embedding", ["embed/embedding"]),
        # regexes (a "/" or a metacharacter) keep re.fullmatch on the whole path
        (r".*/(query|value)/kernel", ["attn/query/kernel", "attn/value/kernel"]),
        (r".*(fc\d)/kernel", ["fc1/kernel", "fc2/kernel"]),
    ],
)
def test_plain_names(kind: str, targets, expected: list[str]) -> None:
    """PEFT's ``target_modules=["query", "value"]`` on Linen and NNX models with a probe: the
    modules' kernels, never their (2-D) attention biases."""
    apply, params, prefix = LMS[kind]()
    probe = lambda p: apply(p, IDS)
    got = _adapted(params, lora.LoraConfig(targets=targets), probe)
    assert got == sorted(prefix + p for p in expected)


def test_plain_name_rule() -> None:
    """Which entries are plain names, and what they match (PEFT's ``endswith("." + name)``)."""
    c = lora.LoraConfig(targets=["q_proj", "up-proj", "gating_einsum"])
    assert c.matches("params/layers_0/self_attn/q_proj/kernel")
    assert c.matches("layers/0/self_attn/q_proj/kernel")  # NNX: no collection
    assert c.matches("q_proj/kernel") and c.matches("q_proj")
    assert c.matches("params/layer_0/mlp/gating_einsum")  # a leaf's name
    assert c.matches("params/h/mlp/up-proj/kernel")
    assert not c.matches("params/layers_0/self_attn/k_proj/kernel")
    assert not c.matches("params/layers_0/self_attn/xq_proj/kernel")  # a whole component
    assert not c.matches("params/q_proj/inner/kernel")  # not the module holding the kernel
    # with "/" or a regex metacharacter an entry is a regex on the whole path
    assert not lora.LoraConfig(targets="attn/q_proj").matches("a/attn/q_proj/kernel")
    assert lora.LoraConfig(targets="attn/q_proj/kernel").matches("attn/q_proj/kernel")
    dotted = lora.LoraConfig(targets="self_attn.q_proj")  # PEFT's dotted name: a regex here
    assert not dotted.matches("a/self_attn/q_proj/kernel") and dotted.matches("self_attn/q_proj")
    # exclude takes plain names too
    e = lora.LoraConfig(exclude=["k_proj"])
    assert not e.matches("params/l/k_proj/kernel") and e.matches("params/l/q_proj/kernel")


def test_plain_names_in_quantize() -> None:
    _, params, prefix = linen_lm()
    q = lora.quantize(params, targets=["fc1", "head"], dtype="int8")
    is_q = lambda x: isinstance(x, lora.QuantizedKernel)
    flat = jax.tree_util.tree_flatten_with_path(q, is_leaf=is_q)[0]
    quantized = {"/".join(str(k.key) for k in kp) for kp, x in flat if is_q(x)}
    assert quantized == {prefix + "fc1/kernel", prefix + "head/kernel"}


class _Head(nn.Module):
    """Embed, an MLP block added to the stream, then ``finish(stream, head Dense)``."""

    finish: str = "plain"

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(11, 8, name="embed")(ids)
        h = h + nn.Dense(8, name="fc")(jax.nn.relu(h))
        head = nn.Dense(11, name="head")
        if self.finish == "softcap":  # Gemma's final logit softcapping, then log_softmax
            return jax.nn.log_softmax(jnp.tanh(head(nn.LayerNorm()(h)) / 30.0) * 30.0)
        if self.finish == "pair":  # (logits, hidden states)
            return head(h), h
        if self.finish == "hidden":  # an encoder without head: the stream is the output
            return h
        k = self.param("out", nn.initializers.normal(), (8, 11))
        return jax.jit(lambda h, k: h @ k)(h, k)  # a head inside a nested jit


@pytest.mark.parametrize(
    ("finish", "heads"),
    [("softcap", ["head"]), ("pair", ["head"]), ("hidden", []), ("plain", ["out"])],
)
def test_head_rule(finish: str, heads: list[str]) -> None:
    """The head is a kernel whose product is an output, up to side values (a bias, a norm's
    scale, a softcap, log_softmax), also inside a nested jit; a projection added to the stream
    is never one."""
    model = _Head(finish)
    params = jax.eval_shape(model.init, jax.random.key(0), IDS)
    s = lora.select(params, lora.LoraConfig(targets="all-linear"), lambda p: model.apply(p, IDS))
    found = sorted(p.split("/")[1] for p, why in s.skipped.items() if "output head" in why)
    assert found == heads
    assert s.picked == ["params/fc/kernel"]
