"""Generation with a KV cache through `lora.wrap`: greedy decoding, one jitted step per token,
with Flax Linen's ``cache`` collection (``mutable=["cache"]``) and NNX ``nnx.Cache`` state.

- One adapter set for the whole batch, in every mode: the tokens equal those of the plain
  decoding model with the set merged (``lora.merge``).
- Routed (``lora.stack`` + ``lora_ids``): one batch where each sequence decodes with its own set
  (``-1``: the base model), plain LoRA and DoRA sets mixed, sets of different ranks: the tokens
  of every sequence equal those of the sequence decoded alone (batch 1) through the plain model
  with its set merged. The attention kernels are 3-D einsum kernels (``DenseGeneral`` /
  ``LinearGeneral``), the MLP 2-D.

Routed decoding runs in the factored modes (``"auto"``, ``"factored"``): mode ``"merged"``
routes by running each example as a batch of one, which a cache sized for the whole batch
refuses (the test says so).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from support import decode_models as dm

import flax_lora as lora

IDS = [0, 1, -1, 2, 1]


def _sets(kind: str, dora: bool) -> tuple[list, object]:
    """Three adapter sets of ranks 2, 4, 8 (the middle one DoRA when ``dora``) with nonzero
    ``b`` (``init="random"``), so each set decodes its own tokens."""
    tokens = dm.prompts(2)
    if kind == "linen":
        model, _, params = dm.linen_decoder()
        probe, tree = (lambda p: model.apply(p, tokens)), params
    else:
        _, params, _, forward = dm.nnx_decoder(2)
        probe, tree = (lambda p: forward(p["params"], tokens)), {"params": params}
    sets = [
        lora.init(
            jax.random.key(10 + i),
            tree,
            lora.LoraConfig(rank=r, alpha=2.0 * r, targets=dm.TARGETS, init="random", dora=d),
            probe=probe,
        )
        for i, (r, d) in enumerate([(2, False), (4, dora), (8, False)])
    ]
    return sets, params


def _step(kind: str, fn, params, adapters, **kw):
    if kind == "linen":
        return dm.linen_step(fn, params, adapters, **kw)
    return dm.nnx_step(fn, params, adapters, **kw)


def _apply(kind: str):
    return dm.linen_decoder()[1].apply if kind == "linen" else dm.nnx_decoder(1)[0]


def _cache(kind: str, batch: int):
    return dm.linen_cache(dm.linen_decoder()[1], batch) if kind == "linen" else dm.nnx_cache(batch)


@pytest.mark.parametrize("mode", ["auto", "factored", "merged"])
@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_one_set_decodes_as_the_merged_model(kind, mode) -> None:
    sets, params = _sets(kind, dora=False)
    prompt = dm.prompts(3)
    fn = lora.wrap(_apply(kind), mode=mode)
    got = dm.greedy(_step(kind, fn, params, sets[2]), _cache(kind, 3), prompt)
    want = dm.alone(kind, sets, [2, 2, 2], prompt)
    np.testing.assert_array_equal(got, want)
    base = dm.alone(kind, sets, [-1, -1, -1], prompt)
    assert (got != base).any()  # the adapter changes what is generated


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("mode", ["auto", "factored"])
@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_routed_decoding_equals_each_sequence_alone(kind, mode, dora) -> None:
    sets, params = _sets(kind, dora)
    prompt = dm.prompts(len(IDS))
    fn = lora.wrap(_apply(kind), mode=mode)
    step = _step(kind, fn, params, lora.stack(sets), lora_ids=np.asarray(IDS))
    got = dm.greedy(step, _cache(kind, len(IDS)), prompt)
    want = dm.alone(kind, sets, IDS, prompt)
    np.testing.assert_array_equal(got, want)
    assert len({tuple(row) for row in want}) > 2  # the sets decode different tokens


def test_routed_decoding_in_merged_mode_is_refused_by_the_cache() -> None:
    """Mode "merged" routes each example as a batch of one; the Linen cache, sized for the
    batch, refuses that (Flax's own error): routed decoding is for the factored modes."""
    sets, params = _sets("linen", dora=False)
    fn = lora.wrap(_apply("linen"), mode="merged")
    step = _step("linen", fn, params, lora.stack(sets), lora_ids=np.asarray(IDS))
    with pytest.raises(ValueError, match="cache shape"):
        dm.greedy(step, _cache("linen", len(IDS)), dm.prompts(len(IDS)))
