"""Several adapters in one generation batch: each sequence decodes with its own LoRA adapter.

A small character-level decoder (Linen, KV cache) is pretrained on the dataset descriptions that
ship with scikit-learn (digits, wine, breast cancer, diabetes). Two LoRA adapter sets are then
trained on the frozen base, each on its own text:

  adapter 0: the Zen of Python (the standard library's ``this`` module);
  adapter 1: scikit-learn's description of the iris dataset.

Then ONE batch of prompts decodes greedily with a KV cache, one jitted step per token, each
sequence through its own adapter (``lora.stack`` + ``lora_ids``; -1 is the base model), and
every sequence is checked against the same prompt decoded alone through the plain model with its
adapter merged (``lora.merge``): the tokens must be equal (the script exits with 1 otherwise).

Run:  python examples/generate.py    (about a minute on a 2-core CPU)
Writes examples/out/generate_loss.png.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import OUT, fit, plot_losses
from sklearn import datasets

import flax_lora as lora

VOCAB, SEQ, BATCH = 128, 64, 32
TARGETS = r".*/(query|key|value|out|fc1_\d|fc2_\d)/kernel"


class CharDecoder(nn.Module):
    """Causal self-attention blocks over characters, a tied embedding; no positional encoding
    (a causal decoder learns positions from its mask). ``decode=True``: a KV cache."""

    d: int = 96
    layers: int = 2
    decode: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        embed = nn.Embed(VOCAB, self.d, name="embed")
        x = embed(tokens)
        mask = None if self.decode else nn.make_causal_mask(tokens)
        for i in range(self.layers):
            h = nn.LayerNorm(name=f"ln{i}a")(x)
            x = x + nn.MultiHeadDotProductAttention(
                num_heads=4, decode=self.decode, name=f"attn{i}"
            )(h, h, mask=mask)
            h = nn.LayerNorm(name=f"ln{i}b")(x)
            h = nn.gelu(nn.Dense(4 * self.d, name=f"fc1_{i}")(h))
            x = x + nn.Dense(self.d, name=f"fc2_{i}")(h)
        return embed.attend(nn.LayerNorm(name="ln_f")(x))


def texts() -> dict[str, str]:
    with contextlib.redirect_stdout(io.StringIO()):
        import this  # noqa: F401  (prints the Zen of Python on import)
    zen = codecs.decode(sys.modules["this"].s, "rot13")
    base = "\n".join(
        load(return_X_y=False).DESCR
        for load in (
            datasets.load_digits,
            datasets.load_wine,
            datasets.load_breast_cancer,
            datasets.load_diabetes,
        )
    )
    return {"base": base, "zen": zen, "iris": datasets.load_iris().DESCR}


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii", "replace"), np.uint8).astype(np.int32) % VOCAB


def windows(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Every window of SEQ characters (inputs) and the same shifted by one (targets)."""
    ids = encode(text)
    idx = np.arange(len(ids) - SEQ)[:, None] + np.arange(SEQ + 1)[None, :]
    w = ids[idx]
    return w[:, :-1], w[:, 1:]


