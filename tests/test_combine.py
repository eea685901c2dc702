"""lora.combine against independent references: float64 numpy sums of deltas taken from
lora.merge, numpy's SVD, hand-computed TIES cases, and HuggingFace PEFT's add_weighted_adapter."""

from __future__ import annotations

import math
from typing import get_args

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import INTEROP
from support.internal import COMBINE_METHODS, Method
from support.trees import kernel_deltas

import flax_lora as lora
from flax_lora import LoraWeights


# ------------------------------------------------------------------------------------------
# helpers: deltas via lora.merge onto zeros (independent of combine)
# ------------------------------------------------------------------------------------------
def weighted_sum(params, adapter_list, weights):
    ds = [kernel_deltas(params, ad) for ad in adapter_list]
    return {p: sum(w * d[p] for w, d in zip(weights, ds, strict=True)) for p in ds[0]}


def assert_deltas_close(got, want, rtol=1e-5, atol=1e-6):
    assert got.keys() == want.keys()
    for p in want:
        scale = max(np.abs(want[p]).max(), 1e-3)
        np.testing.assert_allclose(got[p], want[p], rtol=rtol, atol=atol * scale, err_msg=p)


def random_adapters(params, rank, alpha, seed, rslora=False):
    """Nonzero adapters for every 2-D kernel of a Linen params dict, built with numpy."""
    rng = np.random.default_rng(seed)
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    out = {}
    for name, layer in params["params"].items():
        n_in, n_out = layer["kernel"].shape
        a = jnp.asarray(rng.normal(size=(n_in, rank)) / math.sqrt(n_in), jnp.float32)
        b = jnp.asarray(rng.normal(size=(rank, n_out)) / math.sqrt(rank), jnp.float32)
        w = LoraWeights(a=a, b=b, scale=scale, in_axes=(0,), kernel_shape=(n_in, n_out))
        out[name] = {"kernel": w}
    return {"params": out}


@pytest.fixture(scope="module")
def mlp():
    rng = np.random.default_rng(0)
    params = {
        "params": {
            "Dense_0": {"kernel": jnp.asarray(rng.normal(size=(7, 12)), jnp.float32)},
            "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)},
        }
    }
    ads = [
        random_adapters(params, 4, 8.0, seed=10),
        random_adapters(params, 4, 3.0, seed=11, rslora=True),
        random_adapters(params, 4, 1.0, seed=12),
    ]
    mixed = [
        random_adapters(params, 2, 5.0, seed=20),
        random_adapters(params, 6, 2.0, seed=21, rslora=True),
    ]
    return params, ads, mixed


# ------------------------------------------------------------------------------------------
# exact methods
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [(0.7, 0.3), (1.0, -1.0), (-0.5, 2.0)])
def test_cat_is_exact_weighted_sum_mixed_ranks(mlp, weights):
    params, _, mixed = mlp
    out = lora.combine(mixed, list(weights), method="cat")
    got = kernel_deltas(params, out)
    assert_deltas_close(got, weighted_sum(params, mixed, weights))
    w = out["params"]["Dense_0"]["kernel"]
    assert w.rank == 8 and w.scale == 1.0
    assert jax.tree.structure(out, is_leaf=lambda x: isinstance(x, LoraWeights)) == (
        jax.tree.structure(mixed[0], is_leaf=lambda x: isinstance(x, LoraWeights))
    )


def test_svd_full_rank_is_exact_and_default_rank(mlp):
    params, ads, mixed = mlp
    weights = [0.6, -1.3, 0.4]
    full = lora.combine(ads, weights, method="svd", rank=12)
    assert_deltas_close(kernel_deltas(params, full), weighted_sum(params, ads, weights))
    # rank above min(prod I, prod O) is lowered to it: Dense_1 is (12, 5) -> rank 5
    assert full["params"]["Dense_1"]["kernel"].rank == 5
    default = lora.combine(mixed, [1.0, 1.0], method="svd")
    assert default["params"]["Dense_0"]["kernel"].rank == 6  # max of input ranks


