"""HuggingFace PEFT LoRA adapter files, both ways: `save_peft` and `load_peft`.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and
``adapter_model.safetensors``, its tensors named after the PyTorch modules they adapt. The
modules, from the bottom of the import graph up:

- `_names`: the files' and tensors' names, key maps from Flax paths to PyTorch module names;
- `_layout`: the tensor layouts, one per kind of PyTorch module (the place to add a layout);
- `_config_checks`: the type and range check of each ``adapter_config.json`` field read;
- `_adapter_config`: ``adapter_config.json``: fields written, checks on read, ranks and scales;
- `_safetensors`: the safetensors format: the header parsed and checked, single tensors read;
- `_files`: both files: written without losing or mixing anything, read as untrusted input;
- `_layered`: one PyTorch module per layer of a kernel stacked by a scan;
- `_experts`: expert kernels as PEFT's ``target_parameters`` (ParamWrapper tensors, nesting);
- `_extras`: ``modules_to_save``, trained biases and trainable tokens;
- `_sites`: which kernel of ``params`` each module of a file goes to;
- `_save`, `_load`: `save_peft` and `load_peft`.
"""

from flax_lora._peft._load import load_peft
from flax_lora._peft._save import save_peft

__all__ = ["load_peft", "save_peft"]
