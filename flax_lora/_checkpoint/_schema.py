"""The types of a checkpoint's metadata (``meta`` item, JSON), as `flax_lora._checkpoint._meta`
returns it once checked: the top level (`Meta`) and the fields of one entry (`AdapterFields`,
`ExtraFields`).
"""

from __future__ import annotations

from typing import NotRequired, Required, TypedDict, final

from flax_lora._typing import Kind


@final
class Meta(TypedDict):
    """A checkpoint's metadata as `read_meta` returns it: the top level checked, the entries
    (checked by `adapter_fields` / `extra_fields`) JSON objects."""

    format: str
    version: int
    adapters: dict[str, dict[str, object]]
    extras: dict[str, dict[str, object]]
    config: NotRequired[dict[str, object] | None]


@final
class AdapterFields(TypedDict):
    """The checked fields of one adapter's entry (`ADAPTER_FIELDS`)."""

    scale: float
    in_axes: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    kind: Kind
    dropout: float
    layer_axes: int
    layers: tuple[int, ...] | None
    expert_axes: tuple[int, ...]
    layer_at: int
    rank: int | None
    dora: bool


@final
class ExtraFields(TypedDict, total=False):
    """The checked fields of one trained copy (``role``) or token delta (``indices``,
    ``num_rows``) entry (`EXTRA_FIELDS`)."""

    type: Required[str]
    role: str
    indices: tuple[int, ...]
    num_rows: int
