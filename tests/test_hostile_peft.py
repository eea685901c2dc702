"""PEFT adapter files as untrusted input, and a `save_peft` that never loses or mixes data.

Files are written here by hand (``json`` and a safetensors writer of the tests' own, with
PEFT's names and no flax_lora mark: as PEFT or a model hub would give them), then damaged.
Each refusal must be the right exception type and name the file and the field (config) or the
tensor / module (safetensors); each accepted file must give the factors the file holds, with
PEFT's scale, against a float64 numpy reference. Hypothesis draws random bytes (both files),
random headers and random JSON values for each config field, judged by an oracle written
here from PEFT's rules. The memory test loads 1 GiB (sparse) hostile files in a subprocess
(tests/support/peft_memory.py). The `save_peft` tests snapshot the target's bytes before a
refused save and compare after.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file
from support.internal import _atomic, _safetensors
from support.peft_memory import make_cases
from support.trees import adapter_entries

import flax_lora as lora

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "base_model.model."
A_NAME, B_NAME = f"{PREFIX}lin.lora_A.weight", f"{PREFIX}lin.lora_B.weight"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_rng = np.random.default_rng(22)
W0 = _rng.normal(size=(4, 3)).astype(np.float32)  # Dense kernel (in 4, out 3)
A = _rng.normal(size=(2, 4)).astype(np.float32)  # PEFT's lora_A.weight (r, in)
B = _rng.normal(size=(3, 2)).astype(np.float32)  # PEFT's lora_B.weight (out, r)
PARAMS = {"params": {"lin": {"kernel": jnp.asarray(W0), "bias": jnp.zeros(3)}}}
BASE = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin"]}
DTYPE_CODES = {"F16": "<f2", "BF16": jnp.bfloat16, "F32": "<f4", "F64": "<f8"}


# -- helpers -------------------------------------------------------------------------------------
def st_bytes(tensors: dict[str, tuple[str, np.ndarray]], metadata: dict | None = None) -> bytes:
    """A safetensors file written here (not by the library): ``name -> (dtype code, array)``."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    data = b""
    for name, (code, x) in tensors.items():
        raw = np.ascontiguousarray(x).tobytes()
        header[name] = {
            "dtype": code,
            "shape": list(x.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def peft_dir(
    root: Path,
    cfg: dict | None = None,
    weights: bytes | None = None,
    raw_config: bytes | None = None,
) -> Path:
    """A fresh adapter directory under ``root``: ``BASE | cfg`` (or ``raw_config``) and the
    factors ``A``, ``B`` of module ``lin`` (or ``weights``)."""
    d = root / uuid.uuid4().hex[:10]
    d.mkdir(parents=True)
    content = raw_config if raw_config is not None else json.dumps(BASE | (cfg or {})).encode()
    (d / CONFIG).write_bytes(content)
    if weights is None:
        weights = st_bytes({A_NAME: ("F32", A), B_NAME: ("F32", B)})
    (d / WEIGHTS).write_bytes(weights)
    return d


def ref_delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """PEFT's delta of a Linear, in the Flax kernel's (in, out) layout, float64."""
    return scale * (a.astype(np.float64).T @ b.astype(np.float64).T)


def loaded(adapters: Any) -> lora.LoraWeights:
    return adapter_entries(adapters)["params/lin/kernel"]


def refused(exc: type[Exception], fn: Callable[[], Any], *names: str) -> str:
    """Runs ``fn``, which must raise ``exc`` (exactly) naming every one of ``names``."""
    with pytest.raises(exc) as info:
        fn()
    assert type(info.value) is exc, info.value
    msg = str(info.value)
    for name in names:
        assert name in msg, (name, msg)
    return msg


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


# -- adapter_config.json: each field it uses, checked ---------------------------------------------
NAN, INF = float("nan"), float("inf")
BAD_FIELDS = [
    ("lora_alpha", NAN, ValueError),
    ("lora_alpha", INF, ValueError),
    ("lora_alpha", -INF, ValueError),
    ("lora_alpha", 1e308, ValueError),
    ("lora_alpha", 10**400, ValueError),
    ("lora_alpha", "4", TypeError),
    ("lora_alpha", True, TypeError),
    ("lora_alpha", None, TypeError),
    ("use_rslora", "false", TypeError),
    ("use_rslora", 1, TypeError),
    ("use_dora", "true", TypeError),
    ("fan_in_fan_out", "no", TypeError),
    ("lora_dropout", 5, ValueError),
    ("lora_dropout", -1, ValueError),
    ("lora_dropout", 1.0, ValueError),
    ("lora_dropout", NAN, ValueError),
    ("lora_dropout", "0.1", TypeError),
    ("r", 2.5, TypeError),
    ("r", 2.0, TypeError),
    ("r", 0, ValueError),
    ("r", -2, ValueError),
    ("r", 2**40, ValueError),
    ("r", "two", TypeError),
    ("r", None, TypeError),
    ("r", [2], TypeError),
    ("r", True, TypeError),
    ("rank_pattern", ["lin"], TypeError),
    ("rank_pattern", "lin", TypeError),
    ("rank_pattern", {"lin": "2"}, TypeError),
    ("rank_pattern", {"lin": 0}, ValueError),
    ("rank_pattern", {"(": 2}, ValueError),
    ("alpha_pattern", {"lin": NAN}, ValueError),
    ("alpha_pattern", {"lin": [4]}, TypeError),
    ("alpha_pattern", {"a[": 4}, ValueError),
    ("modules_to_save", "classifier", TypeError),
    ("modules_to_save", [1], TypeError),
    ("target_parameters", "experts.w1", TypeError),
    ("target_modules", 5, TypeError),
    ("bias", 1, TypeError),
    ("bias", "some", ValueError),
    ("trainable_token_indices", "1,2", TypeError),
    ("trainable_token_indices", [-1], ValueError),
    ("trainable_token_indices", [1.5], TypeError),
    ("trainable_token_indices", {"emb": [True]}, TypeError),
    ("trainable_token_indices", {"(": [1]}, ValueError),
    ("peft_type", 3, TypeError),
    ("peft_type", "IA3", ValueError),
    ("task_type", 5, TypeError),
    ("layers_to_transform", "0", TypeError),
    ("layers_to_transform", [-1], TypeError),
    ("init_lora_weights", 3, TypeError),
]


@pytest.mark.parametrize(("field", "value", "exc"), BAD_FIELDS, ids=lambda x: repr(x)[:20])
def test_a_bad_field_is_refused_naming_file_and_field(
    root: Path, field: str, value: Any, exc: type[Exception]
) -> None:
    d = peft_dir(root, {field: value})
    refused(exc, lambda: lora.load_peft(d, PARAMS), str(d / CONFIG), repr(field))


def test_a_bad_pattern_key_is_named(root: Path) -> None:
    d = peft_dir(root, {"rank_pattern": {"lin": 2, "q(": 4}})
    msg = refused(ValueError, lambda: lora.load_peft(d, PARAMS), str(d / CONFIG), "'rank_pattern'")
    assert "'q('" in msg and "regular expression" in msg


@pytest.mark.parametrize("field", ["peft_type", "r", "lora_alpha"])
def test_a_missing_required_field_is_named(root: Path, field: str) -> None:
    d = peft_dir(
        root, raw_config=json.dumps({k: v for k, v in BASE.items() if k != field}).encode()
    )
    refused(ValueError, lambda: lora.load_peft(d, PARAMS), str(d / CONFIG), repr(field))


@pytest.mark.parametrize(
    ("raw", "exc"),
    [
        (b"[1, 2]", TypeError),
        (b"null", TypeError),
        (b'"LORA"', TypeError),
        (b"4", TypeError),
        (b"{", ValueError),
        (b"", ValueError),
        (b"\xff\xfe{}", ValueError),
        (b'{"r": 2,}', ValueError),
        (b"[" * 100_000, ValueError),  # nested too deeply for the parser
    ],
    ids=lambda x: repr(x)[:16],
)
def test_a_config_that_is_no_json_object_is_refused(
    root: Path, raw: bytes, exc: type[Exception]
) -> None:
    d = peft_dir(root, raw_config=raw)
    refused(exc, lambda: lora.load_peft(d, PARAMS), str(d / CONFIG))


def test_an_oversized_config_is_refused_unread(root: Path) -> None:
    d = peft_dir(root)
    with open(d / CONFIG, "r+b") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB of zero bytes
    msg = refused(ValueError, lambda: lora.load_peft(d, PARAMS), str(d / CONFIG))
    assert "larger than" in msg


@pytest.mark.parametrize(
    ("cfg", "scale", "dropout"),
    [
        ({}, 2.0, 0.0),
        ({"lora_alpha": 0.5}, 0.25, 0.0),
        ({"lora_alpha": -4}, -2.0, 0.0),
        ({"lora_alpha": 1e6}, 5e5, 0.0),
        ({"use_rslora": True}, 4 / math.sqrt(2), 0.0),
        ({"lora_dropout": 0.5, "use_rslora": None}, 2.0, 0.5),
        ({"rank_pattern": {"lin": 2}, "alpha_pattern": {"l.n": 8}}, 4.0, 0.0),
        ({"alpha_pattern": {"other": 8, "(?:li)n": 6}}, 3.0, 0.0),
        # PEFT's fields with their JSON types (nulls are defaults); unknown fields ignored
        (
            {
                "bias": None,
                "modules_to_save": None,
                "target_modules": "(lin|other)",
                "layers_to_transform": [0, 1],
                "layers_pattern": None,
                "init_lora_weights": "gaussian",
                "task_type": None,
                "fan_in_fan_out": False,
                "trainable_token_indices": None,
                "a_field_of_a_later_peft": {"anything": [1, "x"]},
            },
            2.0,
            0.0,
        ),
    ],
)
def test_valid_fields_load_with_peft_scale(
    root: Path, cfg: dict, scale: float, dropout: float
) -> None:
    w = loaded(lora.load_peft(peft_dir(root, cfg), PARAMS))
    assert w.scale == pytest.approx(scale, rel=1e-12) and w.dropout == dropout
    np.testing.assert_allclose(np.asarray(lora.delta(w)), ref_delta(A, B, scale), rtol=1e-5)


# -- hypothesis: random JSON values per field, judged by an oracle from PEFT's rules ---------------
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 5)
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(-2, 2)
    | st.text(max_size=6)
    | st.sampled_from(["LORA", "lora", "none", "all", "lora_only", "lin", "(", "l.n", "pissa"])
)
json_values = st.recursive(
    json_scalars,
    lambda kids: (
        st.lists(kids, max_size=3)
        | st.dictionaries(
            st.text(max_size=4) | st.sampled_from(["lin", "(", ".*", "l.n"]), kids, max_size=3
        )
    ),
    max_leaves=6,
)
FIELDS = [
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "target_parameters",
    "target_modules",
    "layers_pattern",
    "bias",
    "trainable_token_indices",
    "layers_to_transform",
    "task_type",
    "init_lora_weights",
    "peft_type",
]


