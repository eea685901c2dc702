"""What each docs page's code examples take as given, for tests/test_doc_examples.py.

A page's ```python blocks run in order in one namespace, after the common imports (``jax``,
``jnp``, ``np``, ``optax``, ``nn``, ``nnx``, ``lora``) and the page's setup here: the objects its
text describes as already there (a model, its params, an input). Pages not listed need none.
``NEEDS`` names the package a page's examples need (they run in the CI leg that has it and
skip elsewhere, saying so); ``NOT_RUN`` names the blocks that need what CI's legs cannot give
them (a tunix training run, a mesh of real accelerators), each with the test that runs the same
code on tiny models.
"""

from __future__ import annotations

COMMON = """
import jax, jax.numpy as jnp, numpy as np, optax
from flax import linen as nn
from flax import nnx
import flax_lora as lora
"""

# a small attention block with a classifier head: params/query|key|value|out|head
ATTENTION = """
class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 8), name="query")(x)
        k = nn.DenseGeneral((2, 8), name="key")(x)
        v = nn.DenseGeneral((2, 8), name="value")(x)
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5, axis=-1)
        h = nn.DenseGeneral(16, axis=(-2, -1), name="out")(jnp.einsum("bhqk,bkhd->bqhd", w, v))
        return nn.Dense(8, name="head")(h.mean(axis=1))

model = Attention()
key = jax.random.key(2)
x = jax.random.normal(jax.random.key(0), (4, 6, 16))
params = model.init(jax.random.key(1), x)
probe = lambda p: model.apply(p, x)
config = lora.LoraConfig(rank=4, alpha=8.0, targets=r".*/(query|value)/kernel")
_random = lora.LoraConfig(rank=4, alpha=8.0, targets=r".*/(query|value)/kernel", init="random")
adapters = lora.init(key, params, _random, probe=probe)
adapters_a, adapters_b, adapters_c = (
    lora.init(jax.random.key(i), params, _random, probe=probe) for i in (3, 4, 5)
)
loss = lambda y: jnp.mean(y**2)
y = jnp.arange(4) % 4
step = 0
"""

LAYERED = """
class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.Dense(16, name="q")(jax.nn.gelu(nn.Dense(16, name="up")(h))), None

class Layered(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=4)
        return scan(name="layers")(x, None)[0]

model = Layered()
key = jax.random.key(2)
x = jax.random.normal(jax.random.key(0), (4, 16))
params = model.init(jax.random.key(1), x)
config = lora.LoraConfig(rank=4)
_random = lora.LoraConfig(rank=4, init="random")
adapters = lora.init(key, params, _random, probe=lambda p: model.apply(p, x))
"""


NNX_LM = """
class TinyLM(nnx.Module):  # called as tunix's models are: (tokens, positions, cache, mask)
    def __init__(self, rngs):
        self.embed = nnx.Embed(32, 16, rngs=rngs)
        self.q_proj = nnx.Linear(16, 16, rngs=rngs)
        self.v_proj = nnx.Linear(16, 16, rngs=rngs)
        self.head = nnx.Linear(16, 32, rngs=rngs)

    def __call__(self, tokens, positions, cache, mask):
        h = self.embed(tokens) * mask[..., None]
        return self.head(jax.nn.gelu(self.q_proj(h)) + self.v_proj(h)), cache

model = TinyLM(nnx.Rngs(0))
key = jax.random.key(2)
tokens = jnp.arange(16).reshape(2, 8) % 32
positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
mask = jnp.ones((2, 8), bool)
config = lora.LoraConfig(rank=8)

class LinenLM(nn.Module):  # a Linen decoder with a KV cache, decode= as gemma's samplers call it
    @nn.compact
    def __call__(self, tokens, decode=False):
        h = nn.Embed(32, 16, name="embed")(tokens)
        h = h + nn.MultiHeadDotProductAttention(2, decode=decode, name="attn")(h)
        return nn.Dense(32, name="head")(h)

linen_model = LinenLM()
base_params = linen_model.init(key, tokens)["params"]
linen_cache = linen_model.init(key, tokens, decode=True)["cache"]
token = tokens[:, :1]
"""

BERT_LIKE = """
class Classifier(nn.Module):  # BERT's names: word_embeddings, query, value, classifier
    @nn.compact
    def __call__(self, ids, mask):
        h = nn.Embed(16, 8, name="word_embeddings")(ids)
        q, v = nn.Dense(8, name="query")(h), nn.Dense(8, name="value")(h)
        w = jax.nn.softmax(q @ h.swapaxes(1, 2) + jnp.where(mask[:, None, :], 0.0, -1e9))
        return nn.Dense(2, name="classifier")((w @ v)[:, 0])

model = Classifier()
key = jax.random.key(2)
ids, mask = jnp.arange(12).reshape(2, 6) % 16, jnp.ones((2, 6), bool)
params = model.init(jax.random.key(1), ids, mask)
bert_cls_key_map = lambda p: p.removeprefix("params/").rsplit("/", 1)[0].replace("/", ".")
"""

