"""Compiled peak memory of a bfloat16 LoRA training step: flax_lora vs gemma's LoRA.

A Gemma-like decoder of our own in Linen (`GemmaLike`: RMSNorm, grouped-query attention with
``DenseGeneral`` q / k / v / o, gated GELU MLP, tied embedding; 4 layers, d 512, 8 query heads
and 2 key-value heads of 64, MLP 2048, vocab 8192), batch 4x128, every parameter in bfloat16.
Side by side in one process, each step jitted with its state donated, XLA's compiled memory
analysis (temp bytes and argument + output + temp - aliased) of:

- full fine-tuning (adamw on every parameter);
- flax_lora, ``lora.wrap(mode="auto")`` (factored), bfloat16 factors, and float32 factors;
- gemma's LoRA: `gemma.gm.nn.LoRA` wrapping the same Linen decoder where the ``gemma`` package
  is installed (it replaces every ``nn.DenseGeneral`` by ``gemma.peft.LoRADenseGeneral``), and
  always the reference module `GemmaStyleLora`: gemma.peft's form re-implemented here
  (``x @ a @ b`` in the factors' dtype by two ``dot_general``, added to the base output);

all with r = 8 on q, k, v, o, gate, up, down of every layer (28 kernels). The ratios are to
full fine-tuning. Then the outputs: the flax_lora bfloat16 factored step's loss and logits
against a float32 reference (float32 base and factors, the same values), and the gemma-style
reference's logits against flax_lora's on the same adapters.

With the ``gemma`` package installed the script also measures the package's own Gemma 3
(``gm.nn.Transformer``, the same sizes, bf16) with full fine-tuning, flax_lora and
`gm.nn.LoRA`, as issue 26 did. The package needs Python >= 3.12 (and pulls TensorFlow): it is
no dependency of this project, and without it the script measures the reference alone and
says so.

Run:  python -m benchmarks.bf16_memory   (about a minute on 2 CPUs; compile only, no timing)
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import flax_lora as lora

#: LoRA targets: every projection of attention and MLP (the kernels gemma's LoRA wraps).
TARGETS = r"params/layer_\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel"
RANK, ALPHA = 8, 8.0  # gemma's LoRA has no alpha: scale alpha / r = 1 is its form


class GemmaStyleLora(nn.Module):
    """gemma.peft's ``LoRADenseGeneralAdapter`` re-implemented (reference, not the package):
    ``dot_general(dot_general(x, a), b)`` with ``x`` promoted to the factors' dtype, no
    accumulation dtype asked for, the result added to the base output by the caller."""

    features: tuple[int, ...]
    axis: tuple[int, ...]
    rank: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axis = tuple(a % x.ndim for a in self.axis)
        a = self.param(
            "a", nn.initializers.zeros_init(), (*(x.shape[i] for i in axis), self.rank), self.dtype
        )
        b = self.param("b", nn.initializers.zeros_init(), (self.rank, *self.features), self.dtype)
        x = nn.dtypes.promote_dtype(x, dtype=self.dtype)[0]
        low = jax.lax.dot_general(x, a, ((axis, tuple(range(len(axis)))), ((), ())))
        return jax.lax.dot_general(low, b, (((low.ndim - 1,), (0,)), ((), ())))


def _dense(features: Any, axis: Any, cfg: GemmaLike, name: str) -> Callable[[jax.Array], Any]:
    """The projection ``name``: an ``nn.DenseGeneral`` (what gm.nn.LoRA intercepts), with the
    `GemmaStyleLora` adapter added when ``cfg.lora_rank`` > 0."""
    base = nn.DenseGeneral(
        features, axis=axis, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.dtype, name=name
    )
    if not cfg.lora_rank or name not in cfg.lora_on:
        return base
    feats = tuple(features) if isinstance(features, tuple) else (features,)
    axes = tuple(axis) if isinstance(axis, tuple) else (axis,)
    adapter = GemmaStyleLora(feats, axes, cfg.lora_rank, cfg.lora_dtype, name=f"{name}_lora")
    return lambda x: base(x) + adapter(x)


class Attention(nn.Module):
    cfg: GemmaLike

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        q = _dense((c.heads, c.head_dim), -1, c, "q")(x)
        k = _dense((c.kv_heads, c.head_dim), -1, c, "k")(x)
        v = _dense((c.kv_heads, c.head_dim), -1, c, "v")(x)
        b, t = x.shape[:2]
        q = q.reshape(b, t, c.kv_heads, c.heads // c.kv_heads, c.head_dim) * c.head_dim**-0.5
        s = jnp.einsum("btkgh,bskh->bkgts", q, k).astype(jnp.float32)
        mask = jnp.tril(jnp.ones((t, t), bool))
        s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(c.dtype)
        o = jnp.einsum("bkgts,bskh->btkgh", p, v).reshape(b, t, c.heads, c.head_dim)
        return _dense(c.d_model, (-2, -1), c, "o")(o)


class Mlp(nn.Module):
    cfg: GemmaLike

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        h = nn.gelu(_dense(c.hidden, -1, c, "gate")(x)) * _dense(c.hidden, -1, c, "up")(x)
        return _dense(c.d_model, -1, c, "down")(h)


class Layer(nn.Module):
    cfg: GemmaLike

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        norm = lambda name: nn.RMSNorm(dtype=c.dtype, param_dtype=c.dtype, name=name)
        x = x + Attention(c, name="attn")(norm("pre_attn_norm")(x))
        return x + Mlp(c, name="mlp")(norm("pre_mlp_norm")(x))


@dataclasses.dataclass(frozen=True)
class GemmaLike:
    """Sizes and dtypes of `GemmaDecoder` (``lora_rank`` > 0 adds the gemma-style adapters)."""

    vocab: int = 8192
    d_model: int = 512
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    hidden: int = 2048
    layers: int = 4
    dtype: Any = jnp.bfloat16
    lora_rank: int = 0
    lora_dtype: Any = jnp.bfloat16
    lora_on: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


class GemmaDecoder(nn.Module):
    """The Gemma-like decoder: tokens ``(batch, seq)`` -> float32 logits ``(batch, seq, vocab)``.
    Kernels ``params/layer_{i}/attn/{q,k,v,o}/kernel``, ``params/layer_{i}/mlp/{gate,up,down}
    /kernel``; the tied table ``params/embed/embedding``."""

    cfg: GemmaLike = GemmaLike()

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.cfg
        embed = nn.Embed(c.vocab, c.d_model, dtype=c.dtype, param_dtype=c.dtype, name="embed")
        x = embed(tokens) * jnp.asarray(c.d_model**0.5, c.dtype)
        for i in range(c.layers):
            x = Layer(c, name=f"layer_{i}")(x)
        x = nn.RMSNorm(dtype=c.dtype, param_dtype=c.dtype, name="final_norm")(x)
        return embed.attend(x).astype(jnp.float32)


def make_batch(key: jax.Array, cfg: GemmaLike, batch: int = 4, seq: int = 128) -> dict:
    t = jax.random.randint(key, (batch, seq + 1), 0, cfg.vocab)
    return {"tokens": t[:, :-1], "targets": t[:, 1:]}


def xent(logits: jax.Array, batch: dict) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def memory(compiled: Any) -> tuple[int, int]:
    """(temp bytes, argument + output + temp - aliased bytes) of a compiled executable."""
    m = compiled.memory_analysis()
    temp = int(m.temp_size_in_bytes)
    total = temp + int(m.argument_size_in_bytes) + int(m.output_size_in_bytes)
    return temp, total - int(getattr(m, "alias_size_in_bytes", 0))


TX = optax.adamw(1e-4)


def full_step(apply: Callable) -> Callable:
    def step(state: tuple, frozen: Any, batch: dict) -> tuple:
        p, opt = state
        loss, g = jax.value_and_grad(lambda q: xent(apply(q, batch["tokens"]), batch))(p)
        upd, opt = TX.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    return step


def flax_lora_step(apply: Callable) -> Callable:
    """flax_lora's factored step: grad w.r.t. the adapters (``lora.wrap(mode="auto")``)."""
    fn = lora.wrap(apply, mode="auto")

    def step(state: tuple, params: Any, batch: dict) -> tuple:
        ad, opt = state
        loss, g = jax.value_and_grad(lambda a: xent(fn(params, a, batch["tokens"]), batch))(ad)
        upd, opt = TX.update(g, opt, ad)
        return optax.apply_updates(ad, upd), opt, loss

    return step


