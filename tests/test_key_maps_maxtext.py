"""The catalogue's MaxText key maps (``maxtext/llama2``, ``maxtext/mixtral``,
``maxtext/mixtral_experts``, ``maxtext/gemma3``).

- Everywhere: kernel paths exactly as MaxText 0.2.5's NNX models give them (scanned
  ``decoder/layers/...``, unscanned ``decoder/layers_<i>/...``, the MoE block's raw expert params,
  the Linen face's ``params/`` prefix) -> the HuggingFace module names of MaxText's own checkpoint
  converter; what has no twin (embedding, router, Gemma 3's scanned 6-layer blocks) -> ``None``.
- With PyTorch, PEFT and transformers, and a Python with maxtext given by the environment
  variable ``FLAX_LORA_MAXTEXT_PYTHON`` (MaxText needs Python >= 3.12, torch here is on 3.11): a
  subprocess (tests/support/maxtext_export.py) builds the tiny MaxText model, adapts it and writes
  its base params, `lora.wrap`'s logits and `save_peft`'s files (the catalogue's key map); here
  the transformers twin (``LlamaForCausalLM`` / ``MixtralForCausalLM``) gets the base weights the
  way MaxText's converter writes them (kernels transposed, the query times ``sqrt(head_dim)``) and
  must give MaxText's base logits; ``PeftModel.from_pretrained`` on it must give `lora.wrap`'s.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import INTEROP

import flax_lora as lora

_L = "model.layers"


@pytest.mark.parametrize(
    ("family", "path", "name"),
    [
        (
            "llama2",
            "decoder/layers/self_attention/query/kernel",
            f"{_L}.{{layer}}.self_attn.q_proj",
        ),
        ("llama2", "decoder/layers/self_attention/key/kernel", f"{_L}.{{layer}}.self_attn.k_proj"),
        (
            "llama2",
            "decoder/layers/self_attention/value/kernel",
            f"{_L}.{{layer}}.self_attn.v_proj",
        ),
        ("llama2", "decoder/layers/self_attention/out/kernel", f"{_L}.{{layer}}.self_attn.o_proj"),
        ("llama2", "decoder/layers/mlp/wi_0/kernel", f"{_L}.{{layer}}.mlp.gate_proj"),
        ("llama2", "decoder/layers/mlp/wi_1/kernel", f"{_L}.{{layer}}.mlp.up_proj"),
        ("llama2", "decoder/layers/mlp/wo/kernel", f"{_L}.{{layer}}.mlp.down_proj"),
        ("llama2", "decoder/layers_0/self_attention/query/kernel", f"{_L}.0.self_attn.q_proj"),
        ("llama2", "decoder/layers_11/mlp/wo/kernel", f"{_L}.11.mlp.down_proj"),
        ("llama2", "decoder/logits_dense/kernel", "lm_head"),
        ("llama2", "params/decoder/layers_1/mlp/wi_1/kernel", f"{_L}.1.mlp.up_proj"),  # Linen
        ("llama2", "token_embedder/embedding", None),
        ("llama2", "decoder/decoder_norm/scale", None),
        ("mixtral", "decoder/layers/self_attention/out/kernel", f"{_L}.{{layer}}.self_attn.o_proj"),
        (
            "mixtral",
            "decoder/layers/MoeBlock_0/wi_0",
            f"{_L}.{{layer}}.mlp.experts.gate_up_proj[0]",
        ),
        (
            "mixtral",
            "decoder/layers/MoeBlock_0/wi_1",
            f"{_L}.{{layer}}.mlp.experts.gate_up_proj[1]",
        ),
        ("mixtral", "decoder/layers/MoeBlock_0/wo", f"{_L}.{{layer}}.mlp.experts.down_proj"),
        ("mixtral", "decoder/layers_2/MoeBlock_0/wi_1", f"{_L}.2.mlp.experts.gate_up_proj[1]"),
        ("mixtral", "decoder/layers/MoeBlock_0/gate/kernel", None),  # the router
        ("mixtral", "decoder/logits_dense/kernel", "lm_head"),
        (
            "mixtral_experts",
            "decoder/layers/MoeBlock_0/wi_0",
            f"{_L}.{{layer}}.block_sparse_moe.experts.{{expert}}.w1",
        ),
        (
            "mixtral_experts",
            "decoder/layers_1/MoeBlock_0/wi_1",
            f"{_L}.1.block_sparse_moe.experts.{{expert}}.w3",
        ),
        (
            "mixtral_experts",
            "decoder/layers_1/MoeBlock_0/wo",
            f"{_L}.1.block_sparse_moe.experts.{{expert}}.w2",
        ),
        ("gemma3", "decoder/layers_7/self_attention/query/kernel", f"{_L}.7.self_attn.q_proj"),
        ("gemma3", "decoder/layers_7/self_attention/out/kernel", f"{_L}.7.self_attn.o_proj"),
        ("gemma3", "decoder/layers_0/mlp/wi_0/kernel", f"{_L}.0.mlp.gate_proj"),
        ("gemma3", "decoder/layers_0/mlp/wo/kernel", f"{_L}.0.mlp.down_proj"),
        # scanned Gemma 3: blocks of 6 layers (HF layer 6 * l + j), which {layer} cannot name
        ("gemma3", "decoder/layers/layers_0/self_attention/query/kernel", None),
        ("gemma3", "decoder/layers_remainder/layers_0/mlp/wo/kernel", None),
        ("gemma3", "token_embedder/embedding", None),  # tied: the output head decodes with it
    ],
)
def test_maxtext_paths_name_hf_modules(family, path, name):
    assert lora.key_map(f"maxtext/{family}")(path) == name


# ---- the PyTorch twin: save_peft -> PeftModel.from_pretrained gives lora.wrap's logits ----

MAXTEXT_PYTHON = os.environ.get("FLAX_LORA_MAXTEXT_PYTHON")
NO_MAXTEXT = (
    "set FLAX_LORA_MAXTEXT_PYTHON to a Python with maxtext==0.2.5 (pip install -e '.[maxtext]' on "
    "Python >= 3.12) to check the MaxText key maps against PEFT"
)
TWINS = [  # scan0 names its kernels as scan1 does (the layer axis is not in a name)
    pytest.param(f, lay, id=f"{f}-{lay}")
    for f in ("llama2", "mixtral")
    for lay in ("scan1", "unscanned")
]


def _needs_twin() -> None:
    pytest.importorskip("torch", reason=INTEROP)
    pytest.importorskip("peft", reason=INTEROP)
    pytest.importorskip("transformers", reason=INTEROP)
    if not MAXTEXT_PYTHON:
        pytest.skip(NO_MAXTEXT)


def _pythonpath() -> str:
    """This checkout first, so that the subprocess imports the flax_lora under test."""
    root = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


_EXPORTS: dict[tuple[str, str], tuple[Path, int, str]] = {}


def _export(family: str, layout: str, tmp_root: Path) -> tuple[Path, int, str]:
    """The exporter's folder, exit status and stderr (run once per case)."""
    if (family, layout) not in _EXPORTS:
        out = tmp_root / f"{family}-{layout}"
        assert MAXTEXT_PYTHON is not None
        proc = subprocess.run(
            [MAXTEXT_PYTHON, "-m", "support.maxtext_export", family, layout, str(out)],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": _pythonpath()},
        )
        if proc.returncode not in (0, 3):
            raise AssertionError(proc.stderr[-4000:])
        _EXPORTS[family, layout] = (out, proc.returncode, proc.stderr[-2000:])
    return _EXPORTS[family, layout]


