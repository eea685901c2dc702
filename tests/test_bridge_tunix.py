"""`lora.NnxBridge` inside tunix's own loops: its ``PeftTrainer`` and its ``Sampler``.

A tiny Qwen3 from ``tunix.models`` (2 layers, random weights) is adapted with flax_lora
adapters through the bridge and trained a few steps by tunix's ``PeftTrainer``, which finds
LoRA by the bridge's ``nnx.LoRAParam`` variables. Checked against independent references: the
base params are bitwise what they were (compared with a numpy copy taken before), the loss
(tunix's own loss function) falls, the checkpoint tunix writes holds exactly the adapters'
arrays (read back by orbax without a target) and a new trainer restores them, and they go to
HF PEFT files (`lora.key_map("tunix/qwen3")`) and back exactly; tunix's sampler
generates with the bridge the greedy tokens of the merged model (`lora.merged`) run through the
same sampler (for a tiny Llama3 too, which has no ``init_cache`` of its own, so the sampler
builds its cache from ``CacheConfig``; and a tiny Gemma3: tied embedding, fused kv einsum,
``get_attention_mask`` read through the bridge).

These tests need the ``google-tunix`` package (not a dependency of flax_lora, nor installed by
CI): they skip without it. Set-up, in a venv of its own (tunix pins its own jax and flax):
``python3 -m venv venv_tunix && venv_tunix/bin/pip install -e '.[test,tunix]'`` (about 3
minutes; no PyTorch), then ``venv_tunix/bin/python -m pytest tests/test_bridge_tunix.py``
(about 35 s on 2 CPU cores without a compilation cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from support.sampler_loops import normal_kernels

import flax_lora as lora

pytest.importorskip(
    "tunix", reason="the tunix bridge tests need google-tunix (pip install -e '.[test,tunix]')"
)
import orbax.checkpoint as ocp  # tunix's checkpoints
from tunix.generate import sampler as sampler_lib
from tunix.models.gemma3 import model as gemma3
from tunix.models.llama3 import model as llama3
from tunix.models.qwen3 import model as qwen3
from tunix.sft import peft_trainer
from tunix.sft import utils as sft_utils

VOCAB = 32
PAD, BOS, EOS = 0, 1, 2
# Llama3 / Qwen3 attention, Gemma3 attention (q, the fused kv, the output einsum), the MLPs
TARGETS = (
    r".*attn/(q|k|v|o)_proj/w|.*attn/(q_einsum|kv_einsum|attn_vec_einsum)/w"
    r"|.*mlp/(gate|up|down)_proj/kernel"
)
SEQ = np.array([BOS, *([3, 4, 5, 6, 7, 8, 9, 10] * 2)], np.int32)  # the pattern to learn


class Tokenizer:
    """Characters 'a'.. as ids 3..: the methods tunix's TokenizerAdapter asks of a tokenizer."""

    def encode(self, text: str, **_: Any) -> list[int]:
        return [ord(c) - ord("a") + 3 for c in text]

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(chr(i - 3 + ord("a")) if i >= 3 else "" for i in ids)

    def bos_id(self) -> int:
        return BOS

    def eos_id(self) -> int:
        return EOS

    def pad_id(self) -> int:
        return PAD


LLAMA_LIKE = dict(vocab_size=VOCAB, rope_theta=10_000, norm_eps=1e-6)
FAMILIES: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "qwen3": (qwen3.Qwen3, qwen3.ModelConfig, LLAMA_LIKE),
    # no init_cache: the sampler makes the cache from CacheConfig
    "llama3": (llama3.Llama3, llama3.ModelConfig, LLAMA_LIKE),
    # tied embedding (embedder.decode inside the call), a fused kv einsum, sliding-window layers,
    # get_attention_mask read by the sampler through the bridge
    "gemma3": (
        gemma3.Gemma3,
        gemma3.ModelConfig,
        dict(num_embed=VOCAB, sliding_window_size=8, param_dtype=jnp.float32),
    ),
}


