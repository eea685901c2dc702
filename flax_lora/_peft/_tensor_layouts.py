"""PEFT's tensor layouts: how each kind of PyTorch module holds LoRA factors and whole leaves.

Ours are ``a (*I, r)`` and ``b (r, *O)`` in the Flax kernel's layout. One `TensorLayout` per kind
of PyTorch module that PEFT's LoRA adapts, each a pair of functions (``write``: ours -> PEFT's,
``read``: PEFT's -> ours, checking every shape) and the names of its two tensors:

- `LINEAR`: Linear / GPT-2 Conv1D <-> Dense, DenseGeneral, Einsum: ``lora_A.weight =
  a.reshape(n_in, r).T`` ``(r, in)`` and ``lora_B.weight = b.reshape(r, n_out).T`` ``(out, r)``,
  the input axes ``I`` and output axes ``O`` of a multi-axis kernel each flattened row-major in
  kernel order (a q/k/v kernel ``(d, heads, head_dim)`` is the twin of ``Linear(d, heads *
  head_dim)``). GPT-2's ``Conv1D`` (``fan_in_fan_out=True``) stores its weight ``(in, out)``, but
  PEFT stores its LoRA factors as for a Linear, so it needs nothing special.
- `CONV`: Conv1d/2d/3d <-> Conv: ``lora_A.weight`` is a conv weight ``(r, in, *window)`` and
  ``lora_B.weight`` a 1x1 conv ``(out, r, 1, ...)``; ours are ``a (*window, in, r)`` and
  ``b (r, out)``.
- `EMBEDDING`: Embedding <-> Embed: ``lora_embedding_A (r, num)`` = ``a.T`` and
  ``lora_embedding_B (dim, r)`` = ``b.T``.
- DoRA (``use_dora``): ``<module>.lora_magnitude_vector`` is our ``m`` (`LoraWeights.m`, shape
  ``O``): ``(out,)`` for a Linear / Conv1D (``O`` flattened), ``(dim,)`` for an Embedding,
  ``(1, out, 1, ...)`` for a Conv. PEFT's norms run over the same axes as ours (see
  `flax_lora._adapters._dora`).

To add a layout: write its ``write`` / ``read`` pair, make a `TensorLayout`, add it to
`TENSOR_LAYOUTS` and teach `layout_of_adapter` (save) and `layout_of_target` (load) when to pick
it. Expert kernels
(PEFT's ``target_parameters``) are not a module layout: their tensors' names depend on the
other parameters of the module, so `flax_lora._peft._expert_params` holds them.

Whole leaves (``modules_to_save``, biases) are written by `to_torch` and read by `from_torch`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import numpy as np
from jax.typing import ArrayLike

from flax_lora._adapters._weights import LoraWeights
from flax_lora._paths import leaf_name
from flax_lora._peft._names import MAGNITUDE
from flax_lora._probe import Use
from flax_lora._typing import Kind

Pair = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Target:
    """One PEFT module's tensors and the kernel they are read onto."""

    path: str  # the kernel's path in params
    module: str  # the PyTorch module's name
    shape: tuple[int, ...]  # the kernel's shape (one layer's, for a layered kernel)
    use: Use | None  # what the probe saw of that kernel (one layer's); None without a probe
    tensors: Mapping[str, np.ndarray]  # the module's tensors, by name after the module name

    @property
    def where(self) -> str:
        """The start of an error message about this module."""
        return f"load_peft: module {self.module!r} -> kernel {self.path!r} of shape {self.shape}"

    def misfit(self, expected: str) -> ValueError:
        """The error for tensors whose shapes do not fit the kernel."""
        got = ", ".join(f"{k[1:]} {tuple(v.shape)}" for k, v in sorted(self.tensors.items()))
        return ValueError(f"{self.where}: expected {expected}; the file has {got}.")