DECODER = """
import functools
from benchmarks import decoder as _decoder
from tests.support.decode_models import NnxDecoder

Decoder = functools.partial(_decoder.Decoder, vocab=64, d_model=32, heads=2, hidden=64, layers=2)
key = jax.random.key(2)
B, max_len = 4, 16
prompt = jnp.arange(B * 8).reshape(B, 8) % 64
params = Decoder().init(jax.random.key(1), prompt)
_random = lora.LoraConfig(rank=4, init="random")
_probe = lambda p: Decoder().apply(p, prompt)
adapters, adapters_a, adapters_b, adapters_c = (
    lora.init(jax.random.key(i), params, _random, probe=_probe) for i in range(4)
)
tok = prompt[:, :1]
model = NnxDecoder(nnx.Rngs(0), decode=True)
for _b in model.blocks:
    _b.attn.init_cache((B, max_len, 32))
_, _p, _ = nnx.split(model, nnx.Param, nnx.Cache)
_plain = nnx.split(NnxDecoder(nnx.Rngs(0)), nnx.Param)[0]
nnx_adapters = lora.init(
    key, {"params": _p}, _random, probe=lambda s: nnx.merge(_plain, s["params"])(prompt)
)
"""

MOE = """
E, d, f = 4, 8, 16

class Moe(nn.Module):  # top-1 routing, experts by einsum
    @nn.compact
    def __call__(self, tokens):
        gate = jax.nn.one_hot(jnp.argmax(nn.Dense(E, name="router")(tokens), -1), E)
        w_in = self.param("w_in", nn.initializers.normal(0.3), (E, d, f))
        w_out = self.param("w_out", nn.initializers.normal(0.3), (E, f, d))
        x_e = jnp.einsum("te,td->etd", gate, tokens)
        h = jax.nn.gelu(jnp.einsum("etd,edf->etf", x_e, w_in))
        return jnp.einsum("etf,efd->td", h, w_out)

model = Moe()
key = jax.random.key(2)
tokens = jax.random.normal(jax.random.key(0), (12, d))
params = model.init(jax.random.key(1), tokens)
config = lora.LoraConfig(rank=2, targets=r".*/w_(in|out)")
w_in = params["params"]["w_in"]
x = tokens
gate = jax.nn.one_hot(jnp.arange(12) % E, E)
x_per_expert = jnp.einsum("te,td->etd", gate, x)
group_sizes = jnp.full((E,), 3, jnp.int32)
x_sorted = x[jnp.argsort(jnp.arange(12) % E)]
"""

PEFT = (
    ATTENTION
    + """
bert_key_map = lambda p: p.removeprefix("params/").rsplit("/", 1)[0].replace("/", ".")
apply = model.apply
"""
    + LAYERED.replace("model = Layered()", "layered = Layered()")
    .replace("x = jax", "xl = jax")
    .replace("params = model.init(jax.random.key(1), x)", "layered_params = layered.init(key, xl)")
    .replace(
        "adapters = lora.init(key, params,", "layered_adapters = lora.init(key, layered_params,"
    )
    .replace("lambda p: model.apply(p, x)", "lambda p: layered.apply(p, xl)")
)


MAXTEXT_LIKE = """
class Mlp(nn.Module):
    @nn.compact
    def __call__(self, h):
        return nn.Dense(16, name="wo")(jax.nn.silu(nn.Dense(32, name="wi_0")(h)))

class Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + Mlp(name="mlp")(h), None

class Decoder(nn.Module):  # kernels stored (d, L, mlp), as MaxText's param_scan_axis: 1
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(Layer, variable_axes={"params": 1}, split_rngs={"params": True}, length=3)
        return layers(name="layers")(x, None)[0]

class MaxTextLike(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Decoder(name="decoder")(x)

mt_model = MaxTextLike()
mt_params = mt_model.init(jax.random.key(7), x)
"""

SETUPS: dict[str, str] = {
    "docs/getting-started/nnx.md": "x = jnp.ones((4, 784))",
    "docs/guides/config.md": ATTENTION,
    "docs/guides/wrap.md": ATTENTION,
    "docs/guides/training.md": ATTENTION,
    "docs/guides/checkpoints.md": ATTENTION,
    "docs/guides/dora.md": ATTENTION,
    "docs/guides/multi_adapter.md": ATTENTION,
    "docs/guides/qlora.md": ATTENTION.replace('r".*/(query|value)/kernel"', "None"),
    "docs/guides/layered.md": LAYERED + MAXTEXT_LIKE,
    "docs/guides/peft.md": PEFT,
    "docs/guides/bridges.md": NNX_LM,
    "docs/guides/extras.md": BERT_LIKE,
    "docs/guides/generation.md": DECODER,
    "docs/guides/moe.md": MOE,
}

# pages whose examples need a package only some CI legs have: the page runs where it imports
NEEDS: dict[str, str] = {"docs/guides/maxtext.md": "maxtext"}

NOT_RUN: dict[tuple[str, int], str] = {
    (
        "docs/guides/bridges.md",
        2,
    ): "a tunix PeftTrainer run and Sampler: tests/test_bridge_tunix.py",
    ("docs/guides/peft.md", 1): "a tunix Llama3 to PEFT: tests/test_key_maps_tunix.py",
    ("docs/guides/peft.md", 2): "a tunix Qwen3-MoE to PEFT: tests/test_key_maps_tunix.py",
    (
        "docs/guides/peft.md",
        4,
    ): "a Gemma-style fused kv and Mixtral experts: tests/test_peft_joined.py",
    (
        "docs/guides/sharding.md",
        0,
    ): "a mesh of several devices: tests/test_sharding.py (8 CPU devices)",
}
