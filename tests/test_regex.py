"""The linear-time matcher behind every pattern a user or a file gives (`flax_lora._regex`).

Its answers are compared with Python's ``re`` (random patterns from a small grammar, and a
table of hand-picked ones); hostile patterns that make ``re`` backtrack exponentially are
matched in a number of set steps bounded by the text's length (counted, not timed); the public
API (`LoraConfig`, `lora.init`, `lora.load_peft`, `lora.quantize`, `lora.trainable`) is shown to
take such patterns and to refuse the constructs the matcher does not support, naming the field.

The reference for ``search`` is ``re``'s ``match`` tried at every position, not ``re.search``:
CPython's search skips start positions with a charset prefix built under the pattern's global
flags, so ``re.search(r"(?a:\\W)", "ß")`` finds nothing though ``re.fullmatch`` matches
``"ß"`` (3.11 and 3.13); the matcher answers by the documented semantics.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.internal import _regex
from support.trees import adapter_entries, leaves_by_path

import flax_lora as lora


def reference(pattern: str, text: str) -> tuple[bool, bool]:
    """``(fullmatch, search)`` as Python's ``re`` answers them (see the module docstring)."""
    compiled = re.compile(pattern)
    found = any(compiled.match(text, i) for i in range(len(text) + 1))
    return compiled.fullmatch(text) is not None, found


def ours(pattern: str, text: str) -> tuple[bool, bool]:
    p = _regex.compile(pattern)
    return p.fullmatch(text), p.search(text)


# ---------------------------------------------------------------------------------------------
# differential: random patterns from a small grammar, random texts
# ---------------------------------------------------------------------------------------------
ATOMS = [
    *"aAbkK_1 .-\n",
    *[r"\w", r"\W", r"\d", r"\D", r"\s", r"\S", r"\.", r"\n", "[ab]", "[^a]", "[a-c]"],
    *[r"[^\W_]", r"[\s\d]", "[-a]", "é", "É", "ß", "ſ", "\u212a", "İ", "i", "(?:)", "(|a)"],
    *["^", "$", r"\A", r"\Z", r"\b", r"\B", "(?:a*)*", "(?:a?)+?", "b{0}"],
]
QUANTIFIERS = ["*", "+", "?", "*?", "+?", "??", "{2}", "{1,3}", "{,2}", "{2,}?", "{0,1}"]
SCOPED = ["i", "s", "m", "a", "-i", "i-s", "ms", "a-m"]
TEXT_ALPHABET = "aaabAkK_1 .-\n\néÉßsSſ\u212aİi"

patterns = st.recursive(
    st.sampled_from(ATOMS),
    lambda inner: st.one_of(
        st.tuples(inner, inner).map("".join),
        st.tuples(inner, inner).map(lambda t: f"(?:{t[0]}|{t[1]})"),
        st.tuples(inner, st.sampled_from(QUANTIFIERS)).map(lambda t: f"(?:{t[0]}){t[1]}"),
        inner.map(lambda p: f"({p})"),
        st.tuples(st.sampled_from(SCOPED), inner).map(lambda t: f"(?{t[0]}:{t[1]})"),
    ),
    max_leaves=7,
)
global_flags = st.sampled_from(["", "", "", "(?i)", "(?s)", "(?m)", "(?a)", "(?im)", "(?x)"])


@settings(max_examples=400, deadline=None)
@given(global_flags, patterns, st.lists(st.text(TEXT_ALPHABET, max_size=8), min_size=1, max_size=4))
def test_random_patterns_agree_with_re(flags: str, body: str, texts: list[str]) -> None:
    pattern = flags + body
    try:
        re.compile(pattern)
    except re.error:  # e.g. (?a) with a scoped (?u)-like mix: invalid for both
        with pytest.raises(ValueError, match="is not a valid regex"):
            _regex.compile(pattern)
        return
    for text in texts:
        assert ours(pattern, text) == reference(pattern, text), (pattern, text)


