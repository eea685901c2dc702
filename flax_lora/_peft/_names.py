"""PEFT's names: its two files, its tensor names, and the key map from Flax paths to modules.

A PEFT adapter's tensors are named ``base_model.model.<module>.<tensor>``, ``<module>`` being the
name of the PyTorch module they belong to. A key map turns the path of a Flax leaf into that
module name; a layered kernel (``nn.scan`` / ``nnx.scan``) is named with the
placeholder ``{layer}``, one PyTorch module per layer; an expert kernel written as one module per
expert with ``{expert}``. A tuple of names is a fused kernel that PyTorch keeps as several modules
(`flax_lora._peft._fused`); a name ending in ``[i]`` is part ``i`` of one PyTorch module that
several kernels make together.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from flax_lora._paths import leaf_name, module_path

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
LAYER = "{layer}"  # in a key map's name of a layered kernel: replaced by each layer index
EXPERT = "{expert}"  # in a key map's name of an expert kernel: one module per expert
MAGNITUDE = ".lora_magnitude_vector"  # DoRA's magnitude, after the module name
TOKENS = ".token_adapter.trainable_tokens_delta"  # trainable tokens, after the embedding's name
BASE_LAYER = ".base_layer"  # the wrapped module, in a name of a module that has LoRA factors
BASE_BIAS = f"{BASE_LAYER}.bias"
_TORCH_PARAM = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}

Name = str | tuple[str, ...]
"""A key map's name of a kernel: one module name, or a tuple of them (a fused kernel)."""

KeyMap = Callable[[str], Name | None] | Mapping[str, Name] | None
"""`save_peft` / `load_peft`'s ``key_map``: a function of a path, a dict, or ``None``."""

Namer = Callable[[str], Name | None]
"""A leaf path -> its PyTorch module name(s) (``PREFIX`` removed), or ``None`` for no twin."""

_PART = re.compile(r"(.+)\[(\d+)\]")


def default_key_map(path: str) -> str:
    """The default kernel path -> PyTorch module name: drop a leading ``params`` and the leaf.

    ``params/encoder/layers_0/query/kernel`` -> ``encoder.layers_0.query``;
    ``layers/0/linear/kernel`` (an NNX state) -> ``layers.0.linear``.
    """
    parts = path.split("/")
    if len(parts) > 1 and parts[0] == "params":
        parts = parts[1:]
    return ".".join(parts[:-1])


def namer(key_map: KeyMap) -> Namer:
    """The key map as a function that checks each name and removes PEFT's ``PREFIX``.

    Raises:
      TypeError: ``key_map`` is none of the three forms (when called: a name is not a string).
    """
    fn: Namer
    if key_map is None:
        fn = default_key_map
    elif isinstance(key_map, Mapping):
        fn = dict(key_map).get
    elif callable(key_map):
        fn = key_map
    else:
        raise TypeError(
            "key_map must be None, a dict {kernel path: module name} or a function of the kernel "
            f"path; got {type(key_map).__name__}."
        )

    def name_of(path: str) -> Name | None:
        name = fn(path)
        if name is None:
            return None
        if isinstance(name, tuple) and name and all(isinstance(n, str) and n for n in name):
            return tuple(n.removeprefix(PREFIX) for n in name)
        if not isinstance(name, str):
            raise TypeError(
                f"key_map({path!r}) must return a module name (str), a non-empty tuple of "
                f"module names (a fused kernel) or None; got {name!r}."
            )
        return name.removeprefix(PREFIX) or None

    return name_of


def layer_name(name: Name, i: int, placeholder: str = LAYER) -> Name:
    """The PEFT module name of layer ``i`` of a layered kernel named ``name`` (plain replacement
    of ``{layer}``, not ``str.format``; of every name of a tuple); likewise of expert ``i``
    with ``placeholder=EXPERT``."""
    if isinstance(name, tuple):
        return tuple(n.replace(placeholder, str(i)) for n in name)
    return name.replace(placeholder, str(i))


def has(name: Name, placeholder: str) -> bool:
    """Whether ``name`` (or a name of the tuple) holds ``placeholder``."""
    return any(placeholder in n for n in ((name,) if isinstance(name, str) else name))


def part_of(name: str) -> tuple[str, int] | None:
    """``(module, i)`` of a name ``"<module>[i]"``: the kernel is part ``i`` of the module that
    several kernels make together; ``None`` for a plain name."""
    found = _PART.fullmatch(name)
    return (found.group(1), int(found.group(2))) if found else None


def plain(name: str) -> str:
    """``name`` without a part suffix ``[i]``."""
    part = part_of(name)
    return name if part is None else part[0]


def module_of(name_of: Namer, path: str) -> str | None:
    """The PyTorch module name of the leaf at ``path``: the key map's name of the path itself,
    else of its module's ``kernel`` / ``embedding`` (a dict key map names kernels only); none
    for a fused kernel (a tuple of names) or a part of a module (``"<module>[i]"``)."""
    module = module_path(path)
    for candidate in (path, f"{module}/kernel", f"{module}/embedding"):
        name = name_of(candidate)
        if isinstance(name, str) and part_of(name) is None:  # a tuple, a part: no one module
            return name
    return None


def torch_param(path: str) -> str:
    """The PyTorch parameter name of the Flax leaf at ``path`` (its last component):
    ``kernel``, ``embedding`` and ``scale`` -> ``weight``; any other name as itself."""
    leaf = leaf_name(path)
    return _TORCH_PARAM.get(leaf, leaf)


def split_tensor_key(key: str) -> tuple[str, str, str] | None:
    """``(kind, module, param)`` of a PEFT tensor name (prefix removed) that is no LoRA factor:
    kind ``"tokens"``, ``"base_bias"`` (``<module>.base_layer.bias``) or ``"plain"``;
    ``None`` for a name without a module."""
    if key.endswith(TOKENS):
        return "tokens", key.removesuffix(TOKENS), ""
    if key.endswith(BASE_BIAS):
        return "base_bias", key.removesuffix(BASE_BIAS), "bias"
    if "." not in key:
        return None
    module, param = key.rsplit(".", 1)
    return "plain", module, param
