"""Google MaxText's decoders (``maxtext`` 0.2.5, NNX ``Transformer``) to HuggingFace
transformers' PyTorch names.

Paths are those of ``nnx.split(model, nnx.Param, ...)``'s state (``decoder/layers/mlp/wi_0/kernel``;
the Linen face's ``params/`` prefix is dropped by the key map). Each table is the inverse of
MaxText's own HF checkpoint mapping (``maxtext/checkpoint_conversion/utils/param_mapping.py``:
``LLAMA31_MAXTEXT_TO_HF_PARAM_MAPPING``, ``MIXTRAL_...``, ``GEMMA3_...``), so an adapter lands on
the module whose weight MaxText's converter writes from that kernel:

- scanned layers (``scan_layers=True``): one kernel ``decoder/layers/...`` for all layers, named
  with ``{layer}`` (whatever its ``param_scan_axis``: the adapter keeps its layer axis leading);
  unscanned: ``decoder/layers_<i>/...``, named with the index.
- MaxText's ``DenseGeneral`` kernels ``query/key/value (D, N, H)``, ``out (N, H, D)``, ``wi_0/wi_1
  (D, F)``, ``wo (F, D)`` are the transposed, flattened ``nn.Linear`` weights of ``q/k/v/o_proj``
  and ``gate/up/down_proj``: flax_lora's default factor layout, no reshape in the table.

Sharp edges (the conversion hooks of MaxText that names cannot carry):

- the query: MaxText's Llama, Mistral and Mixtral fold ``1/sqrt(head_dim)`` into the ``query``
  kernel (HF scales in attention), so the HF ``q_proj`` is ``sqrt(head_dim)`` times the kernel:
  multiply the query adapters' ``b`` by ``sqrt(head_dim)`` before `save_peft` (and divide after
  `load_peft`); Gemma 3 (``query_pre_attn_scalar``) and ``use_qk_norm`` models fold nothing.
- RoPE: MaxText's Llama 3.1 (``llama3.1-*``, ``rope_type: llama3.1``) rotates interleaved pairs
  where HF rotates halves; its converter permutes each head's ``query``/``key`` output rows, so a
  ``q_proj``/``k_proj`` adapter of those models needs the same row permutation of ``lora_B``
  (``llama2-*``, ``llama3-*``, ``mistral-*`` and ``mixtral-*`` use the halves, as HF).
- Gemma 3 scans blocks of 6 layers (``decoder/layers/layers_<j>/...``: HF layer ``6 * l + j``),
  which ``{layer}`` cannot name: the table names unscanned Gemma 3 only.

Not named: the embedding ``token_embedder/embedding`` (Gemma 3 decodes with it; PEFT's
Embedding LoRA changes the lookup only) and Mixtral's router ``MoeBlock_0/gate/kernel`` (PEFT
does not adapt transformers 5's router module).
"""

from __future__ import annotations

from flax_lora._key_maps._rule_map import Rule

_SCANNED = r"decoder/layers"
_UNSCANNED = r"decoder/layers_(\d+)"
_ATTN = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "o_proj"}
_MLP = {"wi_0": "gate_proj", "wi_1": "up_proj", "wo": "down_proj"}


def _both(pattern: str, name: str) -> tuple[Rule, Rule]:
    """The scanned (``{layer}``) and unscanned (``\\1``) rules of one layer kernel."""
    return (
        (f"{_SCANNED}/{pattern}", "model.layers.{layer}." + name),
        (f"{_UNSCANNED}/{pattern}", r"model.layers.\1." + name),
    )


_ATTENTION: tuple[Rule, ...] = tuple(
    rule
    for mt, hf in _ATTN.items()
    for rule in _both(f"self_attention/{mt}/kernel", f"self_attn.{hf}")
)

LLAMA2: tuple[Rule, ...] = (
    *_ATTENTION,
    *(rule for mt, hf in _MLP.items() for rule in _both(f"mlp/{mt}/kernel", f"mlp.{hf}")),
    (r"decoder/logits_dense/kernel", "lm_head"),
)
"""MaxText's ``llama2-*``, ``llama3-*`` and ``mistral-*`` (one decoder layer code): attention
``query/key/value/out`` -> ``q/k/v/o_proj``, the MLP ``wi_0/wi_1/wo`` -> ``gate/up/down_proj``,
``logits_dense`` -> ``lm_head`` (``LlamaForCausalLM``, ``MistralForCausalLM``)."""

MIXTRAL: tuple[Rule, ...] = (
    *_ATTENTION,
    *_both("MoeBlock_0/wi_0", "mlp.experts.gate_up_proj[0]"),
    *_both("MoeBlock_0/wi_1", "mlp.experts.gate_up_proj[1]"),
    *_both("MoeBlock_0/wo", "mlp.experts.down_proj"),
    (r"decoder/logits_dense/kernel", "lm_head"),
)
"""MaxText's ``mixtral-*`` onto transformers 5's ``MixtralForCausalLM``: attention as Llama; the
routed experts ``MoeBlock_0/wi_0, wi_1 (E, D, F)`` and ``wo (E, F, D)`` (raw params of the MoE
block) onto ``MixtralExperts``' parameters ``gate_up_proj (E, 2F, D)`` (gate rows, then up rows:
parts ``[0]``, ``[1]``) and ``down_proj (E, D, F)``: PEFT's ``target_parameters``; pass
``param_order=("gate_up_proj", "down_proj")`` to `save_peft` and `load_peft`."""

MIXTRAL_EXPERTS: tuple[Rule, ...] = (
    *_ATTENTION,
    *_both("MoeBlock_0/wi_0", "block_sparse_moe.experts.{expert}.w1"),
    *_both("MoeBlock_0/wi_1", "block_sparse_moe.experts.{expert}.w3"),
    *_both("MoeBlock_0/wo", "block_sparse_moe.experts.{expert}.w2"),
    (r"decoder/logits_dense/kernel", "lm_head"),
)
"""Mixtral's experts as one module per expert, ``...block_sparse_moe.experts.{expert}.w1/w3/w2``:
the names of Mixtral's HF checkpoints (MaxText's converter writes them) and vLLM's LoRA layout."""

GEMMA3: tuple[Rule, ...] = (
    *(
        (f"{_UNSCANNED}/self_attention/{mt}/kernel", rf"model.layers.\1.self_attn.{hf}")
        for mt, hf in _ATTN.items()
    ),
    *((f"{_UNSCANNED}/mlp/{mt}/kernel", rf"model.layers.\1.mlp.{hf}") for mt, hf in _MLP.items()),
)
"""MaxText's ``gemma3-*`` text decoder, unscanned (``scan_layers=False``), onto
``Gemma3ForCausalLM``: attention and MLP as Llama; the embedding (tied) is not named."""