def _rank_error(x: Any) -> type[Exception] | None:
    if type(x) is not int:
        return TypeError
    return None if 1 <= x <= 2**31 - 1 else ValueError


def _alpha_error(x: Any) -> type[Exception] | None:
    if type(x) not in (int, float):
        return TypeError
    return None if abs(x) <= 1e6 else ValueError  # NaN compares False


def _regex_ok(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except Exception:
        return False
    return True


def _ids_error(x: Any) -> type[Exception] | None:
    if type(x) is not list or any(type(i) is not int for i in x):
        return TypeError
    return ValueError if any(i < 0 for i in x) else None


def _pattern_outcome(v: Any, value_error: Callable) -> tuple[type[Exception] | None, Any]:
    """(error, the value PEFT picks for module ``lin``: the first key ``k`` matching
    ``(.*\\.)?(k)$``, else None)."""
    if v is None:
        return None, None
    if type(v) is not dict:
        return TypeError, None
    for k, x in v.items():
        if not _regex_ok(rf"(.*\.)?({k})$"):
            return ValueError, None
        if value_error(x):
            return value_error(x), None
    hit = next((x for k, x in v.items() if re.match(rf"(.*\.)?({k})$", "lin")), None)
    return None, hit


class Outcome(NamedTuple):
    error: type[Exception] | None  # None: it loads
    content: bool  # the error is a conflict with the tensors, not the field's type or range
    scale: float = 2.0
    dropout: float = 0.0


def _typed(error: type[Exception] | None) -> Outcome:
    return Outcome(error, False)


def oracle(field: str, v: Any) -> Outcome:
    """What `load_peft` must do with ``BASE | {field: v}`` (the file holds the rank-2 factors
    of ``lin``)."""
    strings = type(v) is list and all(type(s) is str for s in v)
    if field == "r":
        return (
            _typed(_rank_error(v))
            if _rank_error(v)
            else Outcome(None if v == 2 else ValueError, True)
        )
    if field == "lora_alpha":
        return _typed(_alpha_error(v)) if _alpha_error(v) else Outcome(None, False, v / 2)
    if field == "lora_dropout":
        if v is None:
            return Outcome(None, False)
        if type(v) not in (int, float):
            return _typed(TypeError)
        return Outcome(None, False, 2.0, float(v)) if 0 <= v < 1 else _typed(ValueError)
    if field in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if v is not None and type(v) is not bool:
            return _typed(TypeError)
        if field == "use_dora" and v:
            return Outcome(ValueError, True)  # the file holds no magnitudes
        return Outcome(None, False, 4 / math.sqrt(2) if field == "use_rslora" and v else 2.0)
    if field in ("rank_pattern", "alpha_pattern"):
        check = _rank_error if field == "rank_pattern" else _alpha_error
        err, hit = _pattern_outcome(v, check)
        if err or hit is None:
            return _typed(err)
        if field == "rank_pattern":
            return Outcome(None if hit == 2 else ValueError, True)
        return Outcome(None, False, hit / 2)
    if field in ("modules_to_save", "target_parameters"):
        if v is not None and not strings:
            return _typed(TypeError)
        # a target parameter named 'lin' (or its kernel) makes 'lin' a ParamWrapper parameter
        wrapped = field == "target_parameters" and {"lin", "kernel", "lin.kernel"} & set(v or ())
        return Outcome(ValueError if wrapped else None, True)
    if field in ("target_modules", "layers_pattern"):
        return _typed(None if v is None or type(v) is str or strings else TypeError)
    if field == "bias":
        if v is None:
            return _typed(None)
        if type(v) is not str:
            return _typed(TypeError)
        return _typed(None if v in ("none", "all", "lora_only") else ValueError)
    if field == "trainable_token_indices":
        if v is None:
            return _typed(None)
        if type(v) is list:
            err = _ids_error(v)
        elif type(v) is dict:
            errs = [ValueError if not _regex_ok(k) else _ids_error(ids) for k, ids in v.items()]
            err = next((e for e in errs if e), None)
        else:
            err = TypeError
        # valid ids, but the file holds no token rows
        return _typed(err) if err else Outcome(ValueError if v else None, True)
    if field == "layers_to_transform":
        index = lambda i: type(i) is int and i >= 0
        ok = v is None or index(v) or (type(v) is list and all(map(index, v)))
        return _typed(None if ok else TypeError)
    if field == "task_type":
        return _typed(None if v is None or type(v) is str else TypeError)
    if field == "init_lora_weights":
        return _typed(None if v is None or type(v) in (bool, str) else TypeError)
    assert field == "peft_type"
    if type(v) is not str:
        return _typed(TypeError)
    return _typed(None if v.upper() == "LORA" else ValueError)


NEAR = {  # values near each field's bounds, mixed into the random ones
    "r": [2, 1, 3, 0, -1, 2**31 - 1, 2**31, 2.0],
    "lora_alpha": [4, 0.5, -1, 0, 1e6, 1e6 + 1, -1e6, 1e300, 10**7],
    "lora_dropout": [0, 0.5, 0.999, 1, -0.1, -0.0],
    "rank_pattern": [{"lin": 2}, {"lin": 3}, {"l.n": 2}, {"other": 5}, {"(": 2}, {".*": 0}],
    "alpha_pattern": [{"lin": 8}, {"(?:li)n": -2}, {"other": 8, "lin": 1e7}, {"[": 1}],
    "modules_to_save": [["head"], [], ["lin"]],
    "target_parameters": [["lin"], ["experts.w1"], [], ["kernel"]],
    "bias": ["none", "all", "lora_only", "x", "NONE"],
    "trainable_token_indices": [[], {}, [1], {"emb": [1]}, {"(": [1]}, {"e": [-1]}],
    "layers_to_transform": [0, [0, 1], -1, [0, -1]],
    "peft_type": ["LORA", "lora", "IA3", "LoRa"],
    "init_lora_weights": [True, False, "gaussian", "pissa_niter_4", "olora"],
}


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(FIELDS), data=st.data())
def test_random_field_values_load_or_are_refused_by_name(
    root: Path, field: str, data: st.DataObject
) -> None:
    value = data.draw(json_values | st.sampled_from(NEAR.get(field, [None])), label=field)
    d = peft_dir(root, {field: value})
    out = oracle(field, value)
    if out.error is not None:
        # the field's type or range: the config file and the field; a conflict with the
        # tensors: the directory (and the field, but for a parameter PEFT would wrap)
        names = [str(d / CONFIG), repr(field)] if not out.content else [str(d)]
        if out.content and field != "target_parameters":
            names.append(field)
        refused(out.error, lambda: lora.load_peft(d, PARAMS), *names)
        event(f"refused: {out.error.__name__}{' (content)' if out.content else ''}")
        return
    event("loaded")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # init_lora_weights="pissa..." warns
        w = loaded(lora.load_peft(d, PARAMS))
    assert w.scale == pytest.approx(out.scale, rel=1e-12)
    assert w.dropout == pytest.approx(out.dropout)
    expected = ref_delta(A, B, out.scale)
    np.testing.assert_allclose(np.asarray(lora.delta(w)), expected, rtol=1e-5, atol=1e-30)


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=80) | json_values.map(lambda v: json.dumps(v).encode()))
def test_random_config_bytes_are_refused_naming_the_file(root: Path, raw: bytes) -> None:
    d = peft_dir(root, raw_config=raw)
    with pytest.raises((TypeError, ValueError)) as info:
        lora.load_peft(d, PARAMS)
    assert str(d / CONFIG) in str(info.value)