def split_step(apply: Callable) -> Callable:
    """A step on a model whose adapters live in its own params (gemma's way): ``state`` holds
    the trained leaves (flat ``{path: array}``), ``frozen`` the others; grad w.r.t. the former."""

    def step(state: tuple, frozen: Any, batch: dict) -> tuple:
        ad, opt = state

        def loss(a: Any) -> jax.Array:
            return xent(apply(merge_flat(frozen, a), batch["tokens"]), batch)

        value, g = jax.value_and_grad(loss)(ad)
        upd, opt = TX.update(g, opt, ad)
        return optax.apply_updates(ad, upd), opt, value

    return step


def split_flat(tree: Any, pick: Callable[[str], bool]) -> tuple[dict, dict]:
    flat = {jax.tree_util.keystr(k, simple=True, separator="/"): v for k, v in _leaves(tree)}
    return (
        {k: v for k, v in flat.items() if not pick(k)},
        {k: v for k, v in flat.items() if pick(k)},
    )


def _leaves(tree: Any) -> list:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def merge_flat(frozen: dict, trained: dict) -> dict:
    out: dict = {}
    for k, v in {**frozen, **trained}.items():
        node = out
        *head, last = k.split("/")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return out


def compile_step(step: Callable, state: Any, frozen: Any, batch: dict) -> Any:
    return jax.jit(step, donate_argnums=0).lower(state, frozen, batch).compile()


