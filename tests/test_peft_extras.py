"""PEFT files with heads, new tokens and trained biases, both ways, against the real peft.

The reference is PyTorch: a small randomly initialised HuggingFace ``BertForSequenceClassification``
with a real PEFT adapter (``task_type="SEQ_CLS"`` with its classifier in ``modules_to_save``,
``trainable_token_indices`` on the word embeddings, ``bias="lora_only"``), every trained part
set to values that differ from its base. Its twin is the Flax `BertForSequenceClassification`
of ``examples/bert.py`` loaded from the same state dict.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import INTEROP

torch = pytest.importorskip("torch", reason=INTEROP)
peft = pytest.importorskip("peft", reason=INTEROP)
transformers = pytest.importorskip("transformers", reason=INTEROP)

import jax  # noqa: E402
from support.examples import load_example  # noqa: E402
from support.trees import perturb  # noqa: E402

import flax_lora as lora  # noqa: E402

TOL = 5e-5
LABELS = 3
TOKENS = [3, 7, 11]


bert = load_example("bert")
HF_CONFIG = dict(
    vocab_size=40,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
    type_vocab_size=2,
)


def torch_model() -> Any:
    torch.manual_seed(0)  # the same base weights every time
    # initializer_range: logits of order 1 (at BERT's 0.02 a tiny model's logits are ~1e-3)
    cfg = transformers.BertConfig(num_labels=LABELS, initializer_range=0.3, **HF_CONFIG)
    return transformers.BertForSequenceClassification(cfg).eval()


def flax_twin() -> tuple[Any, Any]:
    state = {k: v.detach().numpy() for k, v in torch_model().state_dict().items()}
    config = bert.BertConfig(**HF_CONFIG)
    params = bert.params_from_hf(state, config, num_labels=LABELS)
    return bert.BertForSequenceClassification(config, LABELS), params


def batch() -> dict[str, np.ndarray]:
    ids = np.array([[2, 3, 5, 7, 11, 9, 0, 0], [1, 11, 3, 3, 4, 8, 12, 7]], np.int32)
    mask = (ids != 0).astype(np.int32)
    mask[1] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def torch_logits(model: Any) -> np.ndarray:
    t = {k: torch.as_tensor(v, dtype=torch.long) for k, v in batch().items()}
    with torch.no_grad():
        return model(**t).logits.numpy()


def flax_fn(model: Any, mode: str = "auto") -> Any:
    b = batch()
    return jax.jit(
        lora.wrap(
            lambda p: model.apply(p, b["input_ids"], b["attention_mask"], b["token_type_ids"]),
            mode,
        )
    )


def randomize(pm: Any, seed: int) -> None:
    """Every trained tensor of a PEFT model set to random values that differ from its base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def peft_saved(directory: Path, seed: int, **config: Any) -> tuple[Any, np.ndarray]:
    """PEFT's model of `torch_model` with the adapter ``peft.LoraConfig(**config)``, every trained
    tensor randomized, saved to ``directory``: the model (eval mode) and its logits."""
    pm = peft.get_peft_model(torch_model(), peft.LoraConfig(**config))
    randomize(pm, seed)
    pm.eval()
    expected = torch_logits(pm)
    pm.save_pretrained(str(directory))
    return pm, expected


def assert_flax_matches(model: Any, params: Any, adapters: Any, expected: np.ndarray) -> None:
    base = np.asarray(flax_fn(model)(params, None))
    assert np.abs(expected - base).max() > 1e-2  # the adapter changes the output
    assert np.abs(base).max() > 0.1
    for mode in ("auto", "factored", "merged"):
        got = np.asarray(flax_fn(model, mode)(params, adapters))
        np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    merged = lora.merge(params, adapters)
    np.testing.assert_allclose(
        np.asarray(flax_fn(model)(merged, None)),
        np.asarray(flax_fn(model)(params, adapters)),
        atol=TOL,
        rtol=0,
    )


def load_peft_model(directory: Path, cls: Any = None) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(torch_model(), str(directory)).eval()


# -- PyTorch -> Flax -----------------------------------------------------------------------------
def test_flax_twin_is_the_torch_model() -> None:
    model, params = flax_twin()
    np.testing.assert_allclose(
        np.asarray(flax_fn(model)(params, None)), torch_logits(torch_model()), atol=TOL, rtol=0
    )


def test_seq_cls_adapter_from_peft(tmp_path: Path) -> None:
    model, params = flax_twin()
    pm, expected = peft_saved(
        tmp_path, 1, task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query"]
    )
    head = pm.base_model.model.classifier
    assert not torch.equal(head.modules_to_save["default"].weight, head.original_module.weight)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and "classifier" in saved["modules_to_save"]

    adapters = lora.load_peft(tmp_path, params, key_map=bert.bert_cls_key_map)
    copy = adapters["params"]["classifier"]["kernel"]
    assert isinstance(copy, lora.TrainedCopy) and copy.role == "module"
    np.testing.assert_array_equal(
        np.asarray(copy.value), head.modules_to_save["default"].weight.detach().numpy().T
    )
    assert_flax_matches(model, params, adapters, expected)


def test_trainable_tokens_from_peft(tmp_path: Path) -> None:
    model, params = flax_twin()
    _, expected = peft_saved(
        tmp_path,
        2,
        r=2,
        lora_alpha=4,
        target_modules=["value"],
        trainable_token_indices={"word_embeddings": TOKENS},
    )

    adapters = lora.load_peft(tmp_path, params, key_map=bert.bert_cls_key_map)
    node = adapters["params"]["bert"]["embeddings"]["word_embeddings"]["embedding"]
    assert isinstance(node, lora.TokenDelta) and node.indices == tuple(TOKENS)
    assert np.abs(np.asarray(node.delta)).min() > 0  # every trained row differs from its base
    assert_flax_matches(model, params, adapters, expected)


