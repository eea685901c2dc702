"""Training step on Google MaxText's own Llama 2 decoder: flax_lora LoRA vs full fine-tuning vs
MaxText's own LoRA (qwix), side by side in one process.

The model is MaxText's (``pyconfig.initialize`` on its ``configs/base.yml``, ``model_name=
"llama2-7b"`` at a small size, ``model_creation_utils.from_config``) and so is the loss
(``maxtext.trainers.pre_train.train.loss_fn``). Each step is a jitted gradient of that loss plus
an ``optax.adamw`` update, timed as medians of interleaved rounds:

- full fine-tuning: the gradient w.r.t. every param, adamw on every param;
- flax_lora LoRA (rank 8 on every attention and MLP kernel, ``lora.wrap`` mode ``"auto"``):
  the gradient w.r.t. the adapters only;
- qwix LoRA (``qwix.apply_lora_to_model`` with the same targets and rank, as MaxText's
  ``lora_utils.apply_lora_to_model`` does): the gradient w.r.t. its ``nnx.LoRAParam`` s.

Layouts: unscanned layers (all three), and scanned with ``param_scan_axis`` 0 and 1 (MaxText's
default) where flax_lora runs them; qwix does not run on scanned MaxText models (its LoRA
params are made outside MaxText's layer scan), which the table says.

Needs ``maxtext==0.2.5`` (Python >= 3.12, docs/guides/maxtext.md); without it the script says so
and exits 0. Run: ``python benchmarks/maxtext_step.py [--rounds 5]`` (about 1-2 minutes on 2
CPUs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import optax

import flax_lora as lora

TARGETS = r".*self_attention/(query|key|value|out)/kernel|.*mlp/(wi_0|wi_1|wo)/kernel"
QWIX_PATH = r".*(self_attention/(query|key|value|out)|mlp/(wi_0|wi_1|wo))"
SIZES = dict(
    base_emb_dim=256,
    base_num_decoder_layers=4,
    base_num_query_heads=8,
    base_num_kv_heads=8,
    head_dim=32,
    base_mlp_dim=1024,
    vocab_size=1024,
)
SEQ, BATCH, RANK = 128, 4, 8


def maxtext_config(layout: dict[str, Any]) -> Any:
    """MaxText's config of the benchmark's Llama 2 (float32, dot-product attention)."""
    import maxtext
    from maxtext.configs import pyconfig

    base = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
    return pyconfig.initialize(
        [None, base],
        model_name="llama2-7b",
        override_model_config=True,
        max_target_length=SEQ,
        per_device_batch_size=BATCH,
        enable_checkpointing=False,
        attention="dot_product",
        dtype="float32",
        weight_dtype="float32",
        enable_dropout=False,
        run_name="maxtext_step",
        skip_jax_distributed_system=True,
        **SIZES,
        **layout,
    )


def batch() -> dict[str, jax.Array]:
    """A batch as MaxText's input pipeline gives ``train.loss_fn``."""
    rows = jax.random.randint(jax.random.key(0), (BATCH, SEQ + 1), 0, SIZES["vocab_size"])
    pos = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (BATCH, SEQ))
    ones = jnp.ones((BATCH, SEQ), jnp.int32)
    return dict(
        inputs=rows[:, :-1],
        targets=rows[:, 1:],
        inputs_position=pos,
        targets_position=pos,
        inputs_segmentation=ones,
        targets_segmentation=ones,
    )