@pytest.mark.parametrize("rank", [1, 3])
def test_svd_low_rank_matches_numpy_truncated_svd(mlp, rank):
    params, ads, _ = mlp
    weights = [1.0, 0.5, -2.0]
    want = weighted_sum(params, ads, weights)
    for p, m in want.items():  # 2-D kernels: rows are the input axis already
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        want[p] = (u[:, :rank] * s[:rank]) @ vt[:rank]
    got = kernel_deltas(params, lora.combine(ads, weights, method="svd", rank=rank))
    assert_deltas_close(got, want, rtol=1e-4, atol=1e-5)


def test_linear_single_adapter_is_w_delta(mlp):
    params, ads, _ = mlp
    for w in (0.8, -1.7):
        for ad in ads[:2]:  # plain and rsLoRA scale
            got = kernel_deltas(params, lora.combine([ad], [w], method="linear"))
            assert_deltas_close(got, weighted_sum(params, [ad], [w]))


def test_linear_two_adapters_matches_formula(mlp):
    """a = sum sign(w s) sqrt|w s| a_i, b = sum sqrt|w s| b_i (PEFT), written out in numpy."""
    params, ads, _ = mlp
    weights = [0.9, -0.4]
    out = lora.combine(ads[:2], weights, method="linear")
    for name in ("Dense_0", "Dense_1"):
        a = 0.0
        b = 0.0
        for ad, w in zip(ads[:2], weights, strict=True):
            x = ad["params"][name]["kernel"]
            ws = w * x.scale
            a = a + np.sign(ws) * math.sqrt(abs(ws)) * np.asarray(x.a, np.float64)
            b = b + math.sqrt(abs(ws)) * np.asarray(x.b, np.float64)
        got = kernel_deltas(params, out)[f"params/{name}/kernel"]
        np.testing.assert_allclose(got, a @ b, rtol=1e-5, atol=1e-6)


def test_dare_density_one_equals_linear(mlp):
    params, ads, _ = mlp
    weights = [0.5, -1.0, 2.0]
    lin = kernel_deltas(params, lora.combine(ads, weights, "linear"))
    for method in ("dare_linear",):
        got = kernel_deltas(
            params, lora.combine(ads, weights, method, density=1.0, key=jax.random.key(3))
        )
        assert_deltas_close(got, lin)
    got = kernel_deltas(params, lora.combine(ads, weights, "magnitude_prune", density=1.0))
    assert_deltas_close(got, lin)


def test_dare_linear_keeps_about_density_and_rescales():
    big = LoraWeights(
        a=jax.random.normal(jax.random.key(0), (64, 32)) + 3.0,  # no zeros
        b=jnp.ones((32, 64)),
        scale=1.0,
        in_axes=(0,),
        kernel_shape=(64, 64),
    )
    ad = {"k": big}
    density = 0.3
    out = lora.combine([ad], [1.0], "dare_linear", density=density, key=jax.random.key(1))["k"]
    a = np.asarray(out.a)
    kept = a != 0
    assert abs(kept.mean() - density) < 0.03
    np.testing.assert_allclose(a[kept], np.asarray(big.a)[kept] / density, rtol=1e-6)
    again = lora.combine([ad], [1.0], "dare_linear", density=density, key=jax.random.key(1))["k"]
    other = lora.combine([ad], [1.0], "dare_linear", density=density, key=jax.random.key(2))["k"]
    np.testing.assert_array_equal(np.asarray(again.a), a)
    assert not np.array_equal(np.asarray(other.a), a)


def test_magnitude_prune_keeps_the_largest_fraction():
    rng = np.random.default_rng(0)
    a0, b0 = rng.normal(size=(8, 4)), rng.normal(size=(4, 6))
    ad = {
        "k": LoraWeights(
            a=jnp.asarray(a0, jnp.float32),
            b=jnp.asarray(b0, jnp.float32),
            scale=2.0,
            in_axes=(0,),
            kernel_shape=(8, 6),
        )
    }
    out = lora.combine([ad], [0.5], "magnitude_prune", density=0.25)["k"]  # w*s = 1
    for got, ref, k in ((out.a, a0, 8), (out.b, b0, 6)):
        keep = np.zeros(ref.size, bool)
        keep[np.argsort(-np.abs(ref).ravel())[:k]] = True
        want = np.where(keep.reshape(ref.shape), ref, 0.0)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
        assert (np.asarray(got) != 0).sum() == k


