"""Layered kernels in PEFT files: one PyTorch module per layer of a layered kernel.

A layered kernel ``(L, *rest)`` (``nn.scan`` / ``nnx.scan``; `LoraWeights.layer_axes` ``== 1``)
with factors ``a (L, *I, r)``, ``b (L, r, *O)`` is ``L`` PyTorch modules, one per layer
(``model.layers.0.q_proj``, ``model.layers.1.q_proj``, ...). The key map names such a kernel
with the placeholder ``{layer}`` (``"layers.{layer}.attn.query"``); layer ``i``'s module is that
name with ``{layer}`` replaced by ``i``. Each layer's module holds exactly what an unlayered
adapter of the layer's kernel ``rest`` would.

An adapter of some layers only (`LoraWeights.layers`) writes those layers' modules; reading a
file without some layers' modules gives those layers zero factors (and, for DoRA, the magnitudes
``||W0||`` of their base kernels, so they stay the base) and ``layers=`` the others. One layered
adapter has one rank, one scale and one DoRA-ness for all its layers.

A kernel that holds its layer axis elsewhere (MaxText's ``(d, L, mlp)``,
`LoraWeights.layer_at`) is written the same way (its factors keep the layer axis first); to
read one, ``load_peft`` needs the probe, which says where the layer axis is (`scan_layouts`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_lora._adapters._weights import LoraWeights, stored_order
from flax_lora._peft._names import LAYER, Name, has, layer_name
from flax_lora._probe import Use
from flax_lora._typing import ArrayLeaf


class Module(NamedTuple):
    """One PEFT module to write: the kernel's path, the module's name, its (unlayered) adapter.
    Before a fused kernel is split (`flax_lora._peft._fused`) its name is the key map's tuple."""

    path: str
    name: Name
    w: LoraWeights


# -- save ----------------------------------------------------------------------------------------
def layer_modules(path: str, name: Name, w: LoraWeights) -> list[Module]:
    """The PEFT modules ``w`` stands for: itself, or for a layered kernel one per adapted layer,
    as the adapter of that layer's kernel.

    Raises:
      ValueError: ``{layer}`` in the name of an unlayered kernel or missing from a layered one's;
        more than one layer axis (nested scans).
    """
    if not w.layer_axes:
        if has(name, LAYER):
            raise ValueError(
                f"save_peft: key_map names the unstacked kernel {path!r} {name!r}, with the "
                f"placeholder {LAYER!r}; only kernels stacked by a scan have layers."
            )
        return [Module(path, name, w)]
    if w.layer_axes > 1:
        raise ValueError(
            f"save_peft: the kernel {path!r} of shape {tuple(w.stored_shape)} has "
            f"{w.layer_axes} layer axes (nested scans); PEFT modules can be named by one layer "
            "index only, so one layer axis is expected."
        )
    if not has(name, LAYER):
        raise ValueError(
            f"save_peft: key_map names the scan-stacked kernel {path!r} (shape "
            f"{tuple(w.stored_shape)}) {name!r}; a stacked kernel's name must contain "
            f"{LAYER!r}, replaced by each layer index (one PEFT module per layer)."
        )
    layers = range(w.kernel_shape[0]) if w.layers is None else w.layers
    return [
        Module(
            path,
            layer_name(name, i),
            w.layer_slice(a=w.a[i], b=w.b[i], m=None if w.m is None else w.m[i]),
        )
        for i in layers
    ]


# -- load ----------------------------------------------------------------------------------------
def scan_layouts(kernels: dict[str, ArrayLeaf], uses: dict[str, Use] | None) -> dict[str, int]:
    """Puts each kernel whose probe use has its layer axis elsewhere than in front (one layer
    axis, `LoraWeights.layer_at`) in its scan layout, layer axis first, in ``kernels`` and
    ``uses`` (changed in place), so that the modules are read as for ``nn.scan``'s kernels;
    returns path -> ``layer_at`` of those kernels."""
    moved: dict[str, int] = {}
    for path, kernel in list(kernels.items()):
        use = None if uses is None else uses.get(path)
        if use is None or len(use.layer_axes) != 1 or use.layer_axes[0] == 0:
            continue
        at = use.layer_axes[0]
        order = stored_order(1, at, len(kernel.shape))
        scan = lambda d: order[d]  # noqa: B023 - used at once; the kernel's axis -> scan layout
        perm = tuple(order.index(i) for i in range(len(order)))
        if isinstance(kernel, jax.ShapeDtypeStruct) or not hasattr(kernel, "dtype"):
            kernels[path] = jax.ShapeDtypeStruct(tuple(kernel.shape[d] for d in perm), kernel.dtype)
        else:
            kernels[path] = jnp.transpose(kernel, perm)
        assert uses is not None
        uses[path] = dataclasses.replace(
            use,
            in_axes=tuple(scan(d) for d in use.in_axes),
            layer_axes=(0,),
            expert_axes=tuple(scan(d) for d in use.expert_axes),
        )
        moved[path] = at
    return moved


