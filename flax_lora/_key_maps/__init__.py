"""A catalogue of key maps: the Flax paths of known model families to PyTorch module names.

`lora.key_map("tunix/llama3")` gives a ``key_map`` for `save_peft` / `load_peft`. The modules,
from the bottom of the import graph up:

- `_rule_map`: a key map as an ordered table of rules (a path pattern, the module names it gives);
- `_tunix`: the models of google-tunix (Llama3, Qwen2, Qwen3, Qwen3-MoE, Gemma 1/2/3);
- `_flax_families`: the ``gemma`` package's Gemma 3 and HuggingFace transformers 4.57's Flax
  BERT, GPT-2 and Llama;
- `_maxtext`: Google MaxText's decoders (Llama 2/3 and Mistral, Mixtral, Gemma 3);
- `_catalogue`: the table of every family by name and `key_map`.
"""
