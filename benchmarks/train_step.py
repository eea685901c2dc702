"""LoRA training step vs full fine-tuning on the benchmark decoder (factored execution).

Times, in one process with interleaved rounds (medians), on the GPT-style decoder of
`benchmarks.decoder` (6 blocks, d_model 512, 8 heads, MLP 2048, tied embed 8192, batch 8x128):

- full fine-tuning step: grad w.r.t. all params + adamw on all params;
- LoRA merged step: ``lora.wrap(mode="merged")``, grad w.r.t. the adapters + adamw on them;
- LoRA auto step: ``lora.wrap(mode="auto")`` (factored), same;
- backprop to activations only: grad w.r.t. an offset added to the embedded tokens (weights
  frozen, no weight gradient at all): the floor for any LoRA step;

then the forward passes (base, factored, merged) and the peak memory of each step from XLA's
compiled memory analysis. LoRA: r=8, alpha=16 on q, k, v, out, fc1, fc2 of every block (36).

Each variant is timed by wall clock and by the process CPU time (all threads) per call; on a
machine shared with other jobs the CPU-time ratios are the steadier of the two. Targets of the
factored-execution issue: LoRA auto step <= 0.70x full, factored forward <= 1.10x base.

Run:  python benchmarks/train_step.py [--rounds 10] [--reps 1]   (about 1-2 minutes on 2 CPUs)

``--memory-scheduler`` compiles every variant with XLA:CPU's memory-minimizing instruction
scheduler instead of its default concurrency-optimized one (it appends
``--xla_cpu_enable_concurrency_optimized_scheduler=false`` to ``XLA_FLAGS`` before the backend
starts; XLA reads this flag process-wide only, not from per-``jit`` compiler options). The
header prints the flags in effect.
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
from benchmarks._plot import ratio_bars
from benchmarks.decoder import TARGETS, Decoder, loss_fn, make_batch


def lora_step(model: Any, tx: optax.GradientTransformation, mode: str) -> Callable:
    """A LoRA training step ``(adapters, opt_state), params, batch -> (adapters, opt_state, loss)``
    with the gradient w.r.t. the adapters only, for ``lora.wrap(model.apply, mode=mode)``."""
    fn = lora.wrap(model.apply, mode=mode)

    def step(state: tuple, params: Any, batch: dict) -> tuple:
        ad, opt = state
        loss, g = jax.value_and_grad(lambda a: loss_fn(lambda p, t: fn(p, a, t), params, batch))(ad)
        upd, opt = tx.update(g, opt, ad)
        return optax.apply_updates(ad, upd), opt, loss

    return step


def build(model: Decoder, batch: dict, rank: int = 8, alpha: float = 16.0) -> dict[str, Any]:
    """Params, adapters and the jitted steps / forwards (each maps state -> state)."""
    tokens = batch["tokens"]
    params = model.init(jax.random.key(1), tokens)
    config = lora.LoraConfig(rank=rank, alpha=alpha, targets=TARGETS)
    adapters = lora.init(jax.random.key(2), params, config, probe=lambda p: model.apply(p, tokens))
    tx = optax.adamw(1e-4)

    def full_step(state: tuple, frozen: None, batch: dict) -> tuple:
        p, opt = state
        loss, g = jax.value_and_grad(lambda q: loss_fn(model.apply, q, batch))(p)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    offset = jnp.zeros((*tokens.shape, model.d_model), jnp.float32)

    def floor_step(state: tuple, params: Any, batch: dict) -> tuple:
        (o,) = state
        loss, g = jax.value_and_grad(
            lambda o: loss_fn(lambda p, t: model.apply(p, t, o), params, batch)
        )(o)
        return g, loss

    factored = lora.wrap(model.apply, mode="factored")
    merged = lora.wrap(model.apply, mode="merged")
    jit = lambda f: jax.jit(f, donate_argnums=0)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # each step donates its own state
    own = copy(params)
    steps = {  # name -> (step(state, frozen, batch), state, frozen)
        "full fine-tuning step": (jit(full_step), (own, tx.init(own)), None),
        "LoRA merged step": (
            jit(lora_step(model, tx, "merged")),
            (copy(adapters), tx.init(adapters)),
            params,
        ),
        "LoRA auto step": (
            jit(lora_step(model, tx, "auto")),
            (copy(adapters), tx.init(adapters)),
            params,
        ),
        "backprop to activations only": (jit(floor_step), (offset,), params),
    }
    forwards = {  # name -> forward(params, adapters, tokens)
        "base forward": jax.jit(lambda p, a, t: model.apply(p, t)),
        "factored forward": jax.jit(factored),
        "merged forward": jax.jit(merged),
    }
    return dict(params=params, adapters=adapters, steps=steps, forwards=forwards)


def peak_bytes(compiled: Any) -> tuple[int, int]:
    """(temp bytes, argument + output + temp - aliased bytes) of a compiled executable."""
    m = compiled.memory_analysis()
    temp = int(m.temp_size_in_bytes)
    total = temp + int(m.argument_size_in_bytes) + int(m.output_size_in_bytes)
    return temp, total - int(getattr(m, "alias_size_in_bytes", 0))


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()`` waited for; its result, wall seconds and process CPU seconds (all threads)."""
    c, t = time.process_time(), time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    ap.add_argument("--reps", type=int, default=1, help="timed calls per variant per round")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument(
        "--memory-scheduler",
        action="store_true",
        help="XLA:CPU memory-minimizing scheduler for all variants (see the module docstring)",
    )
    ap.add_argument("--plot", metavar="PNG", help="also write the ratios as a bar chart")
    args = ap.parse_args()
    if args.memory_scheduler:  # before the backend starts: XLA reads XLA_FLAGS then
        flag = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    t0 = time.perf_counter()
    model = Decoder(layers=args.layers)
    batch = make_batch(jax.random.key(0))
    b = build(model, batch)
    n_kernels = len(jax.tree.leaves(b["adapters"])) // 2
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cpus; "
        f"LoRA on {n_kernels} kernels; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )

    params, adapters, tokens = b["params"], b["adapters"], batch["tokens"]
    runs, states, memory = {}, {}, {}
    for name, (fn, state, frozen) in b["steps"].items():
        compiled = fn.lower(state, frozen, batch).compile()
        memory[name] = peak_bytes(compiled)
        runs[name] = (compiled, frozen)
        states[name] = jax.block_until_ready(compiled(state, frozen, batch))[:-1]  # warm up
    forwards = {}
    for name, fn in b["forwards"].items():
        forwards[name] = fn.lower(params, adapters, tokens).compile()
        jax.block_until_ready(forwards[name](params, adapters, tokens))

    wall: dict[str, list[float]] = {k: [] for k in (*runs, *forwards)}
    cpu: dict[str, list[float]] = {k: [] for k in (*runs, *forwards)}
    for _ in range(args.rounds):
        for name, (compiled, frozen) in runs.items():
            for _ in range(args.reps):
                out, w, c = timed(lambda: compiled(states[name], frozen, batch))  # noqa: B023
                states[name] = out[:-1]
                wall[name].append(w)
                cpu[name].append(c)
        for name, compiled in forwards.items():
            for _ in range(args.reps):
                _, w, c = timed(lambda: compiled(params, adapters, tokens))  # noqa: B023
                wall[name].append(w)
                cpu[name].append(c)

    med = {k: 1e3 * statistics.median(v) for k, v in wall.items()}
    cmed = {k: 1e3 * statistics.median(v) for k, v in cpu.items()}
    head = f"{'median ms':>10s} {'ratio':>7s} {'CPU ms':>9s} {'ratio':>7s}"
    row = lambda n, ref: (
        f"{n:30s} {med[n]:10.1f} {med[n] / med[ref]:7.3f} {cmed[n]:9.1f} {cmed[n] / cmed[ref]:7.3f}"
    )
    print(f"\n{'training step (ratio to full)':30s} {head}")
    for name in runs:
        print(row(name, "full fine-tuning step"))
    print(f"\n{'forward (ratio to base)':30s} {head}")
    for name in forwards:
        print(row(name, "base forward"))
    print(f"\n{'peak memory (compiled)':30s} {'temp MiB':>10s} {'total MiB':>10s} {'x full':>7s}")
    full_total = memory["full fine-tuning step"][1]
    for name, (temp, total) in memory.items():
        print(f"{name:30s} {temp / 2**20:10.1f} {total / 2**20:10.1f} {total / full_total:7.3f}")
    print(
        f"\n{args.rounds} interleaved rounds x {args.reps} calls per variant; CPU ms is the "
        f"process CPU time (all threads) per call; total wall {time.perf_counter() - t0:.0f} s"
    )
    if args.plot:
        ref = "full fine-tuning step"
        bars = {
            n.replace(" step", "").replace("LoRA ", "LoRA\n"): {
                "time (wall)": med[n] / med[ref],
                "time (CPU)": cmed[n] / cmed[ref],
                "peak memory": memory[n][1] / full_total,
            }
            for n in runs
        }
        title = (
            f"Training step / full fine-tuning ({args.layers}-block decoder, jax {jax.__version__})"
        )
        ratio_bars(args.plot, title, bars, "ratio to full fine-tuning")
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
