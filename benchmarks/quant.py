"""QLoRA on the benchmark decoder: bytes of the base, LoRA step time with the base in f32 / int8 /
nf4, and LoftQ's error reduction.

On the GPT-style decoder of `benchmarks.decoder` (6 blocks, d_model 512, MLP 2048, tied embed 8192):

- bytes of the params tree (sum of leaf ``nbytes``) with every kernel and the embedding stored
  as float32, int8 (per channel), nf4 (blocks of 64) and nf4 with double quantization, and the
  ratios to float32;
- a jitted LoRA training step (r=8, alpha=16 on q, k, v, out, fc1, fc2 of every block; grads
  w.r.t. the adapters, adamw on them) of ``lora.wrap(model.apply)(qparams, adapters, tokens)``:
  the base is kept quantized between steps and each kernel is dequantized at its use inside
  the jitted step; median ms over interleaved rounds, and XLA's compiled memory (arguments,
  temporaries);
- the step's memory, one process per base (float32, int8, nf4 kernels with a float32
  embedding as in issue 17, and nf4 with the embedding quantized too), on the issue's
  scan-stacked decoder (8 ``nn.remat`` blocks in one ``nn.scan``, d=1024, MLP 4096, vocab
  8192, batch 2x128; kernels quantized per layer via ``lora.quantize(..., probe=...)``) and on
  the unstacked decoder: XLA's compiled memory analysis (arguments, temporaries, their peak),
  the process's peak RSS over the timed steps (``VmHWM``, reset after compiling and a warm-up
  step), and the median step time;
- LoftQ (nf4, r=8, 1 and 5 iterations) against plain init on the quantized base: the
  Frobenius error ``||W0 - (deQ(Q) + s a@b)||`` over the 36 adapted kernels, relative to
  ``||W0||``. The decoder's weights are random (Flax's initialisers), so the quantization
  error is close to white noise and a rank-8 fit removes little of it; trained weights, whose
  error has more low-rank structure, gain more (the LoftQ paper).

Timings on a small shared CPU are noisy (other processes share the cores): compare the ratios
of one run, not absolute numbers across runs.

Run:  python benchmarks/quant.py [--rounds 5] [--batch 4] [--seq 64] [--plot quant.png]
      [--memory stacked,unstacked] [--only-memory] [--d-model 1024] [--steps 5]
(the memory runs take about 8 minutes on 2 CPU cores; ``--memory ""`` skips them)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)

import jax
import jax.numpy as jnp
import numpy as np
import optax
from support.trees import adapter_entries, leaves_by_path  # tests/support: no private names

import flax_lora as lora
from benchmarks.decoder import TARGETS, Decoder, ScanDecoder, loss_fn, make_batch

FORMATS = {  # name -> quantize kwargs (None: the float32 base)
    "f32": None,
    "int8": dict(dtype="int8"),
    "nf4": dict(dtype="nf4", block_size=64),
    "nf4+dq": dict(dtype="nf4", block_size=64, double_quant=True),
}


#: the memory runs: as in issue 17, the kernels quantized and the embedding table kept float32;
#: "nf4+embed" quantizes the table too (its lookups dequantize the rows they gather, `attend`
#: the whole table at the logits)
MEMORY_FORMATS = {
    "f32": None,
    "int8": dict(dtype="int8", targets=r".*/kernel"),
    "nf4": dict(dtype="nf4", block_size=64, targets=r".*/kernel"),
    "nf4+embed": dict(dtype="nf4", block_size=64),
}


def nbytes(tree: Any) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def make_step(model: Decoder, tx: optax.GradientTransformation, mode: str) -> Callable:
    fn = lora.wrap(model.apply, mode=mode)

    def step(state: tuple, qparams: Any, batch: dict) -> tuple:
        ad, opt = state
        loss, g = jax.value_and_grad(lambda a: loss_fn(lambda q, t: fn(q, a, t), qparams, batch))(
            ad
        )
        upd, opt = tx.update(g, opt, ad)
        return optax.apply_updates(ad, upd), opt, loss

    return jax.jit(step, donate_argnums=0)


def memory(fn: Any, *args: Any) -> tuple[int, int]:
    """(argument bytes, temp bytes) of the compiled ``fn``."""
    m = fn.lower(*args).compile().memory_analysis()
    return int(m.argument_size_in_bytes), int(m.temp_size_in_bytes)


def loftq_errors(
    params: Any, probe: Callable, rank: int, alpha: float, iters: int
) -> tuple[float, float]:
    """(||W0 - deQ(Q(W0))||, ||W0 - (deQ(Q) + s a@b)||) over the adapted kernels, / ||W0||."""
    config = lora.LoraConfig(
        rank=rank, alpha=alpha, targets=TARGETS, init="loftq", loftq_iter=iters
    )
    adapters, qparams = lora.init(jax.random.key(3), params, config, probe=probe)
    table = adapter_entries(adapters)
    w0 = {p: x for p, x in leaves_by_path(params).items() if p in table}
    plain = leaves_by_path(lora.dequantize(lora.quantize(params, targets=TARGETS)))
    merged = leaves_by_path(lora.merge(lora.dequantize(qparams), adapters))
    sq = lambda d: sum(float(jnp.sum((w0[p] - d[p]) ** 2)) for p in w0)
    norm = np.sqrt(sum(float(jnp.sum(w**2)) for w in w0.values()))
    return np.sqrt(sq(plain)) / norm, np.sqrt(sq(merged)) / norm


def plot(path: str, sizes: dict, med: dict, mem: dict) -> None:
    """Bar charts: params bytes, step time, and the step's compiled memory, per base format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sizes)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    axes[0].bar(names, [sizes[n] / 2**20 for n in names])
    axes[0].set_title("params tree (MiB)")
    axes[1].bar(names, [med[n] for n in names])
    axes[1].set_title("LoRA step, median (ms)")
    args_mib = [mem[n][0] / 2**20 for n in names]
    axes[2].bar(names, args_mib, label="arguments")
    axes[2].bar(names, [mem[n][1] / 2**20 for n in names], bottom=args_mib, label="temporaries")
    axes[2].set_title("step memory, XLA (MiB)")
    axes[2].legend()
    fig.suptitle("QLoRA on the benchmark decoder: base in f32 / int8 / nf4")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


