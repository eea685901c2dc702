"""PEFT's names: its two files, its tensor names, and the key map from Flax paths to modules.

A PEFT adapter's tensors are named ``base_model.model.<module>.<tensor>``, ``<module>`` being the
name of the PyTorch module they belong to. A key map turns the path of a Flax leaf into that
module name; a layered kernel (``nn.scan`` / ``nnx.scan``) is named with the
placeholder ``{layer}``, one PyTorch module per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from flax_lora._paths import leaf_name, module_path

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
LAYER = "{layer}"  # in a key map's name of a layered kernel: replaced by each layer index
MAGNITUDE = ".lora_magnitude_vector"  # DoRA's magnitude, after the module name
TOKENS = ".token_adapter.trainable_tokens_delta"  # trainable tokens, after the embedding's name
BASE_LAYER = ".base_layer"  # the wrapped module, in a name of a module that has LoRA factors
BASE_BIAS = f"{BASE_LAYER}.bias"
_TORCH_PARAM = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}

KeyMap = Callable[[str], str | None] | Mapping[str, str] | None
"""`save_peft` / `load_peft`'s ``key_map``: a function of a path, a dict, or ``None``."""

Namer = Callable[[str], str | None]
"""A leaf path -> its PyTorch module name (``PREFIX`` removed), or ``None`` for no twin."""


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

    def name_of(path: str) -> str | None:
        name = fn(path)
        if name is None:
            return None
        if not isinstance(name, str):
            raise TypeError(
                f"key_map({path!r}) must return a module name (str) or None; got {name!r}."
            )
        return name.removeprefix(PREFIX) or None

    return name_of


def layer_name(name: str, i: int) -> str:
    """The PEFT module name of layer ``i`` of a layered kernel named ``name`` (plain replacement
    of ``{layer}``, not ``str.format``)."""
    return name.replace(LAYER, str(i))


def module_of(name_of: Namer, path: str) -> str | None:
    """The PyTorch module name of the leaf at ``path``: the key map's name of the path itself,
    else of its module's ``kernel`` / ``embedding`` (a dict key map names kernels only)."""
    module = module_path(path)
    for candidate in (path, f"{module}/kernel", f"{module}/embedding"):
        name = name_of(candidate)
        if name is not None:
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
