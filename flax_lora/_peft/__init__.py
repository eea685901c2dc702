"""HuggingFace PEFT LoRA adapter files, both ways: `save_peft` and `load_peft`.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and
``adapter_model.safetensors``, its tensors named after the PyTorch modules they adapt. The
modules, from the bottom of the import graph up:

- `_names`: the files' and tensors' names, key maps from Flax paths to PyTorch module names;
- `_tensor_layouts`: the tensor layouts, one per kind of PyTorch module (the place to add one);
- `_config_checks`: the type and range check of each ``adapter_config.json`` field read;
- `_adapter_config`: ``adapter_config.json``: fields written, checks on read, ranks and scales;
- `_safetensors`: the safetensors format: the header parsed and checked, single tensors read;
- `_files`: both files: written without losing or mixing anything, read as untrusted input;
- `_layered`: one PyTorch module per layer of a layered kernel (``nn.scan``);
- `_per_expert`: an expert kernel as one PyTorch module per expert (``{expert}`` names);
- `_fused`: a fused kernel as several PyTorch modules (a tuple of names), and several kernels as
  one module (``"<module>[i]"`` names);
- `_expert_params`: expert kernels as PEFT's ``target_parameters`` (ParamWrapper tensors,
  nesting);
- `_extra_tensors`: the extras' tensors: ``modules_to_save``, trained biases, trainable tokens;
- `_sites`: which kernel of ``params`` each module of a file goes to;
- `_save`, `_load`: `save_peft` and `load_peft`.
"""