def _rank1(a, b, scale=1.0):
    a = jnp.asarray(a, jnp.float32)[:, None]
    b = jnp.asarray(b, jnp.float32)[None, :]
    return {
        "k": LoraWeights(a=a, b=b, scale=scale, in_axes=(0,), kernel_shape=(a.shape[0], b.shape[1]))
    }


def test_ties_sign_election_hand_built():
    ad1 = _rank1([3.0, -1.0, 2.0, 0.5], [1.0, 0.5])
    ad2 = _rank1([-1.0, -2.0, 1.0, -4.0], [2.0, -1.0])
    # density 1 (no pruning). a: elected signs (total) [+,-,+,-], means of agreeing entries.
    # b: sums [3, -0.5] -> [+,-]; entry 0 mean (1+2)/2, entry 1 only -1 agrees.
    out = lora.combine([ad1, ad2], [1.0, 1.0], "ties", density=1.0)["k"]
    np.testing.assert_allclose(np.asarray(out.a)[:, 0], [3.0, -1.5, 1.5, -4.0])
    np.testing.assert_allclose(np.asarray(out.b)[0], [1.5, -1.0])
    # density 0.5: a1 -> [3,0,2,0], a2 -> [0,-2,0,-4]; b1 -> [1,0], b2 -> [2,0].
    out = lora.combine([ad1, ad2], [1.0, 1.0], "ties", density=0.5)["k"]
    np.testing.assert_allclose(np.asarray(out.a)[:, 0], [3.0, -2.0, 2.0, -4.0])
    np.testing.assert_allclose(np.asarray(out.b)[0], [1.5, 0.0])


def test_ties_majority_sign_methods():
    ads = [_rank1([5.0, 1.0], [1.0]), _rank1([-1.0, 1.0], [1.0]), _rank1([-1.0, -3.0], [1.0])]
    total = lora.combine(ads, [1.0] * 3, "ties", density=1.0)["k"]
    freq = lora.combine(ads, [1.0] * 3, "ties", density=1.0, majority_sign_method="frequency")
    # entry 0: sum 3 > 0 (total: keep 5) but 2 of 3 negative (frequency: mean of -1, -1)
    # entry 1: sum -1 < 0 (total: keep -3) but 2 of 3 positive (frequency: mean of 1, 1)
    np.testing.assert_allclose(np.asarray(total.a)[:, 0], [5.0, -3.0])
    np.testing.assert_allclose(np.asarray(freq["k"].a)[:, 0], [-1.0, 1.0])


def test_ties_svd_on_deltas_hand_built():
    ad1 = _rank1([1.0, -2.0], [1.0, 1.0])  # delta [[1, 1], [-2, -2]]
    ad2 = _rank1([-3.0, -1.0], [1.0, 1.0])  # delta [[-3, -3], [-1, -1]]
    out = lora.combine([ad1, ad2], [1.0, 1.0], "ties_svd", density=1.0, rank=2)
    got = np.asarray(lora.delta(out["k"]))
    # row 0: sum -2 -> keep -3; row 1: both negative -> mean -1.5
    np.testing.assert_allclose(got, [[-3.0, -3.0], [-1.5, -1.5]], atol=1e-5)