def test_bias_lora_only_from_peft(tmp_path: Path) -> None:
    model, params = flax_twin()
    _, expected = peft_saved(
        tmp_path, 3, r=2, lora_alpha=4, target_modules=["query", "value"], bias="lora_only"
    )

    adapters = lora.load_peft(tmp_path, params, key_map=bert.bert_cls_key_map)
    layer = adapters["params"]["bert"]["encoder"]["layer_1"]
    assert layer["value"]["bias"].role == "bias"
    base = params["params"]["bert"]["encoder"]["layer_1"]["value"]["bias"]
    assert np.abs(np.asarray(layer["value"]["bias"].value) - np.asarray(base)).min() > 0
    assert_flax_matches(model, params, adapters, expected)


# -- Flax -> PyTorch -----------------------------------------------------------------------------
def check_round_trip(tmp_path: Path, adapters: Any, params: Any) -> None:
    back = lora.load_peft(tmp_path, params, key_map=bert.bert_cls_key_map)
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-6, rtol=0)


def test_seq_cls_adapter_to_peft(tmp_path: Path) -> None:
    model, params = flax_twin()
    config = lora.LoraConfig(
        rank=4,
        alpha=8.0,
        init="random",
        targets=r".*/(query|value)/kernel",
        modules_to_save=["params/classifier"],
    )
    adapters = perturb(lora.init(jax.random.key(0), params, config), 1, 0.3)
    expected = np.asarray(flax_fn(model)(params, adapters))
    lora.save_peft(tmp_path, adapters, config, key_map=bert.bert_cls_key_map, task_type="SEQ_CLS")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["classifier"]

    pm = load_peft_model(tmp_path)
    assert isinstance(pm, peft.PeftModelForSequenceClassification)
    np.testing.assert_allclose(torch_logits(pm), expected, atol=TOL, rtol=0)
    assert_flax_matches(model, params, adapters, expected)
    check_round_trip(tmp_path, adapters, params)


def test_trainable_tokens_to_peft(tmp_path: Path) -> None:
    model, params = flax_twin()
    config = lora.LoraConfig(
        rank=2,
        init="random",
        targets=r".*/query/kernel",
        trainable_token_indices={r".*/word_embeddings": TOKENS},
    )
    adapters = perturb(lora.init(jax.random.key(0), params, config), 2, 0.3)
    expected = np.asarray(flax_fn(model)(params, adapters))
    with pytest.raises(ValueError, match=r"word_embeddings/embedding.*params="):
        lora.save_peft(tmp_path, adapters, config, key_map=bert.bert_cls_key_map)
    lora.save_peft(tmp_path, adapters, config, key_map=bert.bert_cls_key_map, params=params)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["trainable_token_indices"] == {"bert.embeddings.word_embeddings": TOKENS}

    pm = load_peft_model(tmp_path)
    np.testing.assert_allclose(torch_logits(pm), expected, atol=TOL, rtol=0)
    assert_flax_matches(model, params, adapters, expected)
    check_round_trip(tmp_path, adapters, params)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_to_peft(tmp_path: Path, bias: str) -> None:
    model, params = flax_twin()
    config = lora.LoraConfig(rank=2, init="random", targets=r".*/(query|value)/kernel", bias=bias)
    adapters = perturb(lora.init(jax.random.key(0), params, config), 3, 0.3)
    copies = [
        x
        for x in jax.tree.leaves(adapters, is_leaf=lambda x: isinstance(x, lora.TrainedCopy))
        if isinstance(x, lora.TrainedCopy)
    ]
    assert len(copies) == (4 if bias == "lora_only" else 2 * 8 + 3)  # PEFT trains 19 too
    expected = np.asarray(flax_fn(model)(params, adapters))
    lora.save_peft(tmp_path, adapters, config, key_map=bert.bert_cls_key_map)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["bias"] == bias

    pm = load_peft_model(tmp_path)
    np.testing.assert_allclose(torch_logits(pm), expected, atol=TOL, rtol=0)
    assert_flax_matches(model, params, adapters, expected)
    check_round_trip(tmp_path, adapters, params)


# -- bad files -----------------------------------------------------------------------------------
def test_tensors_the_config_does_not_account_for_are_refused(tmp_path: Path) -> None:
    _, params = flax_twin()
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query"])
    pm = peft.get_peft_model(torch_model(), config)
    pm.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["modules_to_save"] = None
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"does not account.*classifier\.weight"):
        lora.load_peft(tmp_path, params, key_map=bert.bert_cls_key_map)


def test_token_ids_out_of_range_in_a_file_are_refused(tmp_path: Path) -> None:
    _, params = flax_twin()
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["value"],
        trainable_token_indices={"word_embeddings": [1, 2]},
    )
    peft.get_peft_model(torch_model(), config).save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["trainable_token_indices"] = {"word_embeddings": [1, 400]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"\[400\].*out of range.*word_embeddings"):
        lora.load_peft(tmp_path, params, key_map=bert.bert_cls_key_map)


def test_modules_to_save_matching_no_leaf_is_refused(tmp_path: Path) -> None:
    _, params = flax_twin()
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query"])
    peft.get_peft_model(torch_model(), config).save_pretrained(str(tmp_path))
    no_head = lambda p: None if "classifier" in p else bert.bert_cls_key_map(p)
    match = r"'base_model\.model\.classifier\.(weight|bias)'.*matches no leaf"
    with pytest.raises(ValueError, match=match):
        lora.load_peft(tmp_path, params, key_map=no_head)
