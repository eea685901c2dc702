"""The catalogue's tunix key maps on google-tunix's own models (the ``tunix`` extra).

- Llama3, Qwen2, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3: a tiny random HF PyTorch model, written
  with ``save_pretrained``, is loaded into tunix by tunix's own safetensors loader; LoRA
  (nonzero ``b``) on every attention and MLP kernel (but Gemma's fused ``kv_einsum`` and
  Qwen3-MoE's experts, which wait for tuple and ``{expert}`` names: its attention and head);
  `save_peft` with the catalogue's map -> ``PeftModel.from_pretrained`` gives the logits of
  `lora.wrap` (float32 tolerance), and `load_peft` reads the adapters back exactly.
- Every family (Gemma with and without the fused ``qkv_einsum`` too): every kernel of the tunix
  model is named (but the documented exceptions), the names are exactly the adaptable modules of
  the transformers twin (Qwen3-MoE's expert names: the tensors its ``save_pretrained`` writes),
  and each name's HF weight is what tunix's own loading steps put into that kernel (the part of
  a fused kernel, the expert of an expert kernel). Writing fused and ``{expert}`` names is
  `save_peft`'s (tests of the fused-kernel and per-expert files, after that work is merged).
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import INTEROP

TUNIX = "the tunix key maps are tested on tunix's models: pip install -e '.[tunix]'"
pytest.importorskip("tunix", reason=TUNIX)
pytest.importorskip("torch", reason=INTEROP)
pytest.importorskip("peft", reason=INTEROP)
pytest.importorskip("transformers", reason=INTEROP)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from support import tunix_models  # noqa: E402  (imports tunix)
from support.peft_models import assert_same_adapters  # noqa: E402
from tunix.models.gemma import params_safetensors as gemma_params  # noqa: E402
from tunix.models.gemma3 import params_safetensors as gemma3_params  # noqa: E402
from tunix.models.llama3 import params as llama3_params  # noqa: E402
from tunix.models.qwen2 import params as qwen2_params  # noqa: E402
from tunix.models.qwen3 import params as qwen3_params  # noqa: E402
from tunix.utils.torch_utils import torch_key_to_jax_key  # noqa: E402

import flax_lora as lora  # noqa: E402

TOL = 1e-4
MLP = r"mlp/(gate|up|down)_proj/kernel"
TARGETS = {  # every attention and MLP kernel; Gemma's kv_einsum is fused (k, v): not yet
    "llama3": rf"layers/\d+/(attn/[qkvo]_proj/w|{MLP})",
    "qwen2": rf"layers/\d+/(attn/[qkvo]_proj/w|{MLP})",
    "qwen3": rf"layers/\d+/(attn/[qkvo]_proj/w|{MLP})",
    "qwen3_moe": r"layers/\d+/attn/[qkvo]_proj/w|lm_head/w",  # {expert} names: not yet
    "gemma2": rf"layers/\d+/(attn/(q_einsum|attn_vec_einsum)/w|{MLP})",
    "gemma3": rf"layers/\d+/(attn/(q_einsum|attn_vec_einsum)/w|{MLP})",
}


@pytest.mark.parametrize("family", list(TARGETS))
def test_peft_gives_the_logits_of_wrap(family: str, tmp_path: Path) -> None:
    pair = tunix_models.twin_pair(family, tmp_path / "hf")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)))
    base = np.asarray(pair.apply(pair.state, tokens))
    np.testing.assert_allclose(base, tunix_models.torch_logits(pair.torch_model, tokens), atol=TOL)

    config = lora.LoraConfig(rank=2, alpha=4.0, init="random", targets=TARGETS[family])
    probe = lambda s: pair.apply(s, tokens)
    adapters = lora.init(jax.random.key(1), pair.state, config, probe=probe)
    per_layer, head = {"qwen3_moe": (4, 1), "gemma2": (5, 0), "gemma3": (5, 0)}.get(family, (7, 0))
    assert len(jax.tree.leaves(adapters)) == 2 * (per_layer * tunix_models.DIMS["layers"] + head)
    ours = np.asarray(jax.jit(lora.wrap(pair.apply))(pair.state, adapters, tokens))
    assert np.abs(ours - base).max() > 0.05  # the adapters matter

    km = lora.key_map(f"tunix/{family}")
    lora.save_peft(tmp_path / "peft", adapters, config, key_map=km)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(pair.torch_model, str(tmp_path / "peft")).eval()
    np.testing.assert_allclose(ours, tunix_models.torch_logits(pm, tokens), atol=TOL)

    # load_peft asks the key map about every kernel of params; until it takes fused names
    # (tuples), Gemma's kv_einsum is left out here
    single = lambda path: names if isinstance(names := km(path), str) else None
    back = lora.load_peft(tmp_path / "peft", pair.state, key_map=single, probe=probe)
    assert_same_adapters(back, adapters)


# -- names of every family ----------------------------------------------------------------------

UNNAMED = re.compile(r"embedder/input_embedding|layers/\d+/mlp/router/kernel")
"""The kernels the tunix maps leave out (see flax_lora/_key_maps/_tunix.py)."""

TWINS: dict[str, tuple[str, Any]] = {
    # family: (catalogue name, the transformers twin)
    "llama3": ("tunix/llama3", lambda: transformers.LlamaForCausalLM),
    "qwen2": ("tunix/qwen2", lambda: transformers.Qwen2ForCausalLM),
    "qwen3": ("tunix/qwen3", lambda: transformers.Qwen3ForCausalLM),
    "qwen3_moe": ("tunix/qwen3_moe", lambda: transformers.Qwen3MoeForCausalLM),
    "gemma": ("tunix/gemma", lambda: transformers.GemmaForCausalLM),
    "gemma_qkv": ("tunix/gemma2", lambda: transformers.Gemma2ForCausalLM),
    "gemma3": ("tunix/gemma3", lambda: transformers.Gemma3ForCausalLM),
}


def _twin_config(family: str) -> Any:
    d = tunix_models.DIMS
    kv = d["heads"] if family == "gemma_qkv" else d["kv"]
    config = {
        "llama3": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "gemma": transformers.GemmaConfig,
        "gemma_qkv": transformers.Gemma2Config,
        "gemma3": transformers.Gemma3TextConfig,
    }[family]
    extra = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": d["hidden"]}
    return config(
        vocab_size=d["vocab"], hidden_size=d["d"], intermediate_size=d["hidden"],
        num_hidden_layers=d["layers"], num_attention_heads=d["heads"], num_key_value_heads=kv,
        head_dim=d["head_dim"], tie_word_embeddings=False,
        **(extra if family == "qwen3_moe" else {}),
    )  # fmt: skip


def _flat_names(km: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[str]]:
    """Path -> its module names, fused tuples flattened, ``{expert}`` replaced by each index."""
    out: dict[str, list[str]] = {}
    for path, shape in shapes.items():
        names = km(path)
        if names is None:
            continue
        names = [names] if isinstance(names, str) else list(names)
        if "{expert}" in names[0]:
            names = [n.replace("{expert}", str(e)) for n in names for e in range(shape[0])]
        out[path] = names
    return out


@pytest.mark.parametrize("family", list(TWINS))
def test_every_kernel_is_named_as_a_module_of_the_twin(family: str, tmp_path: Path) -> None:
    name, twin = TWINS[family]
    shapes = tunix_models.kernel_shapes(family)
    named = _flat_names(lora.key_map(name), shapes)
    assert set(shapes) - set(named) == {p for p in shapes if UNNAMED.fullmatch(p)}
    names = [n for ns in named.values() for n in ns]
    assert len(names) == len(set(names))  # no module named twice

    model = twin()(_twin_config(family))
    modules = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if family == "qwen3_moe":
        # transformers 5 fuses the experts into parameters, but writes HF's checkpoint layout,
        # one Linear per expert: the {expert} names are its names
        experts = {n for n in names if ".experts." in n}
        model.save_pretrained(tmp_path)
        with safe_open(tmp_path / "model.safetensors", "np") as f:
            written = {k.removesuffix(".weight") for k in f.keys() if ".experts." in k}  # noqa: SIM118
        assert experts == written and len(experts) == 3 * 4 * tunix_models.DIMS["layers"]
        names = [n for n in names if n not in experts]  # (its router is no Linear either)
    if family.startswith("gemma"):  # tunix's Gemma decodes with its embedding (left out)
        modules -= {"lm_head"}
    assert set(names) == modules


LOADERS: dict[str, tuple[Any, Any]] = {
    # family: (tunix's HF -> tunix table, its preprocess of the mapped tensors, from the config)
    "llama3": (llama3_params._get_key_and_transform_mapping, lambda c: None),
    "qwen2": (qwen2_params._get_key_and_transform_mapping, lambda c: None),
    "qwen3": (qwen3_params._get_key_and_transform_mapping, lambda c: None),
    "qwen3_moe": (
        qwen3_params._get_key_and_transform_mapping,
        lambda c: qwen3_params._stack_experts,
    ),
    "gemma": (gemma_params._get_key_and_transform_mapping, gemma_params._make_preprocess_fn),
    "gemma_qkv": (gemma_params._get_key_and_transform_mapping, gemma_params._make_preprocess_fn),
    "gemma3": (gemma3_params._get_key_and_transform_mapping, gemma3_params._make_preprocess_fn),
}
"""The steps of tunix's safetensors loader (``tunix/models/<family>/params*.py``)."""


