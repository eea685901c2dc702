"""LoRA training step vs full fine-tuning on a mixture-of-experts decoder (issue 16).

The decoder of `benchmarks.moe_decoder`: 6 pre-LN blocks, d_model 512, 8 heads, each MLP a
top-2 mixture of 8 experts of width 1024 (kernels ``w_in (8, 512, 1024)``, ``w_out (8, 1024,
512)``), tied embedding 8192, batch 8x128; both dispatch styles (``--dispatch einsum ragged``,
the default, times each in turn in one run). LoRA r=8, alpha=16 on q, k, v, out and both expert
kernels of every block, one LoRA per expert (``a (8, 512, 8)``, ``b (8, 8, 1024)``). Times,
medians of interleaved rounds in one process, wall clock and process CPU time (all threads):

- full fine-tuning step: grad w.r.t. all params + adamw on all params;
- LoRA factored step: ``lora.wrap(mode="factored")`` (no expert kernel formed), grad w.r.t. the
  adapters + adamw on them; target <= 0.75x full;
- LoRA merged step: ``lora.wrap(mode="merged")`` (every ``W0_e + s * a_e @ b_e`` formed);
- backprop to activations only: grad w.r.t. an offset added to the embedded tokens (weights
  frozen, no weight gradient at all): the floor of any LoRA step;

then the forward passes (base, factored: target <= 1.10x base, merged) and the peak memory of
each step from XLA's compiled memory analysis.

``lora.init`` (with the probe) finds the expert axis of both dispatches (a batch dimension of
the einsum's ``dot_general``, the group axis of ``ragged_dot``) and gives each expert its own
factors; should a LoRA part fail, it says why, the other parts are still timed, and the run
ends with that error.

On CPU, ``ragged_dot`` is lowered to a dense product over a masked ``(E, T*k, d)`` broadcast
(``E`` times the grouped FLOPs; see `benchmarks.moe_decoder`): compare ratios within a dispatch.

Run:  python benchmarks/moe_step.py [--dispatch einsum ragged] [--rounds 10]
      python benchmarks/moe_step.py --quick     (small sizes, seconds: checks that it runs)
"""

from __future__ import annotations

import argparse
import os
import re
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
from benchmarks.decoder import loss_fn, make_batch
from benchmarks.moe_decoder import EXPERT_KERNELS, TARGETS, MoeDecoder
from benchmarks.train_step import lora_step, peak_bytes, timed

FULL, FLOOR, BASE = "full fine-tuning step", "backprop to activations only", "base forward"
TARGET_RATIOS = {"LoRA factored step": (FULL, 0.75), "factored forward": (BASE, 1.10)}
QUICK = dict(vocab=512, d_model=64, heads=4, hidden=128, layers=2)  # with batch 2x32