def make_adapters(key: jax.Array, model: Any, params: Any, tokens: jax.Array, dtype: Any) -> Any:
    """Adapters for `TARGETS` with both factors nonzero (``init="random"``), in ``dtype``."""
    config = lora.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS, init="random", dtype=dtype)
    return lora.init(key, params, config, probe=lambda p: model.apply(p, tokens))


def with_factors(params: Any, adapters: Any, dtype: Any, where: Callable[[str], str]) -> dict:
    """``params`` plus each adapter's ``{"a", "b"}`` at ``where(module path)`` (``a`` laid out as
    the kernel's input axes then r, ``b`` as r then its output axes: gemma.peft's layout), in
    ``dtype``; alpha / r = 1, so the factors are the same values as flax_lora's."""
    out = merge_flat(split_flat(params, lambda k: False)[0], {})
    is_w = lambda x: hasattr(x, "kernel_shape")
    for path, w in jax.tree_util.tree_flatten_with_path(adapters, is_leaf=is_w)[0]:
        names = [str(getattr(k, "key", k)) for k in path][:-1]  # drop "kernel"
        shape, n_in = w.kernel_shape, len(w.in_axes)
        node = out
        for n in where("/".join(names)).split("/"):
            node = node.setdefault(n, {})
        node["a"] = jnp.reshape(w.a, (*shape[:n_in], w.a.shape[-1])).astype(dtype)
        node["b"] = jnp.reshape(w.b, (w.b.shape[0], *shape[n_in:])).astype(dtype)
    return out


def cast(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def rel_err(x: jax.Array, ref: jax.Array) -> float:
    """max |x - ref| / max |ref| in float64."""
    x64, r64 = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x64 - r64)) / np.max(np.abs(r64)))


def _gemma() -> Any:
    try:
        from gemma import gm
    except ImportError:
        return None
    return gm


