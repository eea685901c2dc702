"""HuggingFace PEFT LoRA adapter files, both ways: `save_peft` and `load_peft`.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and
``adapter_model.safetensors``, its tensors named after the PyTorch modules they adapt. The
modules, from the bottom of the import graph up:

- `_names`: the files' and tensors' names, key maps from Flax paths to PyTorch module names;
- `_layout`: the tensor layouts, one per kind of PyTorch module (the place to add a layout);
- `_adapter_config`: ``adapter_config.json``: fields written, checks on read, ranks and scales;
- `_files`: writing both files, reading the tensors grouped by module;
- `_layered`: one PyTorch module per layer of a kernel stacked by a scan;
- `_experts`: expert kernels as PEFT's ``target_parameters`` (ParamWrapper tensors, nesting);
- `_extras`: ``modules_to_save``, trained biases and trainable tokens;
- `_save`, `_load`: `save_peft` and `load_peft`.
"""

from flax_lora._peft._load import load_peft
from flax_lora._peft._save import save_peft

__all__ = ["load_peft", "save_peft"]
