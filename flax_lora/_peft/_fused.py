"""Fused kernels in PEFT files: one Flax kernel as several PyTorch modules, and the reverse.

- **Split** (a tuple of names, ``("attn.k_proj", "attn.v_proj")``): a fused kernel that PyTorch
  keeps as ``k`` modules, cut along its first output axis into ``k`` equal parts, in order
  (Gemma's ``kv_einsum`` ``(2, K, D, H)``: input axis ``D``, output axes ``(2, K, H)``). Each
  module holds the shared ``lora_A`` and its slice of ``lora_B`` (part ``j`` of the kernel is
  ``W0[j] + s * a @ b[:, j]``, exactly). Read back, modules whose ``lora_A`` are equal give one
  adapter of their rank; otherwise the adapter has their summed rank: ``a`` the ``a`` s joined
  along the rank, ``b`` block-diagonal by part. Modules with different scales share one scale
  (1) with each module's folded into its block of ``b``. The choice holds for every layer and
  expert of the kernel, so they stay one adapter.
- **Join** (names ``"<module>[i]"``): several kernels that PyTorch fuses into one module (Phi-3's
  ``qkv_proj``, transformers 5's expert ``gate_up_proj``), kernel ``i`` giving the module's
  ``i``-th block of output features (in order, any sizes; the same input). The module's
  ``lora_A`` stacks the kernels' (rank ``sum r_i``), its ``lora_B`` is block-diagonal. Read back,
  each kernel gets the module's ``lora_A`` and its rows of ``lora_B`` (exact for any file),
  trimmed to the rank columns outside of which its rows of ``lora_B`` are zero in every layer:
  its own block of a file `save_peft` wrote (exact factors back), the module's whole rank of a
  file PEFT trained as one module.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._adapters._weights import AdapterLayout, LoraWeights
from flax_lora._paths import describe
from flax_lora._peft._layered import Module
from flax_lora._peft._names import part_of
from flax_lora._peft._tensor_layouts import LINEAR, infer_in_axes
from flax_lora._probe import Use

Group = tuple[int | None, int | None]  # (layer, expert) of a group of a fused kernel's modules


# -- save ----------------------------------------------------------------------------------------
def split_modules(m: Module) -> list[Module]:
    """The modules of a fused kernel's adapter (a tuple name), else ``[m]``.

    Raises:
      ValueError: the adapter is no plain dense adapter, or its first output axis does not
        divide into as many equal parts as there are names (naming the kernel and names).
    """
    if isinstance(m.name, str):
        return [m]
    w, k = m.w, len(m.name)
    if w.kind != "dense" or w.carried_axes:
        raise ValueError(
            f"save_peft: key_map names the kernel {m.path!r} {m.name!r}, a fused kernel, but its "
            f"adapter is a {w.kind} adapter with carried axes {w.carried_axes}; a fused kernel "
            "is a dense kernel (an expert kernel's names need '{expert}')."
        )
    first = w.out_axes[0] if w.out_axes else None
    if first is None or w.kernel_shape[first] % k:
        raise ValueError(
            f"save_peft: the fused kernel {m.path!r} of shape {tuple(w.kernel_shape)} (input "
            f"axes {tuple(w.in_axes)}) cannot be split into the {k} modules {m.name!r}: its first "
            f"output axis {first} has size "
            f"{None if first is None else w.kernel_shape[first]}, not a multiple of {k}."
        )
    n = w.kernel_shape[first] // k
    shape = tuple(n if i == first else s for i, s in enumerate(w.kernel_shape))
    return [
        Module(
            m.path,
            name,
            w.replace(
                b=w.b[:, j * n : (j + 1) * n],
                m=None if w.m is None else w.m[j * n : (j + 1) * n],
                kernel_shape=shape,
            ),
        )
        for j, name in enumerate(m.name)
    ]


def join_modules(modules: Sequence[Module]) -> list[Module]:
    """The modules with those named ``"<module>[i]"`` joined into one module each.

    Raises:
      ValueError: parts missing or given twice; parts that are not plain dense adapters, or
        differ in input features or experts (naming the kernels).
    """
    groups: dict[str, dict[int, Module]] = collections.defaultdict(dict)
    out: list[Module] = []
    for m in modules:
        part = part_of(m.name) if isinstance(m.name, str) else None
        if part is None:
            out.append(m)
        elif part[1] in groups[part[0]]:
            raise ValueError(
                f"save_peft: key_map names the kernels {groups[part[0]][part[1]].path!r} and "
                f"{m.path!r} both {m.name!r}."
            )
        else:
            groups[part[0]][part[1]] = m
    for name, parts in groups.items():
        if sorted(parts) != list(range(len(parts))):
            raise ValueError(
                f"save_peft: the kernels {describe([m.path for m in parts.values()])} are parts "
                f"{sorted(parts)} of the module {name!r}; parts [0] to [{len(parts) - 1}] are "
                "expected, each once."
            )
        out.append(_joined(name, [parts[i] for i in range(len(parts))]))
    return out


def _joined(name: str, parts: list[Module]) -> Module:
    """One module of the kernels ``parts`` (in order): ``a`` the parts' ``a`` along the rank,
    ``b`` block-diagonal with each part's output features flattened; one scale."""
    ws = [m.w for m in parts]
    first = ws[0]
    bad = [
        m.path
        for m in parts
        if m.w.kind != "dense"
        or m.w.m is not None
        or m.w.layer_axes
        or m.w.in_shape != first.in_shape
        or m.w.carried_shape != first.carried_shape
    ]
    if bad:
        raise ValueError(
            f"save_peft: the kernels {describe([m.path for m in parts])} make one module "
            f"{name!r}, so they need plain dense adapters (no DoRA) with the same input axes "
            f"{first.in_shape} and experts {first.carried_shape}; these differ: {describe(bad)}."
        )
    carried, n_in = first.carried_shape, math.prod(first.in_shape)
    scales = [float(w.scale) for w in ws]
    scale = scales[0] if len(set(scales)) == 1 else 1.0
    ranks = [w.rank for w in ws]
    n_outs = [math.prod(w.out_shape) for w in ws]
    a = jnp.concatenate([jnp.reshape(w.a, (*carried, n_in, w.rank)) for w in ws], axis=-1)
    b = jnp.zeros((*carried, sum(ranks), sum(n_outs)), jnp.result_type(*(w.b for w in ws)))
    r0 = o0 = 0
    for w, s, r, n in zip(ws, scales, ranks, n_outs, strict=True):
        block = jnp.reshape(w.b, (*carried, r, n)) * (s / scale)
        b = b.at[..., r0 : r0 + r, o0 : o0 + n].set(block.astype(b.dtype))
        r0, o0 = r0 + r, o0 + n
    c = len(carried)
    joined = first.replace(
        a=a,
        b=b,
        scale=scale,
        in_axes=(c,),
        kernel_shape=(*carried, n_in, sum(n_outs)),
        expert_axes=tuple(range(c)),
    )
    return Module(parts[0].path, name, joined)


