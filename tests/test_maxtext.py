"""flax_lora on Google MaxText's own decoders (``maxtext==0.2.5``), built as MaxText builds them.

Tiny Llama 2, Gemma 3 and Mixtral (``pyconfig.initialize`` on MaxText's ``configs/base.yml`` with
``model_name`` and size overrides, ``model_creation_utils.from_config``; see
tests/support/maxtext_models.py), each scanned with MaxText's default ``param_scan_axis: 1``,
scanned with ``param_scan_axis: 0`` and unscanned; Mixtral on both MoE paths (the dense einsum
path, ``sparse_matmul=False``, and ``jax.lax.ragged_dot``, ``sparse_matmul=True,
megablox=False``). Checked against independent references:

- every `lora.wrap` mode gives the logits of the model on `lora.merge`'d params;
- `lora.merge`'s kernels equal a float64 numpy merge written from MaxText's ``DenseGeneral``
  conventions (one product per layer and per expert), which also pins the adapters' structure:
  one LoRA per layer of a scanned kernel, one per expert of an expert kernel;
- the gradients of MaxText's own ``train.loss_fn`` agree across modes, and a few
  ``optax.adamw`` steps on the adapters lower it;
- an adapter made on the MoE block's dense path has the structure of one made on its sparse
  path, and gives the same logits there.

These tests need the ``maxtext`` package (not a dependency of flax_lora; Python >= 3.12); they
skip without it. Set-up, in a venv of its own (docs/guides/maxtext.md):
``python3.13 -m venv venv_maxtext && venv_maxtext/bin/pip install -e '.[test,maxtext]'``, then
``venv_maxtext/bin/python -m pytest tests/test_maxtext.py`` (about 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_lora as lora

pytest.importorskip(
    "maxtext",
    reason="the MaxText tests need maxtext==0.2.5 (Python >= 3.12): pip install -e '.[maxtext]'",
)
from support import maxtext_models as mm
from support.compare import rel_err
from support.trees import adapter_entries, leaves_by_path

MODES = ("merged", "factored", "auto")
SHARD_MAP = "used by `shard_map`, which cannot be factored"
"""The sparse MoE path runs its ``ragged_dot`` inside MaxText's ``shard_map``, which has no
factored rule: ``mode="factored"`` refuses there, naming the kernel and the op (the API's
contract); ``"auto"`` merges those kernels and factors the others."""


def modes(sparse: bool) -> tuple[str, ...]:
    """The modes that run a case (all but ``"factored"`` on the sparse MoE path)."""
    return tuple(mode for mode in MODES if not (sparse and mode == "factored"))


CASES = [
    pytest.param(family, layout, sparse, id=f"{family}{'-sparse' if sparse else ''}-{layout}")
    for family, sparse in (
        ("llama2", False),
        ("gemma3", False),
        ("mixtral", False),
        ("mixtral", True),
    )
    for layout in mm.LAYOUTS
]


def make(family: str, layout: str, sparse: bool, seed: int = 1) -> tuple[mm.MaxTextModel, Any]:
    """The model and random (both factors nonzero) adapters on every target kernel."""
    m = mm.build(family, layout, sparse)
    ids, pos = mm.tokens()
    config = lora.LoraConfig(rank=4, alpha=8.0, targets=mm.TARGETS, init="random")
    adapters = lora.init(
        jax.random.key(seed), m.params, config, probe=lambda p: m.apply(p, ids, pos)
    )
    return m, adapters


@pytest.mark.parametrize(("family", "layout", "sparse"), CASES)
def test_every_mode_is_the_merged_model(family, layout, sparse):
    m, adapters = make(family, layout, sparse)
    ids, pos = mm.tokens()
    ref = np.asarray(jax.jit(m.apply)(lora.merge(m.params, adapters), ids, pos))
    base = np.asarray(jax.jit(m.apply)(m.params, ids, pos))
    assert rel_err(base, ref) > 1e-3  # the adapters change the logits
    for mode in modes(sparse):
        out = jax.jit(lora.wrap(m.apply, mode=mode))(m.params, adapters, ids, pos)
        assert rel_err(out, ref) < 2e-5, mode
    if sparse:
        with pytest.raises(ValueError, match=re.escape(SHARD_MAP)):
            jax.jit(lora.wrap(m.apply, mode="factored"))(m.params, adapters, ids, pos)


@pytest.mark.parametrize(("family", "layout", "sparse"), CASES)
def test_merged_kernels_are_a_float64_merge_per_layer_and_expert(family, layout, sparse):
    m, adapters = make(family, layout, sparse)
    kernels = leaves_by_path(m.params)
    expected = {p for p in kernels if re.fullmatch(mm.TARGETS, p)}
    entries = adapter_entries(adapters)
    assert set(entries) == expected
    merged = leaves_by_path(lora.merge(m.params, adapters))
    for path, w in entries.items():
        _, expert = mm.conventions(path)
        layered = mm.is_layered_path(m, path)
        carried = ((m.num_layers,) if layered else ()) + ((mm.EXPERTS,) if expert else ())
        assert w.a.shape[: len(carried)] == carried, (path, w.a.shape)  # one LoRA each
        assert w.b.shape[: len(carried)] == carried, (path, w.b.shape)
        ref = mm.merged64(m, path, kernels[path], w.a, w.b, w.scale)
        assert rel_err(merged[path], ref) < 1e-6, path


@pytest.mark.parametrize(("family", "layout", "sparse"), CASES)
def test_maxtext_loss_gradients_agree_across_modes(family, layout, sparse):
    m, adapters = make(family, layout, sparse)
    data = mm.batch()
    grads = {}
    for mode in modes(sparse):
        loss = lora.wrap(m.loss, mode=mode)
        grads[mode] = jax.jit(jax.grad(loss, argnums=1))(m.params, adapters, data)
    # the reference: the gradient through lora.merge, outside the wrapper
    ref = jax.jit(jax.grad(lambda ad: m.loss(lora.merge(m.params, ad), data)))(adapters)
    ref_leaves = jax.tree.leaves(ref)
    assert max(float(jnp.max(jnp.abs(g))) for g in ref_leaves) > 0
    for mode, g in grads.items():
        for x, y in zip(jax.tree.leaves(g), ref_leaves, strict=True):
            assert rel_err(x, y) < 1e-4, mode


@pytest.mark.parametrize(("family", "layout", "sparse"), CASES)
def test_adamw_steps_lower_maxtext_loss(family, layout, sparse):
    m = mm.build(family, layout, sparse)
    ids, pos = mm.tokens()
    config = lora.LoraConfig(rank=4, alpha=8.0, targets=mm.TARGETS)  # PEFT's init: b = 0
    adapters = lora.init(jax.random.key(0), m.params, config, probe=lambda p: m.apply(p, ids, pos))
    data = mm.batch()
    tx = optax.adamw(1e-2)
    loss_fn = lora.wrap(m.loss)

    @jax.jit
    def step(ad, opt):
        loss, g = jax.value_and_grad(loss_fn, argnums=1)(m.params, ad, data)
        updates, opt = tx.update(g, opt, ad)
        return optax.apply_updates(ad, updates), opt, loss

    opt = tx.init(adapters)
    losses = []
    for _ in range(4):
        adapters, opt, loss = step(adapters, opt)
        losses.append(float(loss))
    final = float(jax.jit(m.loss)(lora.merge(m.params, adapters), data))
    assert final < losses[0] - 0.05, (losses, final)


@pytest.mark.parametrize("layout", list(mm.LAYOUTS))
def test_moe_paths_give_one_adapter_structure(layout):
    dense, ad_dense = make("mixtral", layout, False)
    sparse, ad_sparse = make("mixtral", layout, True)
    for p, x in leaves_by_path(dense.params).items():  # the same weights on both paths
        np.testing.assert_array_equal(x, leaves_by_path(sparse.params)[p])
    e_dense, e_sparse = adapter_entries(ad_dense), adapter_entries(ad_sparse)
    assert set(e_dense) == set(e_sparse)
    for path in e_dense:
        x, y = e_dense[path], e_sparse[path]
        assert (x.a.shape, x.b.shape) == (y.a.shape, y.b.shape), path
        for f in ("kernel_shape", "layer_axes", "expert_axes", "in_axes", "kind"):
            assert getattr(x, f) == getattr(y, f), (path, f)
    # an adapter made (and e.g. trained) on the dense path runs on the sparse path
    ids, pos = mm.tokens()
    out_dense = jax.jit(lora.wrap(dense.apply))(dense.params, ad_dense, ids, pos)
    out_sparse = jax.jit(lora.wrap(sparse.apply))(sparse.params, ad_dense, ids, pos)
    assert rel_err(out_sparse, out_dense) < 1e-4


GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "maxtext.md"


def test_guide_recipe_runs(tmp_path):
    """docs/guides/maxtext.md's code blocks, run in order as written, do what the page says."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    ns: dict[str, Any] = {}
    exec(compile("".join(blocks).replace("/tmp/", f"{tmp_path}/"), "maxtext.md", "exec"), ns)
    # the exported files and checkpoint exist; the plain merged model is the wrapped one
    assert (tmp_path / "maxtext_peft" / "adapter_model.safetensors").is_file()
    tokens, positions = ns["tokens"], ns["positions"]
    want = lora.wrap(ns["apply"])(ns["params"], ns["adapters"], tokens, positions)
    got = ns["plain"](tokens, positions, enable_dropout=False)
    assert rel_err(got, want) < 2e-5
    # a few of the page's training steps lower MaxText's loss
    rows = np.stack([np.roll(np.arange(17) * 7 % 256, i) for i in range(2)])
    pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
    ones = jnp.ones((2, 16), jnp.int32)
    data = dict(
        inputs=jnp.asarray(rows[:, :-1], jnp.int32),
        targets=jnp.asarray(rows[:, 1:], jnp.int32),
        inputs_position=pos,
        targets_position=pos,
        inputs_segmentation=ones,
        targets_segmentation=ones,
    )
    adapters, opt = ns["adapters"], ns["opt"]
    losses = []
    for _ in range(4):
        adapters, opt, value = ns["step"](adapters, opt, data)
        losses.append(float(value))
    assert losses[-1] < losses[0], losses