def _paths(tree: Any) -> dict[str, tuple[int, ...]]:
    """ "/"-joined key path (dict keys and dataclass fields) -> leaf shape."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    name = lambda k: str(getattr(k, "key", getattr(k, "name", k)))
    return {"/".join(map(name, kp)): x.shape for kp, x in flat}


def expert_adapters(
    model: MoeDecoder, params: Any, tokens: jax.Array, args: argparse.Namespace
) -> Any:
    """``lora.init`` on ``args.targets``, checked to hold one LoRA per expert on every targeted
    expert kernel (``a (E, d_in, r)``, ``b (E, r, d_out)``).

    Raises:
      RuntimeError: ``lora.init`` raised, or gave an expert kernel another layout (what it does
        before issue 16).
    """
    config = lora.LoraConfig(rank=args.rank, alpha=args.alpha, targets=args.targets)
    probe = lambda p: model.apply(p, tokens)
    try:
        adapters = lora.init(jax.random.key(2), params, config, probe=probe)
    except ValueError as err:
        raise RuntimeError(f"lora.init cannot adapt the expert kernels: {err}") from err
    factors = _paths(adapters)
    for path, shape in _paths(params).items():
        if not (re.fullmatch(EXPERT_KERNELS, path) and re.fullmatch(args.targets, path)):
            continue
        e, d_in, d_out = shape
        want = {"a": (e, d_in, args.rank), "b": (e, args.rank, d_out)}
        got = {n: factors.get(f"{path}/{n}") for n in want}
        if got != want:
            raise RuntimeError(
                f"lora.init gave the expert kernel {path} {shape} the factors {got}, not one LoRA "
                f"per expert {want} (issue 16: an expert axis is a carried axis)"
            )
    return adapters


def build(
    model: MoeDecoder, batch: dict, args: argparse.Namespace
) -> tuple[dict, dict, Exception | None]:
    """``(steps, forwards, lora_error)``: name -> ``(jitted step(state, frozen, batch), state,
    frozen)`` and name -> ``(jitted forward, args)``; the LoRA entries only when
    `expert_adapters` works (else its error)."""
    tokens = batch["tokens"]
    params = jax.jit(model.init)(jax.random.key(1), tokens)
    tx = optax.adamw(1e-4)

    def full(state: tuple, _: None, batch: dict) -> tuple:
        p, opt = state
        loss, g = jax.value_and_grad(loss_fn, argnums=1)(model.apply, p, batch)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    def floor(state: tuple, frozen: Any, batch: dict) -> tuple:
        with_offset = lambda o: loss_fn(lambda p, t: model.apply(p, t, o), frozen, batch)
        loss, g = jax.value_and_grad(with_offset)(state[0])
        return g, loss

    jit = lambda f: jax.jit(f, donate_argnums=0)
    own = jax.tree.map(jnp.copy, params)  # the full step donates its own copy
    offset = jnp.zeros((*tokens.shape, model.d_model), jnp.float32)
    steps = {FULL: (jit(full), (own, tx.init(own)), None), FLOOR: (jit(floor), (offset,), params)}
    forwards = {BASE: (jax.jit(lambda p, t: model.apply(p, t)), (params, tokens))}
    try:
        adapters = expert_adapters(model, params, tokens, args)
    except RuntimeError as err:
        return steps, forwards, err
    for mode in ("factored", "merged"):
        state = (jax.tree.map(jnp.copy, adapters), tx.init(adapters))
        steps[f"LoRA {mode} step"] = (jit(lora_step(model, tx, mode)), state, params)
        forwards[f"{mode} forward"] = (
            jax.jit(lora.wrap(model.apply, mode=mode)),
            (params, adapters, tokens),
        )
    return steps, forwards, None


def run(model: MoeDecoder, batch: dict, args: argparse.Namespace) -> Exception | None:
    """Compiles, warms up and times the variants of one dispatch; prints the tables."""
    steps, forwards, error = build(model, batch, args)
    if error is not None:
        print(f"LoRA parts not run: {error}")
    calls: dict[str, Callable[[], Any]] = {}
    memory, states = {}, {}
    for name, (fn, state, frozen) in steps.items():
        compiled = fn.lower(state, frozen, batch).compile()
        memory[name] = peak_bytes(compiled)
        states[name] = jax.block_until_ready(compiled(state, frozen, batch))[:-1]

        def call(name: str = name, compiled: Any = compiled, frozen: Any = frozen) -> Any:
            out = compiled(states[name], frozen, batch)
            states[name] = out[:-1]
            return out

        calls[name] = call
    for name, (fn, fargs) in forwards.items():
        compiled = fn.lower(*fargs).compile()
        jax.block_until_ready(compiled(*fargs))
        calls[name] = lambda compiled=compiled, fargs=fargs: compiled(*fargs)
    wall: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            _, w, c = timed(call)
            wall[name].append(w)
            cpu[name].append(c)
    ms = {k: 1e3 * statistics.median(v) for k, v in wall.items()}
    cms = {k: 1e3 * statistics.median(v) for k, v in cpu.items()}
    for title, names, ref in (("training step", steps, FULL), ("forward", forwards, BASE)):
        head = f"{title} (ratio to {ref.split()[0]})"
        print(f"\n{head:34s} {'ms':>8s} {'ratio':>6s} {'CPU ms':>8s} {'ratio':>6s}")
        for n in names:
            target = TARGET_RATIOS.get(n)
            note = f"  target <= {target[1]:.2f}" if target else ""
            wall_ratio, cpu_ratio = ms[n] / ms[ref], cms[n] / cms[ref]
            print(f"{n:34s} {ms[n]:8.1f} {wall_ratio:6.3f} {cms[n]:8.1f} {cpu_ratio:6.3f}{note}")
    print(f"\n{'peak memory (compiled)':34s} {'temp MiB':>8s} {'total MiB':>10s} {'x full':>7s}")
    for name, (temp, total) in memory.items():
        print(
            f"{name:34s} {temp / 2**20:8.1f} {total / 2**20:10.1f} {total / memory[FULL][1]:7.3f}"
        )
    return error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--dispatch", nargs="+", choices=("einsum", "ragged"), default=["einsum", "ragged"]
    )
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", default=TARGETS, help="LoRA targets (regex on kernel paths)")
    ap.add_argument(
        "--quick", action="store_true", help="small sizes, 2 rounds: checks that it runs"
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    sizes = dict(QUICK) if args.quick else {"layers": args.layers}
    batch = make_batch(
        jax.random.key(0), *((2, 32) if args.quick else (8, 128)), vocab=sizes.get("vocab", 8192)
    )
    args.rounds = 2 if args.quick else args.rounds
    device = f"{jax.devices()[0].platform}, {os.cpu_count()} cpus"
    print(f"jax {jax.__version__}, {device}; {sizes}; LoRA targets {args.targets!r}")
    errors = []
    for dispatch in args.dispatch:
        model = MoeDecoder(dispatch=dispatch, **sizes)
        print(
            f"\n== {dispatch} dispatch: {model.layers} blocks, d {model.d_model}, top-{model.k} of "
            f"{model.experts} experts of width {model.hidden}, batch {batch['tokens'].shape}"
        )
        error = run(model, batch, args)
        if error is not None:
            errors.append(f"{dispatch}: {error}")
    wall = time.perf_counter() - t0
    print(f"\n{args.rounds} interleaved rounds per variant; total wall {wall:.0f} s")
    if errors:
        raise RuntimeError("the LoRA parts did not run:\n" + "\n".join(errors))


if __name__ == "__main__":
    main()
