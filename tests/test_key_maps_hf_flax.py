"""The catalogue's ``transformers/*`` key maps on transformers' own Flax models (transformers 4.x:
transformers 5 has no Flax models, so this module skips there, the interop extra's version).

For BERT, GPT-2 (``FlaxConv1D``: kernel ``(out, in)``, read through ``probe``) and Llama: a tiny
random PyTorch model, converted to Flax by transformers itself (``from_pt=True``); LoRA (nonzero
``b``) on every kernel but the embeddings an output head shares; `save_peft` with the
catalogue's map -> ``PeftModel.from_pretrained`` gives `lora.wrap`'s outputs, and `load_peft`
reads the adapters back exactly. Run by hand with transformers 4.57 (``pip install
"transformers==4.57.*"`` in a separate environment).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import INTEROP

pytest.importorskip("torch", reason=INTEROP)
pytest.importorskip("peft", reason=INTEROP)
pytest.importorskip(
    "transformers.models.bert.modeling_flax_bert",
    reason="transformers' Flax models (removed in transformers 5): transformers 4.x",
)
import jax
import jax.numpy as jnp
import peft
import torch
import transformers as t
from support.peft_models import assert_same_adapters

import flax_lora as lora

TOL = 1e-4
SMALL = dict(num_hidden_layers=2, num_attention_heads=2, vocab_size=50)
CASES: dict[str, tuple[Any, Any, Any, Any]] = {
    # family: (config, PyTorch class, Flax class, the output compared)
    "bert": (
        lambda: t.BertConfig(hidden_size=16, intermediate_size=32, **SMALL),
        lambda: t.BertModel,
        lambda: t.FlaxBertModel,
        lambda o: o.last_hidden_state,
    ),
    "gpt2": (
        lambda: t.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50),
        lambda: t.GPT2LMHeadModel,
        lambda: t.FlaxGPT2LMHeadModel,
        lambda o: o.logits,
    ),
    "llama": (
        lambda: t.LlamaConfig(hidden_size=16, intermediate_size=32, num_key_value_heads=1, **SMALL),
        lambda: t.LlamaForCausalLM,
        lambda: t.FlaxLlamaForCausalLM,
        lambda o: o.logits,
    ),
}


@pytest.mark.parametrize("family", list(CASES))
def test_peft_gives_the_outputs_of_wrap(family: str, tmp_path: Path) -> None:
    config, torch_cls, flax_cls, out = CASES[family]
    torch.manual_seed(0)
    torch_model = torch_cls()(config()).eval()
    torch_model.save_pretrained(tmp_path / "hf", safe_serialization=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flax_model = flax_cls().from_pretrained(tmp_path / "hf", from_pt=True)
    ids = np.random.default_rng(0).integers(0, 50, (2, 6))
    apply = lambda p, x: out(flax_model(x, params=p))
    params = flax_model.params
    probe = lambda p: apply(p, jnp.asarray(ids))

    cfg = lora.LoraConfig(rank=2, alpha=4.0, init="random", exclude=r".*(wte|embed_tokens).*")
    adapters = lora.init(jax.random.key(1), params, cfg, probe=probe)
    ours = np.asarray(lora.wrap(apply)(params, adapters, jnp.asarray(ids)))
    assert np.abs(ours - np.asarray(apply(params, jnp.asarray(ids)))).max() > 0.05

    km = lora.key_map(f"transformers/{family}")
    lora.save_peft(tmp_path / "peft", adapters, cfg, key_map=km)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = out(pm(input_ids=torch.as_tensor(ids))).numpy()
    np.testing.assert_allclose(ours, theirs, atol=TOL)
    assert_same_adapters(
        lora.load_peft(tmp_path / "peft", params, key_map=km, probe=probe), adapters
    )