# -- adapter_model.safetensors: the header checked before any tensor is read ---------------------
def _header_file(header: Any, data: bytes = b"", length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(text) if length is None else length
    return n.to_bytes(8, "little") + text + data


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


GOOD_HEADER = {A_NAME: _entry("F32", [2, 4], 0, 32), B_NAME: _entry("F32", [3, 2], 32, 56)}
GOOD_DATA = A.tobytes() + B.tobytes()


def _changed(name: str, entry: Any, data: bytes = GOOD_DATA) -> bytes:
    """The good file with the header entry ``name`` replaced by ``entry``."""
    return _header_file(GOOD_HEADER | {name: entry}, data)


def _duplicated() -> bytes:
    """The good file whose header names A twice (valid JSON; Python's parser keeps the last)."""
    text = json.dumps(GOOD_HEADER)[:-1] + f", {json.dumps(A_NAME)}: [0]}}"
    return _header_file(text.encode(), GOOD_DATA)


BAD_FILES = {  # case -> (file, the tensor or thing the message names besides the file)
    "empty": (b"", None),
    "seven bytes": (b"\x01" * 7, None),
    "header past the end": (_header_file(GOOD_HEADER, GOOD_DATA, length=10_000), None),
    "huge header length": (_header_file(GOOD_HEADER, GOOD_DATA, length=2**63), None),
    "header not UTF-8": (_header_file(b"{\xff}"), None),
    "header not JSON": (_header_file(b"{'a': 1}"), None),
    "header a list": (_header_file([1, 2]), None),
    "metadata not strings": (_changed("__metadata__", {"format": 1}), "__metadata__"),
    "duplicate tensor": (_duplicated(), A_NAME),
    "entry not an object": (_changed(A_NAME, [1]), A_NAME),
    "entry without dtype": (_changed(A_NAME, {"shape": [2, 4], "data_offsets": [0, 32]}), A_NAME),
    "int8 factor": (_changed(A_NAME, _entry("I8", [2, 16], 0, 32)), A_NAME),
    "int64 factor": (_changed(A_NAME, _entry("I64", [2, 2], 0, 32)), A_NAME),
    "bool factor": (_changed(A_NAME, _entry("BOOL", [4, 8], 0, 32)), A_NAME),
    "fp8 factor": (_changed(A_NAME, _entry("F8_E4M3", [4, 8], 0, 32)), A_NAME),
    "negative dim": (_changed(A_NAME, _entry("F32", [-2, -4], 0, 32)), A_NAME),
    "bool dim": (_changed(A_NAME, _entry("F32", [True, 8], 0, 32)), A_NAME),
    "float dim": (_changed(A_NAME, _entry("F32", [2.0, 4], 0, 32)), A_NAME),
    "offsets of another size": (_changed(A_NAME, _entry("F32", [2, 4], 0, 24)), A_NAME),
    "reversed offsets": (_changed(A_NAME, _entry("F32", [0], 32, 0)), A_NAME),
    "overlapping": (_changed(B_NAME, _entry("F32", [3, 2], 8, 32)), B_NAME),
    "gap": (_changed(B_NAME, _entry("F32", [3, 2], 40, 64), GOOD_DATA + bytes(8)), B_NAME),
    "truncated data": (_header_file(GOOD_HEADER, GOOD_DATA[:-5]), B_NAME),
    "trailing bytes": (_header_file(GOOD_HEADER, GOOD_DATA + b"junk"), "bytes follow"),
    "0-D factor": (
        _header_file({A_NAME: _entry("F32", [], 0, 4), B_NAME: _entry("F32", [3, 2], 4, 28)})
        + GOOD_DATA[:28],
        A_NAME,
    ),
    "1-D factor": (_changed(A_NAME, _entry("F32", [8], 0, 32)), A_NAME),
    "no partner": (_header_file({A_NAME: GOOD_HEADER[A_NAME]}, A.tobytes()), "'lin'"),
    "no LoRA tensors": (_header_file({}), "no LoRA tensors"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_damaged_safetensors_file_is_refused_naming_file_and_tensor(
    root: Path, case: str
) -> None:
    content, tensor = BAD_FILES[case]
    d = peft_dir(root, weights=content)
    names = [str(d / WEIGHTS)] + ([tensor] if tensor else [])
    msg = refused(ValueError, lambda: lora.load_peft(d, PARAMS), *names)
    if "factor" in case and "D" in case:
        assert "'lin'" in msg  # the module
    if case.endswith(("int8 factor", "int64 factor", "bool factor", "fp8 factor")):
        assert "floating" in msg


def test_the_valid_header_of_those_cases_loads(root: Path) -> None:
    # the control: the same hand-written file, undamaged
    w = loaded(lora.load_peft(peft_dir(root, weights=_header_file(GOOD_HEADER, GOOD_DATA)), PARAMS))
    np.testing.assert_allclose(np.asarray(lora.delta(w)), ref_delta(A, B, 2.0), rtol=1e-5)


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_floating_factors_of_each_dtype_load_as_stored(root: Path, code: str) -> None:
    a, b = (x.astype(DTYPE_CODES[code]) for x in (A, B))
    d = peft_dir(root, weights=st_bytes({A_NAME: (code, a), B_NAME: (code, b)}))
    w = loaded(lora.load_peft(d, PARAMS))
    assert w.a.dtype == jnp.asarray(a).dtype and w.b.dtype == w.a.dtype  # F64: JAX's float32
    np.testing.assert_array_equal(np.asarray(w.a, np.float64), a.astype(np.float64).T)
    np.testing.assert_array_equal(np.asarray(w.b, np.float64), b.astype(np.float64).T)


def test_a_factor_that_does_not_fit_names_module_tensors_and_file(root: Path) -> None:
    wrong = st_bytes({A_NAME: ("F32", np.zeros((2, 5), np.float32)), B_NAME: ("F32", B)})
    d = peft_dir(root, weights=wrong)
    refused(
        ValueError,
        lambda: lora.load_peft(d, PARAMS),
        "'lin'",
        "lora_A.weight (2, 5)",
        str(d / WEIGHTS),
    )


@pytest.mark.parametrize("r", [4, 5])
def test_a_rank_above_both_features_of_the_kernel_is_refused(root: Path, r: int) -> None:
    # the kernel is 4 -> 3: rank 4 is the most an adapter of it can use; rank 5 (fitting the
    # config and both factor shapes) is refused, as a file could make it any size
    rng = np.random.default_rng(r)
    a, b = rng.normal(size=(r, 4)).astype(np.float32), rng.normal(size=(3, r)).astype(np.float32)
    d = peft_dir(root, {"r": r}, weights=st_bytes({A_NAME: ("F32", a), B_NAME: ("F32", b)}))
    if r == 5:
        refused(ValueError, lambda: lora.load_peft(d, PARAMS), "'lin'", "rank 5", str(d / WEIGHTS))
        return
    w = loaded(lora.load_peft(d, PARAMS))
    np.testing.assert_allclose(np.asarray(lora.delta(w)), ref_delta(a, b, 4 / r), rtol=1e-5)


def test_an_extra_tensor_larger_than_its_leaf_is_refused_unread(root: Path) -> None:
    big = st_bytes(
        {
            A_NAME: ("F32", A),
            B_NAME: ("F32", B),
            f"{PREFIX}lin.bias": ("F32", np.zeros(5, np.float32)),
        }
    )
    d = peft_dir(root, {"bias": "all"}, weights=big)
    refused(
        ValueError,
        lambda: lora.load_peft(d, PARAMS),
        f"{PREFIX}lin.bias",
        "'params/lin/bias'",
        str(d / WEIGHTS),
    )


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=200))
def test_random_bytes_are_refused_naming_the_file(root: Path, raw: bytes) -> None:
    d = peft_dir(root, weights=raw)
    refused(ValueError, lambda: lora.load_peft(d, PARAMS), str(d / WEIGHTS))


near_ints = st.integers(-2, 64) | st.sampled_from([2**31, 2**64, 2**70])
entry_fields = {
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "I64", "BOOL", "U8", "x"]),
    "shape": st.lists(near_ints, max_size=3),
    "data_offsets": st.lists(near_ints, max_size=3),
}


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    """The good hand-written file, changed in one way: harmlessly (the header padded with
    spaces, metadata strings added), one header field of one tensor replaced (by a near-valid
    value or any JSON value), an entry added, or the data cut or extended."""
    header, data, pad = json.loads(json.dumps(GOOD_HEADER)), GOOD_DATA, b""
    how = draw(st.sampled_from(["none", "pad", "metadata", "field", "field", "entry", "data"]))
    if how == "pad":
        pad = b" " * draw(st.integers(1, 9))
    elif how == "metadata":
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5)))
    elif how == "field":
        name = draw(st.sampled_from([A_NAME, B_NAME]))
        key = draw(st.sampled_from(sorted(entry_fields)))
        header[name][key] = draw(entry_fields[key] | json_values)
    elif how == "entry":
        extra = draw(st.sampled_from([f"{PREFIX}x", "__metadata__", f"{PREFIX}lin.bias"]))
        header[extra] = draw(json_values)
    elif how == "data":
        cut = draw(st.integers(0, len(data) - 1))
        data = draw(st.sampled_from([data[:cut], data + draw(st.binary(min_size=1, max_size=8))]))
    return _header_file(json.dumps(header).encode() + pad, data)


