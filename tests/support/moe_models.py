"""Small mixture-of-experts MLP blocks (Linen and NNX; einsum, ragged_dot and loop dispatch; one
block or an ``nn.scan`` / ``nnx.scan`` stack) and their float64 numpy references, written
independently of flax_lora, for the expert-kernel tests (issue 16).

A block routes each token to its ``K`` best experts (``lax.top_k`` of the ``router`` logits,
combine weights the softmax of those ``K`` logits, as Mixtral) and sums the weighted outputs of
the expert MLPs ``silu(x @ w_in[e]) @ w_out[e]``. Parameters (a Linen variables dict; an NNX
state has the same paths without ``params/``):

    params/router/kernel     (D, E)   a Dense kernel
    params/experts/w_in      (E, D, F) expert axis 0, input axis 1
    params/experts/w_out     (E, F, D) expert axis 0, input axis 1;
                             (E, D, F) with ``transposed_out`` (input axis 2: PyTorch's
                             (experts, out, in) layout, as Mixtral's ``down_proj``)

Dispatch styles, all dropless and numerically the same block:

- ``"einsum"``: every expert sees every token, ``jnp.einsum("etd,edf->etf", xe, w_in)`` (the
  expert axis a batch dimension of ``dot_general``), then a dense ``(T, E)`` combine matrix that
  is zero outside each token's top-K;
- ``"ragged"``: the ``T * K`` assignments sorted by expert, ``jax.lax.ragged_dot(xs, w_in,
  group_sizes)`` (``ragged_dot_general`` for ``transposed_out``), un-sorted with a scatter-add
  (MaxText / megablox style);
- ``"loop"``: a Python loop over experts (``w_in[e]``: neither a batch dimension nor a group
  axis; the existing per-kernel rules must keep working).

The scan-stacked variants apply ``x + block(x)`` per layer with kernels ``(L, E, D, F)``
(paths ``params/layers/moe/...`` for Linen, ``layers/...`` for NNX).

The reference (`ref_output`) merges ``W_e = W0_e + scale * a_e @ b_e`` in float64 for every
adapted kernel (factors ``a (*C, *I, r)``, ``b (*C, r, *O)``, ``C`` the carried axes: layer and
expert) and runs the block in float64 numpy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

E, D, F, K, L = 4, 8, 16, 2, 2  # experts, model width, expert MLP width, top-k, scan layers
DISPATCHES = ("einsum", "ragged", "loop")
X = np.random.default_rng(0).normal(size=(2, 5, D)).astype(np.float32)  # (batch, seq, D)


# -- the block as a pure function of its kernels --------------------------------------------------
def route(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-``k`` experts of each token and their combine weights (softmax of the top-k logits):
    ``(weights (T, k), experts (T, k))``."""
    top, experts = jax.lax.top_k(logits, k)
    return jax.nn.softmax(top, axis=-1), experts


def combine_matrix(weights: jax.Array, experts: jax.Array, num_experts: int) -> jax.Array:
    """The dense ``(T, E)`` combine weights: each token's top-k weights, zero elsewhere."""
    return jnp.einsum(
        "tk,tke->te", weights, jax.nn.one_hot(experts, num_experts, dtype=weights.dtype)
    )


def _einsum_experts(
    x: jax.Array, w_in: jax.Array, w_out: jax.Array, transposed_out: bool
) -> jax.Array:
    xe = jnp.broadcast_to(x, (w_in.shape[0], *x.shape))  # (E, T, D): every expert, every token
    h = jax.nn.silu(jnp.einsum("etd,edf->etf", xe, w_in))
    return jnp.einsum("etf,edf->etd" if transposed_out else "etf,efd->etd", h, w_out)


def _loop_experts(
    x: jax.Array, w_in: jax.Array, w_out: jax.Array, transposed_out: bool
) -> jax.Array:
    outs = []
    for e in range(w_in.shape[0]):
        w = w_out[e].T if transposed_out else w_out[e]
        outs.append(jax.nn.silu(x @ w_in[e]) @ w)
    return jnp.stack(outs)


