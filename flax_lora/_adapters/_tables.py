"""The tables of an adapter tree: path -> entry dicts, and the split of a tree into its factors
and its extras.

A **table** is a flat dict keyed by the "/"-joined path of the base leaf each entry stands for:
`adapter_table` (path -> `LoraWeights`), `stacked_table` (path -> `StackedLoraWeights`), and the
extras `split` takes out of a tree (path -> `TrainedCopy` / `TokenDelta`, or their stacked forms).
`adapter_tables` checks that several adapter sets adapt the same kernels alike (`lora.combine`,
`lora.stack`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from flax_lora._adapters._extras import (
    STACKED_TYPES,
    Extra,
    StackedCopy,
    StackedExtra,
    StackedTokenDelta,
    TokenDelta,
    TrainedCopy,
    is_extra,
)
from flax_lora._adapters._weights import (
    AdapterLayout,
    LoraWeights,
    StackedLoraWeights,
    is_lora,
    is_stacked,
)
from flax_lora._paths import describe, flatten, nest
from flax_lora._typing import PyTree


def adapter_table(adapters: PyTree) -> dict[str, LoraWeights]:
    """Maps each adapted kernel's path to its `LoraWeights` (trained copies and token deltas,
    `flax_lora._adapters._extras`, are left out: see `flax_lora._adapters._tables.split`).

    Raises:
      TypeError: when ``adapters`` holds anything besides adapter entries.
    """
    table = flatten(adapters, is_leaf=lambda x: is_lora(x) or is_extra(x))
    stray = [p for p, v in table.items() if not (is_lora(v) or is_extra(v)) and v is not None]
    if stray:
        raise TypeError(
            "Expected an adapter tree as returned by lora.init (LoraWeights, TrainedCopy and "
            f"TokenDelta entries only); found other leaves at {describe(stray)}."
        )
    return {p: v for p, v in table.items() if is_lora(v)}


def adapter_tables(
    adapter_list: Sequence[PyTree], fn: str, dora_ok: bool = False
) -> list[dict[str, LoraWeights]]:
    """The `adapter_table` of each of several adapter sets of one model (for `lora.combine`,
    `lora.stack`), checked to adapt the same kernels with the same layouts (DoRA adapters
    refused unless ``dora_ok``).

    Raises:
      TypeError: ``adapter_list`` is not a list of adapter sets.
      ValueError: it is empty, its first set adapts nothing, the sets adapt different kernels or
        disagree on a kernel's layout, a set's factors disagree on their rank, or (without
        ``dora_ok``) a set holds DoRA adapters; naming ``lora.{fn}`` and the path.
    """
    if isinstance(adapter_list, Mapping) or not isinstance(adapter_list, Sequence):
        raise TypeError(
            f"lora.{fn} takes a list of adapter sets (e.g. [adapters_a, adapters_b]); got "
            f"{type(adapter_list).__name__}. For a dict of tasks pass list(tasks.values())."
        )
    if not adapter_list:
        raise ValueError(f"lora.{fn}: adapter_list is empty; pass at least one adapter set.")
    tables = [adapter_table(ad) for ad in adapter_list]
    dora = [f"set {i}: {p}" for i, t in enumerate(tables) for p, w in t.items() if w.m is not None]
    if dora and not dora_ok:  # m / ||W0 + delta|| does not combine linearly
        raise ValueError(
            f"lora.{fn} does not support DoRA adapters (with a magnitude m), found at "
            f"{describe(dora)}: a DoRA kernel m * V / ||V|| is not linear in the adapters. "
            "Merge each DoRA adapter into its own params (lora.merge) instead."
        )
    first = tables[0]
    if not first:
        raise ValueError(f"lora.{fn}: adapter set 0 holds no adapters.")
    for i, table in enumerate(tables[1:], start=1):
        missing = [p for p in first if p not in table]
        extra = [p for p in table if p not in first]
        if missing or extra:
            raise ValueError(
                f"lora.{fn}: all adapter sets must adapt the same kernels. Adapter set {i} lacks "
                f"{describe(missing)} and has extra {describe(extra)} compared with set 0."
            )
        for path, w in table.items():
            w0 = first[path]
            for field in AdapterLayout.LAYOUT_FIELDS:
                if getattr(w, field) != getattr(w0, field):
                    raise ValueError(
                        f"lora.{fn}: adapters for {path!r} disagree on {field}: set 0 has "
                        f"{getattr(w0, field)!r}, set {i} has {getattr(w, field)!r}. Were they "
                        "made for different models?"
                    )
            if w.a.shape[-1] != w.b.shape[len(w.carried_axes)]:
                raise ValueError(
                    f"lora.{fn}: adapter set {i} at {path!r} has a of shape {tuple(w.a.shape)} "
                    f"and b of shape {tuple(w.b.shape)}: their ranks differ."
                )
    return tables


def extra_tables(adapter_list: Sequence[PyTree], fn: str) -> list[dict[str, Extra]]:
    """The trained copies and token deltas (`flax_lora._adapters._extras`) of each adapter set."""
    return [split_plain(ad, fn)[1] for ad in adapter_list]


def stacked_table(stacked: PyTree) -> dict[str, StackedLoraWeights]:
    """Maps each adapted kernel's path to its `StackedLoraWeights`.

    Raises:
      TypeError: ``stacked`` holds anything besides `StackedLoraWeights` (e.g. plain adapters).
    """
    table = flatten(stacked, is_leaf=lambda x: is_stacked(x) or is_lora(x) or is_extra(x))
    extras = [p for p, v in table.items() if isinstance(v, STACKED_TYPES)]
    table = {p: v for p, v in table.items() if p not in extras}
    stray = [p for p, v in table.items() if not is_stacked(v) and v is not None]
    if stray or not (table or extras):
        raise TypeError(
            "Expected a stacked adapter tree as returned by lora.stack (StackedLoraWeights "
            f"entries only); found other entries at {describe(stray)}. Stack adapter sets with "
            "lora.stack([adapters_0, adapters_1, ...])."
        )
    return {p: v for p, v in table.items() if v is not None}


def split(
    adapters: PyTree, is_entry: Callable[[object], bool]
) -> tuple[PyTree, dict[str, Extra | StackedExtra]]:
    """``(the tree without the extra nodes, {path: extra node})``; ``is_entry`` says what the
    other entries are (`LoraWeights`, `StackedLoraWeights`). The first is ``None`` when only
    extra nodes were there."""
    if adapters is None:
        return None, {}
    table = flatten(adapters, is_leaf=lambda x: is_extra(x) or is_entry(x))
    extras = {p: v for p, v in table.items() if is_extra(v)}
    if not extras:
        return adapters, {}
    rest = [(p, v) for p, v in table.items() if not is_extra(v) and v is not None]
    return (nest(rest) if rest else None), extras


def split_plain(adapters: PyTree, fn: str) -> tuple[PyTree, dict[str, Extra]]:
    """`split` of one adapter set (its entries `LoraWeights`), its extras plain ones; ``fn``
    names the public function for the error.

    Raises:
      TypeError: a stacked extra (from `lora.stack`), naming its path.
    """
    rest, extras = split(adapters, is_lora)
    plain = {p: v for p, v in extras.items() if isinstance(v, TrainedCopy | TokenDelta)}
    if len(plain) != len(extras):
        raise TypeError(
            f"lora.{fn} takes one adapter set; found stacked entries (of lora.stack) at "
            f"{describe(_strays(extras, plain))}. Use the sets from before lora.stack, or pick "
            "one with lora.unstack."
        )
    return rest, plain


def split_stacked(stacked: PyTree) -> tuple[PyTree, dict[str, StackedExtra]]:
    """`split` of a stack (its entries `StackedLoraWeights`), its extras stacked ones.

    Raises:
      TypeError: a plain extra, naming its path.
    """
    rest, extras = split(stacked, is_stacked)
    out = {p: v for p, v in extras.items() if isinstance(v, StackedCopy | StackedTokenDelta)}
    if len(out) != len(extras):
        raise TypeError(
            "Expected a stack made by lora.stack; found the wrong kind of extra at "
            f"{describe(_strays(extras, out))}."
        )
    return rest, out


def _strays(extras: Mapping[str, object], kept: Mapping[str, object]) -> list[str]:
    return [p for p in extras if p not in kept]
