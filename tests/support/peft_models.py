"""PyTorch / PEFT helpers shared by the PEFT test modules (tests/test_peft.py,
tests/support/check_peft.py, tests/test_dora_peft.py).

Imports torch and peft: only a module that has already skipped without them
(``pytest.importorskip``) imports this one.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import peft
import torch


def t2n(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy()


def randomize_lora(model: Any, seed: int, std: float = 0.3) -> None:
    """Gives every PEFT LoRA factor random nonzero values (PEFT initialises B to zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_from_pretrained(torch_model: Any, directory: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT flips fan_in_fan_out for Conv1D, with a warning
        return peft.PeftModel.from_pretrained(torch_model, str(directory)).eval()


def get_peft_model(torch_model: Any, **config: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(torch_model, peft.LoraConfig(**config))


def torch_out(model: Any, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return t2n(model(torch.as_tensor(ids)))


def assert_same_adapters(x: Any, y: Any) -> None:
    """Same tree (paths and every static field: scale, in_axes, kernel_shape, kind, dropout) and
    bit-identical factors of the same dtype."""
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def perturb_peft_dora(pm: Any, seed: int) -> Any:
    """Gives the PEFT DoRA model ``pm`` random nonzero A and B, scales its magnitudes by
    ``1 + 0.3 N(0, 1)`` and puts it in eval mode (returned)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.eval()
    return pm