# ---------------------------------------------------------------------------------------------
# differential: hand-picked patterns over a table of texts
# ---------------------------------------------------------------------------------------------
TEXTS = [
    *["", "a", "ab", "aB", "abc", "aaab", "foo bar", "foo_bar", "x\n", "\n", "a\nb", "a\nb\n"],
    *["héllo", "ÉCOLE", "Straße", "STRASSE", "\u212a", "k", "K", "123", "\u0661\u0662", "ǅ"],
    *["params/h0/attn/query/kernel", "params/h11/mlp/fc1/kernel", "encoder.layer.11.query"],
    *["model.layers.0.self_attn.q_proj", "lm_head", "a.b", "a-b", "2024-01-31", "\t \u00a0", "xZ"],
]
PATTERNS = [
    # literals, classes, negations, ranges, categories, dot
    *["a", "ab", ".", "..", "[ab]+", "[^ab]+", "[a-c]*", "[^a-c\\s]+", r"\d+", r"\D+", r"\w+"],
    *[r"\W", r"\s+", r"\S+", "[.]", r"a\.b", "[-a]+", r"[\w.]+", r"[^\W\d]+", "[]a]", "[a^]+"],
    *[r"\u00e9", r"\x41", "\u212a", r"[\u0600-\u06ff]+", "[ß]", "(?s:.)+", "[^\n]+"],
    # alternation, groups (capturing, non-capturing, named), repeats greedy and lazy
    *["a|b", "(a|ab)(c|bcd)", "(?:a|b)*c", "(?P<x>a+)b", "(a*)*b", "(a|a)*b", "(.)+Z"],
    *["a{2}", "a{1,2}", "a{,2}", "a{2,}", "a{2,3}?", "(?:ab){1,3}", "a*?b", "a+?", "a??b"],
    *["(?:a{0,2}){2,}", "(?:(?:a|b){2}){1,2}", "x*", "(?:)", "()*", "(|a)+", r"\d{4}-\d{2}-\d{2}"],
    # anchors and word boundaries
    *["^a", "a$", "^$", "$", "^", r"\Aa", r"a\Z", r"\A\Z", "^a$", "(?m)^b", "(?m)a$", "(?m)^$"],
    *[r"\bfoo\b", r"\Bo", r"\b", r"\B", r"\bbar", r"o\b", r"(?a)\b\w+\b", r"(?a:\b)é", "$\n"],
    # inline flags, global and scoped
    *["(?i)straße", "(?i)STRASSE", "(?i)k", "(?i)[k-k]", "(?i:A)b", "(?i)a(?-i:b)", "(?a)\\w+"],
    *["(?a:\\w)+", "(?ia)k", "(?s)a.b", "(?x) a b # comment", "(?a:\\W)", "(?i)[^a]", "(?i)é"],
    # PEFT's pattern keys as load_peft matches them (re.match with (.*\.)?(key)$)
    *[r"\A(.*\.)?(q_proj)$", r"\A(.*\.)?(layers\.0\..*)$", r"\A(.*\.)?(query|lm_head)$"],
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_hand_picked_patterns_agree_with_re(pattern: str) -> None:
    got = [ours(pattern, t) for t in TEXTS]
    assert got == [reference(pattern, t) for t in TEXTS]
    assert any(f or s for f, s in got)  # each pattern matches some text of the table


def test_search_follows_the_documented_semantics_where_re_search_skips() -> None:
    assert ours(r"(?a:\W)", "ß") == (True, True)
    assert ours(r"x(?a:\W)", "xß") == (True, True)


def test_compiled_patterns_are_cached_and_bad_types_named() -> None:
    assert _regex.compile(r"(\w+)+!") is _regex.compile(r"(\w+)+!", "other")
    assert _regex.fullmatch("a+", "aa") and _regex.search("b", "abc")
    with pytest.raises(TypeError, match=r"LoraConfig\.targets must be a regex string"):
        _regex.compile(b"a", "LoraConfig.targets")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# refused: named, with the pattern and the caller's field
# ---------------------------------------------------------------------------------------------
REFUSED = [
    (r"(a)\1", "a backreference"),
    (r"(?P<x>a)(?P=x)", "a backreference"),
    ("(?=a)a", "a lookahead"),
    ("a(?!b)", "a negative lookahead"),
    ("(?<=a)b", "a lookbehind"),
    ("(?<!a)b", "a negative lookbehind"),
    ("(a)?(?(1)b|c)", "a conditional"),
    ("(?>a*)a", "an atomic group"),
    ("a*+a", "a possessive repeat"),
    ("(?:ab){2}+", "a possessive repeat"),
    ("a{20000}", "too large"),
    ("(?:a{100}){200}", "too large"),
    ("(", "is not a valid regex"),
    ("a{3,2}", "is not a valid regex"),
    ("a**", "is not a valid regex"),
    ("a(?i)b", "is not a valid regex"),
]


@pytest.mark.parametrize("pattern, why", REFUSED)
def test_refused_constructs_are_named(pattern: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"Field.x: {pattern!r} ") + ".*" + why):
        _regex.compile(pattern, "Field.x")