# ---------------------------------------------------------------------------------------------
# step memory, one base format per process (for its peak RSS)
# ---------------------------------------------------------------------------------------------
def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    """Returns freed heap to the OS and restarts the kernel's peak-RSS count (VmHWM)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(model_name: str, fmt: str, args: Any) -> None:
    """One base format on one model in this process: compiled memory, peak RSS, step time."""
    import json

    jax.block_until_ready(jnp.zeros(()))  # the runtime up, before any model array exists
    runtime = _rss_mib("VmRSS")
    if model_name == "stacked":
        model = ScanDecoder(  # the decoder: blocks stacked by nn.scan, each remat'd
            d_model=args.d_model,
            heads=args.d_model // 64,
            hidden=4 * args.d_model,
            layers=args.stacked_layers,
            remat=True,
        )
        batch = make_batch(jax.random.key(0), batch=args.stacked_batch, seq=args.stacked_seq)
    else:
        model = Decoder(layers=args.layers)
        batch = make_batch(jax.random.key(0), batch=args.batch, seq=args.seq)
    tokens = batch["tokens"]
    probe = lambda p: model.apply(p, tokens)
    kw = MEMORY_FORMATS[fmt]
    params = jax.jit(model.init)(jax.random.key(1), tokens)
    config = lora.LoraConfig(rank=8, alpha=16.0, targets=TARGETS)
    adapters = lora.init(jax.random.key(2), params, config, probe=probe)
    base = params if kw is None else jax.block_until_ready(lora.quantize(params, probe=probe, **kw))
    del params
    tx = optax.adamw(1e-4)
    step = make_step(model, tx, args.mode)
    state = (adapters, tx.init(adapters))
    compiled = step.lower(state, base, batch).compile()
    m = compiled.memory_analysis()
    arg, temp = int(m.argument_size_in_bytes), int(m.temp_size_in_bytes)
    out, alias = int(m.output_size_in_bytes), int(m.alias_size_in_bytes)
    out_state = step(state, base, batch)  # warm up
    jax.block_until_ready(out_state)
    state = out_state[:-1]
    _reset_peak_rss()
    before = _rss_mib("VmRSS")
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        out_state = step(state, base, batch)
        jax.block_until_ready(out_state)
        times.append(time.perf_counter() - t)
        state = out_state[:-1]
    peak_rss = _rss_mib("VmHWM")
    print(
        "RESULT "
        + json.dumps(
            dict(
                model=model_name,
                fmt=fmt,
                arg=arg,
                temp=temp,
                peak=arg + temp + out - alias,
                rss_before=before,
                rss_peak=peak_rss,
                rss_runtime=runtime,
                ms=1e3 * statistics.median(times),
                loss=float(out_state[-1]),
                base_bytes=nbytes(base),
            )
        ),
        flush=True,
    )


def step_memory(args: Any, models: list[str], formats: list[str]) -> dict:
    """Runs `child` in a fresh process per (model, format); returns their results."""
    import json
    import subprocess

    results = {}
    for model_name in models:
        for fmt in formats:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", model_name, fmt]
            cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in _PASS]
            run = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                print(run.stdout[-2000:], run.stderr[-4000:])
                raise RuntimeError(f"{model_name}/{fmt} failed")
            results[model_name, fmt] = json.loads(lines[-1][7:])
            r = results[model_name, fmt]
            print(
                f"  measured {model_name:9s} {fmt:9s}: peak {r['peak'] / 2**20:7.1f} MiB, "
                f"RSS {r['rss_peak']:7.1f} MiB, {r['ms']:8.1f} ms",
                flush=True,
            )
    return results


_PASS = (
    "steps",
    "batch",
    "seq",
    "layers",
    "mode",
    "d_model",
    "stacked_layers",
    "stacked_batch",
    "stacked_seq",
)


def print_memory(results: dict, models: list[str], formats: list[str], args: Any) -> None:
    mib = lambda b: b / 2**20
    net = lambda r: r["rss_peak"] - r["rss_runtime"]
    for model_name in models:
        f32 = results[model_name, "f32"]
        if model_name == "stacked":
            what = (
                f"scan-stacked decoder ({args.stacked_layers} nn.remat blocks in one nn.scan, "
                f"d={args.d_model}, MLP {4 * args.d_model}, vocab 8192), batch "
                f"{args.stacked_batch}x{args.stacked_seq}"
            )
        else:
            what = (
                f"unstacked benchmark decoder ({args.layers} blocks), batch {args.batch}x{args.seq}"
            )
        print(f"\nLoRA adamw step (r=8 on q, k, v, out, fc1, fc2), {what}:")
        print(
            f"{'base':9s} {'args MiB':>9s} {'temp MiB':>9s} {'peak MiB':>9s} {'x f32':>6s} "
            f"{'RSS peak':>9s} {'x f32':>6s} {'RSS-rt':>7s} {'x f32':>6s} {'ms':>8s} {'x f32':>6s} "
            f"{'loss':>8s}"
        )
        for fmt in formats:
            r = results[model_name, fmt]
            print(
                f"{fmt:9s} {mib(r['arg']):9.1f} {mib(r['temp']):9.1f} {mib(r['peak']):9.1f} "
                f"{r['peak'] / f32['peak']:6.3f} {r['rss_peak']:9.1f} "
                f"{r['rss_peak'] / f32['rss_peak']:6.3f} {net(r):7.1f} {net(r) / net(f32):6.3f} "
                f"{r['ms']:8.1f} "
                f"{r['ms'] / f32['ms']:6.3f} {r['loss']:8.4f}"
            )
    print(
        "(peak: XLA's compiled memory analysis, arguments + temporaries + outputs not aliased; "
        "RSS peak: the process's VmHWM over the timed steps, after compiling and one warm-up "
        "step, including the runtime's own ~0.3-0.5 GiB; RSS-rt: that peak less the process's "
        "RSS once the JAX runtime was up, before any model array existed (compiled code "
        "included); ms: "
        "median step time, one process per base, so compare ratios of one run)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--reps", type=int, default=2, help="timed calls per variant per round")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--mode", default="auto", help="lora.wrap mode")
    ap.add_argument("--skip-loftq", action="store_true")
    ap.add_argument("--plot", default=None, help="also save a bar chart (PNG) to this path")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per process (memory runs)")
    ap.add_argument("--d-model", type=int, default=1024, help="stacked decoder width")
    ap.add_argument("--stacked-layers", type=int, default=8)
    ap.add_argument("--stacked-batch", type=int, default=2)
    ap.add_argument("--stacked-seq", type=int, default=128)
    ap.add_argument(
        "--memory", default="stacked,unstacked", help="models for the per-process memory runs"
    )
    ap.add_argument("--only-memory", action="store_true", help="skip the in-process timings")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args)
        return
    models = [m for m in args.memory.split(",") if m]
    if models:
        print(f"step memory, one process per model and base {list(MEMORY_FORMATS)}:", flush=True)
        results = step_memory(args, models, list(MEMORY_FORMATS))
        print_memory(results, models, list(MEMORY_FORMATS), args)
    if args.only_memory:
        return
    t0 = time.perf_counter()
    model = Decoder(layers=args.layers)
    batch = make_batch(jax.random.key(0), batch=args.batch, seq=args.seq)
    tokens = batch["tokens"]
    params = jax.jit(model.init)(jax.random.key(1), tokens)
    config = lora.LoraConfig(rank=8, alpha=16.0, targets=TARGETS)
    probe = lambda p: model.apply(p, tokens)
    adapters = lora.init(jax.random.key(2), params, config, probe=probe)
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cpus; decoder "
        f"{args.layers} blocks, batch {args.batch}x{args.seq}; LoRA r=8 on "
        f"{len(jax.tree.leaves(adapters)) // 2} kernels, wrap mode {args.mode!r}"
    )

    bases = {
        name: params if kw is None else jax.block_until_ready(lora.quantize(params, **kw))
        for name, kw in FORMATS.items()
    }
    n_kernels = sum(
        isinstance(x, lora.QuantizedKernel)
        for x in jax.tree.leaves(
            bases["nf4"], is_leaf=lambda x: isinstance(x, lora.QuantizedKernel)
        )
    )
    f32 = nbytes(params)
    print(
        f"\nparams tree bytes ({n_kernels} leaves quantized: every kernel and the embedding "
        "table; biases and norms stay float32)"
    )
    print(f"{'base':10s} {'MiB':>10s} {'x f32':>8s} {'bits/weight':>12s}")
    n_weights = sum(x.size for x in jax.tree.leaves(params))
    for name, tree in bases.items():
        b = nbytes(tree)
        print(f"{name:10s} {b / 2**20:10.2f} {b / f32:8.3f} {8 * b / n_weights:12.2f}")

    tx = optax.adamw(1e-4)
    step = make_step(model, tx, args.mode)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    states, mem = {}, {}
    for name, base in bases.items():
        state = (copy(adapters), tx.init(adapters))
        mem[name] = memory(step, state, base, batch)
        out = step(state, base, batch)  # compile + warm up
        jax.block_until_ready(out)
        states[name] = out[:-1]
    losses = {name: float(step(states[name], bases[name], batch)[-1]) for name in bases}
    states = {name: (copy(adapters), tx.init(adapters)) for name in bases}

    times: dict[str, list[float]] = {k: [] for k in bases}
    for _ in range(args.rounds):
        for name, base in bases.items():
            for _ in range(args.reps):
                t = time.perf_counter()
                out = step(states[name], base, batch)
                jax.block_until_ready(out)
                times[name].append(time.perf_counter() - t)
                states[name] = out[:-1]
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    print(
        f"\n{'LoRA step, base in':18s} {'median ms':>10s} {'x f32':>7s} {'args MiB':>9s} "
        f"{'temp MiB':>9s} {'loss':>8s}"
    )
    for name in bases:
        arg, temp = mem[name]
        print(
            f"{name:18s} {med[name]:10.1f} {med[name] / med['f32']:7.3f} {arg / 2**20:9.1f} "
            f"{temp / 2**20:9.1f} {losses[name]:8.4f}"
        )
    print(
        f"({args.rounds} rounds x {args.reps} calls, interleaved. 'args': what stays resident "
        "between steps (base + adapters + optimizer state + batch). 'temp': XLA's scratch, "
        "where each kernel is dequantized at its use (in this table the embedding is "
        "quantized too: `attend` dequantizes the whole table for the logits).)"
    )
    if args.plot:
        plot(args.plot, {k: nbytes(v) for k, v in bases.items()}, med, mem)

    if not args.skip_loftq:
        print("\nLoftQ (nf4, r=8, alpha=16) on the 36 adapted kernels: ||W0 - W|| / ||W0||")
        for iters in (1, 5):
            t = time.perf_counter()
            plain, loftq = loftq_errors(params, probe, 8, 16.0, iters)
            print(
                f"loftq_iter={iters}: plain init (W = deQ(Q(W0))) {plain:.5f}, LoftQ "
                f"(W = deQ(Q) + s a@b) {loftq:.5f}: {100 * (1 - loftq / plain):.2f}% lower "
                f"({time.perf_counter() - t:.0f} s)"
            )
    print(f"\nwall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
