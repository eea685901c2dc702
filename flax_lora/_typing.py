"""The package's shared type names: the pytree alias, the dropout key and the ``Literal`` types
of its options.

Every module that annotates a pytree, a key or one of these options imports it from here, so one
word has one meaning across the package.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import jax

PyTree = Any
"""Any pytree (a nested structure of dicts, lists, tuples, dataclasses and arrays)."""

Key = jax.Array | None
"""A PRNG key, or ``None`` for none: the dropout key of a call (``lora_rng``) or of one
equation of the factored engine."""

Mode = Literal["auto", "merged", "factored"]
"""How `lora.wrap` computes an adapted kernel's use."""

Kind = Literal["dense", "conv", "embed"]
"""What a kernel is to its layer: contracted (Dense, Einsum), convolved, or looked up."""

Init = Literal["lora", "gaussian", "random", "pissa", "olora", "loftq"]
"""`LoraConfig.init`: how the factors start."""

Bias = Literal["none", "all", "lora_only"]
"""`LoraConfig.bias`: which biases train (PEFT's ``bias``)."""

QuantFormat = Literal["int8", "nf4"]
"""`lora.quantize`'s storage formats."""

MODES: tuple[str, ...] = get_args(Mode)
KINDS: tuple[str, ...] = get_args(Kind)
INITS: tuple[str, ...] = get_args(Init)
BIASES: tuple[str, ...] = get_args(Bias)
QUANT_FORMATS: tuple[str, ...] = get_args(QuantFormat)
