"""DoRA vs LoRA training step on the benchmark decoder (`benchmarks.decoder`), mode "auto".

Times, in one process with interleaved rounds (medians of wall clock and of process CPU time per
call), the jitted adamw training step of the 6-block d512 decoder (batch 8x128) with
r=8, alpha=16 adapters on q, k, v, out, fc1, fc2 of every block (36 kernels):

- LoRA auto step: ``lora.wrap(mode="auto")`` (factored), grad w.r.t. the adapters;
- DoRA auto step: the same with ``LoraConfig(dora=True)`` (factored DoRA: ``||V||`` per output
  unit from ``W0``'s norms and low-rank terms, no kernel formed);
- DoRA merged step: ``mode="merged"`` (``m * V / ||V||`` formed inside the step);

and prints the DoRA/LoRA ratios, plus the peak memory of each step from XLA's compiled memory
analysis.

Run:  python benchmarks/dora.py [--rounds 6] [--reps 1]   (about 2-3 minutes on 2 CPUs)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import optax

import flax_lora as lora
from benchmarks.decoder import TARGETS, Decoder, make_batch
from benchmarks.train_step import lora_step, peak_bytes, timed


def build(model: Decoder, batch: dict, rank: int = 8, alpha: float = 16.0) -> dict[str, Any]:
    """Params and the jitted steps (each maps (state, params, batch) -> state)."""
    tokens = batch["tokens"]
    params = model.init(jax.random.key(1), tokens)
    probe = lambda p: model.apply(p, tokens)
    tx = optax.adamw(1e-4)

    def make(dora: bool) -> Any:
        config = lora.LoraConfig(rank=rank, alpha=alpha, targets=TARGETS, dora=dora)
        return lora.init(jax.random.key(2), params, config, probe=probe)

    jit = lambda f: jax.jit(f, donate_argnums=0)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    plain, dora = make(False), make(True)
    steps = {
        "LoRA auto step": (jit(lora_step(model, tx, "auto")), (copy(plain), tx.init(plain))),
        "DoRA auto step": (jit(lora_step(model, tx, "auto")), (copy(dora), tx.init(dora))),
        "DoRA merged step": (jit(lora_step(model, tx, "merged")), (copy(dora), tx.init(dora))),
    }
    return dict(params=params, steps=steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    ap.add_argument("--reps", type=int, default=1, help="timed calls per variant per round")
    ap.add_argument("--layers", type=int, default=6)
    args = ap.parse_args()

    model = Decoder(layers=args.layers)
    batch = make_batch(jax.random.key(0))
    built = build(model, batch)
    params = built["params"]
    states: dict[str, Any] = {}
    memory: dict[str, tuple[int, int]] = {}
    for name, (step, state) in built["steps"].items():
        memory[name] = peak_bytes(step.lower(state, params, batch).compile())
        out = jax.block_until_ready(step(state, params, batch))  # compile + warm up
        states[name] = out[:-1]
    wall: dict[str, list[float]] = {n: [] for n in states}
    cpu: dict[str, list[float]] = {n: [] for n in states}
    for _ in range(args.rounds):
        for name, (step, _) in built["steps"].items():
            for _ in range(args.reps):
                out, w, c = timed(lambda s=step, n=name: s(states[n], params, batch))
                states[name] = out[:-1]
                wall[name].append(w)
                cpu[name].append(c)

    med = lambda xs: statistics.median(xs)
    print(
        f"backend {jax.default_backend()}, {args.rounds} rounds x {args.reps} reps, decoder "
        f"{args.layers} blocks d512, batch 8x128, r=8 on q,k,v,out,fc1,fc2"
    )
    print(f"{'step':<20} {'wall ms':>9} {'cpu ms':>9} {'temp MiB':>9} {'peak MiB':>9}")
    for name in states:
        t, p = memory[name]
        print(
            f"{name:<20} {1e3 * med(wall[name]):9.1f} {1e3 * med(cpu[name]):9.1f} "
            f"{t / 2**20:9.1f} {p / 2**20:9.1f}"
        )
    base = "LoRA auto step"
    for name in ("DoRA auto step", "DoRA merged step"):
        print(
            f"ratio {name} / {base}: wall {med(wall[name]) / med(wall[base]):.3f}, "
            f"cpu {med(cpu[name]) / med(cpu[base]):.3f}"
        )


if __name__ == "__main__":
    main()
