"""PyTorch / PEFT ground truth for expert kernels written as PEFT's ``target_parameters``
(``lora.ParamWrapper``, peft 0.21.2), for the PEFT-file tests of issue 16.

`TorchMoe` is the PyTorch twin of `support.moe_models.LinenMoe` (einsum dispatch, ``w_out`` in
its default ``(E, F, D)`` Flax layout): a ``router`` ``nn.Linear`` and an ``experts`` module
whose experts are two ``nn.Parameter``\\ s used by ``torch.einsum``:

    experts.w_in   (E, D, F)  = Flax's w_in, laid out (experts, in, out)
    experts.w_out  (E, D, F)  = Flax's w_out (E, F, D) transposed: (experts, out, in), the
                              layout of Mixtral's ``down_proj`` in transformers 5

What PEFT does with them (read from peft/tuners/lora/layer.py ``ParamWrapper`` and checked by
tests/test_moe_peft.py):

- a 3-D parameter ``(E, s1, s2)`` is read as ``(E, out, in)`` (``in = s2``) unless the module
  has ``is_transposed = True`` (then ``(E, in, out)``, ``in = s1``): one flag per module, so of
  two parameters laid out differently PEFT reads one "backwards" (the delta is the same; only
  which factor is called A changes: see `kernel_factors`);
- ``lora_A.weight (r * E, in)``, rows **expert-major** (row ``e * r + k``);
  ``lora_B.weight (out, r * E)``, columns **rank-major** (column ``k * E + e``);
- ``delta[e] = scaling * B_e @ A_e`` in PEFT's ``(out, in)`` view, ``scaling = lora_alpha / r``
  (``/ sqrt(r)`` with ``use_rslora``), put in the parameter's own layout;
- several targeted parameters of one module nest: the parameter registered **first** is wrapped
  first and ends up innermost, so its tensors sit under the longest ``.base_layer`` chain
  (`wrapper_prefixes`); the order of ``target_parameters`` in the config does not matter.

Imports torch and peft: only a module that has already skipped without them imports this one.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

from support.moe_models import K

#: the parameters of `TorchExperts` in their registration order (PEFT nests in this order)
EXPERT_PARAMS = ("w_in", "w_out")
PREFIX = "base_model.model."


class TorchExperts(nn.Module):
    """``w_in (E, D, F)`` (experts, in, out) and ``w_out (E, D, F)`` (experts, out, in), used by
    ``torch.einsum`` on tokens dispatched to every expert ``xe (E, T, D)``. ``is_transposed``
    (when not ``None``) is the attribute PEFT reads for the layout of 3-D parameters."""

    def __init__(self, w_in: np.ndarray, w_out: np.ndarray, is_transposed: bool | None) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.tensor(np.asarray(w_in, np.float32)))
        self.w_out = nn.Parameter(torch.tensor(np.asarray(w_out, np.float32)))
        if is_transposed is not None:
            self.is_transposed = is_transposed

    def forward(self, xe: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(torch.einsum("etd,edf->etf", xe, self.w_in))
        return torch.einsum("etf,edf->etd", h, self.w_out)


class TorchMoe(nn.Module):
    """The twin of `LinenMoe` (einsum dispatch): top-``k`` routing, softmax of the top-k logits,
    every expert on every token, a dense combine."""

    def __init__(self, params: Mapping[str, Any], is_transposed: bool | None, k: int = K) -> None:
        super().__init__()
        p = params["params"]
        router = np.asarray(p["router"]["kernel"], np.float32)  # (D, E)
        self.k = k
        self.router = nn.Linear(*router.shape, bias=False)
        with torch.no_grad():
            self.router.weight.copy_(torch.tensor(router.T))
        w_out = np.swapaxes(np.asarray(p["experts"]["w_out"]), 1, 2)  # (E, F, D) -> (E, D, F)
        self.experts = TorchExperts(p["experts"]["w_in"], w_out, is_transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        logits = self.router(x2)
        top, experts = torch.topk(logits, self.k, dim=-1)
        weights = torch.softmax(top, dim=-1)
        combine = torch.zeros_like(logits).scatter(1, experts, weights)  # (T, E)
        ye = self.experts(x2.expand(logits.shape[-1], *x2.shape))  # (E, T, D)
        return torch.einsum("etd,te->td", ye, combine).reshape(x.shape)


class TorchMoeStack(nn.Module):
    """The twin of `LinenMoeStack` (einsum dispatch): ``layers.<i>`` a `TorchMoe` of layer
    ``i``'s kernels, applied as ``x + block(x)``."""

    def __init__(self, params: Mapping[str, Any], is_transposed: bool | None) -> None:
        super().__init__()
        p = params["params"]["layers"]["moe"]
        n = np.shape(p["router"]["kernel"])[0]
        self.layers = nn.ModuleList(
            TorchMoe(
                {
                    "params": {
                        "router": {"kernel": np.asarray(p["router"]["kernel"])[i]},
                        "experts": {k: np.asarray(v)[i] for k, v in p["experts"].items()},
                    }
                },
                is_transposed,
            )
            for i in range(n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def same_side(param: str, is_transposed: bool | None) -> bool:
    """Whether PEFT's ``in`` side of `TorchExperts`'s ``param`` is the side the model contracts
    (``w_in`` is laid out (E, in, out), ``w_out`` (E, out, in); PEFT assumes (E, out, in) unless
    ``is_transposed``)."""
    return bool(is_transposed) if param == "w_in" else not is_transposed


def wrapper_prefixes(module: str, params: Sequence[str]) -> dict[str, str]:
    """The module name each targeted parameter's LoRA tensors sit under, for the parameters of one
    module in their registration order: the last is outermost, each earlier one a
    ``.base_layer`` deeper (``{"w_in": "experts.base_layer", "w_out": "experts"}``)."""
    n = len(params)
    return {p: module + ".base_layer" * (n - 1 - i) for i, p in enumerate(params)}


def get_moe_peft_model(
    model: nn.Module,
    rank: int,
    alpha: float,
    seed: int,
    router: bool = True,
    std: float = 0.3,
    **options: Any,
) -> Any:
    """``peft.get_peft_model`` with ``target_parameters`` on both expert parameters (and the
    ``router`` as an ordinary ``target_modules`` entry), every LoRA factor set to seeded nonzero
    values (PEFT initialises B to zero); ``options`` go to ``peft.LoraConfig`` (e.g.
    ``rank_pattern``)."""
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=["router"] if router else [],
        target_parameters=[f"experts.{p}" for p in EXPERT_PARAMS],
        **options,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return pm.eval()


def from_pretrained(model: TorchMoe, directory: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(model, str(directory)).eval()


def torch_forward(model: Any, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(x, np.float32))).numpy()


def wrappers(peft_model: Any) -> dict[str, Any]:
    """Parameter name -> its ``lora.ParamWrapper`` (outermost first)."""
    out, module = {}, peft_model.base_model.model.experts
    while isinstance(module, peft.tuners.lora.ParamWrapper):
        out[module.parameter_name] = module
        module = module.base_layer
    return out


# -- PEFT's tensors <-> per-expert factors, in numpy ---------------------------------------------
def peft_view_factors(lora_a: np.ndarray, lora_b: np.ndarray, num_experts: int) -> tuple:
    """``(lhs (E, in, r), rhs (E, r, out))`` in PEFT's view of the parameter, from
    ``lora_A.weight (r * E, in)`` (rows ``e * r + k``) and ``lora_B.weight (out, r * E)``
    (columns ``k * E + e``): ``delta[e] = scaling * lhs[e] @ rhs[e]`` as ``(in, out)``."""
    lora_a, lora_b = np.asarray(lora_a), np.asarray(lora_b)
    r = lora_a.shape[0] // num_experts
    lhs = lora_a.reshape(num_experts, r, -1).transpose(0, 2, 1)
    rhs = lora_b.reshape(lora_b.shape[0], r, num_experts).transpose(2, 1, 0)
    return lhs, rhs


def peft_tensors(lhs: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `peft_view_factors`: ``(lora_A.weight (r * E, in), lora_B.weight
    (out, r * E))``."""
    lhs, rhs = np.asarray(lhs), np.asarray(rhs)
    e, _, r = lhs.shape
    lora_a = lhs.transpose(0, 2, 1).reshape(e * r, -1)
    lora_b = rhs.transpose(2, 1, 0).reshape(rhs.shape[2], r * e)
    return lora_a, lora_b


def peft_expert_delta64(
    lora_a: np.ndarray, lora_b: np.ndarray, num_experts: int, scaling: float, swapped: bool
) -> np.ndarray:
    """``ParamWrapper.get_delta_weight`` in float64 numpy: ``einsum("ore,eri->eio")`` (``"eoi"``
    when PEFT swapped in/out, i.e. a 3-D parameter without ``is_transposed``), in the
    parameter's own layout."""
    a = np.asarray(lora_a, np.float64).reshape(num_experts, -1, lora_a.shape[-1])
    b = np.asarray(lora_b, np.float64).reshape(lora_b.shape[0], -1, num_experts)
    return scaling * np.einsum("ore,eri->eoi" if swapped else "ore,eri->eio", b, a)


def kernel_factors(lhs: np.ndarray, rhs: np.ndarray, same: bool) -> tuple[np.ndarray, np.ndarray]:
    """Flax's ``a (E, I, r)`` and ``b (E, r, O)`` of the kernel (``I`` the side the model
    contracts) from PEFT's view factors; ``same``: PEFT's ``in`` is that side (`same_side`)."""
    if same:
        return lhs, rhs
    return np.swapaxes(rhs, 1, 2), np.swapaxes(lhs, 1, 2)


def read_peft_files(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``adapter_model.safetensors`` (numpy) and ``adapter_config.json``."""
    tensors = load_file(str(Path(directory) / "adapter_model.safetensors"))
    return tensors, json.loads((Path(directory) / "adapter_config.json").read_text())


def write_peft_files(
    directory: Path, tensors: Mapping[str, np.ndarray], rank: int, alpha: float, **config: Any
) -> None:
    """A minimal PEFT adapter (the fields a ``target_parameters`` adapter needs) with the given
    tensors (names with the ``base_model.model.`` prefix and without the adapter name)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fields = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": [],
        "target_parameters": [f"experts.{p}" for p in EXPERT_PARAMS],
        "lora_dropout": 0.0,
        "bias": "none",
        **config,
    }
    (directory / "adapter_config.json").write_text(json.dumps(fields, indent=2))
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    save_file(arrays, str(directory / "adapter_model.safetensors"))