def steps(layout: dict[str, Any]) -> dict[str, tuple[Callable[[Any], Any], Any] | str]:
    """Name -> (jitted step, initial state), or the reason the step does not run."""
    from flax import nnx
    from maxtext.trainers.pre_train import train
    from maxtext.utils import model_creation_utils

    cfg = maxtext_config(layout)
    model = model_creation_utils.from_config(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    data = batch()
    tx = optax.adamw(1e-4)

    def loss(p: Any, d: dict[str, jax.Array]) -> jax.Array:
        m = nnx.merge(graphdef, p, rest, copy=True)
        return train.loss_fn(m, cfg, d, None, None, is_train=True)[0]

    def full(state: Any) -> Any:
        p, opt = state
        g = jax.grad(loss)(p, data)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt

    out: dict[str, tuple[Callable[[Any], Any], Any] | str] = {
        "full fine-tuning": (jax.jit(full), (params, tx.init(params)))
    }

    def probe(p: Any) -> jax.Array:
        return nnx.merge(graphdef, p, rest, copy=True)(
            data["inputs"], data["inputs_position"], enable_dropout=False
        )

    config = lora.LoraConfig(rank=RANK, alpha=2.0 * RANK, targets=TARGETS)
    try:
        adapters = lora.init(jax.random.key(1), params, config, probe=probe)
    except (ValueError, TypeError) as e:
        out["flax_lora LoRA"] = f"does not run: {type(e).__name__}: {str(e)[:120]}"
    else:
        wrapped = lora.wrap(loss)

        def lora_step(state: Any) -> Any:
            ad, opt = state
            g = jax.grad(wrapped, argnums=1)(params, ad, data)
            upd, opt = tx.update(g, opt, ad)
            return optax.apply_updates(ad, upd), opt

        out["flax_lora LoRA"] = (jax.jit(lora_step), (adapters, tx.init(adapters)))
    out["qwix LoRA"] = qwix_step(cfg, data, tx, loss_of=train.loss_fn)
    return out


def qwix_step(cfg: Any, data: dict[str, jax.Array], tx: Any, loss_of: Callable) -> Any:
    """qwix's LoRA step on a fresh model, as MaxText's ``lora_utils`` applies it."""
    from flax import nnx
    from maxtext.utils import model_creation_utils

    try:
        import qwix

        model = model_creation_utils.from_config(cfg, rngs=nnx.Rngs(0))
        provider = qwix.LoraProvider(module_path=QWIX_PATH, rank=RANK, alpha=2.0 * RANK)
        model = qwix.apply_lora_to_model(
            model,
            provider,
            decoder_input_tokens=data["inputs"],
            decoder_positions=data["inputs_position"],
        )
        graphdef, lora_params, rest = nnx.split(model, nnx.LoRAParam, ...)
        if not jax.tree.leaves(lora_params):
            return "does not run: qwix made no LoRA params"

        def loss(lp: Any) -> jax.Array:
            m = nnx.merge(graphdef, lp, rest, copy=True)
            return loss_of(m, cfg, data, None, None, is_train=True)[0]

        jax.eval_shape(jax.grad(loss), lora_params)
    except Exception as e:  # report any failure of the third-party path
        return f"does not run: {type(e).__name__}: {str(e)[:120]}"

    def step(state: Any) -> Any:
        lp, opt = state
        g = jax.grad(loss)(lp)
        upd, opt = tx.update(g, opt, lp)
        return optax.apply_updates(lp, upd), opt

    return jax.jit(step), (lora_params, tx.init(lora_params))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layouts", default="unscanned,scan0,scan1")
    args = parser.parse_args()
    try:
        import maxtext  # noqa: F401
    except ImportError:
        print("skipped: needs maxtext==0.2.5 (Python >= 3.12): pip install -e '.[maxtext]'")
        return
    layouts = {
        "unscanned": dict(scan_layers=False),
        "scan0": dict(scan_layers=True, param_scan_axis=0),
        "scan1": dict(scan_layers=True, param_scan_axis=1),
    }
    rows = []
    for lname in args.layouts.split(","):
        variants = steps(layouts[lname])
        runnable = {k: v for k, v in variants.items() if not isinstance(v, str)}
        states = {}
        for name, (fn, state) in runnable.items():
            t0 = time.perf_counter()
            states[name] = jax.block_until_ready(fn(state))
            print(f"{lname}: compiled + first call {name}: {time.perf_counter() - t0:.1f} s")
        times: dict[str, list[float]] = {k: [] for k in runnable}
        for _ in range(args.rounds):
            for name, (fn, _) in runnable.items():
                t0 = time.perf_counter()
                states[name] = jax.block_until_ready(fn(states[name]))
                times[name].append(time.perf_counter() - t0)
        full_t = statistics.median(times["full fine-tuning"])
        for name, v in variants.items():
            if isinstance(v, str):
                rows.append(f"| {lname} | {name} | - | {v} |")
            else:
                t = statistics.median(times[name])
                rows.append(f"| {lname} | {name} | {t * 1e3:.0f} ms | {t / full_t:.2f} |")
    n = SIZES["base_num_decoder_layers"]
    print(
        f"\nMaxText llama2 (d={SIZES['base_emb_dim']}, {n} layers, mlp {SIZES['base_mlp_dim']}, "
        f"vocab {SIZES['vocab_size']}), batch {BATCH} x {SEQ}, rank {RANK}, "
        f"{args.rounds} interleaved rounds, {jax.devices()[0].platform}"
    )
    print("| layers | step | median time | / full fine-tuning |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