def _layers(base: dict[str, np.ndarray], meta: dict[str, Any], name: str) -> list[np.ndarray]:
    """One array per layer of the layer param ``name`` (``self_attention/query/kernel``)."""
    if meta["scan_layers"]:
        x = base[f"decoder/layers/{name}"]
        return list(np.moveaxis(x, meta["layer_axis"], 0))
    return [base[f"decoder/layers_{i}/{name}"] for i in range(meta["num_layers"])]


def twin(directory: Path) -> Any:
    """The transformers model with MaxText's base weights, as MaxText's converter writes them
    (``LLAMA31_MAXTEXT_TO_HF_PARAM_HOOK_FN`` / ``MIXTRAL_...``): kernels transposed and
    flattened, the query kernel times ``sqrt(head_dim)``."""
    import torch
    import transformers

    meta = json.loads((directory / "meta.json").read_text())
    base = dict(np.load(directory / "base.npz"))
    hd, n, k = meta["head_dim"], meta["heads"], meta["kv_heads"]
    kwargs = dict(
        vocab_size=meta["vocab"],
        hidden_size=meta["emb"],
        intermediate_size=meta["mlp"],
        num_hidden_layers=meta["num_layers"],
        num_attention_heads=n,
        num_key_value_heads=k,
        head_dim=hd,
        rms_norm_eps=meta["eps"],
        rope_theta=meta["rope_theta"],
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    if meta["family"] == "mixtral":
        cfg = transformers.MixtralConfig(
            num_local_experts=meta["experts"], num_experts_per_tok=meta["top_k"], **kwargs
        )
        model = transformers.MixtralForCausalLM(cfg)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    d = meta["emb"]
    sd = {
        "model.embed_tokens.weight": base["token_embedder/embedding"],
        "model.norm.weight": base["decoder/decoder_norm/scale"],
        "lm_head.weight": base["decoder/logits_dense/kernel"].T,
    }
    attn = {
        "q_proj": [
            w.reshape(d, -1).T * np.sqrt(hd)
            for w in _layers(base, meta, "self_attention/query/kernel")
        ],
        "k_proj": [w.reshape(d, -1).T for w in _layers(base, meta, "self_attention/key/kernel")],
        "v_proj": [w.reshape(d, -1).T for w in _layers(base, meta, "self_attention/value/kernel")],
        "o_proj": [w.reshape(-1, d).T for w in _layers(base, meta, "self_attention/out/kernel")],
    }
    norms = {
        "input_layernorm": _layers(base, meta, "pre_self_attention_layer_norm/scale"),
        "post_attention_layernorm": _layers(base, meta, "post_self_attention_layer_norm/scale"),
    }
    for i in range(meta["num_layers"]):
        for hf, ws in attn.items():
            sd[f"{_L}.{i}.self_attn.{hf}.weight"] = ws[i]
        for hf, ws in norms.items():
            sd[f"{_L}.{i}.{hf}.weight"] = ws[i]
    if meta["family"] == "mixtral":
        gate = _layers(base, meta, "MoeBlock_0/gate/kernel")
        wi0 = _layers(base, meta, "MoeBlock_0/wi_0")  # (E, D, F) per layer
        wi1 = _layers(base, meta, "MoeBlock_0/wi_1")
        wo = _layers(base, meta, "MoeBlock_0/wo")  # (E, F, D)
        for i in range(meta["num_layers"]):
            sd[f"{_L}.{i}.mlp.gate.weight"] = gate[i].T
            gate_up = np.concatenate([wi0[i], wi1[i]], axis=2)  # (E, D, 2F)
            sd[f"{_L}.{i}.mlp.experts.gate_up_proj"] = np.swapaxes(gate_up, 1, 2)
            sd[f"{_L}.{i}.mlp.experts.down_proj"] = np.swapaxes(wo[i], 1, 2)
    else:
        mlp = {
            "gate_proj": _layers(base, meta, "mlp/wi_0/kernel"),
            "up_proj": _layers(base, meta, "mlp/wi_1/kernel"),
            "down_proj": _layers(base, meta, "mlp/wo/kernel"),
        }
        for i in range(meta["num_layers"]):
            for hf, ws in mlp.items():
                sd[f"{_L}.{i}.mlp.{hf}.weight"] = ws[i].T
    state = {key: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for key, v in sd.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return model.eval()


def _logits(model: Any, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


def _rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.max(np.abs(x - y)) / np.max(np.abs(y)))


@pytest.mark.parametrize(("family", "layout"), TWINS)
def test_peft_on_the_twin_gives_lora_logits(family, layout, tmp_path_factory):
    """The twin with MaxText's base weights gives MaxText's base logits, and PEFT's model on
    the `save_peft` file gives `lora.wrap`'s (one MaxText export per case: a subprocess)."""
    _needs_twin()
    import peft

    directory, rc, err = _export(family, layout, tmp_path_factory.getbasetemp())
    assert rc == 0, err
    tokens = np.load(directory / "tokens.npy")
    base = np.load(directory / "base_logits.npy")
    assert _rel(_logits(twin(directory), tokens), base) < 1e-4
    model = peft.PeftModel.from_pretrained(twin(directory), str(directory / "peft")).eval()
    want = np.load(directory / "lora_logits.npy")
    assert _rel(want, base) > 1e-3  # the adapters matter
    assert _rel(_logits(model, tokens), want) < 1e-4
