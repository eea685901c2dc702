"""`lora.init`: make the adapters of a params tree."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flax_lora._adapters import LoraWeights
from flax_lora._config import LoraConfig
from flax_lora._layers import init_stacked, stacked_kernels
from flax_lora._paths import describe, flatten, nest

PyTree = Any
_FLAX_KERNEL_NAMES = ("kernel", "embedding")


def init(
    key: jax.Array,
    params: PyTree,
    config: LoraConfig,
    probe: Callable[[PyTree], Any] | None = None,
) -> PyTree | tuple[PyTree, PyTree]:
    """Creates the LoRA adapters of every kernel of ``params`` that ``config`` selects.

    Example:
      >>> model = nn.Dense(4)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> adapters = lora.init(jax.random.key(1), params, lora.LoraConfig(rank=2))
      >>> adapters["params"]["kernel"].a.shape, adapters["params"]["kernel"].b.shape
      ((3, 2), (2, 4))

    Which leaves are kernels: with ``probe``, every floating leaf of 2 or more dimensions that the
    traced probe contracts (``dot_general``, ``conv``) or gathers (an Embed lookup). Without a
    probe, with ``targets=None``, the 2-D leaves named ``kernel`` or ``embedding`` (Flax's names);
    with explicit ``targets``, every 2-D floating leaf they match. Rows of a 2-D kernel are its
    input axis; kernels of 3 or more dimensions need the probe.

    Args:
      key: a PRNG key.
      params: a Linen variables dict (``{"params": ...}``), an NNX state, or any pytree.
      config: what to adapt and how.
      probe: an optional function of the params alone, e.g. ``lambda p: model.apply(p, x)``,
        traced abstractly (no FLOPs) to learn each kernel's input axes and kind.

    Returns:
      The adapters: nested dicts that mirror the paths of the adapted kernels, each ending in a
      `LoraWeights` with factors ``a`` and ``b``; with ``modules_to_save``, ``bias`` or
      ``trainable_token_indices``, also a `TrainedCopy` or `TokenDelta` at the path of each
      leaf they train. With ``init="pissa"`` or ``"olora"``, the pair
      ``(adapters, new_params)``, where ``new_params`` holds the residual base kernels; with
      ``init="loftq"``, ``(adapters, qparams)``, where each adapted kernel of ``qparams`` is a
      `QuantizedKernel` (``config.loftq_dtype``) and ``deQ(Q) + scale * a @ b`` approximates it
      (see `lora.quantize`; the other leaves are unchanged).

    Raises:
      ValueError: no kernel matches; ``modules_to_save`` patterns match no module; token ids
        are out of range for a table, or a table also gets LoRA factors; ``bias="lora_only"``
        finds no bias beside the adapted kernels (all naming the paths); a rank is below 1 or
        (PiSSA/OLoRA/LoftQ) above the kernel's smaller side; a kernel of 3 or more dimensions
        has no probe.
      TypeError: a targeted leaf is not floating.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"lora.init expects a LoraConfig; got {type(config).__name__}.")
    original = params  # DoRA's magnitude needs the values of a quantized base
    params = _shapes_of_quantized(params, config)
    leaves = flatten(params)
    uses = None
    if probe is not None:
        from flax_lora._probe import kernel_uses

        uses = kernel_uses(probe, params)

    saved = _saved_leaves(leaves, config)  # modules_to_save: trained whole, never factored
    selected = _select({p: x for p, x in leaves.items() if p not in saved}, config, uses)
    stacked = stacked_kernels(selected, uses, leaves, config)  # scan-stacked layers
    keys = jax.random.split(key, max(len(selected), 1))
    adapters: list[tuple[str, LoraWeights]] = []
    new_kernels: dict[str, jax.Array] = {}
    for k, (path, (kind, in_axes)) in zip(keys, selected.items(), strict=False):
        kernel = leaves[path]
        if path in stacked:
            w, residual = init_stacked(k, path, kernel, kind, in_axes, config, *stacked[path])
        else:
            w, residual = _init_one(k, path, kernel, kind, in_axes, config)
        if config.dora:
            w = _with_magnitude(w, residual if residual is not None else original, path)
        adapters.append((path, w))
        if residual is not None:
            new_kernels[path] = residual
    extras = _extras(original, leaves, saved, selected, config, uses)
    tree = nest(adapters + list(extras.items()))
    if config.init in ("pissa", "olora", "loftq"):
        from flax_lora._paths import path_str

        new_params = jax.tree_util.tree_map_with_path(
            lambda kp, x: new_kernels.get(path_str(kp), x), params
        )
        return tree, new_params
    return tree