class Factors(NamedTuple):
    """A module's tensors in our layout, float as in the file."""

    a: np.ndarray  # (*I, r)
    b: np.ndarray  # (r, *O)
    kind: Kind
    in_axes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    """How one kind of PyTorch module holds a LoRA factor pair and DoRA's magnitude."""

    keys: tuple[str, str]  # the names of lora_A and lora_B after the module name
    write: Callable[[str, LoraWeights, np.ndarray, np.ndarray], Pair]  # (path, w, a, b) -> PEFT's
    read: Callable[[Target, np.ndarray, np.ndarray], Factors]  # (target, A, B) -> ours
    magnitude: Callable[[np.ndarray, int], np.ndarray]  # flat m, kernel ndim -> PEFT's m


# -- Linear (and GPT-2's Conv1D) <-> Dense, DenseGeneral, Einsum ---------------------------------
def _write_linear(path: str, w: LoraWeights, a: np.ndarray, b: np.ndarray) -> Pair:
    n_in, n_out = math.prod(w.in_shape), math.prod(w.out_shape)
    return a.reshape(n_in, w.rank).T, b.reshape(w.rank, n_out).T


def _read_linear(t: Target, lora_a: np.ndarray, lora_b: np.ndarray) -> Factors:
    r = lora_a.shape[0]
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_b.shape[1] != r:
        raise t.misfit("lora_A (r, in) and lora_B (out, r)")
    n_in, n_out = lora_a.shape[1], lora_b.shape[0]
    if t.use is not None:
        if t.use.kind == "conv":
            raise ValueError(f"{t.where}: PEFT adapted a Linear, but the probe sees a conv.")
        kind, in_axes = t.use.kind, tuple(t.use.in_axes)
    elif len(t.shape) == 2:
        kind, in_axes = "dense", (0,)
    else:
        kind, in_axes = "dense", infer_in_axes(t.where, t.shape, n_in, n_out)
    in_shape = tuple(t.shape[i] for i in in_axes)
    out_shape = tuple(s for i, s in enumerate(t.shape) if i not in in_axes)
    if math.prod(in_shape) != n_in or math.prod(out_shape) != n_out:
        raise t.misfit(
            f"lora_A (r, {math.prod(in_shape)}) and lora_B ({math.prod(out_shape)}, r) for input "
            f"axes {in_axes}"
        )
    return Factors(lora_a.T.reshape(*in_shape, r), lora_b.T.reshape(r, *out_shape), kind, in_axes)


def infer_in_axes(where: str, shape: tuple[int, ...], n_in: int, n_out: int) -> tuple[int, ...]:
    """The one set of axes whose sizes multiply to ``n_in`` (the rest to ``n_out``)."""
    nd = len(shape)
    fits = [
        axes
        for k in range(1, nd)
        for axes in itertools.combinations(range(nd), k)
        if math.prod(shape[i] for i in axes) == n_in
        and math.prod(shape[i] for i in range(nd) if i not in axes) == n_out
    ]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise ValueError(
            f"{where}: no split of its axes into {n_in} input and {n_out} output features "
            "(PEFT's lora_A / lora_B shapes). Was the adapter made for another model?"
        )
    raise ValueError(
        f"{where}: its input axes are ambiguous from PEFT's {n_in} -> {n_out} features "
        f"(any of {fits} fits). Pass probe=lambda p: model.apply(p, x) to load_peft."
    )


def _flat_magnitude(m: np.ndarray, nd: int) -> np.ndarray:
    return m


# -- Conv1d / Conv2d / Conv3d <-> Conv -----------------------------------------------------------
def _write_conv(path: str, w: LoraWeights, a: np.ndarray, b: np.ndarray) -> Pair:
    nd = len(w.kernel_shape)
    if tuple(w.in_axes) != tuple(range(nd - 1)):
        raise ValueError(
            f"save_peft: conv kernel {path!r} of shape {tuple(w.kernel_shape)} has input axes "
            f"{tuple(w.in_axes)}; PEFT's conv layout needs Flax's (*window, in, out)."
        )
    lora_a = np.moveaxis(np.moveaxis(a, -1, 0), -1, 1)  # (*k, in, r) -> (r, in, *k)
    return lora_a, b.T.reshape((math.prod(w.out_shape), w.rank) + (1,) * (nd - 2))