def layer_use(use: Use | None, path: str, name: str, layer: int | None) -> Use | None:
    """What the probe saw of the kernel that module ``name`` is read onto: the kernel at ``path``,
    or its layer ``layer`` (then without the layer axis).

    Raises:
      ValueError: the probe sees the kernel layered but the name has no ``{layer}``, or the
        other way round.
    """
    if use is None:
        return None
    if len(use.layer_axes) != (layer is not None):
        seen = f"stacked by {len(use.layer_axes)} scan(s)" if use.layer_axes else "unstacked"
        raise ValueError(
            f"load_peft: the probe sees the kernel {path!r} (module {name!r}) {seen}"
            f", but the key map's name for it {'has' if layer is not None else 'lacks'} the "
            f"placeholder {LAYER!r}; expected one scan-stacked layer axis named by "
            f"{LAYER!r}, or an unstacked kernel without it."
        )
    if layer is None:
        return use
    in_axes = tuple(d - 1 for d in use.in_axes)
    if hasattr(use, "expert_axes"):  # a probe that knows expert axes
        experts = tuple(d - 1 for d in use.expert_axes)
        return dataclasses.replace(use, in_axes=in_axes, layer_axes=(), expert_axes=experts)
    return dataclasses.replace(use, in_axes=in_axes, layer_axes=())


def join_layer_modules(
    path: str,
    template: str,
    kernel: ArrayLeaf,
    pieces: dict[int, LoraWeights],
) -> LoraWeights:
    """One layered adapter (``layer_axes=1``) of ``kernel`` (the layered base kernel) from the
    adapters of its layers' modules (``template`` with ``{layer}`` replaced); layers without a
    module get zero factors, DoRA magnitudes ``||W0||`` (which leave them the base kernel), and
    ``layers`` lists the others when there are such.

    Raises:
      ValueError: the layers differ in rank, scale or DoRA-ness; a DoRA adapter lacks layers
        but ``kernel`` holds no values for their norms.
    """
    shape = tuple(int(s) for s in kernel.shape)
    how = {i: (w.rank, float(w.scale), w.m is not None) for i, w in pieces.items()}
    if len(set(how.values())) > 1:
        raise ValueError(
            f"load_peft: the layers of the layered kernel {path!r} (modules {template!r}) "
            "must share one rank, one scale and DoRA-ness (one layered adapter holds them); the "
            "file gives, by layer: "
            + ", ".join(
                f"{i}: rank {r}, scale {scale}{', DoRA' if dora else ''}"
                for i, (r, scale, dora) in sorted(how.items())
            )
            + "."
        )
    present = sorted(pieces)
    first = pieces[present[0]]
    missing = [i for i in range(shape[0]) if i not in pieces]
    fill: dict[str, dict[int, jax.Array | np.ndarray]] = {
        "a": {},
        "b": {},
        "m": {},
    }  # field -> {absent layer: its value}
    for i in missing:
        fill["a"][i], fill["b"][i] = jnp.zeros_like(first.a), jnp.zeros_like(first.b)
    if missing and first.m is not None:  # DoRA: zero factors (V = W0) and m = ||W0||
        norms = _base_norms(path, template, kernel, first.in_axes, missing)
        fill["m"] = {i: jnp.asarray(norms[i], first.m.dtype) for i in missing}

    def layered(field: str) -> jax.Array:
        return jnp.stack(
            [getattr(pieces[i], field) if i in pieces else fill[field][i] for i in range(shape[0])]
        )

    return first.replace(
        a=layered("a"),
        b=layered("b"),
        m=None if first.m is None else layered("m"),
        in_axes=tuple(d + 1 for d in first.in_axes),
        expert_axes=tuple(d + 1 for d in first.expert_axes),
        kernel_shape=shape,
        layer_axes=1,
        layers=tuple(present) if missing else None,
    )


def _base_norms(
    path: str,
    template: str,
    kernel: ArrayLeaf,
    in_axes: tuple[int, ...],
    layers: list[int],
) -> dict[int, np.ndarray]:
    """``||W0[i]||`` over each layer's input axes ``in_axes`` (one value per output unit, as
    `flax_lora._adapters._dora.weight_norm`), float32 or wider, for the given layers of a
    layered kernel."""
    if isinstance(kernel, jax.ShapeDtypeStruct) or not hasattr(kernel, "dtype"):
        raise ValueError(
            f"load_peft: the DoRA adapter of the layered kernel {path!r} (modules "
            f"{template!r}) lacks layers {layers}, whose magnitudes are the base kernel's norms, "
            f"but params holds no values at {path!r} ({type(kernel).__name__}); pass the real "
            "params."
        )
    acc = jnp.promote_types(kernel.dtype, jnp.float32)
    axes = tuple(sorted(d + 1 for d in in_axes))
    norms = np.asarray(
        jax.device_get(jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(kernel, acc)), axis=axes)))
    )
    return {i: norms[i] for i in layers}