# ------------------------------------------------------------------------------------------
# Conv 1-D / 2-D / 3-D (PEFT #3769) and DenseGeneral
# ------------------------------------------------------------------------------------------
def conv_adapters(ksize, n_in, n_out, rank, alpha, seed):
    """A conv adapter in Flax's layout: kernel (*k, in, out), input axes = spatial + in."""
    rng = np.random.default_rng(seed)
    nd = len(ksize)
    a = jnp.asarray(rng.normal(size=(*ksize, n_in, rank)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(rank, n_out)), jnp.float32)
    w = LoraWeights(
        a=a,
        b=b,
        scale=alpha / rank,
        in_axes=tuple(range(nd + 1)),
        kernel_shape=(*ksize, n_in, n_out),
        kind="conv",
    )
    return {"params": {"Conv_0": {"kernel": w}}}


@pytest.mark.parametrize("ksize", [(3,), (3, 3), (2, 2, 2)])
def test_svd_and_cat_on_conv(ksize):
    params = {"params": {"Conv_0": {"kernel": jnp.zeros((*ksize, 3, 4))}}}
    ads = [conv_adapters(ksize, 3, 4, 2, 4.0, seed=1), conv_adapters(ksize, 3, 4, 3, 1.0, seed=2)]
    weights = [1.5, -0.5]
    want = weighted_sum(params, ads, weights)
    assert_deltas_close(kernel_deltas(params, lora.combine(ads, weights, "cat")), want)
    assert_deltas_close(kernel_deltas(params, lora.combine(ads, weights, "svd", rank=5)), want)
    # rank 1: numpy truncated SVD of the (prod k * in, out) matrix
    ((path, m),) = want.items()
    u, s, vt = np.linalg.svd(m.reshape(-1, m.shape[-1]), full_matrices=False)
    want1 = {path: ((u[:, :1] * s[:1]) @ vt[:1]).reshape(m.shape)}
    got1 = kernel_deltas(params, lora.combine(ads, weights, "svd", rank=1))
    assert_deltas_close(got1, want1, rtol=1e-4, atol=1e-5)


def test_svd_dense_general_output_axes():
    """A DenseGeneral kernel (4, 2, 3) with input axis 0: SVD over the (4, 6) matrix."""
    rng = np.random.default_rng(3)
    params = {"params": {"DenseGeneral_0": {"kernel": jnp.zeros((4, 2, 3))}}}

    def adapter():
        w = LoraWeights(
            a=jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
            b=jnp.asarray(rng.normal(size=(2, 2, 3)), jnp.float32),
            scale=0.5,
            in_axes=(0,),
            kernel_shape=(4, 2, 3),
        )
        return {"params": {"DenseGeneral_0": {"kernel": w}}}

    ads = [adapter(), adapter()]
    want = weighted_sum(params, ads, [1.0, 2.0])
    assert_deltas_close(kernel_deltas(params, lora.combine(ads, [1.0, 2.0], "svd", rank=4)), want)