# ragged_dot_general's dimension numbers for a (T, F) @ (E, D, F) product (rhs contracts axis 2)
_RAGGED_TRANSPOSED = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (2,)), ((), ())),
    lhs_ragged_dimensions=(0,),
    rhs_group_dimensions=(0,),
)


def _ragged_block(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    w_in: jax.Array,
    w_out: jax.Array,
    transposed_out: bool,
) -> jax.Array:
    k = experts.shape[-1]
    flat = experts.reshape(-1)  # (T * k,) the expert of each assignment
    order = jnp.argsort(flat, stable=True)
    token = order // k  # the token of each sorted assignment
    sizes = jnp.bincount(flat, length=w_in.shape[0]).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(x[token], w_in, sizes))
    if transposed_out:
        y = jax.lax.ragged_dot_general(h, w_out, sizes, _RAGGED_TRANSPOSED)
    else:
        y = jax.lax.ragged_dot(h, w_out, sizes)
    y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
    return jnp.zeros((x.shape[0], y.shape[-1]), y.dtype).at[token].add(y)


def moe_block(
    x: jax.Array,
    logits: jax.Array,
    w_in: jax.Array,
    w_out: jax.Array,
    *,
    dispatch: str,
    k: int = K,
    transposed_out: bool = False,
) -> jax.Array:
    """The experts' weighted sum for tokens ``x (..., D)`` with router ``logits (..., E)``."""
    x = jnp.asarray(x)  # a numpy input cannot be indexed by traced expert ids
    lead = x.shape[:-1]
    x2, logits2 = x.reshape(-1, x.shape[-1]), logits.reshape(-1, logits.shape[-1])
    weights, experts = route(logits2, k)
    if dispatch == "ragged":
        y = _ragged_block(x2, weights, experts, w_in, w_out, transposed_out)
    else:
        run = _einsum_experts if dispatch == "einsum" else _loop_experts
        ye = run(x2, w_in, w_out, transposed_out)  # (E, T, D)
        y = jnp.einsum("etd,te->td", ye, combine_matrix(weights, experts, w_in.shape[0]))
    return y.reshape(*lead, y.shape[-1])


def _expert_shapes(d: int, f: int, e: int, transposed_out: bool) -> tuple[tuple, tuple]:
    return (e, d, f), ((e, d, f) if transposed_out else (e, f, d))


# -- Linen ----------------------------------------------------------------------------------------
class LinenExperts(nn.Module):
    """The expert kernels ``w_in`` and ``w_out`` and the dispatch."""

    dispatch: str
    hidden: int = F
    transposed_out: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, logits: jax.Array) -> jax.Array:
        init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        s_in, s_out = _expert_shapes(
            x.shape[-1], self.hidden, logits.shape[-1], self.transposed_out
        )
        w_in = self.param("w_in", init, s_in, self.param_dtype)
        w_out = self.param("w_out", init, s_out, self.param_dtype)
        return moe_block(
            x, logits, w_in, w_out, dispatch=self.dispatch, transposed_out=self.transposed_out
        )


class LinenMoe(nn.Module):
    """A top-``K`` mixture-of-experts MLP: ``router`` (Dense, no bias) and ``experts``."""

    dispatch: str = "einsum"
    experts: int = E
    hidden: int = F
    transposed_out: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        logits = nn.Dense(
            self.experts, use_bias=False, param_dtype=self.param_dtype, name="router"
        )(x)
        return LinenExperts(
            self.dispatch, self.hidden, self.transposed_out, self.param_dtype, name="experts"
        )(x, logits.astype(jnp.float32))


class _LinenScanBody(nn.Module):
    dispatch: str
    transposed_out: bool
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        moe = LinenMoe(
            self.dispatch,
            transposed_out=self.transposed_out,
            param_dtype=self.param_dtype,
            name="moe",
        )
        return x + moe(x), None