def _saved_leaves(leaves: dict[str, Any], config: LoraConfig) -> list[str]:
    """The floating leaves of the modules in ``config.modules_to_save`` (a module's path, or
    that of a module it is inside, fullmatches a pattern)."""
    if not config.modules_to_save:
        return []
    out, used = [], set()
    for path, leaf in leaves.items():
        parts = path.split("/")
        for k in range(1, len(parts)):
            module = "/".join(parts[:k])
            hit = [p for p in config.modules_to_save if re.fullmatch(p, module)]
            if hit:
                used.update(hit)
                if jnp.issubdtype(getattr(leaf, "dtype", jnp.int32), jnp.floating):
                    out.append(path)
                break
    unused = [p for p in config.modules_to_save if p not in used]
    if unused:
        modules = list(dict.fromkeys(p.rsplit("/", 1)[0] for p in leaves if "/" in p))
        raise ValueError(
            f"LoraConfig.modules_to_save: {unused} match no module of params (a pattern must "
            f"re.fullmatch a module's path, the path of its leaves without the leaf name). "
            f"Modules seen: {describe(modules, limit=40)}."
        )
    return out


def _extras(
    original: PyTree,
    leaves: dict[str, Any],
    saved: list[str],
    selected: dict[str, Any],
    config: LoraConfig,
    uses: dict[str, Any] | None,
) -> dict[str, Any]:
    """Path -> `TrainedCopy` / `TokenDelta` for modules_to_save, trained biases and tokens."""
    from flax_lora._extras import TokenDelta, TrainedCopy

    values = flatten(original)  # the real values (a quantized base stands in as shapes above)

    def copy_of(path: str) -> jax.Array:
        if path not in values or not hasattr(values[path], "dtype"):
            raise TypeError(
                f"lora.init: {path!r} is to be trained whole (modules_to_save / bias), but params "
                f"hold no plain array there ({type(leaves[path]).__name__}); pass the float "
                "params (e.g. lora.dequantize(params))."
            )
        return jnp.array(values[path], copy=True)

    out: dict[str, Any] = {}
    for path in saved:
        out[path] = TrainedCopy(value=copy_of(path), role="module")
    if config.bias != "none":
        floating = lambda p: jnp.issubdtype(getattr(leaves[p], "dtype", jnp.int32), jnp.floating)
        if config.bias == "all":
            biases = [p for p in leaves if p.rsplit("/", 1)[-1] == "bias" and floating(p)]
            if not biases:
                raise ValueError(
                    "LoraConfig(bias='all'): params hold no floating leaf named 'bias'. Leaves: "
                    f"{describe(leaves, limit=20)}."
                )
        else:
            modules = [p.rsplit("/", 1)[0] for p in selected if "/" in p]
            biases = [f"{m}/bias" for m in modules if f"{m}/bias" in leaves]
            if not biases:
                raise ValueError(
                    "LoraConfig(bias='lora_only') trains the biases of the adapted modules, but "
                    f"none of them has a leaf named 'bias': looked for "
                    f"{describe([f'{m}/bias' for m in modules])}. Use bias='none' for modules "
                    "without biases."
                )
        for path in biases:
            if path not in out:  # a bias of a module in modules_to_save is trained there
                out[path] = TrainedCopy(value=copy_of(path), role="bias")
    if config.trainable_token_indices is not None:
        for path, ids in _token_tables(leaves, config, uses).items():
            table = leaves[path]
            if path in selected or path in out:
                raise ValueError(
                    f"LoraConfig.trainable_token_indices: the table {path!r} also gets "
                    f"{'LoRA factors' if path in selected else 'a trained copy'}; a table can "
                    "have one of the two. Exclude it from targets (exclude=...) or from "
                    "modules_to_save."
                )
            bad = [i for i in ids if i >= table.shape[0]]
            if bad:
                raise ValueError(
                    f"LoraConfig.trainable_token_indices: token ids {bad} are out of range for "
                    f"the table {path!r} of shape {tuple(table.shape)} (ids must be below "
                    f"{table.shape[0]})."
                )
            delta = jnp.zeros((len(ids), *table.shape[1:]), config.dtype)
            out[path] = TokenDelta(delta=delta, indices=tuple(ids), num_rows=int(table.shape[0]))
    return out