def _load_like_tunix(family: str, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF tensor name -> array, through tunix's own key mapping, transform and preprocess (the
    steps of ``safetensors_loader.load_and_create_model``): tunix key -> array."""
    config = tunix_models.ABSTRACT[family][0]()
    table, preprocess = LOADERS[family]
    mapping = table(config)
    out: dict[str, Any] = {}
    for key, v in weights.items():
        tunix_key, transform = torch_key_to_jax_key(mapping, key)
        if transform is not None:
            permute, reshape = transform
            v = v.transpose(permute) if permute else v
            v = v.reshape(reshape) if reshape else v
        out[tunix_key] = jnp.asarray(v)
    fn = preprocess(config)
    return {k: np.asarray(v) for k, v in (fn(out) if fn is not None else out).items()}


@pytest.mark.parametrize("family", list(LOADERS))
def test_names_invert_tunix_own_loader(family: str) -> None:
    """Each name's HF weight is what tunix's loader puts into the kernel (the part of a fused
    kernel, the expert of an expert kernel) the name came from: each HF weight is filled with
    its own number, loaded by tunix's steps, and the kernels are read back."""
    name, twin = TWINS[family]
    shapes = tunix_models.kernel_shapes(family)
    named = _flat_names(lora.key_map(name), shapes)
    torch_shapes = {n: tuple(p.shape) for n, p in twin()(_twin_config(family)).named_parameters()}
    weights = {}
    for path, names in named.items():
        for n in names:
            # an expert: HF's checkpoint layout, one Linear (out, in) per expert
            expert = ".experts." in n
            shape = shapes[path][1:][::-1] if expert else torch_shapes[n + ".weight"]
            weights[n + ".weight"] = np.full(shape, len(weights), np.float32)
    number = {n: i for i, n in enumerate(weights)}
    loaded = _load_like_tunix(family, weights)
    for path, names in named.items():
        kernel = loaded[path.replace("/", ".")]
        assert kernel.shape == shapes[path], path
        parts = [kernel] if len(names) == 1 else list(kernel)  # fused / expert: axis 0
        for part, n in zip(parts, names, strict=True):
            assert (part == number[n + ".weight"]).all(), (path, n)


def test_the_example_runs_and_agrees(tmp_path: Path) -> None:
    """examples/tunix_to_peft.py (fewer steps): trains, writes PEFT's files, exits 0 only when
    PyTorch + PEFT give its logits."""
    example = Path(__file__).resolve().parents[1] / "examples" / "tunix_to_peft.py"
    run = subprocess.run(
        [sys.executable, str(example), "--steps", "20", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "max |diff|" in run.stdout
    assert sorted(p.name for p in (tmp_path / "tunix_peft").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