@settings(max_examples=200, deadline=None)
@given(content=mutated_files())
def test_mutated_headers_load_the_file_or_are_refused(root: Path, content: bytes) -> None:
    d = peft_dir(root, weights=content)
    try:
        w = loaded(lora.load_peft(d, PARAMS))
    except ValueError as e:
        assert str(d / WEIGHTS) in str(e)
        event("refused")
        return
    event("loaded")
    # loaded: then the safetensors library reads the same factors from it
    tensors = load_file(str(d / WEIGHTS))
    a, b = tensors[A_NAME], tensors[B_NAME]
    expected = ref_delta(a, b, 2.0)
    np.testing.assert_allclose(
        np.asarray(lora.delta(w), np.float64), expected, rtol=1e-5, atol=1e-6
    )


def test_hostile_1gib_files_are_refused_without_reading_them(tmp_path: Path) -> None:
    cases = make_cases(tmp_path)  # sparse files: a few KiB on disk
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH")) if p
    )
    proc = subprocess.run(
        [sys.executable, "-m", "support.peft_memory", str(tmp_path), *cases],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    for case in cases:
        r = result[case]
        assert result["file_bytes"][case] >= 1 << 30
        assert r["error"] is not None and r["error"].startswith("ValueError: "), (case, r)
        assert str(tmp_path / case) in r["error"], (case, r)  # the file, or its directory
        assert r["extra_mib"] < 50, (case, r)  # (main before issue 22: +2048 MiB, 6-9 s)
        assert r["seconds"] < 5, (case, r)


# -- save_peft: never replaces what it did not write; a reader never mixes two saves ---------------
@pytest.fixture(scope="module")
def adapters(root: Path) -> Any:
    return lora.load_peft(peft_dir(root), PARAMS)


def _other(adapters: Any) -> Any:
    """The adapters with another scale (so that a config changes with them)."""
    w = loaded(adapters)
    return {"params": {"lin": {"kernel": w.replace(scale=3.0)}}}


def test_save_peft_writes_a_new_folder_through_a_staging_folder(
    tmp_path: Path, adapters: Any
) -> None:
    target = tmp_path / "sub" / "adapter"
    assert lora.save_peft(target, adapters) == target
    assert sorted(os.listdir(target.parent)) == ["adapter"]  # no staging folder left
    assert sorted(os.listdir(target)) == [CONFIG, WEIGHTS]
    w = loaded(lora.load_peft(target, PARAMS))
    np.testing.assert_allclose(np.asarray(lora.delta(w)), ref_delta(A, B, 2.0), rtol=1e-5)


def test_save_peft_marks_its_files_with_the_config_hash(tmp_path: Path, adapters: Any) -> None:
    lora.save_peft(tmp_path, adapters)
    with open(tmp_path / WEIGHTS, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    assert meta["format"] == "pt" and meta["flax_lora.save_peft"] == "1"
    assert (
        meta["flax_lora.config_sha256"]
        == hashlib.sha256((tmp_path / CONFIG).read_bytes()).hexdigest()
    )


def test_save_peft_leaves_the_other_files_of_a_folder_alone(tmp_path: Path, adapters: Any) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / f".{WEIGHTS}.mine").write_text("mine too")
    lora.save_peft(tmp_path, adapters)
    lora.save_peft(tmp_path, _other(adapters))  # replaces its own pair
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / f".{WEIGHTS}.mine").read_text() == "mine too"
    assert loaded(lora.load_peft(tmp_path, PARAMS)).scale == pytest.approx(3.0)


