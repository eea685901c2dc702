"""lora.stack / unstack and the reference routed forward, checked against running each example
alone through ``model.apply(lora.merge(params, adapters_i), x_i)`` (or the base for id -1)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support.internal import gather
from support.trees import adapter_entries, kernel_deltas

import flax_lora as lora
from flax_lora import LoraWeights

VOCAB, T, B = 11, 5, 6
IDS = [0, 1, -1, 2, 1, 0]


def tokens() -> jax.Array:
    return jax.random.randint(jax.random.key(7), (B, T), 0, VOCAB)


def configs() -> list[lora.LoraConfig]:
    """Mixed ranks and scales (rsLoRA included), all nonzero."""
    return [
        lora.LoraConfig(rank=2, alpha=4.0, init="random"),
        lora.LoraConfig(rank=4, alpha=2.0, init="random", rslora=True),
        lora.LoraConfig(rank=3, alpha=0.5, init="random"),
    ]


class LinenNet(nn.Module):
    """Embed -> self-attention (DenseGeneral kernels) -> Conv 1-D -> Dense."""

    @nn.compact
    def __call__(self, x):
        h = nn.Embed(VOCAB, 8)(x)
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(h)
        h = nn.relu(nn.Conv(6, (3,))(h))
        return nn.Dense(3)(h.mean(1))


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, 8, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs
        )
        self.conv = nnx.Conv(8, 6, kernel_size=(3,), rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.conv(self.attn(self.embed(x))))
        return self.head(h.mean(1))


def linen_setup():
    model = LinenNet()
    x = tokens()
    params = jax.jit(model.init)(jax.random.key(0), x)
    return model.apply, params, x


def nnx_setup():
    graphdef, params, rest = nnx.split(NnxNet(nnx.Rngs(0)), nnx.Param, ...)
    apply_fn = lambda p, x: nnx.merge(graphdef, p, rest)(x)
    return apply_fn, params, tokens()


@pytest.fixture(scope="module", params=["linen", "nnx"])
def setup(request):
    apply_fn, params, x = linen_setup() if request.param == "linen" else nnx_setup()
    probe = lambda p: apply_fn(p, x)
    ads = [lora.init(jax.random.key(10 + i), params, cfg, probe) for i, cfg in enumerate(configs())]
    return apply_fn, params, x, ads


# ------------------------------------------------------------------------------------------
# stacked representation
# ------------------------------------------------------------------------------------------
def test_stack_shapes_padding_and_unstack(setup):
    _, params, _, ads = setup
    stacked = lora.stack(ads)
    entries = adapter_entries(stacked)
    originals = [adapter_entries(ad) for ad in ads]
    assert entries.keys() == originals[0].keys()
    assert len(entries) == 7  # embed, query, key, value, out, conv, dense
    for path, w in entries.items():
        o = [t[path] for t in originals]
        assert w.a.shape == (3, *o[0].a.shape[:-1], 4), path
        assert w.b.shape == (3, 4, *o[0].b.shape[1:]), path
        assert w.ranks == (2, 4, 3)
        for k, r in enumerate(w.ranks):  # padding is zeros
            assert not np.any(np.asarray(w.a[k, ..., r:])) and not np.any(np.asarray(w.b[k, r:]))
    for i, ad in enumerate(ads):
        got = kernel_deltas(params, lora.unstack(stacked, i))
        want = kernel_deltas(params, ad)
        for p in want:
            np.testing.assert_allclose(got[p], want[p], rtol=1e-5, atol=1e-6, err_msg=p)


def test_gather_gives_each_examples_delta(setup):
    """The contract the factored routing relies on: a[ids] @ b[ids] is adapter ids[j]'s delta."""
    _, params, _, ads = setup
    stacked = lora.stack(ads)
    ids = jnp.asarray(IDS)
    want = [kernel_deltas(params, ad) for ad in ads]
    for path, w in adapter_entries(stacked).items():
        a, b = gather(w, ids)
        assert a.shape == (B, *w.a.shape[1:]) and b.shape == (B, *w.b.shape[1:])
        n_in = int(np.prod(w.in_shape))
        d = np.einsum(
            "bir,bro->bio",
            np.asarray(a, np.float64).reshape(B, n_in, -1),
            np.asarray(b, np.float64).reshape(B, w.rank, -1),
        )
        order = w.in_axes + w.out_axes
        inverse = [order.index(i) for i in range(len(order))]
        for j, k in enumerate(IDS):
            dj = d[j].reshape(w.in_shape + w.out_shape).transpose(inverse)
            ref = np.zeros(w.kernel_shape) if k < 0 else want[k][path]
            np.testing.assert_allclose(dj, ref, rtol=1e-5, atol=1e-6, err_msg=f"{path} ex {j}")


