"""The key-map catalogue (`lora.key_map`) without tunix: lookups, errors, and the names of
transformers 4.57's Flax models and the ``gemma`` package's Gemma 3 against the modules of the
PyTorch twins (those tests skip without torch and transformers).

The Flax paths below were recorded from the real models (transformers 4.57.1's
``FlaxBertModel``, ``FlaxGPT2LMHeadModel`` and ``FlaxLlamaForCausalLM``, 2 layers, printed with
``flax.traverse_util.flatten_dict(model.params)``; transformers 5 has no Flax models) and read
from the ``gemma`` package's source (``gemma/gm/nn/_modules.py``: ``Attention``,
``FeedForward``; blocks ``layer_{i}``). The tunix families are checked on tunix's own models in
``test_key_maps_tunix.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from support import INTEROP

import flax_lora as lora


def _layers(templates: list[str], n: int = 2) -> list[str]:
    return [t.format(i=i) for i in range(n) for t in templates]


FLAX_BERT = [
    "embeddings/position_embeddings/embedding",
    "embeddings/token_type_embeddings/embedding",
    "embeddings/word_embeddings/embedding",
    *_layers(
        [
            "encoder/layer/{i}/attention/output/dense/kernel",
            "encoder/layer/{i}/attention/self/key/kernel",
            "encoder/layer/{i}/attention/self/query/kernel",
            "encoder/layer/{i}/attention/self/value/kernel",
            "encoder/layer/{i}/intermediate/dense/kernel",
            "encoder/layer/{i}/output/dense/kernel",
        ]
    ),
    "pooler/dense/kernel",
]
FLAX_GPT2 = [  # FlaxGPT2LMHeadModel: the LM head is the tied wte, no kernel of its own
    "transformer/wte/embedding",
    "transformer/wpe/embedding",
    *_layers(
        [
            "transformer/h/{i}/attn/c_attn/kernel",
            "transformer/h/{i}/attn/c_proj/kernel",
            "transformer/h/{i}/mlp/c_fc/kernel",
            "transformer/h/{i}/mlp/c_proj/kernel",
        ]
    ),
]
FLAX_LLAMA = [
    "lm_head/kernel",
    "model/embed_tokens/embedding",
    *_layers(
        [
            "model/layers/{i}/mlp/down_proj/kernel",
            "model/layers/{i}/mlp/gate_proj/kernel",
            "model/layers/{i}/mlp/up_proj/kernel",
            "model/layers/{i}/self_attn/k_proj/kernel",
            "model/layers/{i}/self_attn/o_proj/kernel",
            "model/layers/{i}/self_attn/q_proj/kernel",
            "model/layers/{i}/self_attn/v_proj/kernel",
        ]
    ),
]
GEMMA3 = [  # the gemma package's Gemma 3 (num_kv_heads < num_heads): kernels only
    "embedder/input_embedding_table",
    *_layers(
        [
            "layer_{i}/attn/q_einsum/w",
            "layer_{i}/attn/kv_einsum/w",
            "layer_{i}/attn/attn_vec_einsum/w",
            "layer_{i}/mlp/gating_einsum",
            "layer_{i}/mlp/linear",
        ]
    ),
]
SHARED_EMBEDDINGS = {  # not named: an output head may share them
    "transformer/wte/embedding",
    "model/embed_tokens/embedding",
    "embedder/input_embedding_table",
}


def _flat(names: Any) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def test_lookups_by_hand() -> None:
    tunix = lora.key_map("tunix/llama3")
    assert tunix("layers/1/attn/o_proj/w") == "model.layers.1.self_attn.o_proj"
    assert tunix("layers/0/mlp/down_proj/kernel") == "model.layers.0.mlp.down_proj"
    assert tunix("lm_head/w") == "lm_head"
    assert tunix("embedder/input_embedding") is None
    assert tunix("layers/0/attn/q_norm/w") is None
    gemma = lora.key_map("tunix/gemma2")
    assert gemma("layers/3/attn/kv_einsum/w") == (
        "model.layers.3.self_attn.k_proj",
        "model.layers.3.self_attn.v_proj",
    )
    assert gemma("layers/0/attn/qkv_einsum/w") == tuple(
        f"model.layers.0.self_attn.{x}_proj" for x in "qkv"
    )
    moe = lora.key_map("tunix/qwen3_moe")
    assert moe("layers/1/mlp/up_proj") == "model.layers.1.mlp.experts.{expert}.up_proj"
    assert moe("layers/1/mlp/router/kernel") is None
    # a Linen variables dict's leading collection is dropped
    bert = lora.key_map("transformers/bert")
    assert bert("params/bert/encoder/layer/11/attention/self/query/kernel") == (
        "bert.encoder.layer.11.attention.self.query"
    )
    assert bert("params/classifier/kernel") == "classifier"
    assert lora.key_map("gemma/gemma3")("params/layer_4/mlp/gating_einsum") == (
        "model.layers.4.mlp.gate_proj",
        "model.layers.4.mlp.up_proj",
    )


def test_a_key_map_shows_its_table() -> None:
    km = lora.key_map("tunix/qwen3")
    assert km.name == "tunix/qwen3"
    assert km.rules and all(isinstance(p, str) for p, _ in km.rules)
    assert "tunix/qwen3" in repr(km)


def test_unknown_family_lists_the_catalogue() -> None:
    with pytest.raises(ValueError, match=r"'tunix/llama4'.*'tunix/llama3'.*'transformers/bert'"):
        lora.key_map("tunix/llama4")
    with pytest.raises(TypeError, match="name must be a str"):
        lora.key_map(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="path must be a str"):
        lora.key_map("tunix/llama3")(("layers", 0))  # type: ignore[arg-type]


def test_the_docstring_lists_every_family() -> None:
    doc = lora.key_map.__doc__ or ""
    families = {
        f"{source}/{fam}"
        for source, fams in {
            "tunix": ["llama3", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3"],
            "gemma": ["gemma3"],
            "transformers": ["bert", "gpt2", "llama"],
        }.items()
        for fam in fams
    }
    for name in families:
        assert f"``{name}``" in doc, name
        lora.key_map(name)  # known


@pytest.mark.parametrize(
    ("family", "paths"),
    [
        ("transformers/bert", FLAX_BERT),
        ("transformers/gpt2", FLAX_GPT2),
        ("transformers/llama", FLAX_LLAMA),
    ],
)
def test_flax_transformers_names_are_their_paths(family: str, paths: list[str]) -> None:
    """transformers' Flax modules are named as the PyTorch ones: the module path with dots."""
    km = lora.key_map(family)
    for path in paths:
        expected = None if path in SHARED_EMBEDDINGS else path.rsplit("/", 1)[0].replace("/", ".")
        assert km(path) == expected, path