# ------------------------------------------------------------------------------------------
# PEFT itself as the reference
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,density",
    [
        ("linear", None),
        ("cat", None),
        ("svd", None),
        ("ties", 0.5),
        ("magnitude_prune", 0.6),
        ("ties_svd", 0.7),
        ("magnitude_prune_svd", 0.4),
    ],
)
def test_matches_peft_add_weighted_adapter(method, density):
    torch = pytest.importorskip("torch", reason=INTEROP)
    peft = pytest.importorskip("peft", reason=INTEROP)
    n_in, n_out, r = 6, 5, 4
    params = {"params": {"lin": {"kernel": jnp.zeros((n_in, n_out))}}}
    alphas, weights = (8.0, 3.0), (0.8, -0.6)
    ads = [random_adapters(params, r, al, seed=i) for i, al in enumerate(alphas)]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(n_in, n_out, bias=False)

        def forward(self, x):
            return self.lin(x)

    names = ["x", "y"]
    model = None
    for name, al in zip(names, alphas, strict=True):
        cfg = peft.LoraConfig(r=r, lora_alpha=al, target_modules=["lin"], init_lora_weights=False)
        if model is None:
            model = peft.get_peft_model(Net(), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    layer = model.base_model.model.lin
    with torch.no_grad():
        for name, ad in zip(names, ads, strict=True):
            w = ad["params"]["lin"]["kernel"]
            layer.lora_A[name].weight.copy_(torch.tensor(np.asarray(w.a).T))
            layer.lora_B[name].weight.copy_(torch.tensor(np.asarray(w.b).T))
    kwargs = {} if density is None else {"density": density}
    model.add_weighted_adapter(names, list(weights), "combo", combination_type=method, **kwargs)
    with torch.no_grad():
        want = layer.get_delta_weight("combo").double().numpy().T
    got = kernel_deltas(params, lora.combine(ads, list(weights), method, density=density))
    np.testing.assert_allclose(got["params/lin/kernel"], want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------
def test_errors_name_the_problem(mlp):
    _, ads, mixed = mlp
    only0 = {"params": {"Dense_0": ads[1]["params"]["Dense_0"]}}
    with pytest.raises(ValueError, match="Dense_1"):
        lora.combine([ads[0], only0], [1.0, 1.0], "cat")
    with pytest.raises(ValueError, match=r"params/Dense_0/kernel.*ranks \[2, 6\]"):
        lora.combine(mixed, [1.0, 1.0], "linear")
    with pytest.raises(ValueError, match="one weight per adapter"):
        lora.combine(ads, [1.0, 1.0], "cat")
    with pytest.raises(ValueError, match="method must be one of"):
        lora.combine(ads[:2], [1.0, 1.0], "average")
    with pytest.raises(ValueError, match="key"):
        lora.combine(ads[:2], [1.0, 1.0], "dare_ties", density=0.5)
    with pytest.raises(ValueError, match="density"):
        lora.combine(ads[:2], [1.0, 1.0], "ties")
    with pytest.raises(ValueError, match="density"):
        lora.combine(ads[:2], [1.0, 1.0], "ties", density=1.5)
    with pytest.raises(ValueError, match="rank applies"):
        lora.combine(ads[:2], [1.0, 1.0], "cat", rank=3)
    with pytest.raises(TypeError, match="list of adapter sets"):
        lora.combine({"a": ads[0], "b": ads[1]}, [1.0, 1.0], "cat")
    w = ads[0]["params"]["Dense_0"]["kernel"]
    bad_axes = {"params": {**ads[0]["params"], "Dense_0": {"kernel": w.replace(in_axes=(1,))}}}
    with pytest.raises(ValueError, match=r"'params/Dense_0/kernel' disagree on in_axes"):
        lora.combine([ads[0], bad_axes], [1.0, 1.0], "svd")
    bad_shape = {
        "params": {**ads[0]["params"], "Dense_1": {"kernel": w.replace(kernel_shape=(7, 13))}}
    }
    with pytest.raises(ValueError, match=r"'params/Dense_1/kernel' disagree on kernel_shape"):
        lora.combine([ads[0], bad_shape], [1.0, 1.0], "svd")


def test_combine_under_jit_with_traced_weights(mlp):
    params, ads, _ = mlp
    fn = jax.jit(lambda w: lora.combine(ads[:2], w, "svd", rank=8))
    got = kernel_deltas(params, fn(jnp.array([0.3, -1.1])))
    assert_deltas_close(got, weighted_sum(params, ads[:2], [0.3, -1.1]), rtol=1e-4, atol=1e-5)


def test_the_method_type_names_the_method_table() -> None:
    """`Method` (the type of ``method``) and `COMBINE_METHODS` (what runs) name the same
    methods, and each factor-form method has an SVD-form twin (PEFT's name) with its steps."""
    assert set(get_args(Method)) == set(COMBINE_METHODS)
    factor = {m for m, spec in COMBINE_METHODS.items() if spec.form.equal_ranks}
    svd = {m for m, spec in COMBINE_METHODS.items() if spec.form.takes_rank}
    twin = {m: "svd" if m == "linear" else f"{m}_svd" for m in factor}  # PEFT's names
    assert set(twin.values()) == svd
    for m, s in twin.items():
        assert (COMBINE_METHODS[m].prune, COMBINE_METHODS[m].merge) == (
            COMBINE_METHODS[s].prune,
            COMBINE_METHODS[s].merge,
        )