def xent(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_step(loss_of: Callable[[Any, Any, Any], jax.Array], tx: optax.GradientTransformation):
    @jax.jit
    def step(carry: tuple, x: Any, y: Any) -> tuple:
        trained, opt = carry
        loss, g = jax.value_and_grad(loss_of)(trained, x, y)
        upd, opt = tx.update(g, opt, trained)
        return (optax.apply_updates(trained, upd), opt), loss

    return step


def decode(
    apply: Callable[..., Any],
    variables: Any,
    prompts: np.ndarray,
    lengths: np.ndarray,
    new: int,
    *extra: Any,
    **kw: Any,
) -> np.ndarray:
    """Greedy decoding with a KV cache: the prompts' characters fed one per step (each sequence
    its own length), then each step's argmax; returns prompt + continuation, ``(B, L + new)``."""
    total = prompts.shape[1] + new
    cache = CharDecoder(decode=True).init(
        jax.random.key(0), jnp.zeros((len(prompts), total), jnp.int32)
    )["cache"]
    seq = jnp.zeros((len(prompts), total), jnp.int32).at[:, : prompts.shape[1]].set(prompts)

    @jax.jit
    def run(cache: Any, seq: jax.Array, *extra: Any) -> jax.Array:
        def body(t: jax.Array, carry: tuple) -> tuple:
            cache, seq = carry
            tok = jax.lax.dynamic_slice_in_dim(seq, t, 1, axis=1)
            logits, state = apply(
                {**variables, "cache": cache}, *extra, tok, mutable=["cache"], **kw
            )
            nxt = jnp.argmax(logits[:, -1], axis=-1).astype(seq.dtype)
            keep = t + 1 < jnp.asarray(lengths)  # still inside this sequence's prompt
            col = jnp.where(keep, jax.lax.dynamic_index_in_dim(seq, t + 1, 1, False), nxt)
            return state["cache"], jax.lax.dynamic_update_index_in_dim(seq, col, t + 1, 1)

        return jax.lax.fori_loop(0, total - 1, body, (cache, seq))[1]

    return np.asarray(run(cache, seq, *extra))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--lora-steps", type=int, default=300)
    parser.add_argument("--new", type=int, default=48, help="characters generated per prompt")
    args = parser.parse_args()
    corpus = texts()
    model = CharDecoder()
    x0, y0 = windows(corpus["base"])
    params = model.init(jax.random.key(0), x0[:2])
    tx = optax.adamw(3e-3)
    step = train_step(lambda p, x, y: xent(model.apply(p, x), y), tx)
    (params, _), base_losses = fit(
        step, (params, tx.init(params)), x0, y0, args.base_steps, BATCH, 0, "base"
    )

    fn = lora.wrap(model.apply)
    config = lora.LoraConfig(rank=8, alpha=16.0, targets=TARGETS)
    probe = lambda p: model.apply(p, x0[:2])
    sets, curves = [], {"base (scikit-learn descriptions)": base_losses}
    for i, name in enumerate(("zen", "iris")):
        x, y = windows(corpus[name])
        adapters = lora.init(jax.random.key(1 + i), params, config, probe=probe)
        tx = optax.adamw(1e-2)
        step = train_step(lambda a, x, y: xent(fn(params, a, x), y), tx)
        (adapters, _), losses = fit(
            step,
            (adapters, tx.init(adapters)),
            x,
            y,
            args.lora_steps,
            BATCH,
            1 + i,
            f"adapter {i}: {name}",
        )
        sets.append(adapters)
        curves[f"adapter {i}: {name}"] = losses
    print("loss curves:", plot_losses(curves, OUT / "generate_loss.png", "character decoder"))

    prompts = ["Beautiful is", "Iris Setosa", "Simple is", "The data", "Flat is", "Sepal"]
    ids = np.array([0, 1, 0, -1, 0, 1])
    width = max(map(len, prompts))
    padded = np.stack([np.pad(encode(p), (0, width - len(p))) for p in prompts])
    lengths = np.array([len(p) for p in prompts])
    dec = CharDecoder(decode=True)
    routed = decode(
        lora.wrap(dec.apply), params, padded, lengths, args.new, lora.stack(sets), lora_ids=ids
    )
    ok = True
    for j, (p, k) in enumerate(zip(prompts, ids, strict=True)):
        merged = params if k < 0 else lora.merge(params, sets[k])
        alone = decode(dec.apply, merged, padded[j : j + 1], lengths[j : j + 1], args.new)[0]
        same = np.array_equal(alone, routed[j])
        ok &= same
        text = bytes(routed[j][lengths[j] : lengths[j] + args.new].astype(np.uint8)).decode(
            "ascii", "replace"
        )
        who = "base" if k < 0 else f"adapter {k}"
        print(
            f"[{who:>9}] {p!r} -> {text!r}  {'(= alone, merged)' if same else 'DIFFERS from alone'}"
        )
    print("every sequence equals its own merged model decoding alone:", ok)
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