# -- against the PyTorch twins' modules --------------------------------------------------------


@pytest.fixture(scope="module")
def transformers_mod() -> Any:
    pytest.importorskip("torch", reason=INTEROP)
    return pytest.importorskip("transformers", reason=INTEROP)


def _adaptable(model: Any, skip: frozenset[str] = frozenset()) -> set[str]:
    """The modules of ``model`` that PEFT's LoRA adapts: Linear, GPT-2's Conv1D, Embedding."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    return {n for n, m in model.named_modules() if isinstance(m, kinds)} - skip


def _named(family: str, paths: list[str]) -> set[str]:
    km = lora.key_map(family)
    return {n for p in paths if (names := km(p)) is not None for n in _flat(names)}


def test_names_are_the_modules_of_the_pytorch_twins(transformers_mod: Any) -> None:
    t = transformers_mod
    small = dict(num_hidden_layers=2, num_attention_heads=2, vocab_size=50)
    bert = t.BertModel(t.BertConfig(hidden_size=16, intermediate_size=32, **small))
    assert _named("transformers/bert", FLAX_BERT) == _adaptable(bert)
    gpt2 = t.GPT2LMHeadModel(t.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50))
    # the tied head and word embedding are one module pair PEFT must not split
    assert _named("transformers/gpt2", FLAX_GPT2) == _adaptable(
        gpt2, frozenset({"transformer.wte", "lm_head"})
    )
    llama = t.LlamaForCausalLM(
        t.LlamaConfig(hidden_size=16, intermediate_size=32, num_key_value_heads=1, **small)
    )
    assert _named("transformers/llama", FLAX_LLAMA) == _adaptable(
        llama, frozenset({"model.embed_tokens"})
    )


def test_gemma_package_names_are_the_modules_of_gemma3(transformers_mod: Any) -> None:
    t = transformers_mod
    config = t.Gemma3TextConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    model = t.Gemma3ForCausalLM(config)
    expected = _adaptable(model, frozenset({"model.embed_tokens", "lm_head"}))
    assert _named("gemma/gemma3", GEMMA3) == expected
    km = lora.key_map("gemma/gemma3")
    assert km("embedder/input_embedding_table") is None