def test_possessive_is_refused_because_its_language_differs() -> None:
    assert re.fullmatch("a*+a", "aa") is None and re.fullmatch("a*a", "aa") is not None


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("targets", dict(targets=[".*kernel", r"(a)\1"])),
        ("exclude", dict(exclude="(?=x)")),
        ("rank_pattern", dict(rank_pattern={"(?<=a)b": 2})),
        ("alpha_pattern", dict(alpha_pattern={"a*+": 2.0})),
        ("layers_pattern", dict(layers=[0], layers_pattern="(?>h)")),
        ("modules_to_save", dict(modules_to_save="a{99999}")),
        ("trainable_token_indices", dict(trainable_token_indices={"(": [1]})),
    ],
)
def test_lora_config_names_the_field_of_a_refused_pattern(field: str, kwargs: Any) -> None:
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}: '"):
        lora.LoraConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# hostile patterns: set steps bounded by the text's length
# ---------------------------------------------------------------------------------------------
BERT = "roberta_model_for_sequence_classification.encoder.layer.11.attention.self.query"
PATH = "params/" + BERT.replace(".", "/") + "/kernel"
HOSTILE = [
    (r"(\w+)+!", BERT, False, False),  # a rank_pattern key, against a module name
    (r"\A(.*\.)?((\w+)+!)$", BERT, False, False),  # ... as load_peft wraps it
    (r"(.+)+Z", PATH, False, False),  # targets=, against a kernel path
    (r"(\w+)+!", "a" * 10_000, False, False),
    (r"(.+)+Z", "x/" * 5_000, False, False),
    ("(a|a)*b", "a" * 10_000, False, False),
    ("(a*)*b", "a" * 10_000, False, False),
    ("(a*)*b", "a" * 10_000 + "b", True, True),
    ("(a|a)*b", "a" * 9_999 + "ba", False, True),
]


@pytest.mark.parametrize("pattern, text, full, found", HOSTILE)
def test_hostile_patterns_take_steps_linear_in_the_text(
    pattern: str, text: str, full: bool, found: bool
) -> None:
    p = _regex.compile(pattern)
    before = p.set_steps
    assert (p.fullmatch(text), p.search(text)) == (full, found)
    steps = p.set_steps - before
    assert steps <= 2 * (len(text) + 1)  # at most one set step per character and call
    if len(text) > 1000:  # a repetitive text meets few DFA states: the rest are dict lookups
        assert steps <= 40


def test_a_pattern_with_many_dfa_states_stays_linear_and_right(monkeypatch: Any) -> None:
    """``(a|b)*a(a|b){12}`` has 2^13 DFA states; with the cache capped at 8 states it starts
    over again and again, and still answers as ``re`` does, one set step per character."""
    monkeypatch.setattr(_regex, "MAX_STATES", 8)
    rng = random.Random(0)
    pattern = "(a|b)*a(a|b){12}"
    for n in (0, 12, 13, 14, 500, 3000):
        text = "".join(rng.choice("ab") for _ in range(n))
        p = _regex.compile(pattern)
        before = p.set_steps
        assert p.fullmatch(text) == (re.fullmatch(pattern, text) is not None)
        assert p.search(text) == ("a" in text[:-12] if n > 12 else False)
        assert p.set_steps - before <= 2 * (n + 1)


