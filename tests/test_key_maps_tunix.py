"""The catalogue's tunix key maps on google-tunix's own models (the ``tunix`` extra).

- Llama3, Qwen2, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3 (Gemma with ``num_kv_heads < num_heads``:
  the fused ``kv_einsum``; with ``num_kv_heads == num_heads``: the fused ``qkv_einsum``): a tiny
  random HF PyTorch model, written with ``save_pretrained``, is loaded into tunix by tunix's own
  safetensors loader; LoRA (nonzero ``b``) on every attention and MLP kernel (Qwen3-MoE: its
  experts, attention and head); `lora.wrap` equals the merged model, `save_peft` with the
  catalogue's map -> ``PeftModel.from_pretrained`` takes every tensor and gives the logits of
  `lora.wrap` (float32 tolerance), and `load_peft` reads the adapters back exactly (our files
  and PEFT's ``save_pretrained`` of them); PEFT's model with random factors of its own (``k_proj``
  and ``v_proj`` apart, a full ``gate_up_proj`` ``lora_B``), saved by PEFT, loads onto the
  fused kernels and gives PEFT's logits through `lora.wrap`. Qwen3-MoE's
  experts go to transformers 5's fused ``experts.gate_up_proj`` (``[0]`` gate, ``[1]`` up) and
  ``experts.down_proj`` through PEFT's ``target_parameters`` (``tunix/qwen3_moe_hf5``).
- Qwen3-MoE's experts as one module per expert (``tunix/qwen3_moe``, HF's checkpoint and vLLM's
  layout; transformers 5 has no such modules for PEFT to load onto): the file's modules are the
  checkpoint's, each expert's factors its own (float64 deltas), the checkpoint weight plus the
  file's delta is the merged tunix kernel's expert, and `load_peft` reads it back exactly.
- Every family (Gemma with and without the fused ``qkv_einsum`` too): every kernel of the tunix
  model is named (but the documented exceptions), the names are exactly the adaptable modules of
  the transformers twin (Qwen3-MoE's expert names: the tensors its ``save_pretrained`` writes),
  and each name's HF weight is what tunix's own loading steps put into that kernel (the part of
  a fused kernel, the expert of an expert kernel); ``tunix/qwen3_moe_hf5``'s expert names are
  transformers 5's expert parameters, their ``[i]`` parts filling them exactly.
"""

from __future__ import annotations

import dataclasses
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
from safetensors.numpy import load_file  # noqa: E402
from support import tunix_models  # noqa: E402  (imports tunix)
from support.peft_models import assert_same_adapters, perturb_peft_dora  # noqa: E402
from support.trees import leaves_by_path  # noqa: E402
from tunix.models.gemma import params_safetensors as gemma_params  # noqa: E402
from tunix.models.gemma3 import params_safetensors as gemma3_params  # noqa: E402
from tunix.models.llama3 import params as llama3_params  # noqa: E402
from tunix.models.qwen2 import params as qwen2_params  # noqa: E402
from tunix.models.qwen3 import params as qwen3_params  # noqa: E402
from tunix.utils.torch_utils import torch_key_to_jax_key  # noqa: E402

import flax_lora as lora  # noqa: E402

TOL = 1e-4
MLP = r"mlp/(gate|up|down)_proj/kernel"
LLAMA_TARGETS = rf"layers/\d+/(attn/[qkvo]_proj/w|{MLP})"
GEMMA_TARGETS = rf"layers/\d+/(attn/(q|kv|qkv|attn_vec)_einsum/w|{MLP})"
EXPERTS = r"layers/\d+/mlp/(gate|up|down)_proj"
ORDER = ("gate_up_proj", "down_proj")  # transformers 5's Qwen3MoeExperts registers them so


@dataclasses.dataclass(frozen=True)
class Case:
    """A PEFT round trip: the twin pair, the catalogue's map, the targets (every attention and
    MLP kernel), the adapted kernels per layer (and heads), `save_peft`/`load_peft` options."""

    family: str
    key_map: str
    targets: str
    per_layer: int
    head: int = 0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


