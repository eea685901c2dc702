"""Fine-tune a google-tunix model with flax_lora and serve the adapter with transformers + PEFT.

The path of a tunix user: a HuggingFace checkpoint loaded into a tunix model, LoRA trained in JAX,
the adapter handed to PyTorch. Here the checkpoint is a tiny random ``LlamaForCausalLM`` (2
layers, d=64; no download), written with ``save_pretrained`` and loaded into tunix's ``Llama3``
by tunix's own loader (``tunix.models.llama3.params.create_model_from_safe_tensors``).

1. The tunix model is split, ``graphdef, state = nnx.split(model)``; ``apply(state, tokens)``
   runs it. LoRA (rank 8) goes on every attention and MLP kernel and on ``lm_head``
   (``lora.init`` with a probe: tunix's attention kernels are 3-D einsums ``(D, N, H)``).
2. A few optax (Adam) steps on a toy next-token task (arithmetic sequences mod the vocabulary:
   each token is the previous one plus a step that the sequence's first two tokens show), with
   ``lora.wrap(apply, mode="factored")`` (no adapted kernel is formed) and a tqdm bar.
3. ``lora.save_peft(..., key_map=lora.key_map("tunix/llama3"))`` writes PEFT's files, named as
   transformers names the modules (``layers/0/attn/q_proj/w`` -> ``model.layers.0.self_attn.
   q_proj``); ``PeftModel.from_pretrained`` loads them onto the PyTorch checkpoint, and the
   logits of both sides are compared. The script exits with status 1 when they differ by more
   than ``--tol`` times the largest logit (float32 rounding).

Needs the ``tunix`` and ``interop`` extras (``pip install -e '.[tunix,interop,examples]'``).

Run:  python examples/tunix_to_peft.py        (about 15 s on a 2-core CPU)
Outputs: examples/out/tunix_base/ (the HF checkpoint), examples/out/tunix_peft/ (the adapter).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import torch
import transformers
from flax import nnx
from tqdm import tqdm
from tunix.models.llama3 import model as llama3_model
from tunix.models.llama3 import params as llama3_params

import flax_lora as lora

OUT = Path(__file__).resolve().parent / "out"
VOCAB, D, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 64, 128, 2, 4, 2, 16
ROPE_THETA = 1_000_000  # tunix's Llama3 attention applies RoPE with this theta


def hf_checkpoint(directory: Path, seed: int) -> None:
    """A tiny random Llama in HuggingFace's format (config.json, model.safetensors)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        rope_theta=float(ROPE_THETA), rms_norm_eps=1e-6, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def tunix_config() -> llama3_model.ModelConfig:
    return llama3_model.ModelConfig(
        num_layers=LAYERS, vocab_size=VOCAB, embed_dim=D, hidden_dim=HIDDEN, num_heads=HEADS,
        head_dim=HEAD_DIM, num_kv_heads=KV_HEADS, rope_theta=ROPE_THETA, norm_eps=1e-6,
    )  # fmt: skip


def batches(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """Arithmetic sequences mod VOCAB: a random start and a random step in 1..4."""
    start = rng.integers(0, VOCAB, (batch, 1))
    step = rng.integers(1, 5, (batch, 1))
    return (start + step * np.arange(length)[None, :]) % VOCAB


def torch_logits(model: Any, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="optax steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=12, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-5, help="relative logit difference")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    start = time.perf_counter()

    # -- the base model: a HF checkpoint loaded into tunix by tunix's loader --------------------
    base_dir = args.out / "tunix_base"
    shutil.rmtree(base_dir, ignore_errors=True)
    hf_checkpoint(base_dir, args.seed)
    model = llama3_params.create_model_from_safe_tensors(str(base_dir), tunix_config())
    graphdef, state = nnx.split(model)

    def apply(s: Any, tokens: jax.Array) -> jax.Array:
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
        logits, _ = nnx.merge(graphdef, s)(tokens, positions, None, mask)
        return logits

    # -- LoRA on every attention and MLP kernel and on lm_head ----------------------------------
    config = lora.LoraConfig(
        rank=args.rank,
        alpha=2.0 * args.rank,
        targets=r"layers/\d+/(attn/[qkvo]_proj/w|mlp/(gate|up|down)_proj/kernel)|lm_head/w",
    )
    rng = np.random.default_rng(args.seed)
    sample = jnp.asarray(batches(rng, 2, args.length))
    adapters = lora.init(jax.random.key(args.seed), state, config, probe=lambda s: apply(s, sample))
    lora.summary(state, adapters)
    fn = lora.wrap(apply, mode="factored")
    tx = optax.adam(args.lr)

    def loss_fn(ad: Any, tokens: jax.Array) -> jax.Array:
        logits = fn(state, ad, tokens[:, :-1])[:, 1:]  # from the third token the step is known
        targets = tokens[:, 2:]
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def step(ad: Any, opt_state: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(ad, tokens)
        updates, opt_state = tx.update(grads, opt_state, ad)
        return optax.apply_updates(ad, updates), opt_state, loss

    held_out = jnp.asarray(batches(np.random.default_rng(args.seed + 1), 64, args.length))
    before = float(jax.jit(loss_fn)(adapters, held_out))
    opt_state = tx.init(adapters)
    bar = tqdm(range(args.steps), desc="LoRA on tunix Llama3", unit="step")
    for _ in bar:
        tokens = jnp.asarray(batches(rng, args.batch_size, args.length))
        adapters, opt_state, loss = step(adapters, opt_state, tokens)
        bar.set_postfix(loss=f"{float(loss):.3f}")
    after = float(jax.jit(loss_fn)(adapters, held_out))
    logits = np.asarray(jax.jit(fn)(state, adapters, held_out))
    accuracy = float((logits[:, 1:-1].argmax(-1) == np.asarray(held_out)[:, 2:]).mean())
    print(f"held-out loss {before:.3f} -> {after:.3f}; next-token accuracy {accuracy:.1%}")

    # -- to PyTorch: PEFT's files, named by the catalogue's key map -----------------------------
    peft_dir = args.out / "tunix_peft"
    shutil.rmtree(peft_dir, ignore_errors=True)
    lora.save_peft(peft_dir, adapters, config, key_map=lora.key_map("tunix/llama3"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()
        torch_model = peft.PeftModel.from_pretrained(torch_model, str(peft_dir)).eval()
    theirs = torch_logits(torch_model, np.asarray(held_out))
    diff = float(np.abs(logits - theirs).max())
    scale = float(np.abs(logits).max())
    print(f"wrote {peft_dir}: {len(list(peft_dir.iterdir()))} files")
    print(
        f"logits, JAX (tunix + flax_lora) vs PyTorch (transformers + PEFT): max |diff| "
        f"{diff:.2e}, {diff / scale:.1e} of the largest logit {scale:.1f} (tolerance {args.tol:g})"
    )
    print(f"done in {time.perf_counter() - start:.1f} s")
    if not diff <= args.tol * scale:
        print("FAIL: the two sides disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
