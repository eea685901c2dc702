"""The mixture-of-experts test models of tests/support/moe_models.py against their float64
references (no adapters from flax_lora yet: issue 16's groundwork), and the equations JAX makes
of the two expert dispatches, which the expert-kernel rules will read.

- every case (Linen / NNX, einsum / ragged_dot / loop dispatch, one block / a scan stack, the
  ``(E, F, D)`` or ``(E, D, F)`` layout of ``w_out``) equals `ref_output` with no adapter;
- the model run on kernels merged in float64 (``W0_e + scale * a_e @ b_e`` for nonzero
  per-expert factors) equals `ref_output` with those factors: the layout conventions of the
  factors (``a (*C, *I, r)``, ``b (*C, r, *O)``) hold end to end;
- `carried_delta64` equals an explicit loop over the carried indices;
- the einsum dispatch contracts each expert kernel by a ``dot_general`` whose batch dimension is
  the expert axis; the ragged dispatch by ``ragged_dot_general`` with the expert axis as its
  group dimension.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core
from support.compare import assert_close
from support.moe_models import (
    DISPATCHES,
    D,
    E,
    F,
    L,
    build,
    carried_delta64,
    merged64,
    random_factors,
    ref_output,
    with_kernels,
)

CASES = [
    pytest.param(fw, d, s, t, id=f"{fw}-{d}{'-stack' if s else ''}{'-transposed' if t else ''}")
    for fw, d, s, t in itertools.product(("linen", "nnx"), DISPATCHES, (False, True), (False, True))
]


@pytest.mark.parametrize(("framework", "dispatch", "stacked", "transposed"), CASES)
def test_model_equals_reference(
    framework: str, dispatch: str, stacked: bool, transposed: bool
) -> None:
    case = build(framework, dispatch, stacked=stacked, transposed_out=transposed)
    assert_close(jax.jit(case.apply)(case.params, case.x), ref_output(case, case.params), 2e-6)


@pytest.mark.parametrize(
    ("framework", "dispatch", "stacked", "transposed"),
    [
        ("linen", "einsum", False, False),
        ("nnx", "ragged", False, True),
        ("linen", "ragged", True, False),
        ("nnx", "einsum", True, True),
    ],
)
def test_reference_with_factors(
    framework: str, dispatch: str, stacked: bool, transposed: bool
) -> None:
    case = build(framework, dispatch, stacked=stacked, transposed_out=transposed)
    factors = random_factors(case)
    merged = with_kernels(case.params, merged64(case, case.params, factors))
    ref = ref_output(case, case.params, factors)
    assert_close(jax.jit(case.apply)(merged, case.x), ref, 2e-6)
    assert np.max(np.abs(ref - ref_output(case, case.params))) > 0.1  # the factors matter


@pytest.mark.parametrize(
    ("shape", "carried", "inputs"),
    [((E, D, F), (0,), (1,)), ((E, D, F), (0,), (2,)), ((L, E, F, D), (0, 1), (2,))],
)
def test_carried_delta_per_index(shape: tuple, carried: tuple, inputs: tuple) -> None:
    rng = np.random.default_rng(0)
    outputs = [i for i in range(len(shape)) if i not in carried and i not in inputs]
    c = [shape[i] for i in carried]
    a = rng.normal(size=(*c, shape[inputs[0]], 3))
    b = rng.normal(size=(*c, 3, shape[outputs[0]]))
    got = carried_delta64(a, b, 0.5, carried, inputs)
    assert got.shape == shape
    for idx in itertools.product(*(range(n) for n in c)):
        want = 0.5 * a[idx] @ b[idx]  # (in, out) of this expert (and layer)
        if inputs[0] > outputs[0]:
            want = want.T
        np.testing.assert_allclose(got[idx], want, rtol=1e-12)


def _eqns(jaxpr: Any) -> list[Any]:
    """Every equation of ``jaxpr``, nested jaxprs (jit, scan, custom derivatives) included."""
    out = []
    for eqn in jaxpr.eqns:
        out.append(eqn)
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    out += _eqns(sub.jaxpr)
                elif isinstance(sub, jex_core.Jaxpr):
                    out += _eqns(sub)
    return out


@pytest.mark.parametrize("transposed", [False, True])
def test_einsum_dispatch_is_a_batched_dot_general(transposed: bool) -> None:
    case = build("linen", "einsum", transposed_out=transposed)
    eqns = _eqns(jax.make_jaxpr(case.probe)(case.params).jaxpr)
    found = set()
    for eqn in eqns:
        if eqn.primitive.name != "dot_general":
            continue
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        shapes = [tuple(v.aval.shape) for v in eqn.invars]
        if (E, D, F) in shapes or (E, F, D) in shapes:
            kernel = shapes.index((E, D, F)) if (E, D, F) in shapes else shapes.index((E, F, D))
            assert (lb, rb)[kernel] == (0,), eqn  # the expert axis is a batch dimension
            found.add(((lc, rc)[kernel], shapes[kernel]))
    # w_in contracts D (axis 1); w_out contracts F: axis 1 of (E, F, D), axis 2 of (E, D, F)
    assert found == {
        ((1,), (E, D, F)),
        ((2,) if transposed else (1,), (E, D, F) if transposed else (E, F, D)),
    }


@pytest.mark.parametrize("transposed", [False, True])
def test_ragged_dispatch_is_ragged_dot_general(transposed: bool) -> None:
    case = build("nnx", "ragged", transposed_out=transposed)
    eqns = [
        e
        for e in _eqns(jax.make_jaxpr(case.probe)(case.params).jaxpr)
        if e.primitive.name == "ragged_dot_general"
    ]
    assert len(eqns) == 2
    assert {"ragged_dot_dimension_numbers", "group_offset", "precision"} <= set(eqns[0].params)
    contracted = []
    for eqn in eqns:
        rd = eqn.params["ragged_dot_dimension_numbers"]
        assert tuple(rd.rhs_group_dimensions) == (0,) and tuple(rd.lhs_ragged_dimensions) == (0,)
        assert eqn.params["group_offset"] is None
        (_, rc), (_, rb) = rd.dot_dimension_numbers
        assert tuple(rb) == ()
        contracted.append(tuple(rc))
        assert eqn.invars[2].aval.shape == (E,) and eqn.invars[2].aval.dtype == jnp.int32
    assert contracted == [(1,), (2,) if transposed else (1,)]
