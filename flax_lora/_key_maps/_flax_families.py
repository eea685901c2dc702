"""Linen families: the ``gemma`` package's Gemma 3 and transformers 4.57's Flax BERT, GPT-2, Llama.

The ``gemma`` package (google-deepmind/gemma, ``gemma/gm/nn``): blocks ``layer_{i}``, attention
einsums as tunix's Gemma (``q_einsum (N, D, H)``, ``kv_einsum (2, K, D, H)``, ``qkv_einsum``,
``attn_vec_einsum (N, H, D)``), the MLP's fused ``gating_einsum`` (``(2, H, D)`` or ``(2, D, H)``:
gate then up) and ``linear (H, D)``, all ``Einsum`` parameters. The names are those of
HuggingFace's ``Gemma3ForCausalLM`` (text-only Gemma 3).

transformers 4.57's Flax models name their modules as the PyTorch twins do, with ``/`` for
``.`` (``encoder/layer/0/attention/self/query`` is ``encoder.layer.0.attention.self.query``);
each table lists the modules PEFT can adapt, with the optional task wrapper (``bert/``,
``transformer/``, ``model/``) that the PyTorch task model has too. Not named: embeddings that an
output head shares (GPT-2's ``wte``, Llama's ``embed_tokens``; see `flax_lora._key_maps._tunix`).
Sharp edge: transformers' ``FlaxConv1D`` (GPT-2) stores its kernel ``(out, in)``, so
`lora.init` and `lora.load_peft` need ``probe`` to see that its columns are the input axis.
"""

from __future__ import annotations

from flax_lora._key_maps._rule_map import Rule

_ATTN = r"model.layers.\1.self_attn"
_MLP = r"model.layers.\1.mlp"

GEMMA3: tuple[Rule, ...] = (
    (r"layer_(\d+)/attn/q_einsum/w", rf"{_ATTN}.q_proj"),
    (r"layer_(\d+)/attn/kv_einsum/w", (rf"{_ATTN}.k_proj", rf"{_ATTN}.v_proj")),
    (
        r"layer_(\d+)/attn/qkv_einsum/w",
        (rf"{_ATTN}.q_proj", rf"{_ATTN}.k_proj", rf"{_ATTN}.v_proj"),
    ),
    (r"layer_(\d+)/attn/attn_vec_einsum/w", rf"{_ATTN}.o_proj"),
    (r"layer_(\d+)/mlp/gating_einsum", (rf"{_MLP}.gate_proj", rf"{_MLP}.up_proj")),
    (r"layer_(\d+)/mlp/linear", rf"{_MLP}.down_proj"),
)

BERT: tuple[Rule, ...] = (
    (r"((?:bert/)?embeddings/(?:word|position|token_type)_embeddings)/embedding", r"\1"),
    (
        r"((?:bert/)?encoder/layer/\d+/(?:attention/self/(?:query|key|value)|attention/output/dense"
        r"|intermediate/dense|output/dense))/kernel",
        r"\1",
    ),
    (r"((?:bert/)?pooler/dense)/kernel", r"\1"),
    (r"classifier/kernel", "classifier"),
)
"""``FlaxBertModel`` / ``FlaxBertForSequenceClassification`` -> ``BertModel`` /
``BertForSequenceClassification``."""

GPT2: tuple[Rule, ...] = (
    (r"((?:transformer/)?h/\d+/(?:attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj))/kernel", r"\1"),
    (r"((?:transformer/)?wpe)/embedding", r"\1"),
)
"""``FlaxGPT2Model`` / ``FlaxGPT2LMHeadModel`` -> ``GPT2Model`` / ``GPT2LMHeadModel`` (its
``Conv1D`` modules; PEFT sets ``fan_in_fan_out`` itself)."""

LLAMA: tuple[Rule, ...] = (
    (r"((?:model/)?layers/\d+/(?:self_attn/[qkvo]_proj|mlp/(?:gate|up|down)_proj))/kernel", r"\1"),
    (r"lm_head/kernel", "lm_head"),
)
"""``FlaxLlamaModel`` / ``FlaxLlamaForCausalLM`` -> ``LlamaModel`` / ``LlamaForCausalLM``."""