@pytest.mark.parametrize(
    "present",
    [
        {
            WEIGHTS: st_bytes({A_NAME: ("F32", A), B_NAME: ("F32", B)}, {"format": "pt"}),
            CONFIG: b"{}",
        },
        {CONFIG: json.dumps(BASE).encode()},
        {WEIGHTS: b"garbage"},
        {WEIGHTS: st_bytes({A_NAME: ("F32", A)}, {"format": "pt"})},
    ],
    ids=["peft pair", "config alone", "garbage", "foreign weights alone"],
)
def test_save_peft_refuses_files_it_did_not_write(
    tmp_path: Path, adapters: Any, present: dict[str, bytes]
) -> None:
    for name, content in present.items():
        (tmp_path / name).write_bytes(content)
    before = snapshot(tmp_path)
    refused(ValueError, lambda: lora.save_peft(tmp_path, adapters), str(tmp_path), "did not write")
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == sorted(present)


def test_save_peft_refuses_a_file_or_link_in_place_of_the_folder(
    tmp_path: Path, adapters: Any
) -> None:
    (tmp_path / "file").write_text("precious")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for target in (tmp_path / "file", tmp_path / "dangling"):
        refused(
            ValueError, lambda t=target: lora.save_peft(t, adapters), str(target), "not a folder"
        )
    assert (tmp_path / "file").read_text() == "precious" and os.path.islink(tmp_path / "dangling")
    assert sorted(os.listdir(tmp_path)) == ["dangling", "file"]