def routed_apply(apply_fn, params, stacked, ids, x):
    """The routed forward in mode "merged": each example with its own adapter merged in."""
    return lora.wrap(apply_fn, mode="merged")(params, stacked, x, lora_ids=ids)


# ------------------------------------------------------------------------------------------
# routed forward vs each example alone through its own merged model
# ------------------------------------------------------------------------------------------
def test_routed_apply_equals_per_example_merged(setup):
    apply_fn, params, x, ads = setup
    stacked = lora.stack(ads)
    traces = []

    @jax.jit
    def routed(params, stacked, ids, x):
        traces.append(1)
        return routed_apply(apply_fn, params, stacked, ids, x)

    got = np.asarray(routed(params, stacked, jnp.asarray(IDS), x))
    single = jax.jit(lambda p, ad, xi: apply_fn(lora.merge(p, ad), xi))
    base = jax.jit(apply_fn)
    for j, k in enumerate(IDS):
        xj = x[j : j + 1]
        want = base(params, xj) if k < 0 else single(params, ads[k], xj)
        np.testing.assert_allclose(got[j], np.asarray(want)[0], rtol=2e-5, atol=2e-6)
    # the adapters matter: rows routed to different adapters differ from the base
    base_all = np.asarray(base(params, x))
    assert np.abs(got[0] - base_all[0]).max() > 1e-3
    np.testing.assert_allclose(got[2], base_all[2], rtol=2e-5, atol=2e-6)
    # one compilation for any ids
    routed(params, stacked, jnp.asarray([2, 2, 0, -1, -1, 1]), x)
    assert len(traces) == 1


def test_traced_out_of_range_ids_run_the_base():
    apply_fn, params, x = linen_setup()
    ads = [lora.init(jax.random.key(1), params, configs()[0], lambda p: apply_fn(p, x))]
    stacked = lora.stack(ads)
    fn = jax.jit(functools.partial(routed_apply, apply_fn))
    got = fn(params, stacked, jnp.asarray([5, -1, 0, 0, 0, 0]), x)
    base = apply_fn(params, x)
    np.testing.assert_allclose(got[:2], base[:2], rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------
def dense_adapters(n_in, n_out, rank, name="Dense_0"):
    w = LoraWeights(
        a=jnp.ones((n_in, rank)), b=jnp.ones((rank, n_out)), scale=1.0, in_axes=(0,),
        kernel_shape=(n_in, n_out),
    )  # fmt: skip
    return {"params": {name: {"kernel": w}}}


def test_errors():
    ad = dense_adapters(3, 2, 1)
    with pytest.raises(ValueError, match=r"'params/Dense_0/kernel' disagree on kernel_shape"):
        lora.stack([ad, dense_adapters(4, 2, 1)])
    with pytest.raises(ValueError, match="Dense_1"):
        lora.stack([ad, dense_adapters(3, 2, 1, name="Dense_1")])
    with pytest.raises(TypeError, match="list of adapter sets"):
        lora.stack({"a": ad})
    stacked = lora.stack([ad, dense_adapters(3, 2, 2)])
    with pytest.raises(ValueError, match="out of range"):
        lora.unstack(stacked, 2)
    params = {"params": {"Dense_0": {"kernel": jnp.zeros((3, 2))}}}
    apply_fn = lambda p, x: x @ p["params"]["Dense_0"]["kernel"]
    x = jnp.ones((3, 3))
    with pytest.raises(ValueError, match=r"\[-1, 2\).*\[2\]"):
        routed_apply(apply_fn, params, stacked, [0, 2, -1], x)
    with pytest.raises(ValueError, match=r"\[-2\]"):
        routed_apply(apply_fn, params, stacked, [0, -2, -1], x)
    with pytest.raises(ValueError, match="batch"):
        routed_apply(apply_fn, params, stacked, [0, 1], x)
    with pytest.raises(TypeError, match="integers"):
        routed_apply(apply_fn, params, stacked, [0.0, 1.0, 0.0], x)
    with pytest.raises(TypeError, match=r"lora\.stack"):
        routed_apply(apply_fn, params, ad, [0, 0, 0], x)
    # a small exact case: ids [1, -1, 0] on a ones input
    y = routed_apply(apply_fn, params, stacked, jnp.asarray([1, -1, 0]), x)
    np.testing.assert_allclose(np.asarray(y), [[6.0, 6.0], [0.0, 0.0], [3.0, 3.0]])