class LinenMoeStack(nn.Module):
    """``L`` residual MoE blocks stacked by ``nn.scan`` (kernels ``(L, E, D, F)``)."""

    dispatch: str = "einsum"
    layers: int = L
    transposed_out: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        stack = nn.scan(
            _LinenScanBody,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.layers,
        )
        return stack(self.dispatch, self.transposed_out, self.param_dtype, name="layers")(x, None)[
            0
        ]


# -- NNX ------------------------------------------------------------------------------------------
class NnxMoe(nnx.Module):
    """The NNX twin of `LinenMoe`: ``router`` (an ``nnx.Linear``) and ``experts/{w_in,w_out}``."""

    def __init__(
        self,
        dispatch: str,
        *,
        transposed_out: bool = False,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.dispatch, self.transposed_out = dispatch, transposed_out
        self.router = nnx.Linear(D, E, use_bias=False, param_dtype=param_dtype, rngs=rngs)
        s_in, s_out = _expert_shapes(D, F, E, transposed_out)
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.experts = nnx.Dict(
            w_in=nnx.Param(init(rngs.params(), s_in, param_dtype)),
            w_out=nnx.Param(init(rngs.params(), s_out, param_dtype)),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        logits = self.router(x).astype(jnp.float32)
        w_in, w_out = self.experts["w_in"][...], self.experts["w_out"][...]
        return moe_block(
            x, logits, w_in, w_out, dispatch=self.dispatch, transposed_out=self.transposed_out
        )


class NnxMoeStack(nnx.Module):
    """``L`` residual `NnxMoe` blocks made by ``nnx.vmap`` and run by ``nnx.scan``."""

    def __init__(self, dispatch: str, *, transposed_out: bool = False, rngs: nnx.Rngs) -> None:
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs: nnx.Rngs) -> NnxMoe:
            return NnxMoe(dispatch, transposed_out=transposed_out, rngs=rngs)

        self.layers = make(rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(x: jax.Array, block: NnxMoe) -> jax.Array:
            return x + block(x)

        return step(x, self.layers)


# -- the cases ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExpertAxes:
    """The axes of one kernel, written by hand: ``carried`` (scan layer axis, then expert axis),
    ``inputs`` (contracted with the tokens), the rest are outputs."""

    carried: tuple[int, ...]
    inputs: tuple[int, ...]


@dataclasses.dataclass
class MoeCase:
    """A model instance: ``apply(params, x)``, its params (seeded numpy values), an input, and
    each kernel's path -> `ExpertAxes` (the router included: no carried axis unless stacked)."""

    apply: Callable[[Any, Any], Any]
    params: Any
    x: np.ndarray
    kernels: dict[str, ExpertAxes]
    stacked: bool
    transposed_out: bool

    def probe(self, p: Any) -> Any:
        return self.apply(p, self.x)


def fill(tree: Any, seed: int, std: float = 0.5) -> Any:
    """Seeded normal values for the floating leaves of an abstract tree (keys stay keys)."""
    rng = np.random.default_rng(seed)

    def f(s: Any) -> Any:
        if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        return jnp.asarray(std * rng.normal(size=s.shape), s.dtype)

    return jax.tree.map(f, tree)


def _kernels(prefix: str, stacked: bool, transposed_out: bool) -> dict[str, ExpertAxes]:
    s = int(stacked)  # a leading layer axis shifts every axis by one
    layer = (0,) if stacked else ()
    return {
        f"{prefix}router/kernel": ExpertAxes(layer, (s,)),
        f"{prefix}experts/w_in": ExpertAxes((*layer, s), (s + 1,)),
        f"{prefix}experts/w_out": ExpertAxes((*layer, s), (s + (2 if transposed_out else 1),)),
    }


@functools.cache
def build(
    framework: str,
    dispatch: str,
    *,
    stacked: bool = False,
    transposed_out: bool = False,
    param_dtype: Any = jnp.float32,
    seed: int = 1,
) -> MoeCase:
    """The case ``framework`` ("linen" | "nnx") x ``dispatch``, one block or an ``L``-layer
    scan stack; params filled with seeded N(0, 0.5^2) values in ``param_dtype`` (cached for
    the session: the tests never mutate a case)."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch {dispatch!r} not in {DISPATCHES}")
    if framework == "linen":
        if stacked:
            model = LinenMoeStack(dispatch, transposed_out=transposed_out, param_dtype=param_dtype)
        else:
            model = LinenMoe(dispatch, transposed_out=transposed_out, param_dtype=param_dtype)
        params = fill(jax.eval_shape(model.init, jax.random.key(0), X), seed)
        prefix = "params/layers/moe/" if stacked else "params/"
        return MoeCase(
            model.apply,
            params,
            X,
            _kernels(prefix, stacked, transposed_out),
            stacked,
            transposed_out,
        )
    if framework != "nnx":
        raise ValueError(f"framework {framework!r} not in ('linen', 'nnx')")
    if stacked and param_dtype != jnp.float32:
        raise ValueError("the NNX stack is float32 only")
    if stacked:
        make = lambda: NnxMoeStack(dispatch, transposed_out=transposed_out, rngs=nnx.Rngs(0))
    else:
        make = lambda: NnxMoe(
            dispatch, transposed_out=transposed_out, param_dtype=param_dtype, rngs=nnx.Rngs(0)
        )
    graphdef, state = nnx.split(nnx.eval_shape(make))
    apply = lambda s, x: nnx.merge(graphdef, s)(x)
    prefix = "layers/" if stacked else ""
    return MoeCase(
        apply,
        fill(state, seed),
        X,
        _kernels(prefix, stacked, transposed_out),
        stacked,
        transposed_out,
    )


# -- float64 references ---------------------------------------------------------------------------
def carried_delta64(
    a: Any, b: Any, scale: float, carried: tuple[int, ...], inputs: tuple[int, ...]
) -> np.ndarray:
    """``scale * a @ b`` per carried index, in float64, in the kernel's own layout.

    ``a`` is ``(*C, *I, r)`` and ``b`` is ``(*C, r, *O)`` (``C`` the kernel's ``carried`` axes,
    ``I`` its ``inputs``, ``O`` the rest, each in the kernel's order): for every carried index
    ``c``, ``delta[c] = a[c] @ b[c]`` reshaped to ``(*I, *O)``, then put back in kernel order.
    """
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nc, ni = len(carried), len(inputs)
    c_shape, i_shape, o_shape = a64.shape[:nc], a64.shape[nc:-1], b64.shape[nc + 1 :]
    assert len(i_shape) == ni and b64.shape[:nc] == c_shape, (a64.shape, b64.shape)
    r = a64.shape[-1]
    flat_a = a64.reshape(math.prod(c_shape), math.prod(i_shape), r)
    flat_b = b64.reshape(math.prod(c_shape), r, math.prod(o_shape))
    prod = np.einsum("cir,cro->cio", flat_a, flat_b).reshape(*c_shape, *i_shape, *o_shape)
    ndim = prod.ndim
    outputs = [i for i in range(ndim) if i not in carried and i not in inputs]
    order = [*carried, *inputs, *outputs]  # prod axis j holds kernel axis order[j]
    return scale * np.transpose(prod, np.argsort(order))


def _path(kp: Any) -> str:
    """A key path joined with "/", without the trailing ``value`` of an NNX Variable."""
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in kp]
    return "/".join(parts[:-1] if parts[-1] == "value" else parts)


def _leaves(tree: Any) -> dict[str, Any]:
    return {_path(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def merged64(
    case: MoeCase, params: Any, factors: Mapping[str, tuple[Any, Any, float]] | None = None
) -> dict[str, np.ndarray]:
    """Each kernel of ``case`` (path -> float64 array), ``W0 + scale * a @ b`` where ``factors``
    holds ``path -> (a, b, scale)``; every other path of ``factors`` is an error."""
    base = {p: np.asarray(v, np.float64) for p, v in _leaves(params).items() if p in case.kernels}
    for path, (a, b, scale) in (factors or {}).items():
        axes = case.kernels[path]
        base[path] = base[path] + carried_delta64(a, b, scale, axes.carried, axes.inputs)
    return base


def _silu64(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def ref_block64(
    x: np.ndarray,
    router: np.ndarray,
    w_in: np.ndarray,
    w_out: np.ndarray,
    k: int = K,
    transposed_out: bool = False,
    min_margin: float = 1e-4,
) -> np.ndarray:
    """One MoE block in float64, token by token: ``sum_j p_j * silu(x @ w_in[e_j]) @ w_out[e_j]``
    over the top-``k`` experts ``e_j`` (softmax weights ``p_j`` of their logits).

    Raises if a token's k-th and (k+1)-th logits are closer than ``min_margin`` (float32 could
    pick another expert there: choose another seed).
    """
    lead = x.shape[:-1]
    x2 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    logits = x2 @ router
    out = np.zeros((x2.shape[0], w_in.shape[1]))
    for t, row in enumerate(logits):
        ranked = np.argsort(-row, kind="stable")
        if k < len(row):
            margin = row[ranked[k - 1]] - row[ranked[k]]
            assert margin > min_margin, f"token {t}: top-{k} margin {margin:.2e}, pick another seed"
        top = ranked[:k]
        p = np.exp(row[top] - row[top].max())
        p /= p.sum()
        for pj, e in zip(p, top, strict=True):
            w = w_out[e].T if transposed_out else w_out[e]
            out[t] += pj * (_silu64(x2[t] @ w_in[e]) @ w)
    return out.reshape(*lead, -1)


def ref_output(
    case: MoeCase, params: Any, factors: Mapping[str, tuple[Any, Any, float]] | None = None
) -> np.ndarray:
    """The model's output in float64 with ``W_e = W0_e + scale * a_e @ b_e`` for every kernel of
    ``factors`` (``path -> (a, b, scale)``; ``None``: the base model)."""
    w = merged64(case, params, factors)
    by_role = {
        p.rsplit("/", 2)[-2] if p.endswith("kernel") else p.rsplit("/", 1)[-1]: v
        for p, v in w.items()
    }
    x = np.asarray(case.x, np.float64)
    if not case.stacked:
        return ref_block64(
            x,
            by_role["router"],
            by_role["w_in"],
            by_role["w_out"],
            transposed_out=case.transposed_out,
        )
    for layer in range(by_role["router"].shape[0]):
        r, wi, wo = (by_role[n][layer] for n in ("router", "w_in", "w_out"))
        x = x + ref_block64(x, r, wi, wo, transposed_out=case.transposed_out)
    return x


def random_factors(
    case: MoeCase, rank: int = 2, scale: float = 0.75, seed: int = 3, std: float = 0.3
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Nonzero float32 factors ``a (*C, *I, r)``, ``b (*C, r, *O)`` for every kernel of ``case``
    (one LoRA per expert and per layer), by the API's layout."""
    rng = np.random.default_rng(seed)
    shapes = {p: np.shape(v) for p, v in _leaves(case.params).items()}
    out = {}
    for path, axes in case.kernels.items():
        shape = shapes[path]
        outputs = [i for i in range(len(shape)) if i not in axes.carried and i not in axes.inputs]
        c = [shape[i] for i in axes.carried]
        a = std * rng.normal(size=(*c, *(shape[i] for i in axes.inputs), rank))
        b = std * rng.normal(size=(*c, rank, *(shape[i] for i in outputs)))
        out[path] = (a.astype(np.float32), b.astype(np.float32), scale)
    return out


def with_kernels(params: Any, kernels: Mapping[str, np.ndarray]) -> Any:
    """``params`` with the kernels at the given paths replaced (cast to each leaf's dtype)."""

    def f(kp: Any, leaf: Any) -> Any:
        path = _path(kp)
        return jnp.asarray(kernels[path], leaf.dtype) if path in kernels else leaf

    return jax.tree_util.tree_map_with_path(f, params)
