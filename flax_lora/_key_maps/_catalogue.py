"""The catalogue: every known family's key map by name, and `key_map`."""

from __future__ import annotations

from flax_lora._key_maps import _flax_families, _maxtext, _tunix
from flax_lora._key_maps._rule_map import Rule, RuleMap

CATALOGUE: dict[str, tuple[Rule, ...]] = {
    "tunix/llama3": _tunix.LLAMA,
    "tunix/qwen2": _tunix.LLAMA,
    "tunix/qwen3": _tunix.LLAMA,
    "tunix/qwen3_moe": _tunix.QWEN3_MOE,
    "tunix/qwen3_moe_hf5": _tunix.QWEN3_MOE_HF5,
    "tunix/gemma": _tunix.GEMMA,
    "tunix/gemma2": _tunix.GEMMA,
    "tunix/gemma3": _tunix.GEMMA,
    "gemma/gemma3": _flax_families.GEMMA3,
    "maxtext/llama2": _maxtext.LLAMA2,
    "maxtext/mixtral": _maxtext.MIXTRAL,
    "maxtext/mixtral_experts": _maxtext.MIXTRAL_EXPERTS,
    "maxtext/gemma3": _maxtext.GEMMA3,
    "transformers/bert": _flax_families.BERT,
    "transformers/gpt2": _flax_families.GPT2,
    "transformers/llama": _flax_families.LLAMA,
}
"""Name -> rules. The names are ``<source>/<family>``; the source is where the Flax model
comes from (google-tunix, the ``gemma`` package, MaxText, transformers 4.57's Flax models)."""


def key_map(name: str) -> RuleMap:
    """The key map of a known model family: its Flax kernel paths -> PyTorch module names.

    A ``key_map`` for `save_peft` and `load_peft`, from the Flax (or NNX) parameter paths of the
    family to HuggingFace transformers' PyTorch module names (``model.layers.0.self_attn.q_proj``,
    the names a PEFT adapter of the PyTorch model uses). It gives ``None`` for a path it does not
    name (no PyTorch twin), so `save_peft` refuses adapters on such a kernel naming the path.

    The families (``tunix/*``: google-tunix 0.1.7's ``tunix.models``, NNX states;
    ``gemma/*``: the ``gemma`` package; ``maxtext/*``: MaxText 0.2.5's NNX decoders;
    ``transformers/*``: transformers 4.57's Flax models):

    - ``tunix/llama3``, ``tunix/qwen2``, ``tunix/qwen3``: attention ``q/k/v/o_proj``, MLP
      ``gate/up/down_proj``, ``lm_head`` -> ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` /
      ``Qwen3ForCausalLM``.
    - ``tunix/qwen3_moe``: attention as above; expert kernels one module per expert
      (``model.layers.0.mlp.experts.{expert}.gate_proj``, HF's checkpoint and vLLM's layout).
    - ``tunix/qwen3_moe_hf5``: attention as above; expert kernels onto transformers 5's fused
      expert parameters (PEFT's ``target_parameters``): ``gate_proj`` and ``up_proj`` ->
      ``model.layers.0.mlp.experts.gate_up_proj[0]`` and ``[1]``, ``down_proj`` ->
      ``...experts.down_proj``; pass ``param_order=("gate_up_proj", "down_proj")`` to
      `save_peft` and `load_peft`.
    - ``tunix/gemma``, ``tunix/gemma2``, ``tunix/gemma3``, ``gemma/gemma3``: ``q_einsum`` ->
      ``q_proj``; the fused ``kv_einsum`` -> ``(k_proj, v_proj)`` and ``qkv_einsum`` -> ``(q_proj,
      k_proj, v_proj)``; ``attn_vec_einsum`` -> ``o_proj``; the MLP (the ``gemma`` package's fused
      ``gating_einsum`` -> ``(gate_proj, up_proj)``, ``linear`` -> ``down_proj``).
    - ``maxtext/llama2`` (MaxText's ``llama2-*``, ``llama3-*``, ``mistral-*``), ``maxtext/mixtral``,
      ``maxtext/mixtral_experts``, ``maxtext/gemma3``: ``self_attention/query|key|value|out`` ->
      ``q/k/v/o_proj``, ``mlp/wi_0|wi_1|wo`` -> ``gate/up/down_proj``, ``logits_dense`` ->
      ``lm_head``; scanned layers (``decoder/layers/...``) as ``model.layers.{layer}...``,
      unscanned (``decoder/layers_3/...``) by index; Mixtral's experts onto transformers 5's
      ``mlp.experts.gate_up_proj[0]``/``[1]`` and ``down_proj`` (pass ``param_order=
      ("gate_up_proj", "down_proj")``) or, ``_experts``, one module per expert
      (``block_sparse_moe.experts.{expert}.w1``); Gemma 3 unscanned only. MaxText's Llama and
      Mixtral fold ``1/sqrt(head_dim)`` into the query kernel: scale the query adapters' ``b``
      by ``sqrt(head_dim)`` for HF (docs/guides/maxtext.md).
    - ``transformers/bert``, ``transformers/gpt2``, ``transformers/llama``: Flax BERT (with or
      without ``bert/`` and ``classifier``), GPT-2 (``Conv1D``: its Flax kernel is ``(out, in)``,
      so pass ``probe`` to `init` and `load_peft`), Llama.

    Embeddings an output head may share (tunix's ``embedder``, Gemma's, GPT-2's ``wte``,
    Llama's ``embed_tokens``) and routers are not named: leave them out of ``targets`` (a regex
    of the attention and MLP kernels). Fused kernels (a tuple of names), ``{expert}`` names and
    ``"<module>[i]"`` parts are `save_peft` / `load_peft` key-map values, so every attention and
    MLP kernel of these families goes both ways.

    Example:
      >>> import flax_lora as lora
      >>> km = lora.key_map("tunix/llama3")
      >>> km("layers/0/attn/q_proj/w")
      'model.layers.0.self_attn.q_proj'
      >>> km("embedder/input_embedding") is None
      True
      >>> # lora.save_peft("/tmp/adapter", adapters, config, key_map=km)

    Args:
      name: a family's name, ``"<source>/<family>"`` as listed above.

    Returns:
      The key map: a function of a kernel path (a leading ``params/`` is ignored) that gives
      its module name, a tuple of names for a fused kernel, or ``None``; its ``rules`` attribute
      shows the table.

    Raises:
      TypeError: ``name`` is not a string.
      ValueError: ``name`` is not in the catalogue (the error lists the names).
    """
    if not isinstance(name, str):
        raise TypeError(f"key_map: name must be a str; got {type(name).__name__}.")
    rules = CATALOGUE.get(name)
    if rules is None:
        known = ", ".join(repr(n) for n in CATALOGUE)
        raise ValueError(f"key_map: unknown model family {name!r}; the catalogue has {known}.")
    return RuleMap(name, rules)
