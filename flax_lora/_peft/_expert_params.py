"""Expert kernels in PEFT files: PEFT's ``target_parameters`` (``lora.ParamWrapper``, peft 0.21).

An expert kernel (`LoraWeights.expert_axes`: one LoRA per expert, ``a (E, *I, r)``,
``b (E, r, *O)``) is the twin of a 3-D ``nn.Parameter`` ``(E, s1, s2)`` of a PyTorch module,
targeted by name ``"<module>.<param>"`` (the key map's name of the kernel, e.g.
``"experts.w1"``). PEFT's tensors of such a parameter:

- ``lora_A.weight (r * E, in)``, rows **expert-major** (row ``e * r + k`` is expert ``e``, rank
  ``k``); ``lora_B.weight (out, r * E)``, columns **rank-major** (column ``k * E + e``);
  ``delta[e] = scaling * B_e @ A_e`` in PEFT's ``(out, in)`` layout.
- PEFT's ``in`` is ``s2`` (it reads ``(E, out, in)``, the PyTorch Linear convention, as
  Mixtral's experts) unless the module has ``is_transposed = True`` (then ``s1``: ``(E, in,
  out)``, as gpt-oss's). A parameter laid out the other way round (``(E, in, out)`` without the
  flag, ``(E, out, in)`` with it) is read **reversed**: PEFT's ``in`` is the side the model does
  not contract. The delta is the same matrix either way; only which factor PEFT calls A differs,
  and the Flax side cannot see it, so such parameters are named by ``reversed_params``.
- Several targeted parameters of one module nest: each ``ParamWrapper`` wraps the previous one,
  in PyTorch's **registration order**, so the first registered parameter is innermost and its
  tensors sit under ``<module>.base_layer.base_layer...`` (one ``.base_layer`` per later
  parameter). The file names the depth, not the parameter, and the Flax side cannot know
  PyTorch's order: it is given by ``param_order`` (needed when a module has several).
- ``rank_pattern`` / ``alpha_pattern`` keys match ``"<module>.<param>"``; ParamWrapper refuses
  ``lora_dropout``, DoRA, ``fan_in_fan_out`` and ``lora_bias``.

Our factors from PEFT's tensors as ``lhs[e] = A_e.T (in, r)``, ``rhs[e] = B_e.T (r, out)``:
``a, b = lhs, rhs`` when PEFT's ``in`` is the contracted side, else ``a, b = rhs^T, lhs^T``.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import NamedTuple

import jax
import numpy as np

from flax_lora._adapters._weights import LoraWeights
from flax_lora._peft._names import BASE_LAYER
from flax_lora._peft._tensor_layouts import Factors, Target

ParamOrder = Sequence[str] | Mapping[str, Sequence[str]] | None
"""``param_order``: PyTorch's registration order of parameter names (e.g.
``("gate_up_proj", "down_proj")``, the same for every module), or per module (keyed by the key
map's module name, ``{layer}`` included): ``{"experts": ("w_in", "w_out")}``."""

KEYS = (".lora_A.weight", ".lora_B.weight")


class ExpertSpec(NamedTuple):
    """The PyTorch side of expert parameters, as `save_peft` / `load_peft` are told it."""

    order: ParamOrder
    reversed: frozenset[str]  # key-map names of the parameters PEFT reads reversed

    def is_reversed(self, name: str) -> bool:
        """Whether PEFT's ``in`` of the parameter named ``name`` (by the key map) is the side
        the model does not contract."""
        return name in self.reversed


def expert_spec(
    param_order: ParamOrder, reversed_params: Collection[str], caller: str
) -> ExpertSpec:
    """The two keywords, checked.

    Raises:
      TypeError: ``param_order`` or ``reversed_params`` is a bare string or holds non-strings.
    """
    seqs = param_order.values() if isinstance(param_order, Mapping) else [param_order or ()]
    if isinstance(reversed_params, str) or any(isinstance(s, str) for s in seqs):
        raise TypeError(
            f"{caller}: param_order must be a sequence of parameter names or a dict {{module: "
            "names}}, and reversed_params a collection of names, not a single string."
        )
    names = [*reversed_params, *(p for s in seqs for p in s)]
    if any(not isinstance(n, str) for n in names):
        raise TypeError(f"{caller}: param_order / reversed_params must hold strings: {names!r}.")
    return ExpertSpec(param_order, frozenset(reversed_params))


def split_param(name: str) -> tuple[str, str]:
    """``(module, param)`` of a parameter's name ``"<module>.<param>"``."""
    module, _, param = name.rpartition(".")
    return module, param


def registration_order(
    spec: ExpertSpec, module: str, params: Collection[str], where: str
) -> list[str]:
    """PyTorch's registration order of the parameters of ``module`` (as the key map spells it)
    that include ``params``: ``param_order``'s (every name it gives), or a single parameter
    that ``param_order`` does not name alone.

    Raises:
      ValueError: several parameters and no ``param_order`` for the module, or one that lacks
        some of them (naming the module).
    """
    order = spec.order.get(module) if isinstance(spec.order, Mapping) else spec.order
    missing = sorted(set(params) - set(order or ()))
    if len(params) == 1 and (order is None or missing):  # one parameter, not ordered: alone
        return list(params)
    if order is None or missing:
        raise ValueError(
            f"{where}: module {module!r} has the expert parameters {sorted(params)}, which PEFT "
            "nests in PyTorch's registration order (the first registered innermost, under "
            "'.base_layer'); the Flax side cannot know that order"
            + (f" and param_order lacks {missing}" if order is not None else "")
            + ". Pass param_order=(names in registration order) or {module: names}, e.g. "
            "[n for n, _ in torch_module.named_parameters(recurse=False)]."
        )
    return list(order)


def wrapper_names(module: str, ordered: Sequence[str]) -> dict[str, str]:
    """The module name each parameter's tensors sit under in the file, for the targeted
    parameters of ``module`` in registration order (the last is outermost)."""
    n = len(ordered)
    return {p: module + BASE_LAYER * (n - 1 - i) for i, p in enumerate(ordered)}


def nesting(
    names: Collection[str],
    templates: Mapping[str, str],
    spec: ExpertSpec,
    where: str,
    targeted: Callable[[str, str], bool] | None = None,
) -> dict[str, str]:
    """Parameter name -> the module name of its tensors in the file, for the adapted parameter
    names of one file (``templates``: a name -> the key map's spelling, ``{layer}`` kept).
    PEFT nests the parameters it targets: ``names`` and, on load, those of ``param_order``
    that ``targeted(module, param)`` says the file's config targets.

    Raises:
      ValueError: a module with several parameters and no order for them.
    """
    by_module: dict[str, list[str]] = collections.defaultdict(list)
    for name in names:
        by_module[split_param(name)[0]].append(name)
    out = {}
    for module, full in by_module.items():
        params = {split_param(n)[1]: n for n in full}
        template_module = split_param(templates.get(full[0], full[0]))[0]
        order = registration_order(spec, template_module, params, where)
        kept = [p for p in order if p in params or (targeted is not None and targeted(module, p))]
        out |= {params[p]: w for p, w in wrapper_names(module, kept).items() if p in params}
    return out


# -- our factors <-> PEFT's tensors --------------------------------------------------------------
def check_expert(path: str, w: LoraWeights) -> None:
    """Raises unless ``w`` is an expert adapter ParamWrapper can hold (naming ``path``)."""
    problems = []
    if len(w.expert_axes) != 1:
        problems.append(f"{len(w.expert_axes)} expert axes (PEFT's parameter has one, first)")
    if w.m is not None:
        problems.append("a DoRA magnitude (ParamWrapper refuses DoRA)")
    if w.kind != "dense":
        problems.append(f"kind {w.kind!r}")
    if problems:
        raise ValueError(
            f"save_peft: the expert kernel {path!r} of shape {tuple(w.kernel_shape)} cannot be "
            f"written as PEFT's target_parameters: {'; '.join(problems)}."
        )


def to_peft_expert(w: LoraWeights, reversed_: bool) -> dict[str, np.ndarray]:
    """The unlayered expert adapter ``w`` as ParamWrapper's float32 ``lora_A.weight (r * E,
    in)`` and ``lora_B.weight (out, r * E)`` (PEFT's ``in`` the output side when
    ``reversed_``)."""
    (e,), r = w.carried_shape, w.rank
    a = np.asarray(jax.device_get(w.a)).astype(np.float32).reshape(e, math.prod(w.in_shape), r)
    b = np.asarray(jax.device_get(w.b)).astype(np.float32).reshape(e, r, math.prod(w.out_shape))
    lhs, rhs = (np.swapaxes(b, 1, 2), np.swapaxes(a, 1, 2)) if reversed_ else (a, b)
    lora_a = lhs.transpose(0, 2, 1).reshape(e * r, -1)  # row e * r + k
    lora_b = rhs.transpose(2, 1, 0).reshape(-1, r * e)  # column k * E + e
    return {KEYS[0]: np.ascontiguousarray(lora_a), KEYS[1]: np.ascontiguousarray(lora_b)}


def read_expert(
    t: Target, expert_axis: int, in_axes: tuple[int, ...], r: int, reversed_: bool
) -> Factors:
    """ParamWrapper's tensors of ``t`` as our ``a (E, *I, r)``, ``b (E, r, *O)`` for the
    (unlayered) kernel ``t.shape`` with that expert axis and input axes.

    Raises:
      ValueError: the tensors do not fit (naming the module, the kernel and ``reversed_params``
        when the other orientation would fit).
    """
    e = t.shape[expert_axis]
    out_axes = [i for i in range(len(t.shape)) if i != expert_axis and i not in in_axes]
    n_in = math.prod(t.shape[i] for i in in_axes)
    n_out = math.prod(t.shape[i] for i in out_axes)
    lora_a, lora_b = (t.tensors.get(k) for k in KEYS)
    if lora_a is None or lora_b is None:
        raise t.misfit("ParamWrapper's lora_A.weight and lora_B.weight")
    p_in, p_out = (n_out, n_in) if reversed_ else (n_in, n_out)
    if lora_a.shape != (r * e, p_in) or lora_b.shape != (p_out, r * e):
        hint = ""
        if (p_in, p_out) != (p_out, p_in) and lora_a.shape == (r * e, p_out):
            hint = (
                f" (it fits the other orientation: {'leave out' if reversed_ else 'add'} "
                f"{t.module!r} {'from' if reversed_ else 'to'} reversed_params)"
            )
        raise t.misfit(
            f"expert factors for {e} experts of rank {r}: lora_A.weight ({r * e}, {p_in}) and "
            f"lora_B.weight ({p_out}, {r * e}){hint}"
        )
    lhs = np.asarray(lora_a).reshape(e, r, p_in).transpose(0, 2, 1)  # (E, in, r)
    rhs = np.asarray(lora_b).reshape(p_out, r, e).transpose(2, 1, 0)  # (E, r, out)
    a, b = (np.swapaxes(rhs, 1, 2), np.swapaxes(lhs, 1, 2)) if reversed_ else (lhs, rhs)
    in_shape = tuple(t.shape[i] for i in in_axes)
    out_shape = tuple(t.shape[i] for i in out_axes)
    return Factors(a.reshape(e, *in_shape, r), b.reshape(e, r, *out_shape), "dense", in_axes)


def expert_axes_of(t: Target, n_in: int | None, where: str) -> tuple[int, tuple[int, ...]]:
    """The expert axis and input axes of the (unlayered) kernel of ``t``: the probe's when it
    knows them, else ParamWrapper's layout: the expert axis first; without a probe the input
    axis is the one of the other two whose size is PEFT's contracted size ``n_in``.

    Raises:
      ValueError: the kernel is not 3-D without a probe, or the input axis is ambiguous.
    """
    use = t.use
    probed = tuple(getattr(use, "expert_axes", ()) or ()) if use is not None else ()
    if use is not None and len(probed) > 1:
        raise ValueError(
            f"{where}: the probe sees {len(probed)} expert axes {probed}; PEFT's parameter has one."
        )
    if use is not None:
        axis = probed[0] if probed else 0
        return axis, tuple(i for i in use.in_axes if i != axis)
    if len(t.shape) != 3:
        raise ValueError(
            f"{where}: an expert kernel read without a probe must be 3-D (E, s1, s2) as PEFT's "
            "parameter; pass probe=lambda p: model.apply(p, x) to load_peft."
        )
    fits = [i for i in (1, 2) if t.shape[i] == n_in]
    if len(fits) != 1:
        raise ValueError(
            f"{where}: its input axis is {'ambiguous' if fits else 'not found'} from PEFT's "
            f"{n_in} contracted features (axes 1, 2 have sizes {t.shape[1:]}). Pass "
            "probe=lambda p: model.apply(p, x) to load_peft."
        )
    return 0, (fits[0],)