# ---------------------------------------------------------------------------------------------
# through the public API
# ---------------------------------------------------------------------------------------------
def bert_like_params(seed: int = 0) -> dict[str, Any]:
    """A params tree with long BERT-like paths (2-D kernels: no probe needed)."""
    rng = np.random.default_rng(seed)

    def dense(i: int, o: int) -> dict[str, np.ndarray]:
        w = rng.standard_normal((i, o)).astype(np.float32)
        return {"kernel": w, "bias": np.zeros(o, np.float32)}

    def layer() -> dict[str, Any]:
        heads = {k: dense(8, 8) for k in ("query", "key", "value")}
        return {"attention": {"self": heads, "output": {"dense": dense(8, 8)}}}

    encoder = {"layer": {str(i): layer() for i in (0, 11)}}
    model = {"roberta_model_for_sequence_classification": {"encoder": encoder}}
    return {"params": {**model, "classifier": dense(8, 2)}}


def test_init_with_a_hostile_target_pattern() -> None:
    params = bert_like_params()
    config = lora.LoraConfig(rank=2, targets=["(.+)+Z", r".*/query/kernel"])
    adapters = lora.init(jax.random.key(0), params, config)
    expected = {p for p in leaves_by_path(params) if p.endswith("/query/kernel")}
    assert set(adapter_entries(adapters)) == expected and len(expected) == 2
    assert len(max(expected, key=len)) > 80


def test_load_peft_with_hostile_pattern_keys(tmp_path: Path) -> None:
    params = bert_like_params()
    config = lora.LoraConfig(
        rank=4, alpha=8.0, rank_pattern={"query": 2}, alpha_pattern={"value": 3.0}, init="random"
    )
    adapters = lora.init(jax.random.key(1), params, config)
    lora.save_peft(tmp_path, adapters, config)
    file = tmp_path / "adapter_config.json"
    cfg = json.loads(file.read_text())
    assert len(max(cfg["rank_pattern"], key=len)) > 60  # module names of 60+ characters
    for field, value in (("rank_pattern", 3), ("alpha_pattern", 5.0)):
        cfg[field] = {r"(\w+)+!": value, **cfg[field]}  # first, so it is tried on every module
    file.write_text(json.dumps(cfg))
    back = lora.load_peft(tmp_path, params)
    assert jax.tree.structure(back) == jax.tree.structure(adapters)  # scales included
    for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    entries = adapter_entries(back)
    ranks = {p.split("/")[-2]: e.a.shape[-1] for p, e in entries.items()}
    scales = {p.split("/")[-2]: e.scale for p, e in entries.items()}
    assert ranks == {"query": 2, "key": 4, "value": 4, "dense": 4, "classifier": 4}
    assert scales == {"query": 4.0, "key": 2.0, "value": 0.75, "dense": 2.0, "classifier": 2.0}


def test_load_peft_names_the_file_field_of_a_refused_key(tmp_path: Path) -> None:
    params = bert_like_params()
    config = lora.LoraConfig(rank=2, targets=r".*/query/kernel")
    lora.save_peft(tmp_path, lora.init(jax.random.key(0), params, config), config)
    file = tmp_path / "adapter_config.json"
    cfg = json.loads(file.read_text())
    cfg["rank_pattern"] = {r"(q)\1": 3}
    file.write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match=r"adapter_config\.json'?: field 'rank_pattern'.*backreference"
    ):
        lora.load_peft(tmp_path, params)


def test_quantize_and_trainable_with_hostile_patterns() -> None:
    params = bert_like_params()
    q = lora.quantize(params, targets=["(.+)+Z", r".*/key/kernel"], dtype="int8")
    quantized = leaves_by_path(q, is_leaf=lambda x: isinstance(x, lora.QuantizedKernel))
    chosen = {p for p, x in quantized.items() if isinstance(x, lora.QuantizedKernel)}
    assert chosen == {p for p in leaves_by_path(params) if p.endswith("/key/kernel")}
    mask = leaves_by_path(lora.trainable(params, also=r"(\w+)+!|classifier/bias"))
    assert {p for p, m in mask.items() if m} == {"params/classifier/bias"}
    with pytest.raises(ValueError, match=r"lora\.trainable: also: '\(\?<=a\)b' uses"):
        lora.trainable(params, also="(?<=a)b")
    with pytest.raises(ValueError, match=r"lora\.quantize: targets: '\(a\)\\\\1' uses"):
        lora.quantize(params, targets=r"(a)\1")
