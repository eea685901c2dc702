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

    Embeddings an output head may share and routers are not named: leave them out of
    ``targets``. The families, and what each maps: `docs/guides/peft.md`.

    Examples:
      >>> km = lora.key_map("tunix/llama3")
      >>> km("layers/0/attn/q_proj/w")
      'model.layers.0.self_attn.q_proj'
      >>> km("embedder/input_embedding") is None  # no PyTorch twin
      True
      >>> lora.key_map("tunix/gemma3")("layers/0/attn/kv_einsum/w")  # a fused kernel
      ('model.layers.0.self_attn.k_proj', 'model.layers.0.self_attn.v_proj')
      >>> # lora.save_peft(directory, adapters, config, key_map=km)

    Args:
      name: a family's name: ``tunix/llama3``, ``tunix/qwen2``, ``tunix/qwen3``,
        ``tunix/qwen3_moe``, ``tunix/qwen3_moe_hf5`` (pass ``param_order=("gate_up_proj",
        "down_proj")`` to `save_peft` and `load_peft`), ``tunix/gemma``, ``tunix/gemma2``,
        ``tunix/gemma3``, ``gemma/gemma3``, ``maxtext/llama2`` (also MaxText's llama3 and
        mistral), ``maxtext/mixtral`` (pass ``param_order=("gate_up_proj", "down_proj")``),
        ``maxtext/mixtral_experts``, ``maxtext/gemma3`` (MaxText's Llama and Mixtral fold
        ``1/sqrt(head_dim)`` into the query kernel: see `docs/guides/maxtext.md`),
        ``transformers/bert``, ``transformers/gpt2`` (its
        Flax kernels are ``(out, in)``: pass ``probe`` to `init` and `load_peft`),
        ``transformers/llama``.

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