def measure(cfg: GemmaLike, batch: dict) -> dict[str, tuple[int, int]]:
    """Compiled (temp, total) bytes of each step on the Gemma-like decoder of ``cfg``."""
    model = GemmaDecoder(cfg)
    tokens = batch["tokens"]
    params = model.init(jax.random.key(1), tokens)
    ad16 = make_adapters(jax.random.key(2), model, params, tokens, jnp.bfloat16)
    ad32 = cast(ad16, jnp.float32)
    out: dict[str, tuple[int, int]] = {}
    out["full fine-tuning"] = memory(
        compile_step(full_step(model.apply), (params, TX.init(params)), None, batch)
    )
    for name, ad in (("flax_lora, bf16 factors", ad16), ("flax_lora, f32 factors", ad32)):
        step = flax_lora_step(model.apply)
        out[name] = memory(compile_step(step, (ad, TX.init(ad)), params, batch))
    variants = []
    for dt, tag in ((jnp.bfloat16, "bf16"), (jnp.float32, "f32")):
        ref = GemmaDecoder(dataclasses.replace(cfg, lora_rank=RANK, lora_dtype=dt))
        p = with_factors(params, ad16, dt, lambda m: f"{m}_lora")
        variants.append((f"gemma-style reference, {tag} factors", ref.apply, p, "_lora/"))
    gm = _gemma()
    if gm is not None:
        for dt, tag in ((jnp.bfloat16, "bf16"), (jnp.float32, "f32")):
            wrapped = gm.nn.LoRA(rank=RANK, model=GemmaDecoder(cfg), dtype=dt)
            p = with_factors(params, ad16, dt, lambda m: f"{m}/lora")
            variants.append((f"gemma gm.nn.LoRA, {tag} factors", wrapped.apply, p, "/lora/"))
    for name, apply, p, mark in variants:
        frozen, trained = split_flat(p, lambda k, mark=mark: mark in k)  # type: ignore[misc]
        step = split_step(apply)
        out[name] = memory(compile_step(step, (trained, TX.init(trained)), frozen, batch))
    return out


def check_outputs(cfg: GemmaLike, batch: dict) -> None:
    """flax_lora's bf16 factored loss and logits against a float32 reference (float32 base and
    factors of the same values, the merged model), beside the bf16 base model's own error."""
    tokens = batch["tokens"]
    model16 = GemmaDecoder(cfg)
    model32 = GemmaDecoder(dataclasses.replace(cfg, dtype=jnp.float32))
    params = model16.init(jax.random.key(1), tokens)
    ad16 = make_adapters(jax.random.key(2), model16, params, tokens, jnp.bfloat16)
    p32, ad32 = cast(params, jnp.float32), cast(ad16, jnp.float32)
    fn = lora.wrap(model16.apply, mode="auto")
    loss16, g16 = jax.jit(jax.value_and_grad(lambda a: xent(fn(params, a, tokens), batch)))(ad16)
    logits16 = jax.jit(fn)(params, ad16, tokens)
    ref32 = jax.jit(lambda p, a: model32.apply(lora.merge(p, a), tokens))(p32, ad32)
    loss32 = xent(ref32, batch)
    base16 = jax.jit(model16.apply)(params, tokens)
    base32 = jax.jit(model32.apply)(p32, tokens)
    gref = GemmaDecoder(dataclasses.replace(cfg, lora_rank=RANK))
    gp = with_factors(params, ad16, jnp.bfloat16, lambda m: f"{m}_lora")
    gstyle16 = jax.jit(gref.apply)(gp, tokens)
    print("\noutputs against the float32 reference (max |diff| / max |ref|)")
    print(f"  flax_lora bf16 factored logits  {rel_err(logits16, ref32):.4f}")
    print(f"  gemma-style bf16 logits         {rel_err(gstyle16, ref32):.4f}")
    print(f"  base model alone, bf16 vs f32   {rel_err(base16, base32):.4f}")
    print(f"  loss: bf16 factored {float(loss16):.5f}, float32 reference {float(loss32):.5f}")
    del g16