CASES = {
    "llama3": Case("llama3", "tunix/llama3", LLAMA_TARGETS, 7),
    "qwen2": Case("qwen2", "tunix/qwen2", LLAMA_TARGETS, 7),
    "qwen3": Case("qwen3", "tunix/qwen3", LLAMA_TARGETS, 7),
    # Qwen3-MoE onto transformers 5's fused experts (gate_up_proj[0] / [1], down_proj: PEFT's
    # target_parameters) and the untied head
    "qwen3_moe_hf5": Case(
        "qwen3_moe",
        "tunix/qwen3_moe_hf5",
        rf"layers/\d+/attn/[qkvo]_proj/w|{EXPERTS}|lm_head/w",
        7,
        head=1,
        options={"param_order": ORDER},
    ),
    # q_einsum, the fused kv_einsum (k_proj, v_proj), attn_vec_einsum, the MLP
    "gemma2": Case("gemma2", "tunix/gemma2", GEMMA_TARGETS, 6),
    "gemma3": Case("gemma3", "tunix/gemma3", GEMMA_TARGETS, 6),
    # num_heads == num_kv_heads: the fused qkv_einsum (q_proj, k_proj, v_proj)
    "gemma2_qkv": Case("gemma2_qkv", "tunix/gemma2", GEMMA_TARGETS, 5),
    "gemma3_qkv": Case("gemma3_qkv", "tunix/gemma3", GEMMA_TARGETS, 5),
}


def _tokens() -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)))