def _read_conv(t: Target, lora_a: np.ndarray, lora_b: np.ndarray) -> Factors:
    nd, shape, r = len(t.shape), t.shape, lora_a.shape[0]
    in_axes = tuple(range(nd - 1))
    if t.use is not None and (t.use.kind != "conv" or tuple(t.use.in_axes) != in_axes):
        raise ValueError(
            f"{t.where}: PEFT adapted a conv, but the probe sees a {t.use.kind} with input axes "
            f"{tuple(t.use.in_axes)} (Flax's conv layout (*window, in, out) is expected)."
        )
    window = shape[:-2]
    if (
        lora_a.ndim != nd
        or lora_a.shape != (r, shape[-2], *window)
        or lora_b.shape != (shape[-1], r) + (1,) * (nd - 2)
    ):
        raise t.misfit(
            f"conv factors lora_A (r, {shape[-2]}, {', '.join(map(str, window))}) and "
            f"lora_B ({shape[-1]}, r{', 1' * (nd - 2)})"
        )
    a = np.moveaxis(np.moveaxis(lora_a, 0, -1), 0, -2)  # (r, in, *k) -> (*k, in, r)
    return Factors(a, lora_b.reshape(shape[-1], r).T, "conv", in_axes)


def _conv_magnitude(m: np.ndarray, nd: int) -> np.ndarray:
    return m.reshape((1, m.size) + (1,) * (nd - 2))  # PEFT: (1, out, 1, ...)


# -- Embedding <-> Embed -------------------------------------------------------------------------
def _write_embedding(path: str, w: LoraWeights, a: np.ndarray, b: np.ndarray) -> Pair:
    if len(w.kernel_shape) != 2:
        raise ValueError(
            f"save_peft: embedding {path!r} is {len(w.kernel_shape)}-D "
            f"{tuple(w.kernel_shape)}; PEFT's Embedding LoRA needs a 2-D (num, dim) embedding."
        )
    return a.T, b.T


def _read_embedding(t: Target, lora_a: np.ndarray, lora_b: np.ndarray) -> Factors:
    if t.use is not None and (t.use.kind != "embed" or tuple(t.use.in_axes) != (0,)):
        raise ValueError(
            f"{t.where}: PEFT adapted an Embedding, but the probe sees a {t.use.kind}."
        )
    r = lora_a.shape[0]
    if len(t.shape) != 2 or lora_a.shape != (r, t.shape[0]) or lora_b.shape != (t.shape[1], r):
        raise t.misfit("lora_embedding_A (r, num) and lora_embedding_B (dim, r) of a 2-D embedding")
    return Factors(lora_a.T, lora_b.T, "embed", (0,))


# -- the table of layouts ------------------------------------------------------------------------
LINEAR = TensorLayout(
    (".lora_A.weight", ".lora_B.weight"), _write_linear, _read_linear, _flat_magnitude
)
CONV = TensorLayout((".lora_A.weight", ".lora_B.weight"), _write_conv, _read_conv, _conv_magnitude)
EMBEDDING = TensorLayout(
    (".lora_embedding_A", ".lora_embedding_B"), _write_embedding, _read_embedding, _flat_magnitude
)
TENSOR_LAYOUTS = (LINEAR, CONV, EMBEDDING)
SUFFIXES = (*dict.fromkeys(k for layout in TENSOR_LAYOUTS for k in layout.keys), MAGNITUDE)
"""The names after a module's name of every tensor a LoRA module may hold."""
PAIRS = {frozenset(layout.keys) for layout in TENSOR_LAYOUTS}
"""The sets of factor tensors a complete module holds."""


def layout_of_adapter(w: LoraWeights) -> TensorLayout:
    """The layout `save_peft` writes ``w`` in: by its kind."""
    return {"dense": LINEAR, "conv": CONV, "embed": EMBEDDING}[w.kind]


