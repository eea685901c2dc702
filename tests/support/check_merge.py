"""The adapter tools on expert kernels (``moe-*``: one LoRA per expert, and per layer in a scan
stack): merge / unmerge, `lora.summary`, orbax checkpoints (`lora.combine`: check_combine.py;
`lora.stack`: check_stack.py; quantized bases: check_quant.py; DoRA: check_dora.py; sharding:
tests/test_moe_sharding.py).

The adapters are built by hand (`support.moe_adapters`: ``a (*C, *I, r)``, ``b (*C, r, *O)``)
on the MoE blocks of `support.moe_models` (Linen / NNX, einsum / ragged_dot dispatch, one block
/ a scan stack, ``w_out`` laid out ``(E, F, D)`` or ``(E, D, F)``). References are float64 numpy
per carried index (`carried_delta64`, `merged64`, `ref_output`) and parameter counts written
here.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import flax_lora as lora

from .cases import check
from .compare import assert_close
from .moe_adapters import expert_adapters, kernel_shapes
from .moe_models import build, merged64, random_factors, ref_output
from .trees import adapter_entries

EXPERTS = ("experts/w_in", "experts/w_out")
_merge = jax.jit(lora.merge)


def _case(stacked: bool, transposed: bool = False, **kw: Any) -> Any:
    return build("linen", "einsum", stacked=stacked, transposed_out=transposed, **kw)


@check
def merge_per_expert(framework: str, dispatch: str, stacked: bool, transposed: bool) -> None:
    case = build(framework, dispatch, stacked=stacked, transposed_out=transposed)
    factors = random_factors(case)
    adapters = expert_adapters(case, factors)
    merged = _merge(case.params, adapters)
    ref = merged64(case, case.params, factors)
    for path, kernel in merged64(case, merged).items():
        assert_close(kernel, ref[path], 2e-6)
    assert_close(jax.jit(case.apply)(merged, case.x), ref_output(case, case.params, factors), 2e-5)
    back = jax.jit(lora.unmerge)(merged, adapters)
    base = merged64(case, case.params)
    for path, kernel in merged64(case, back).items():
        assert_close(kernel, base[path], 2e-6)


@check
def merge_some_layers_of_a_stacked_expert_kernel() -> None:
    case = _case(True)
    factors = random_factors(case)
    merged = _merge(case.params, expert_adapters(case, factors, layers=(1,)))
    zeroed = {p: (np.concatenate([0 * a[:1], a[1:]]), b, s) for p, (a, b, s) in factors.items()}
    ref = merged64(case, case.params, zeroed)
    for path, kernel in merged64(case, merged).items():
        assert_close(kernel, ref[path], 2e-6)
        assert np.array_equal(kernel[0], merged64(case, case.params)[path][0])


@check
def merge_bfloat16_expert_kernels() -> None:
    case = _case(False, param_dtype=jnp.bfloat16)
    factors = random_factors(case)
    merged = _merge(case.params, expert_adapters(case, factors, dtype=jnp.bfloat16))
    for path, kernel in merged64(case, merged).items():
        assert jax.tree.leaves(merged)[0].dtype == jnp.bfloat16
        a, b, s = factors[path]
        # reference from the bf16-rounded factors, one bf16 rounding of the sum allowed
        a16 = np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)
        b16 = np.asarray(jnp.asarray(b, jnp.bfloat16), np.float64)
        ref = merged64(case, case.params, {path: (a16, b16, s)})[path]
        assert np.max(np.abs(kernel - ref) / np.maximum(np.abs(ref), 1e-3)) <= 2**-8


# -- summary --------------------------------------------------------------------------------------
@check
def summary_counts_every_expert(stacked: bool, transposed: bool) -> None:
    case = _case(stacked, transposed)
    f = random_factors(case, rank=3)
    s = lora.summary(case.params, expert_adapters(case, f), show=False)
    shapes = kernel_shapes(case)
    expected = {}
    for path, ax in case.kernels.items():
        shape = shapes[path]
        c = math.prod(shape[i] for i in ax.carried)
        n_in = math.prod(shape[i] for i in ax.inputs)
        n_out = math.prod(shape) // (c * n_in)
        expected[path] = c * 3 * (n_in + n_out)
    assert {r.path: r.params for r in s.rows} == expected
    assert s.trainable_params == sum(expected.values())
    assert s.trainable_bytes == 4 * sum(expected.values())
    assert s.base_params == sum(x.size for x in jax.tree.leaves(case.params))
    assert {r.path: r.rank for r in s.rows} == dict.fromkeys(expected, 3)


# -- checkpoints ----------------------------------------------------------------------------------
@check
def checkpoint_round_trip(tmp_path: Any, stacked: bool, dtype: str) -> None:
    dtype = jnp.dtype(dtype)
    case = _case(stacked, True)
    f = random_factors(case)
    adapters = expert_adapters(case, f, dtype=dtype, layers=(1,) if stacked else None)
    lora.save(tmp_path / "ckpt", adapters)
    back = lora.load(tmp_path / "ckpt")
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    old, new = adapter_entries(adapters), adapter_entries(back)
    for path, w in old.items():
        assert new[path].meta() == w.meta()
        want = (1 if stacked else 0,) if path.endswith(EXPERTS) else ()
        assert new[path].expert_axes == w.expert_axes == want
        for x, y in ((w.a, new[path].a), (w.b, new[path].b)):
            assert y.dtype == x.dtype and np.array_equal(np.asarray(x), np.asarray(y))
    for path, kernel in merged64(case, _merge(case.params, back)).items():
        assert np.array_equal(kernel, merged64(case, _merge(case.params, adapters))[path])