def test_overwrite_false_refuses_any_existing_pair(tmp_path: Path, adapters: Any) -> None:
    lora.save_peft(tmp_path, adapters, overwrite=False)  # nothing there yet: fine
    before = snapshot(tmp_path)
    refused(
        ValueError,
        lambda: lora.save_peft(tmp_path, _other(adapters), overwrite=False),
        str(tmp_path),
        "overwrite=False",
    )
    assert snapshot(tmp_path) == before


def test_a_save_stopped_between_its_renames_is_detected(
    tmp_path: Path, adapters: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    lora.save_peft(tmp_path, adapters)
    real_replace, calls = os.replace, []

    def replace_then_die(src: Any, dst: Any) -> None:
        calls.append(dst)
        if len(calls) == 2:  # the config's rename: the process dies here
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        lora.save_peft(tmp_path, _other(adapters))
    monkeypatch.undo()
    assert [Path(c).name for c in calls] == [WEIGHTS, CONFIG]
    assert sorted(os.listdir(tmp_path)) == [CONFIG, WEIGHTS]  # temporary files removed
    # new tensors, old config: a reader refuses them
    refused(ValueError, lambda: lora.load_peft(tmp_path, PARAMS), str(tmp_path), "interrupted")
    lora.save_peft(tmp_path, _other(adapters))  # the next save replaces the pair
    assert loaded(lora.load_peft(tmp_path, PARAMS)).scale == pytest.approx(3.0)


def test_a_config_edited_after_save_peft_is_used_with_a_warning(
    tmp_path: Path, adapters: Any
) -> None:
    lora.save_peft(tmp_path, adapters)
    cfg = json.loads((tmp_path / CONFIG).read_text())
    (tmp_path / CONFIG).write_text(json.dumps(cfg | {"lora_alpha": 40}))
    with pytest.warns(UserWarning, match="changed after the save"):
        got = loaded(lora.load_peft(tmp_path, PARAMS))
    assert got.scale == pytest.approx(40 / cfg["r"])  # the edited alpha, as PEFT would read it


def test_dead_saves_temporary_files_are_removed_by_the_next_save(
    tmp_path: Path, adapters: Any
) -> None:
    lora.save_peft(tmp_path, adapters)
    dead = [tmp_path / f".{WEIGHTS}.{'0' * 16}.tmp", tmp_path / f".{CONFIG}.{'a' * 16}.tmp"]
    for p in dead:
        p.write_text("left by a killed save")
    lora.save_peft(tmp_path, adapters)
    assert sorted(os.listdir(tmp_path)) == [CONFIG, WEIGHTS]


def test_a_folder_made_meanwhile_is_written_into_not_replaced(
    tmp_path: Path, adapters: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    target, real_rename = tmp_path / "adapter", _atomic.rename

    def someone_else_first(src: Any, dst: Any, mode: Any = "replace") -> None:
        Path(dst).mkdir()
        (Path(dst) / "theirs.txt").write_text("theirs")
        real_rename(src, dst, mode)

    monkeypatch.setattr(_atomic, "rename", someone_else_first)
    lora.save_peft(target, adapters)
    monkeypatch.undo()
    assert sorted(os.listdir(target)) == [CONFIG, WEIGHTS, "theirs.txt"]
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # the staging folder is gone
    assert loaded(lora.load_peft(target, PARAMS)).scale == pytest.approx(2.0)


@pytest.mark.parametrize("view", ["transposed", "sliced"])
def test_every_tensor_is_written_c_contiguous(tmp_path: Path, view: str) -> None:
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    t = x.T if view == "transposed" else x[:, ::2]
    assert not t.flags.c_contiguous
    _safetensors.write(str(tmp_path / "t.safetensors"), {"t": t}, {"format": "pt"})
    np.testing.assert_array_equal(load_file(str(tmp_path / "t.safetensors"))["t"], t)


def test_save_peft_refuses_an_alpha_load_peft_would_refuse(tmp_path: Path, adapters: Any) -> None:
    w = loaded(adapters)
    huge = {"params": {"lin": {"kernel": w.replace(scale=1e7)}}}
    refused(
        ValueError,
        lambda: lora.save_peft(tmp_path / "x", huge),
        "'params/lin/kernel'",
        "lora_alpha",
    )
    assert not (tmp_path / "x").exists()


def test_a_dead_saves_staging_folder_is_removed_by_the_next_save(
    tmp_path: Path, adapters: Any
) -> None:
    target = tmp_path / "adapter"
    dead = _atomic.staging_path(target, 0x0000000F)  # a save killed before its rename
    (dead / _atomic.CHECKPOINT).mkdir(parents=True)
    (dead / _atomic.CHECKPOINT / WEIGHTS).write_bytes(b"half written")
    user = tmp_path / ".adapter.saving-notes"  # not the staging pattern: never touched
    user.mkdir()
    lora.save_peft(target, adapters)
    assert sorted(os.listdir(tmp_path)) == [".adapter.saving-notes", "adapter"]
    assert sorted(os.listdir(target)) == [CONFIG, WEIGHTS]
    assert loaded(lora.load_peft(target, PARAMS)).scale == pytest.approx(2.0)