def _token_tables(
    leaves: dict[str, Any], config: LoraConfig, uses: dict[str, Any] | None
) -> dict[str, tuple[int, ...]]:
    """Table path -> token ids, for ``config.trainable_token_indices``."""
    spec = config.trainable_token_indices
    embed = lambda p: uses is not None and p in uses and uses[p].kind == "embed"
    is_table = lambda p: (
        getattr(leaves[p], "ndim", 0) == 2 and (p.rsplit("/", 1)[-1] == "embedding" or embed(p))
    )
    tables = [p for p in leaves if is_table(p)]
    if not isinstance(spec, dict):
        if not tables:
            raise ValueError(
                "LoraConfig.trainable_token_indices: params hold no Embed table (a 2-D leaf named "
                "'embedding'); pass {regex: ids} to name the table."
            )
        return {p: spec for p in tables}
    out: dict[str, tuple[int, ...]] = {}
    for pattern, ids in spec.items():
        hits = [
            p
            for p in leaves
            if getattr(leaves[p], "ndim", 0) >= 2
            and (re.fullmatch(pattern, p) or re.fullmatch(pattern, p.rsplit("/", 1)[0]))
        ]
        if not hits:
            raise ValueError(
                f"LoraConfig.trainable_token_indices: {pattern!r} matches no table of params (it "
                "must re.fullmatch a 2-D table's path or its module's path). Embed tables seen: "
                f"{describe(tables)}."
            )
        for p in hits:
            if leaves[p].ndim != 2:
                raise ValueError(
                    f"LoraConfig.trainable_token_indices: {pattern!r} matches {p!r} of shape "
                    f"{tuple(leaves[p].shape)}; token rows need a 2-D (num, features) table."
                )
            if p in out:
                raise ValueError(
                    f"LoraConfig.trainable_token_indices: {p!r} is matched by several patterns."
                )
            out[p] = ids
    return out


def _shapes_of_quantized(params: PyTree, config: LoraConfig) -> PyTree:
    """A quantized base (QLoRA) stands in as the shapes of its kernels: "lora", "gaussian" and
    "random" need no values, and nothing is dequantized."""
    from flax_lora._quant import is_quantized

    found = [x for x in jax.tree.leaves(params, is_leaf=is_quantized) if is_quantized(x)]
    if not found:
        return params
    if config.init in ("pissa", "olora", "loftq"):
        raise TypeError(
            f"lora.init(init={config.init!r}) needs the float base kernels, but params hold "
            "QuantizedKernel nodes. Pass the float params (init='loftq' quantizes them itself), "
            "or lora.dequantize(params)."
        )
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x,
        params,
        is_leaf=is_quantized,
    )