def layout_of_target(t: Target) -> TensorLayout:
    """The layout of a module's tensors in a file: by their names, then (Conv and Linear share
    names) by the rank of ``lora_A``, a conv weight for a Conv."""
    if EMBEDDING.keys[0] in t.tensors:
        return EMBEDDING
    return CONV if t.tensors[CONV.keys[0]].ndim > 2 else LINEAR


def to_peft(path: str, w: LoraWeights) -> dict[str, np.ndarray]:
    """The adapter ``w`` of one module (unlayered) as PEFT's float32 tensors, by their names
    after the module name (DoRA's magnitude included).

    Raises:
      ValueError: ``w`` has a layout PEFT cannot express (naming ``path``).
    """
    layout = layout_of_adapter(w)
    lora_a, lora_b = layout.write(path, w, _float32(w.a), _float32(w.b))
    tensors = {layout.keys[0]: lora_a, layout.keys[1]: lora_b}
    if w.m is not None:  # DoRA
        tensors[MAGNITUDE] = layout.magnitude(_float32(w.m).reshape(-1), len(w.kernel_shape))
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def from_peft(t: Target) -> Factors:
    """A module's factor tensors in our layout, for the kernel of ``t.shape``.

    Raises:
      ValueError: the tensors do not fit the kernel, or what the probe saw of it (naming both).
    """
    layout = layout_of_target(t)
    return layout.read(t, t.tensors[layout.keys[0]], t.tensors[layout.keys[1]])


def magnitude_from_peft(t: Target, out_shape: tuple[int, ...]) -> np.ndarray:
    """DoRA's ``lora_magnitude_vector`` (PEFT's ``(out,)``, ``(dim,)`` or conv ``(1, out, 1,
    ...)``) as our ``m`` of shape ``out_shape``.

    Raises:
      ValueError: it has another number of entries, or another rank.
    """
    m = t.tensors[MAGNITUDE]
    if m.size != math.prod(out_shape) or m.ndim not in (1, len(t.shape)):
        raise ValueError(
            f"{t.where}: its lora_magnitude_vector has shape {tuple(m.shape)}; expected "
            f"{math.prod(out_shape)} entries, one per output unit {out_shape}."
        )
    return m.reshape(out_shape)


def _float32(x: ArrayLike) -> np.ndarray:
    return np.asarray(jax.device_get(x)).astype(np.float32)


# -- whole leaves (modules_to_save, biases) ------------------------------------------------------
def to_torch(path: str, x: ArrayLike) -> np.ndarray:
    """A Flax leaf in its PyTorch twin's layout, float32: a 2-D ``kernel`` transposed, a conv
    kernel ``(*window, in, out)`` as ``(out, in, *window)``, a ``bias`` flattened."""
    x = _float32(x)
    leaf = leaf_name(path)
    if leaf == "kernel":
        if x.ndim == 2:
            x = x.T
        elif x.ndim >= 3:  # Flax conv (*window, in, out) -> PyTorch (out, in, *window)
            x = np.moveaxis(np.moveaxis(x, -1, 0), -1, 1)
    elif leaf == "bias":
        x = x.reshape(-1)
    return np.ascontiguousarray(x)


def from_torch(path: str, t: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A PyTorch tensor as the Flax leaf of ``shape`` at ``path`` (the inverse of `to_torch`).

    Raises:
      ValueError: the tensor does not fit (naming the path and both shapes).
    """
    leaf = leaf_name(path)
    t = np.asarray(t)
    if leaf == "kernel" and len(shape) == 2 and t.shape == shape[::-1]:
        return t.T
    if leaf == "kernel" and len(shape) >= 3:
        if t.shape == (shape[-1], shape[-2], *shape[:-2]):
            return np.moveaxis(np.moveaxis(t, 0, -1), 0, -2)
    elif t.shape == shape or (leaf != "kernel" and t.size == int(np.prod(shape))):
        return t.reshape(shape)
    raise ValueError(
        f"{where}: the tensor for {path!r} has shape {tuple(t.shape)}, which does not fit the "
        f"Flax leaf of shape {shape} (a Linear weight is the transposed kernel, a conv weight "
        "(out, in, *window))."
    )