@pytest.mark.parametrize("name", list(CASES))
def test_peft_gives_the_logits_of_wrap(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    pair = tunix_models.twin_pair(case.family, tmp_path / "hf")
    tokens = _tokens()
    base = np.asarray(pair.apply(pair.state, tokens))
    np.testing.assert_allclose(base, tunix_models.torch_logits(pair.torch_model, tokens), atol=TOL)

    config = lora.LoraConfig(rank=2, alpha=4.0, init="random", targets=case.targets)
    probe = lambda s: pair.apply(s, tokens)
    adapters = lora.init(jax.random.key(1), pair.state, config, probe=probe)
    n = case.per_layer * tunix_models.DIMS["layers"] + case.head
    assert len(jax.tree.leaves(adapters)) == 2 * n
    ours = np.asarray(jax.jit(lora.wrap(pair.apply))(pair.state, adapters, tokens))
    merged = np.asarray(pair.apply(lora.merge(pair.state, adapters), tokens))
    np.testing.assert_allclose(ours, merged, atol=TOL)
    assert np.abs(ours - base).max() > 0.05  # the adapters matter

    km = lora.key_map(case.key_map)
    lora.save_peft(tmp_path / "peft", adapters, config, key_map=km, **case.options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(pair.torch_model, str(tmp_path / "peft")).eval()
    with safe_open(tmp_path / "peft" / "adapter_model.safetensors", "np") as f:
        written = set(f.keys())
    # PEFT took every tensor of the file (its state dict adds lm_head's base weight)
    assert {k for k in peft.get_peft_model_state_dict(pm) if ".lora_" in k} == written
    np.testing.assert_allclose(ours, tunix_models.torch_logits(pm, tokens), atol=TOL)

    back = lora.load_peft(tmp_path / "peft", pair.state, key_map=km, probe=probe, **case.options)
    assert_same_adapters(back, adapters)
    # the files PEFT itself writes of what it loaded read back exactly too
    pm.save_pretrained(str(tmp_path / "from_peft"), save_embedding_layers=False)
    again = lora.load_peft(
        tmp_path / "from_peft", pair.state, key_map=km, probe=probe, **case.options
    )
    assert_same_adapters(again, adapters)

    # PyTorch -> JAX: factors PEFT holds apart (k_proj's and v_proj's own lora_A, a full lora_B
    # of gate_up_proj) load onto the fused / joined kernels and give PEFT's logits
    perturb_peft_dora(pm, seed=5)  # random A and B for every lora_ tensor (no DoRA here)
    pm.save_pretrained(str(tmp_path / "trained"), save_embedding_layers=False)
    trained = lora.load_peft(
        tmp_path / "trained", pair.state, key_map=km, probe=probe, **case.options
    )
    for path, a in leaves_by_path(trained).items():  # PEFT's factors, so their ranks
        names = km(path.removesuffix("/a"))
        if path.endswith("/a") and (isinstance(names, tuple) or "[" in str(names)):
            assert a.shape[-1] == 2 * (len(names) if isinstance(names, tuple) else 2), path
    theirs = tunix_models.torch_logits(pm, tokens)
    assert np.abs(theirs - ours).max() > 0.05  # other adapters than ours
    got = np.asarray(jax.jit(lora.wrap(pair.apply))(pair.state, trained, tokens))
    np.testing.assert_allclose(got, theirs, atol=TOL)


def test_experts_as_one_module_per_expert(tmp_path: Path) -> None:
    """Qwen3-MoE's experts in HF's checkpoint layout (``tunix/qwen3_moe``: one module per
    expert, vLLM's LoRA layout): the file's modules are the checkpoint's expert modules, each
    expert's factors are its own (a float64 delta per expert), the checkpoint's weight plus the
    file's delta is the merged tunix kernel's expert, and `load_peft` reads it back exactly."""
    pair = tunix_models.twin_pair("qwen3_moe", tmp_path / "hf")
    tokens = _tokens()
    targets = rf"layers/\d+/attn/[qkvo]_proj/w|{EXPERTS}|lm_head/w"
    config = lora.LoraConfig(rank=2, alpha=4.0, init="random", targets=targets)
    probe = lambda s: pair.apply(s, tokens)
    adapters = lora.init(jax.random.key(1), pair.state, config, probe=probe)
    km = lora.key_map("tunix/qwen3_moe")
    lora.save_peft(tmp_path / "peft", adapters, config, key_map=km)

    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    with safe_open(tmp_path / "hf" / "model.safetensors", "np") as f:
        checkpoint = {k: f.get_tensor(k) for k in f.keys() if ".experts." in k}  # noqa: SIM118
    modules = {k.removesuffix(".weight") for k in checkpoint}
    assert len(modules) == 3 * 4 * tunix_models.DIMS["layers"]
    written = {k.removeprefix("base_model.model.") for k in tensors if ".experts." in k}
    assert written == {f"{m}.lora_{ab}.weight" for m in modules for ab in "AB"}

    entries = leaves_by_path(adapters)
    merged = leaves_by_path(lora.merge(pair.state, adapters))
    shapes = {p: tuple(x.shape) for p, x in leaves_by_path(pair.state).items()}
    experts = {p: n for p, n in _flat_names(km, shapes).items() if re.fullmatch(EXPERTS, p)}
    assert len(experts) == 3 * tunix_models.DIMS["layers"]
    for path, names in experts.items():
        a = np.asarray(entries[path + "/a"], np.float64)  # (E, in, r)
        b = np.asarray(entries[path + "/b"], np.float64)  # (E, r, out)
        assert len(names) == a.shape[0] == 4
        for e, name in enumerate(names):
            la, lb = (tensors[f"base_model.model.{name}.lora_{ab}.weight"] for ab in "AB")
            np.testing.assert_array_equal(la, np.asarray(entries[path + "/a"])[e].T)
            np.testing.assert_array_equal(lb, np.asarray(entries[path + "/b"])[e].T)
            delta = 2.0 * lb.astype(np.float64) @ la.astype(np.float64)  # alpha / r = 2
            np.testing.assert_allclose(delta, (2.0 * a[e] @ b[e]).T, rtol=1e-12, atol=1e-15)
            w = checkpoint[name + ".weight"].astype(np.float64) + delta  # (out, in)
            np.testing.assert_allclose(w, np.asarray(merged[path])[e].T, atol=1e-6)

    back = lora.load_peft(tmp_path / "peft", pair.state, key_map=km, probe=probe)
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


def test_fused_expert_names_are_parameters_of_transformers5() -> None:
    """``tunix/qwen3_moe_hf5``: every kernel is named (but the router and the embedding), the
    attention and head names are the twin's Linear modules, and the expert names are
    transformers 5's ``Qwen3MoeExperts`` parameters, their ``[i]`` parts filling
    ``gate_up_proj (E, 2F, D)`` (gate then up) and ``down_proj (E, D, F)`` exactly."""
    shapes = tunix_models.kernel_shapes("qwen3_moe")
    km = lora.key_map("tunix/qwen3_moe_hf5")
    named = {p: km(p) for p in shapes if km(p) is not None}
    assert set(shapes) - set(named) == {p for p in shapes if UNNAMED.fullmatch(p)}
    model = transformers.Qwen3MoeForCausalLM(_twin_config("qwen3_moe"))
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    filled: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
    for path, name in named.items():
        assert isinstance(name, str), path
        part = re.fullmatch(r"(.*)\[(\d+)\]", name)
        if not re.fullmatch(EXPERTS, path):
            assert part is None and name in linears, (path, name)
            continue
        param = part.group(1) if part else name
        filled.setdefault(param, []).append((int(part.group(2)) if part else 0, shapes[path]))
    layers = tunix_models.DIMS["layers"]
    assert len(filled) == 2 * layers
    for param, parts in filled.items():
        e, n_out, n_in = params[param]  # PyTorch's (E, out, in)
        parts.sort()
        assert [i for i, _ in parts] == list(range(len(parts)))
        # each tunix kernel is (E, in, out); the parts stack on the output axis
        assert all(s[0] == e and s[1] == n_in for _, s in parts), param
        assert sum(s[2] for _, s in parts) == n_out, param
        assert len(parts) == (2 if param.endswith("gate_up_proj") else 1)


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