def _select(
    leaves: dict[str, Any], config: LoraConfig, uses: dict[str, Any] | None
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Path -> (kind, input axes) of every kernel the config adapts."""
    candidates = {}
    for path, leaf in leaves.items():
        ndim = getattr(leaf, "ndim", 0)
        if ndim < 2:
            continue
        if uses is not None:
            if path in uses or (config.targets is not None and config.matches(path)):
                candidates[path] = leaf
        elif config.targets is not None or path.rsplit("/", 1)[-1] in _FLAX_KERNEL_NAMES:
            candidates[path] = leaf
    # a scan-stacked kernel's layers are the entries of its leading axis, not a number in its
    # path: `flax_lora._layers.stacked_kernels` picks them
    stacked = lambda p: uses is not None and p in uses and bool(uses[p].layer_axes)
    chosen = [p for p in candidates if config.matches(p, layer_in_path=not stacked(p))]
    if not chosen:
        raise ValueError(
            f"LoraConfig(targets={config.targets!r}, exclude={config.exclude!r}, "
            f"layers={config.layers!r}) matches no kernel. Kernels seen: "
            f"{describe(candidates, limit=40)}." + _no_probe_hint(leaves, config, uses)
        )
    out = {}
    for path in chosen:
        leaf = candidates[path]
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                f"Kernel {path!r} has dtype {leaf.dtype}; LoRA adapts floating-point kernels only."
            )
        is_table = leaf.ndim == 2 and path.rsplit("/", 1)[-1] == "embedding"
        if uses is not None and path in uses and not (is_table and uses[path].kind == "dense"):
            kind, in_axes = uses[path].kind, uses[path].in_axes
        elif leaf.ndim == 2:
            # An Embed table's rows are its input axis also when the probe only contracts it
            # (``attend``), as without a probe.
            kind = "embed" if path.rsplit("/", 1)[-1] == "embedding" else "dense"
            in_axes = (0,)
        elif uses is not None:
            raise ValueError(
                f"Kernel {path!r} of shape {tuple(leaf.shape)} is matched by targets but the probe "
                "never contracts or gathers it, so its input axes are unknown."
            )
        else:
            raise ValueError(
                f"Kernel {path!r} has shape {tuple(leaf.shape)} ({leaf.ndim} dimensions): pass "
                "probe=lambda p: model.apply(p, x) to lora.init so that its input axes can be "
                "learned (2-D kernels need no probe)."
            )
        if not in_axes or len(in_axes) == leaf.ndim:
            raise ValueError(
                f"Kernel {path!r} of shape {tuple(leaf.shape)}: the probe contracts axes "
                f"{in_axes}, which leaves no input or no output axis to factor."
            )
        out[path] = (kind, tuple(in_axes))
    return out


def _no_probe_hint(leaves: dict[str, Any], config: LoraConfig, uses: dict[str, Any] | None) -> str:
    """For a config that matches nothing without a probe and with ``targets=None``: the rule
    that picked the candidates, the leaves it passed over, and what to pass instead."""
    if uses is not None or config.targets is not None:
        return ""
    big = [p for p, leaf in leaves.items() if getattr(leaf, "ndim", 0) >= 2]
    others = [p for p in big if p.rsplit("/", 1)[-1] not in _FLAX_KERNEL_NAMES]
    if others:
        example = "|".join(re.escape(p) for p in others[:2])
        todo = (
            f"To adapt other leaves, pass targets= (regexes that re.fullmatch their paths, e.g. "
            f"targets={example!r}; 2-D leaves then take their rows as the input axis) or "
            "probe=lambda p: apply_fn(p, x) (every leaf the traced function contracts or "
            "gathers becomes a kernel)."
        )
    else:
        todo = "The tree has no other leaf of 2 or more dimensions to adapt."
    return (
        " Without a probe and with targets=None, only leaves named 'kernel' or 'embedding' "
        f"(Flax's names) are candidates. Leaves of 2 or more dimensions in params: "
        f"{describe(big, limit=10)}. {todo}"
    )


def _init_one(
    key: jax.Array,
    path: str,
    kernel: jax.Array,
    kind: str,
    in_axes: tuple[int, ...],
    config: LoraConfig,
) -> tuple[LoraWeights, jax.Array | None]:
    shape = tuple(kernel.shape)
    out_axes = tuple(i for i in range(len(shape)) if i not in in_axes)
    in_shape = tuple(shape[i] for i in in_axes)
    out_shape = tuple(shape[i] for i in out_axes)
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    r = config.rank_for(path)
    scale = config.scale_for(path)
    dtype = config.dtype
    meta = dict(
        scale=scale, in_axes=in_axes, kernel_shape=shape, kind=kind, dropout=float(config.dropout)
    )
    residual = None
    if config.init in ("lora", "gaussian", "random"):
        a, b = _random_factors(key, config.init, kind == "embed", n_in, n_out, r, jnp.dtype(dtype))
    else:  # pissa / olora / loftq: factor W0 in float32, base becomes the residual
        if r > min(n_in, n_out):
            raise ValueError(
                f"init={config.init!r} needs rank <= min(fan_in, fan_out) = {min(n_in, n_out)} "
                f"for {path!r} (kernel {shape}, input axes {in_axes}); got rank {r}."
            )
        w = kernel.astype(jnp.float32).transpose(in_axes + out_axes).reshape(n_in, n_out)
        if config.init == "loftq":  # the base becomes Q, quantized (see flax_lora._quant)
            from flax_lora._quant import loftq_factors

            a32, b32, residual = loftq_factors(
                kernel, in_axes, r, scale, config.loftq_iter, config.loftq_dtype
            )
        elif config.init == "pissa":
            u, s, vt = jnp.linalg.svd(w, full_matrices=False)
            root = jnp.sqrt(s[:r] / scale)
            a32, b32 = u[:, :r] * root, root[:, None] * vt[:r]
        else:  # OLoRA: QR of W0 in PyTorch's (out, in) layout: lora_A = R[:r], lora_B = Q[:, :r]
            q, rr = jnp.linalg.qr(w.T)
            a32, b32 = rr[:r].T, q[:, :r].T
        # the residual is taken against the factors as stored (in ``dtype``), so that
        # residual + scale * a @ b is W0 to float32 rounding also for bfloat16 adapters
        a, b = a32.astype(dtype), b32.astype(dtype)
        if residual is None:  # pissa / olora
            ab = jnp.matmul(
                a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
            )
            res = w - scale * ab
            inverse = tuple((in_axes + out_axes).index(i) for i in range(len(shape)))
            residual = res.reshape(in_shape + out_shape).transpose(inverse).astype(kernel.dtype)
    a = _place(a.reshape((*in_shape, r)), kernel, in_axes, last=True)
    b = _place(b.reshape((r, *out_shape)), kernel, out_axes, last=False)
    return LoraWeights(a=a, b=b, **meta), residual


def _with_magnitude(w: LoraWeights, base: PyTree, path: str) -> LoraWeights:
    """DoRA: ``m = ||W0 + scale * a @ b||`` over the input axes (PEFT), in the factors' dtype.

    ``base`` is the base kernel the adapter will run on (a PiSSA/OLoRA residual, a LoftQ
    `QuantizedKernel`), or the params tree holding it at ``path``. With the default inits
    (``b = 0``, or ``a = 0`` for an Embed) this makes DoRA the identity at init.
    """
    from flax_lora._dora import weight_norm
    from flax_lora._quant import dequantize_kernel, is_quantized

    if not (is_quantized(base) or hasattr(base, "ndim")):
        base = flatten(base, is_leaf=is_quantized)[path]
    if is_quantized(base):
        base = dequantize_kernel(base)
    m = weight_norm(base, w, jnp.promote_types(base.dtype, jnp.float32)).astype(w.b.dtype)
    sharding = getattr(base, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and not isinstance(base, jax.core.Tracer):
        spec = tuple(sharding.spec) + (None,) * (base.ndim - len(sharding.spec))
        axes = tuple(range(getattr(w, "layer_axes", 0))) + tuple(w.out_axes)
        out_spec = jax.sharding.PartitionSpec(*[spec[i] for i in axes])
        m = jax.device_put(m, jax.sharding.NamedSharding(sharding.mesh, out_spec))
    return w.replace(m=m)


def _random_factors(
    key: jax.Array, init: str, embed: bool, n_in: int, n_out: int, r: int, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """``a`` (n_in, r) and ``b`` (r, n_out) for the random inits.

    The random numbers are drawn by one compiled call per power-of-two size (threefry takes
    long to compile on CPU, and a model has many kernel shapes); slicing and scaling them to
    each shape is a second, cheap compiled call.
    """
    na, nb = n_in * r, r * n_out
    normal = init == "gaussian" or (embed and init == "lora")
    flat = _draw(key, _bucket(na + nb), normal)
    return _shape_factors(flat, init, embed, n_in, n_out, r, dtype)


def _bucket(n: int) -> int:
    return max(256, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw(key: jax.Array, n: int, normal: bool) -> jax.Array:
    if normal:
        return jax.random.normal(key, (n,), jnp.float32)
    return jax.random.uniform(key, (n,), jnp.float32, -1.0, 1.0)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _shape_factors(
    flat: jax.Array, init: str, embed: bool, n_in: int, n_out: int, r: int, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    na, nb = n_in * r, r * n_out
    u_a = flat[:na].reshape(n_in, r)
    u_b = flat[na : na + nb].reshape(r, n_out)
    bound = 1.0 / math.sqrt(n_in)  # PyTorch kaiming_uniform_(a=sqrt(5)) on fan_in = prod(I)
    if init == "random":  # both uniform: a as kaiming, b in +-1/sqrt(r)
        a, b = u_a * bound, u_b / math.sqrt(r)
    elif embed:  # PEFT: A zeros, B standard normal, for both "lora" and "gaussian"
        a, b = jnp.zeros_like(u_a), u_b
    elif init == "lora":  # a kaiming-uniform, b zeros
        a, b = u_a * bound, jnp.zeros_like(u_b)
    else:  # gaussian: a normal with std 1/r, b zeros
        a, b = u_a / r, jnp.zeros_like(u_b)
    return a.astype(dtype), b.astype(dtype)


def _place(x: jax.Array, kernel: Any, axes: tuple[int, ...], last: bool) -> jax.Array:
    """Gives a factor the sharding of its kernel's ``axes`` (rank axis unsharded)."""
    sharding = getattr(kernel, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding) or isinstance(kernel, jax.core.Tracer):
        return x
    spec = tuple(sharding.spec) + (None,) * (kernel.ndim - len(sharding.spec))
    picked = tuple(spec[i] for i in axes)
    new_spec = (*picked, None) if last else (None, *picked)
    return jax.device_put(
        x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*new_spec))
    )