def measure_gemma3(gm: Any, batch: dict) -> dict[str, tuple[int, int]]:
    """The package's own Gemma 3 (``gm.nn.Transformer``: 4 layers, d 512, 8 query and 2
    key-value heads of 64, MLP 2048, vocab 8192, bf16): full fine-tuning, flax_lora (bf16
    factors on every attention and MLP kernel) and `gm.nn.LoRA` (bf16)."""
    kinds = gm.nn.config.AttentionType
    config = gm.nn.config.TransformerConfig(
        num_embed=8192, embed_dim=512, hidden_dim=2048, num_heads=8, head_dim=64,
        num_kv_heads=2, final_logit_softcap=None, use_post_attn_norm=True,
        use_post_ffw_norm=True, use_qk_norm=True, sliding_window_size=64,
        attention_types=gm.nn.config.make_attention_layers_types(
            (kinds.LOCAL_SLIDING, kinds.GLOBAL), num_layers=4
        ),
        transpose_gating_einsum=True, local_base_frequency=10_000,
        global_base_frequency=1_000_000, vision_encoder=None,
    )  # fmt: skip
    model = gm.nn.Transformer(config=config, dtype=jnp.bfloat16)
    tokens = batch["tokens"]
    params = cast(model.init(jax.random.key(1), tokens), jnp.bfloat16)
    apply = lambda p, t: model.apply(p, t).logits.astype(jnp.float32)
    targets = r"params/layer_\d+/(attn/(q|kv|attn_vec)_einsum/w|mlp/(gating_einsum|linear))"
    cfg = lora.LoraConfig(rank=RANK, alpha=ALPHA, targets=targets, dtype=jnp.bfloat16)
    ad = lora.init(jax.random.key(2), params, cfg, probe=lambda p: apply(p, tokens))
    out = {
        "full fine-tuning": memory(
            compile_step(full_step(apply), (params, TX.init(params)), None, batch)
        ),
        "flax_lora, bf16 factors": memory(
            compile_step(flax_lora_step(apply), (ad, TX.init(ad)), params, batch)
        ),
    }
    wrapped = gm.nn.LoRA(rank=RANK, model=model, dtype=jnp.bfloat16)
    wapply = lambda p, t: wrapped.apply(p, t).logits.astype(jnp.float32)
    p = cast(wrapped.init(jax.random.key(1), tokens), jnp.bfloat16)
    frozen, trained = split_flat(p, lambda k: "lora" in k.lower())
    out["gemma gm.nn.LoRA, bf16 factors"] = memory(
        compile_step(split_step(wapply), (trained, TX.init(trained)), frozen, batch)
    )
    return out


def _table(title: str, mem: dict[str, tuple[int, int]]) -> None:
    full = mem["full fine-tuning"][1]
    print(f"\n{title:36s} {'temp MiB':>9s} {'peak MiB':>9s} {'x full':>7s}")
    for name, (temp, total) in mem.items():
        print(f"{name:36s} {temp / 2**20:9.1f} {total / 2**20:9.1f} {total / full:7.3f}")


def main() -> None:
    cfg = GemmaLike()
    batch = make_batch(jax.random.key(0), cfg)
    gm = _gemma()
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cpus; "
        f"gemma package: {'installed' if gm is not None else 'not installed'}; "
        f"{cfg.layers} layers, d {cfg.d_model}, batch {batch['tokens'].shape}, r {RANK}"
    )
    mem = measure(cfg, batch)
    _table("compiled step (bf16 base)", mem)
    ours, ref = mem["flax_lora, bf16 factors"], mem["gemma-style reference, bf16 factors"]
    print(
        f"flax_lora bf16 - gemma-style bf16: temp {ours[0] - ref[0]:+d} bytes, "
        f"peak {ours[1] - ref[1]:+d} bytes"
    )
    check_outputs(cfg, batch)
    if gm is not None:
        _table("the gemma package's Gemma 3", measure_gemma3(gm, batch))


if __name__ == "__main__":
    main()
