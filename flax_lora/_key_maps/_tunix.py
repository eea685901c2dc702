"""google-tunix's models (``tunix.models``, 0.1.7) to HuggingFace transformers' PyTorch names.

Paths are those of ``nnx.split(model)``'s state (``layers/0/attn/q_proj/w``); each table is the
inverse of tunix's own HF -> tunix mapping (``tunix/models/<family>/params*.py``,
``_get_key_and_transform_mapping``), so an adapter lands on the module whose weight tunix loaded
into the kernel. Layers are an NNX list (one path per layer), so no name holds ``{layer}``.

Not named (the key map gives ``None``, so `save_peft` names the path if it is adapted):

- the embedding ``embedder/input_embedding``: with tied embeddings tunix also decodes with it,
  so its adapter would change the logits, while PEFT's Embedding LoRA changes the lookup only;
- Qwen2's ``q_bias`` / ``k_bias`` / ``v_bias`` (biases, not kernels);
- Qwen3-MoE's router ``mlp/router/kernel``: transformers 5 holds it in a router module that PEFT
  does not adapt, and vLLM serves no LoRA on it.
"""

from __future__ import annotations

from flax_lora._key_maps._rule_map import Rule

_LAYER = r"layers/(\d+)"
_ATTN = r"model.layers.\1.self_attn"

LLAMA: tuple[Rule, ...] = (
    (rf"{_LAYER}/attn/([qkvo])_proj/w", rf"{_ATTN}.\2_proj"),
    (rf"{_LAYER}/mlp/(gate|up|down)_proj/kernel", r"model.layers.\1.mlp.\2_proj"),
    (r"lm_head/w", "lm_head"),
)
"""Llama3, Qwen2 and Qwen3 (dense): q/k/v/o ``Einsum`` kernels ``(D, N, H)`` / ``(N, H, D)``,
the MLP's ``nnx.Linear`` kernels, and the untied ``lm_head`` ``(D, V)``."""

QWEN3_MOE: tuple[Rule, ...] = (
    LLAMA[0],
    (rf"{_LAYER}/mlp/(gate|up|down)_proj", r"model.layers.\1.mlp.experts.{expert}.\2_proj"),
    LLAMA[2],
)
"""Qwen3-MoE: attention as Llama; the expert kernels ``mlp/{gate,up}_proj (E, D, F)`` and
``mlp/down_proj (E, F, D)`` (``nnx.Param`` leaves of the MoE layer) as one module per expert,
``{expert}`` in the name: the layout of HuggingFace's checkpoints (tunix stacks them from it),
of transformers 4.57's ``Qwen3MoeSparseMoeBlock`` and of vLLM's LoRA. (transformers 5 fuses the
experts into ``experts.gate_up_proj`` / ``experts.down_proj`` parameters.)"""

GEMMA: tuple[Rule, ...] = (
    (rf"{_LAYER}/attn/q_einsum/w", rf"{_ATTN}.q_proj"),
    (rf"{_LAYER}/attn/kv_einsum/w", (rf"{_ATTN}.k_proj", rf"{_ATTN}.v_proj")),
    (rf"{_LAYER}/attn/qkv_einsum/w", (rf"{_ATTN}.q_proj", rf"{_ATTN}.k_proj", rf"{_ATTN}.v_proj")),
    (rf"{_LAYER}/attn/attn_vec_einsum/w", rf"{_ATTN}.o_proj"),
    LLAMA[1],
)
"""Gemma, Gemma 2 and Gemma 3 (text): ``q_einsum (N, D, H)``, the fused ``kv_einsum
(2, K, D, H)`` -> ``(k_proj, v_proj)`` or, when ``num_heads == num_kv_heads``, ``qkv_einsum
(3, N, D, H)`` -> ``(q_proj, k_proj, v_proj)`` (tunix stacks them so from the HF weights),
``attn_vec_einsum (N, H, D)`` -> ``o_proj``, and the MLP's ``nnx.Linear`` kernels."""