# -- load ----------------------------------------------------------------------------------------
def part_target(
    shape: tuple[int, ...], use: Use | None, k: int, stand_ins: Mapping[str, np.ndarray], where: str
) -> tuple[tuple[int, ...], Use]:
    """The shape of one of the ``k`` parts of a fused kernel of ``shape`` (its first output axis
    divided by ``k``) and its use: the probe's input axes, else those that PEFT's Linear shapes
    of the module (``stand_ins``) allow for the whole kernel.

    Raises:
      ValueError: the module holds no Linear factors; the input axes are ambiguous or none fit;
        the first output axis does not divide into ``k`` parts.
    """
    lora_a, lora_b = (stand_ins.get(key) for key in LINEAR.keys)
    if lora_a is None or lora_b is None or lora_a.ndim != 2 or lora_b.ndim != 2:
        raise ValueError(
            f"{where}: a fused kernel's modules are Linear modules (lora_A.weight (r, in), "
            f"lora_B.weight (out, r)); the file has {sorted(k[1:] for k in stand_ins)}."
        )
    if use is not None:
        in_axes = tuple(use.in_axes)
    else:
        in_axes = infer_in_axes(where, shape, lora_a.shape[1], lora_b.shape[0] * k)
    out_axes = [i for i in range(len(shape)) if i not in in_axes]
    if not out_axes or shape[out_axes[0]] % k:
        raise ValueError(
            f"{where}: the fused kernel of shape {shape} has input axes {in_axes}; its first "
            f"output axis {out_axes[0] if out_axes else None} does not divide into its {k} "
            "modules (the key map's tuple of names)."
        )
    first = out_axes[0]
    part = tuple(n // k if i == first else n for i, n in enumerate(shape))
    return part, Use(use.kind if use is not None else "dense", in_axes)


def joined_target(
    parts: Sequence[tuple[str, tuple[int, ...], Use | None]], where: str
) -> tuple[tuple[int, ...], Use, list[AdapterLayout]]:
    """The shape ``(*C, n_in, sum n_out)`` of one module several kernels (``parts``: path,
    shape, use) make, its use, and each kernel's layout (2-D kernels need no probe).

    Raises:
      ValueError: a kernel of 3 or more dimensions without a probe; kernels that differ in
        input axes or experts (naming them).
    """
    layouts = []
    for path, shape, use in parts:
        if use is None and len(shape) != 2:
            raise ValueError(
                f"{where}: the kernel {path!r} of shape {shape} is part of a module several "
                "kernels make; its input axes are unknown. Pass probe=lambda p: "
                "model.apply(p, x) to load_peft."
            )
        in_axes, experts = ((0,), ()) if use is None else (use.in_axes, use.expert_axes)
        layouts.append(AdapterLayout(1.0, tuple(in_axes), shape, expert_axes=tuple(experts)))
    first = layouts[0]
    if any((x.in_shape, x.carried_shape) != (first.in_shape, first.carried_shape) for x in layouts):
        raise ValueError(
            f"{where}: the kernels {[p for p, _, _ in parts]} make one module, so they need the "
            "same input axes and experts; they have "
            f"{[(x.in_shape, x.carried_shape) for x in layouts]} (input sizes, experts)."
        )
    c = first.carried_shape
    shape = (*c, math.prod(first.in_shape), sum(math.prod(x.out_shape) for x in layouts))
    return shape, Use("dense", (len(c),), expert_axes=tuple(range(len(c)))), layouts


def fuse_parts(
    path: str,
    names: str,
    k: int,
    pieces: Mapping[tuple[int | None, int | None, int | None], LoraWeights],
    where: str,
) -> dict[Group, LoraWeights]:
    """The adapters of a fused kernel (per layer and expert) from its ``k`` modules' adapters
    (``pieces`` by layer, expert, part), each read for its part of the kernel.

    Raises:
      ValueError: a layer or expert with some parts missing, or parts of different input
        layouts (naming the modules ``names`` and the file ``where``).
    """
    groups: dict[Group, dict[int, LoraWeights]] = collections.defaultdict(dict)
    for (layer, expert, part), w in pieces.items():
        groups[(layer, expert)][int(part or 0)] = w
    for key, parts in groups.items():
        missing = [j for j in range(k) if j not in parts]
        layouts = {(w.in_axes, tuple(w.kernel_shape), w.kind) for w in parts.values()}
        if missing or len(layouts) > 1:
            layer, expert = key
            at = (f" layer {layer}" if layer is not None else "") + (
                f" expert {expert}" if expert is not None else ""
            )
            raise ValueError(
                f"load_peft: {where!r}: the fused kernel {path!r} is the {k} modules {names}, "
                + (
                    f"but the file lacks part(s) {missing}{at} of them."
                    if missing
                    else f"but their tensors fit different layouts{at}: {sorted(layouts)}."
                )
            )
    ws = [w for parts in groups.values() for w in parts.values()]
    scales = {float(w.scale) for w in ws}
    scale = scales.pop() if len(scales) == 1 else 1.0
    shared = all(
        len({tuple(w.a.shape) for w in parts.values()}) == 1
        and all(np.array_equal(_host(w.a), _host(parts[0].a)) for w in parts.values())
        for parts in groups.values()
    )
    return {
        key: _fused([parts[j] for j in range(k)], scale, shared) for key, parts in groups.items()
    }


def _fused(parts: list[LoraWeights], scale: float, shared: bool) -> LoraWeights:
    """One adapter of the kernel whose first output axis the ``parts`` split, in order."""
    first = parts[0]
    axis = first.out_axes[0]
    n = first.kernel_shape[axis]
    shape = tuple(n * len(parts) if i == axis else s for i, s in enumerate(first.kernel_shape))
    bs = [w.b * (float(w.scale) / scale) for w in parts]
    if shared:
        a, b = first.a, jnp.concatenate(bs, axis=1)
    else:
        a = jnp.concatenate([w.a for w in parts], axis=-1)
        ranks = [w.rank for w in parts]
        out_shape = (first.out_shape[0] * len(parts), *first.out_shape[1:])
        b = jnp.zeros((sum(ranks), *out_shape), bs[0].dtype)
        r0 = 0
        for j, (bj, r) in enumerate(zip(bs, ranks, strict=True)):
            b = b.at[r0 : r0 + r, j * n : (j + 1) * n].set(bj)
            r0 += r
    m = None if first.m is None else jnp.concatenate([w.m for w in parts if w.m is not None], 0)
    return first.replace(a=a, b=b, m=m, scale=scale, kernel_shape=shape)


def split_joined(w: LoraWeights, parts: Sequence[AdapterLayout]) -> list[LoraWeights]:
    """The adapters of the kernels of a joined module, from the module's adapter ``w`` (read
    for ``(*C, n_in, sum n_out)``): each kernel (``parts``: their layouts) gets ``w``'s ``a``
    and its columns of ``b``, in its own layout."""
    out, o0 = [], 0
    for p in parts:
        n = math.prod(p.out_shape)
        a = jnp.reshape(w.a, (*w.carried_shape, *p.in_shape, w.rank))
        b = jnp.reshape(w.b[..., o0 : o0 + n], (*w.carried_shape, w.rank, *p.out_shape))
        out.append(p.with_factors(a, b).replace(scale=w.scale, dropout=w.dropout))
        o0 += n
    return out


def trim_joined(
    index: int, count: int, pieces: Mapping[int | None, LoraWeights]
) -> dict[int | None, LoraWeights]:
    """Kernel ``index`` of ``count`` joined ones, by layer, keeping of the module's rank only
    columns outside of which every layer's ``b`` is zero (so the deltas stay exact): its equal
    block when ``b`` is zero outside it (as `save_peft` writes equal ranks, also while ``b`` is
    all zero), else the span of its nonzero columns (`save_peft`'s own ranks), else all."""
    ws = list(pieces.values())
    r, rank_axis = ws[0].rank, len(ws[0].carried_shape)
    if any(w.rank != r for w in ws):
        return dict(pieces)
    other = tuple(d for d in range(ws[0].b.ndim) if d != rank_axis)
    used = np.flatnonzero(np.any([np.any(_host(w.b), axis=other) for w in ws], axis=0))
    lo, hi = 0, r
    if r % count == 0 and all(index * r // count <= u < (index + 1) * r // count for u in used):
        lo, hi = index * r // count, (index + 1) * r // count
    elif used.size:
        lo, hi = int(used[0]), int(used[-1]) + 1
    return {
        i: w.replace(
            a=jax.lax.slice_in_dim(w.a, lo, hi, axis=w.a.ndim - 1),
            b=jax.lax.slice_in_dim(w.b, lo, hi, axis=rank_axis),
        )
        for i, w in pieces.items()
    }


def _host(x: jax.Array | np.ndarray) -> np.ndarray:
    return np.asarray(jax.device_get(x))