def tiny(family: str = "qwen3", seed: int = 0) -> nnx.Module:
    """A 2-layer model of tunix's ``family`` with small dimensions and random weights."""
    make, make_config, extra = FAMILIES[family]
    config = make_config(
        num_layers=2, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8, num_kv_heads=2, **extra
    )
    model = make(config, rngs=nnx.Rngs(seed))
    # tunix initialises the MLP kernels to zeros (weights come from a checkpoint): random ones
    nnx.update(model, normal_kernels(nnx.state(model, nnx.Param), jax.random.key(seed + 100)))
    if family == "gemma3":
        # Gemma scales the embedded tokens by sqrt(d) and decodes with the same (tied) table: a
        # smaller table lets the layers, not the last token's own embedding, pick the next token
        table = model.embedder.input_embedding
        table[...] = 0.1 * table[...]
    return model


def model_inputs(tokens: Any) -> dict[str, Any]:
    """What tunix's PEFT CLI feeds its loss function (tunix/cli/peft_main.py)."""
    mask = tokens != PAD
    return {
        "input_tokens": tokens,
        "input_mask": mask,
        "positions": sft_utils.build_positions_from_mask(mask),
        "attention_mask": sft_utils.make_causal_attn_mask(mask),
    }


def bridged(family: str = "qwen3", seed: int = 0, init: str = "lora") -> lora.NnxBridge:
    """The tiny model with adapters on its attention and MLP kernels, in mode "factored": every
    use of an adapted kernel (tunix's 3-D attention einsums included) is factored, none
    merged."""
    model = tiny(family, seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    inputs = model_inputs(SEQ[None])

    def probe(p: Any) -> jax.Array:
        m = nnx.merge(graphdef, p, rest)
        return m(inputs["input_tokens"], inputs["positions"], None, inputs["attention_mask"])[0]

    config = lora.LoraConfig(rank=4, alpha=8.0, targets=TARGETS, init=init)
    adapters = lora.init(jax.random.key(seed + 1), params, config, probe=probe)
    return lora.NnxBridge(model, adapters, mode="factored")


def numpy_copy(tree: Any) -> list[np.ndarray]:
    return [np.array(x) for x in jax.tree.leaves(tree)]


def adapter_paths(bridge: lora.NnxBridge) -> set[str]:
    flat = nnx.to_flat_state(nnx.state(bridge, nnx.LoRAParam))
    return {"/".join(map(str, path)) for path, _ in flat}


def test_the_bridge_is_what_tunix_calls_lora() -> None:
    bridge = bridged()
    assert sft_utils.is_lora_enabled(bridge)
    assert not sft_utils.is_lora_enabled(bridge.model)
    lora_leaves = jax.tree.leaves(nnx.state(bridge, nnx.LoRAParam))
    assert len(lora_leaves) == 2 * 2 * 7  # a and b, 2 layers, 7 kernels
    ours = jax.tree.leaves(lora.to_adapters(bridge))
    assert all(x is y for x, y in zip(lora_leaves, ours, strict=True))


@pytest.mark.filterwarnings("ignore:Sharding info not provided")  # orbax, restoring untargeted
def test_peft_trainer_trains_only_the_adapters(tmp_path: Path) -> None:
    bridge = bridged()
    base_before = numpy_copy(nnx.state(bridge.model, nnx.Param))
    adapters_before = numpy_copy(lora.to_adapters(bridge))
    batch = np.stack([SEQ, SEQ])
    inputs = model_inputs(batch)
    loss_before = float(peft_trainer._default_loss_fn(bridge, **inputs))

    steps = 8
    config = peft_trainer.TrainingConfig(
        eval_every_n_steps=1000,
        max_steps=steps,
        checkpoint_root_directory=str(tmp_path / "ckpt"),
        checkpointing_options=ocp.CheckpointManagerOptions(save_interval_steps=steps),
    )
    trainer = peft_trainer.PeftTrainer(bridge, optax.adam(3e-2), config)
    trainer = trainer.with_gen_model_input_fn(
        lambda x: model_inputs(x.input_tokens) | {"input_mask": x.input_mask}
    )
    data = [
        peft_trainer.TrainingInput(input_tokens=batch, input_mask=batch != PAD)
        for _ in range(steps)
    ]
    trainer.train(data)
    trainer.close()
    assert trainer.train_steps == steps

    base_after = numpy_copy(nnx.state(bridge.model, nnx.Param))
    assert all(np.array_equal(u, v) for u, v in zip(base_before, base_after, strict=True))
    adapters_after = lora.to_adapters(bridge)
    unchanged = [
        jax.tree_util.keystr(path)
        for (path, u), v in zip(
            jax.tree_util.tree_flatten_with_path(adapters_after)[0], adapters_before, strict=True
        )
        if np.array_equal(np.asarray(u), v)
    ]
    assert unchanged == [], "every factor trains (b starts at zero, a moves once b has)"
    loss_after = float(peft_trainer._default_loss_fn(bridge, **inputs))
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)

    # tunix's LoRA-only checkpoint: exactly the adapters' arrays, read back without a target
    step_dir = tmp_path / "ckpt" / str(steps) / "model_params"
    saved = ocp.PyTreeCheckpointer().restore(step_dir)
    flat = jax.tree_util.tree_flatten_with_path(saved)[0]
    saved_paths = {"/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat}
    saved_paths = {p.removesuffix("/value") for p in saved_paths}
    assert saved_paths == adapter_paths(bridge)
    ours = {
        "/".join(map(str, path)): v.get_value()
        for path, v in nnx.to_flat_state(nnx.state(bridge, nnx.LoRAParam))
    }
    for path, leaf in flat:
        name = "/".join(str(getattr(k, "key", k)) for k in path).removesuffix("/value")
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ours[name]))

    # a new trainer on a fresh bridge restores the trained adapters from that checkpoint
    fresh = bridged()
    restored = peft_trainer.PeftTrainer(fresh, optax.adam(3e-2), config)
    assert restored.train_steps == steps
    for u, v in zip(
        jax.tree.leaves(lora.to_adapters(fresh)), jax.tree.leaves(adapters_after), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    restored.close()

    # the trained adapters leave as HF PEFT files (tunix's Qwen3 -> Qwen3ForCausalLM names) and
    # come back exactly
    key_map = lora.key_map("tunix/qwen3")
    lora_config = lora.LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    lora.save_peft(tmp_path / "peft", adapters_after, lora_config, key_map=key_map)
    graphdef, params, rest = nnx.split(bridge.model, nnx.Param, ...)
    args = (inputs["input_tokens"], inputs["positions"], None, inputs["attention_mask"])
    back = lora.load_peft(
        tmp_path / "peft",
        params,
        key_map=key_map,
        probe=lambda p: nnx.merge(graphdef, p, rest)(*args)[0],
    )
    for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(adapters_after), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sampler_greedy_tokens_equal_the_merged_model(family: str) -> None:
    bridge = bridged(family, init="random")  # both factors nonzero: the adapters change the model
    small = jax.tree.map(lambda x: 0.3 * x, lora.to_adapters(bridge))
    bridge = lora.NnxBridge(bridge.model, small, mode="factored")
    cache = sampler_lib.CacheConfig(cache_size=32, num_layers=2, num_kv_heads=2, head_dim=8)
    prompts = ["abcd", "hgf"]

    def generate(module: nnx.Module) -> list[list[int]]:
        sampler = sampler_lib.Sampler(module, Tokenizer(), cache)
        out = sampler(prompts, max_generation_steps=10, echo=False, temperature=0.0)
        return [list(map(int, t)) for t in out.tokens]

    with_bridge = generate(bridge)
    with_merged = generate(lora.merged(bridge))
    with_base = generate(bridge.model)
    assert with_bridge == with_merged
    assert with_bridge != with_base, "the adapters must change what is generated"
    assert all(len(t) == 10 for t in with_bridge)
